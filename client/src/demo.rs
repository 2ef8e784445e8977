//! `treaty demo`: a local cluster of real processes (one coordinator, N
//! participants) on loopback, then the REPL. Ctrl-D / `exit` (or Ctrl-C with
//! `--no-repl`) stops the nodes with SIGTERM so they shut down cleanly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Client;

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
}

struct Node {
    name: String,
    child: Child,
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
    Ok(Node { name: name.to_string(), child: cmd.spawn()? })
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
    for p in &ports {
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
    ];
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
            ];
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
    let client = Client::new(participant_addrs.clone());
    let ready = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = client.cluster_status().await {
                if s.participants.iter().all(|(_, _, st)| st.as_ref().is_ok_and(|n| n.ready)) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    if ready.is_err() {
        eprintln!("error: the cluster did not become ready within 20 s; see the logs in {}", logs.display());
        stop(&mut nodes);
        return 3;
    }
    println!("Treaty demo cluster is up (data in {}, logs in {}):", args.data_dir.display(), logs.display());
    println!("  {:<14} {}", "coordinator", addr(ports[0]));
    for (i, a) in participant_addrs.iter().enumerate() {
        println!("  {:<14} {a}", format!("participant {}", i + 1));
    }
    println!("From another terminal:  treaty --endpoints {} put hello world", participant_addrs.join(","));
    let code = if args.no_repl || !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        println!("Press Ctrl-C to stop the cluster.");
        rt.block_on(treaty_common::shutdown_signal());
        0
    } else {
        crate::repl::run(client, &rt)
    };
    println!("stopping the cluster...");
    stop(&mut nodes);
    println!("stopped.");
    code
}
