//! `treaty demo`: a local cluster of real processes (one coordinator, N
//! participants) on loopback, then the REPL. Ctrl-D / `exit` (or Ctrl-C with
//! `--no-repl`) stops the nodes with SIGTERM so they shut down cleanly.
//!
//! Security is on: the first start creates the cluster's CA and certificates
//! in `<data-dir>/certs` and registers that directory for the cluster's
//! endpoints (see [`crate::credentials`]), so `treaty` commands from another
//! terminal find their client certificate. `--insecure` runs plaintext.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{credentials, Client, Identity, Security};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where the nodes keep their data and logs (kept across runs).
    #[arg(long, default_value = "treaty-demo-data")]
    pub data_dir: PathBuf,
    /// Number of participants.
    #[arg(long, default_value_t = 5)]
    pub participants: usize,
    /// The coordinator's port; participants listen on the following ports.
    #[arg(long, default_value_t = 7000)]
    pub port: u16,
    /// Do not open the REPL: print the endpoints and run until Ctrl-C.
    #[arg(long)]
    pub no_repl: bool,
    /// Run the nodes without TLS or authentication (to measure the difference).
    #[arg(long)]
    pub insecure: bool,
    /// How many participants hold each key (default: all). Fixed when the
    /// demo's cluster is first created.
    #[arg(long, env = "TREATY_REPLICATION")]
    pub replication: Option<usize>,
    /// Participant 1 serves the Redis protocol on this port, participant 2
    /// on the next, and so on (default: --port + 379, so 7379 to 7383).
    #[arg(long)]
    pub redis_port: Option<u16>,
    /// Start no Redis-protocol doors.
    #[arg(long, conflicts_with = "redis_port")]
    pub no_redis: bool,
    /// The coordinator serves its status page and metrics on this port, the
    /// participants their metrics on the next ones (default: --port + 90,
    /// so the page is at http://127.0.0.1:7090/).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Serve no metrics and no status page.
    #[arg(long, conflicts_with = "metrics_port")]
    pub no_metrics: bool,
}

/// The demo's certificates directory, created (or completed with missing
/// participant certificates) on first use.
fn ensure_certs(dir: &std::path::Path, participants: u64) -> Result<(), String> {
    if !dir.join(treaty_common::tls::CA_CERT).exists() {
        return treaty_common::tls::create(dir, participants).map_err(|e| e.to_string());
    }
    for id in 1..=participants {
        if !dir.join(format!("participant-{id}.pem")).exists() {
            treaty_common::tls::issue(dir, &Identity::Participant(id)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

struct Node {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Node {
    /// If the node has exited: how, and the last line of its log (a node
    /// that refuses to start says why there).
    fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(its log is empty)");
        Some(format!("{} exited ({status}): {}", self.name, last.trim()))
    }
}

fn spawn(name: &str, args: &[String], log: PathBuf) -> std::io::Result<Node> {
    let exe = std::env::current_exe()?;
    let log_file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file);
    #[cfg(target_os = "linux")]
    unsafe {
        use std::os::unix::process::CommandExt;
        // Own process group: the terminal's Ctrl-C goes to the demo, which
        // stops the nodes in order. And if the demo dies, so do they.
        cmd.process_group(0).pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    Ok(Node { name: name.to_string(), child: cmd.spawn()?, log })
}

fn stop(nodes: &mut [Node]) {
    for n in nodes.iter() {
        unsafe {
            libc::kill(n.child.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in nodes.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    eprintln!("{} did not stop within 5 s; killing it", n.name);
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
            }
        }
    }
}

pub fn run(args: DemoArgs) -> i32 {
    if args.participants == 0 {
        eprintln!("error: --participants must be at least 1");
        return 2;
    }
    let ports: Vec<u16> = (0..=args.participants as u16).map(|i| args.port + i).collect();
    let redis_ports: Vec<u16> = if args.no_redis {
        vec![]
    } else {
        let base = args.redis_port.unwrap_or(args.port.saturating_add(379));
        (0..args.participants as u16).map(|i| base.saturating_add(i)).collect()
    };
    let metrics_ports: Vec<u16> = if args.no_metrics {
        vec![]
    } else {
        let base = args.metrics_port.unwrap_or(args.port.saturating_add(90));
        (0..=args.participants as u16).map(|i| base.saturating_add(i)).collect()
    };
    for p in ports.iter().chain(&redis_ports).chain(&metrics_ports) {
        if std::net::TcpListener::bind(("127.0.0.1", *p)).is_err() {
            eprintln!("error: port {p} is in use (is another demo running?); pass --port to use other ports");
            return 3;
        }
    }
    let logs = args.data_dir.join("logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        eprintln!("error: cannot create {}: {e}", logs.display());
        return 2;
    }
    let certs = args.data_dir.join("certs");
    let security_args: Vec<String> = if args.insecure {
        vec!["--insecure".into()]
    } else {
        if let Err(e) = ensure_certs(&certs, args.participants as u64) {
            eprintln!("error: cannot set up the demo's certificates in {}: {e}", certs.display());
            return 2;
        }
        vec!["--certs".into(), certs.display().to_string()]
    };
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let participant_addrs: Vec<String> = ports[1..].iter().map(|p| addr(*p)).collect();
    let mut nodes = Vec::new();
    let coord_args = vec![
        "coordinator".to_string(),
        "--listen".into(),
        addr(ports[0]),
        "--data-dir".into(),
        args.data_dir.join("coordinator").display().to_string(),
        "--participants".into(),
        participant_addrs.join(","),
    ]
    .into_iter()
    .chain(args.replication.map(|r| format!("--replication={r}")))
    .chain(metrics_ports.first().map(|p| format!("--metrics={}", addr(*p))))
    .chain(security_args.iter().cloned())
    .collect::<Vec<String>>();
    let mut spawn_all = || -> std::io::Result<()> {
        nodes.push(spawn("coordinator", &coord_args, logs.join("coordinator.log"))?);
        for (i, a) in participant_addrs.iter().enumerate() {
            let id = i + 1;
            let pargs = vec![
                "participant".to_string(),
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                a.clone(),
                "--data-dir".into(),
                args.data_dir.join(format!("participant-{id}")).display().to_string(),
                "--coordinator".into(),
                addr(ports[0]),
            ]
            .into_iter()
            .chain(redis_ports.get(i).map(|p| format!("--redis={}", addr(*p))))
            .chain(metrics_ports.get(id).map(|p| format!("--metrics={}", addr(*p))))
            .chain(security_args.iter().cloned())
            .collect::<Vec<String>>();
            nodes.push(spawn(&format!("participant {id}"), &pargs, logs.join(format!("participant-{id}.log")))?);
        }
        Ok(())
    };
    if let Err(e) = spawn_all() {
        eprintln!("error: cannot start the nodes: {e}");
        stop(&mut nodes);
        return 3;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let security = if args.insecure {
        Security::Insecure
    } else {
        match Security::tls(&certs, Identity::Client(treaty_common::tls::DEFAULT_CLIENT.into())) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                stop(&mut nodes);
                return 2;
            }
        }
    };
    let all_addrs: Vec<String> = ports.iter().map(|p| addr(*p)).collect();
    if !args.insecure {
        credentials::register(&all_addrs, &certs);
    }
    let client = Client::new(participant_addrs.clone(), security);
    let ready = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = client.cluster_status().await {
                if s.participants.iter().all(|(_, _, st)| st.as_ref().is_ok_and(|n| n.ready)) {
                    return Ok(());
                }
            }
            let exited: Vec<String> = nodes.iter_mut().filter_map(Node::exited).collect();
            if !exited.is_empty() {
                return Err(exited);
            }
            if Instant::now() > deadline {
                return Err(vec![]);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    if let Err(exited) = ready {
        for e in &exited {
            eprintln!("error: {e}");
        }
        if exited.is_empty() {
            eprintln!("error: the cluster did not become ready within 20 s; see the logs in {}", logs.display());
        } else {
            eprintln!("(the logs are in {})", logs.display());
        }
        stop(&mut nodes);
        if !args.insecure {
            credentials::unregister(&all_addrs, &certs);
        }
        return 3;
    }
    println!("Treaty demo cluster is up (data in {}, logs in {}):", args.data_dir.display(), logs.display());
    println!("  {:<14} {}", "coordinator", addr(ports[0]));
    for (i, a) in participant_addrs.iter().enumerate() {
        println!("  {:<14} {a}", format!("participant {}", i + 1));
    }
    let default_endpoints = args.port == 7000 && args.participants == 5;
    let endpoints_flag =
        if default_endpoints { String::new() } else { format!("--endpoints {} ", participant_addrs.join(",")) };
    if args.insecure {
        println!("Security: OFF (--insecure): no TLS, no authentication.");
        println!("From another terminal:  treaty --insecure {endpoints_flag}put hello world");
    } else {
        println!("Security: TLS 1.3 with the cluster's own CA; certificates in {}", certs.display());
        println!("From another terminal:  treaty {endpoints_flag}put hello world");
        println!(
            "  (the CLI finds the client certificate by these endpoints; elsewhere pass --certs {})",
            certs.display()
        );
    }
    if let Some(page) = metrics_ports.first() {
        println!(
            "Status page: http://127.0.0.1:{page}/   (Prometheus metrics at /metrics there and on ports {} to {})",
            page + 1,
            page + args.participants as u16
        );
    }
    if let (Some(first), Some(last)) = (redis_ports.first(), redis_ports.last()) {
        println!("Redis protocol: participants 1 to {} on ports {first} to {last}", redis_ports.len());
        if args.insecure {
            println!("  redis-cli -p {first}");
        } else {
            let c = certs.display();
            println!("  redis-cli -p {first} --tls --cacert {c}/ca.pem --cert {c}/client-admin.pem --key {c}/client-admin.key");
        }
    }
    let code = if args.no_repl || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        println!("Press Ctrl-C to stop the cluster.");
        rt.block_on(treaty_common::shutdown_signal());
        0
    } else {
        crate::repl::run(client, &rt)
    };
    println!("stopping the cluster...");
    stop(&mut nodes);
    if !args.insecure {
        credentials::unregister(&all_addrs, &certs);
    }
    println!("stopped.");
    code
}
