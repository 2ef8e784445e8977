//! Command-line flags, shared by the `treaty-coordinator` binary and `treaty demo`.

use std::path::PathBuf;
use std::time::Duration;

/// Treaty's two-phase-commit coordinator.
#[derive(clap::Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "TREATY_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: String,
    /// Directory for the decision log (created if missing).
    #[arg(long, env = "TREATY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Participant addresses, comma-separated; participant ids are 1..N in this order.
    #[arg(long, env = "TREATY_PARTICIPANTS", value_delimiter = ',', required = true)]
    pub participants: Vec<String>,
    /// Longest wait for a PREPARE vote (ms).
    #[arg(long, env = "TREATY_PREPARE_TIMEOUT_MS", default_value_t = 3000)]
    pub prepare_timeout_ms: u64,
    /// A participant silent this long is suspected (ms).
    #[arg(long, env = "TREATY_DETECT_MS", default_value_t = 1000)]
    pub detect_ms: u64,
    /// Read lease length (ms). A dead participant stalls writes for at most
    /// about detect + lease + 200 ms before it is excluded.
    #[arg(long, env = "TREATY_LEASE_MS", default_value_t = 2000)]
    pub lease_ms: u64,
    /// PREPARE batches in flight per participant at once. 1 measured best
    /// here: while one batch is out, the next grows, and each costs one sync.
    #[arg(long, env = "TREATY_PREPARE_PIPELINE", default_value_t = 1)]
    pub prepare_pipeline: usize,
    /// Writes are refused when fewer participants than this are in the view.
    /// With --replication below the participant count: writes to a key are
    /// refused when fewer than min(this, replication) of its replicas are.
    #[arg(long, env = "TREATY_MIN_REPLICAS", default_value_t = 3)]
    pub min_replicas: usize,
    /// How many participants hold each key (default: all of them, full
    /// copies). Fixed when the cluster is created: a restart may repeat it
    /// or leave it out, not change it.
    #[arg(long, env = "TREATY_REPLICATION")]
    pub replication: Option<usize>,
    /// The decision log keeps at least the newest this many commits (their
    /// entries and outcomes: a retry of one of them is answered, not run
    /// again) ...
    #[arg(long, env = "TREATY_RETAIN_COMMITS", default_value_t = crate::DEFAULT_RETAIN_COMMITS)]
    pub retain_commits: u64,
    /// ... and every commit younger than this many seconds. Older entries
    /// that every member has applied are compacted away.
    #[arg(long, env = "TREATY_RETAIN_SECS", default_value_t = crate::DEFAULT_RETAIN_FOR.as_secs())]
    pub retain_secs: u64,

    #[command(flatten)]
    pub security: treaty_common::cli::SecurityArgs,
}

/// Runs the server as the binary does; returns only on shutdown or error.
pub async fn main_with(args: Args) -> i32 {
    treaty_common::init_tracing(args.security.log_format);
    let listener = match treaty_common::start_server("treaty-coordinator", &args.listen).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let security = match args.security.server_security(
        "treaty-coordinator",
        &args.listen,
        treaty_common::tls::Identity::Coordinator,
    ) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let participants = args.participants.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
    let mut config = crate::Config::new(args.data_dir, participants, security);
    config.max_connections = args.security.max_connections;
    config.frame_timeout = Duration::from_millis(args.security.frame_timeout_ms.max(100));
    config.prepare_timeout = Duration::from_millis(args.prepare_timeout_ms);
    config.prepare_pipeline = args.prepare_pipeline.max(1);
    config.membership.detect_ms = args.detect_ms;
    config.membership.lease_ms = args.lease_ms;
    config.membership.min_replicas = args.min_replicas;
    if args.min_replicas == 0 || args.min_replicas > config.participants.len() {
        eprintln!(
            "treaty-coordinator: --min-replicas must be between 1 and the number of participants ({})",
            config.participants.len()
        );
        return 2;
    }
    if let Some(r) = args.replication {
        if r == 0 || r > config.participants.len() {
            eprintln!(
                "treaty-coordinator: --replication {r} is out of range: each key needs 1 to {} replicas (the number \
                 of participants)",
                config.participants.len()
            );
            return 2;
        }
    }
    config.replication = args.replication;
    config.metrics = args.security.metrics.clone();
    config.retain_commits = args.retain_commits.max(1);
    config.retain_for = Duration::from_secs(args.retain_secs);
    if let Err(e) = crate::run(listener, config, treaty_common::shutdown_signal()).await {
        eprintln!("treaty-coordinator: {e:#}");
        return 1;
    }
    0
}
