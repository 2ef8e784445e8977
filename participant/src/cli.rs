//! Command-line flags, shared by the `treaty-participant` binary and `treaty demo`.

use std::path::PathBuf;
use std::time::Duration;

/// A Treaty replica: votes in two-phase commit, keeps its data in memory
/// over a write-ahead log and checkpoints, serves reads.
#[derive(clap::Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// This replica's id: its 1-based position in the coordinator's --participants.
    #[arg(long, env = "TREATY_ID")]
    pub id: u64,
    /// Address to listen on.
    #[arg(long, env = "TREATY_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: String,
    /// Directory for data and WAL (created if missing).
    #[arg(long, env = "TREATY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The coordinator's address.
    #[arg(long, env = "TREATY_COORDINATOR", default_value = "127.0.0.1:7000")]
    pub coordinator: String,
    /// How long a write or read waits for a key held by a prepared transaction (ms).
    #[arg(long, env = "TREATY_LOCK_WAIT_MS", default_value_t = 2000)]
    pub lock_wait_ms: u64,
    /// Bytes of data log after which the data in memory is written to a
    /// checkpoint file and the log behind it removed (or the data's size,
    /// if larger). A restart replays at most about this much log.
    #[arg(long, env = "TREATY_CHECKPOINT_BYTES", default_value_t = treaty_storage::DEFAULT_CHECKPOINT_BYTES)]
    pub checkpoint_bytes: u64,
    /// Also serve the Redis protocol (RESP2/RESP3) on this address, for
    /// redis-cli and Redis client libraries (TLS with a client certificate
    /// unless --insecure).
    #[arg(long, env = "TREATY_REDIS", value_name = "ADDR")]
    pub redis: Option<String>,
    #[command(flatten)]
    pub security: treaty_common::cli::SecurityArgs,
}

/// Runs the server as the binary does; returns only on shutdown or error.
pub async fn main_with(args: Args) -> i32 {
    treaty_common::init_tracing(args.security.log_format);
    if args.id == 0 {
        eprintln!("treaty-participant: --id must be 1 or more (its position in the coordinator's --participants)");
        return 2;
    }
    let listener = match treaty_common::start_server("treaty-participant", &args.listen).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let me = treaty_common::tls::Identity::Participant(args.id);
    let security = match args.security.server_security("treaty-participant", &args.listen, me) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Some(redis) = &args.redis {
        if security.is_insecure() && !treaty_common::cli::is_loopback(redis) {
            eprintln!(
                "treaty-participant: --insecure is refused for --redis {redis}, which is not a loopback address: \
                 without TLS anyone who can reach the port could read and change data. Pass --certs DIR instead"
            );
            return 2;
        }
    }
    let mut config = crate::Config::new(args.id, args.data_dir, args.coordinator, security);
    config.max_connections = args.security.max_connections;
    config.frame_timeout = Duration::from_millis(args.security.frame_timeout_ms.max(100));
    config.lock_wait = Duration::from_millis(args.lock_wait_ms);
    config.checkpoint_bytes = args.checkpoint_bytes;
    config.redis = args.redis;
    config.metrics = args.security.metrics.clone();
    if let Err(e) = crate::run(listener, config, treaty_common::shutdown_signal()).await {
        eprintln!("treaty-participant: {e:#}");
        return 1;
    }
    0
}
