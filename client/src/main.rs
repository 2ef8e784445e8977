//! `treaty`: the command-line client. One-shot commands, the REPL, `demo`
//! (a local cluster of processes) and `bench`.
//!
//! Exit status: 0 success; 1 a transaction aborted or failed; 2 bad input;
//! 3 cluster unavailable; 4 `get` of a missing key.

use clap::{Parser, Subcommand};
use treaty_client::{bench, demo, repl, Client, Error, Outcome, ReadMode};
use treaty_common::types::escape;

const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005";

/// Treaty: a replicated key-value store where every write is a two-phase-commit transaction.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// Participant endpoints to talk to, comma-separated (fails over in order).
    #[arg(long, env = "TREATY_ENDPOINTS", value_delimiter = ',', default_value = DEFAULT_ENDPOINTS, global = true)]
    endpoints: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a key's value. A missing key prints nothing and exits with status 4.
    Get {
        key: String,
        /// Serve from the replica's local state even if it may be behind.
        #[arg(long)]
        stale: bool,
        /// Also print the key's version (commit index of its last write) to stderr.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Set a key.
    Put { key: String, value: String },
    /// Delete a key.
    Del { key: String },
    /// Set KEY to NEW only if it currently holds EXPECTED.
    Cas { key: String, expected: String, new: String },
    /// Show every node: up or down, role, applied commit index.
    Status,
    /// What became of a transaction (by the id an error message named):
    /// exit 0 committed, 1 not committed (or still running), 3 unknown yet.
    Outcome {
        /// The transaction id (32 hex digits).
        id: String,
    },
    /// Open the interactive shell.
    Repl,
    /// Run a batch file of commands (`-` reads standard input). See docs/cli.md.
    Run(treaty_client::batch::RunArgs),
    /// Check one node: exit 0 if it answers and (for a participant) is ready.
    /// Used by container healthchecks.
    Health {
        /// The node's address.
        addr: String,
        /// The node is the coordinator.
        #[arg(long)]
        coordinator: bool,
    },
    /// Start a local coordinator and participants as processes, then open the REPL.
    Demo(demo::DemoArgs),
    /// Measure throughput and latency (etcd benchmark workload shape).
    Bench(bench::BenchArgs),
    #[command(hide = true)]
    Coordinator(treaty_coordinator::cli::Args),
    #[command(hide = true)]
    Participant(treaty_participant::cli::Args),
}

fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Invalid(_) => 2,
        Error::Unavailable(_) | Error::NotReady(_) => 3,
        _ => 1,
    }
}

fn fail(e: Error) -> i32 {
    eprintln!("error: {e}");
    exit_code(&e)
}

fn print_status(client: &Client, rt: &tokio::runtime::Runtime) -> i32 {
    rt.block_on(async {
        match client.cluster_status().await {
            Ok(s) => {
                println!(
                    "cluster {}  last commit index {}  view epoch {}  members {:?} (minimum {}){}",
                    s.coordinator.cluster.map(|c| c.to_string()).unwrap_or_default(),
                    s.coordinator.applied_index,
                    s.coordinator.epoch,
                    s.members,
                    s.min_replicas,
                    if s.coordinator.ready { "" } else { "  WRITES REFUSED: too few members" }
                );
                println!(
                    "{:<15} {:<22} {:<6} {:>8} {:>9} {:>8}  NOTE",
                    "NODE", "ADDRESS", "STATE", "APPLIED", "PREPARED", "LEASE"
                );
                println!(
                    "{:<15} {:<22} {:<6} {:>8} {:>9} {:>8}  syncs {} commits {}",
                    "coordinator",
                    s.coordinator.addr,
                    "up",
                    s.coordinator.applied_index,
                    s.coordinator.prepared,
                    "-",
                    s.coordinator.syncs,
                    s.coordinator.commits
                );
                let mut all_up = true;
                for (id, addr, st) in s.participants {
                    match st {
                        Ok(n) => {
                            let mut note = Vec::new();
                            if !s.members.contains(&id) {
                                note.push("NOT IN VIEW (catching up to rejoin)".to_string());
                                all_up = false;
                            }
                            if !n.ready {
                                note.push("CATCHING UP".to_string());
                            }
                            for (t, age) in &n.in_doubt {
                                note.push(format!("in doubt {t} for {age} ms"));
                            }
                            note.push(format!("syncs {} applied {}", n.syncs, n.commits));
                            println!(
                                "{:<15} {:<22} {:<6} {:>8} {:>9} {:>8}  {}",
                                format!("participant {id}"),
                                addr,
                                "up",
                                n.applied_index,
                                n.prepared,
                                n.lease_ms.map_or("none".to_string(), |ms| format!("{ms}ms")),
                                note.join("; ")
                            )
                        }
                        Err(e) => {
                            all_up = false;
                            println!(
                                "{:<15} {:<22} {:<6} {:>8} {:>9} {:>8}  {}{e}",
                                format!("participant {id}"),
                                addr,
                                "down",
                                "-",
                                "-",
                                "-",
                                if s.members.contains(&id) { "" } else { "NOT IN VIEW; " }
                            )
                        }
                    }
                }
                if all_up {
                    0
                } else {
                    3
                }
            }
            Err(e) => {
                eprintln!("coordinator unreachable through any endpoint ({e}); asking each endpoint directly");
                println!("{:<22} {:<12} {:<6} {:>8} {:>9}", "ADDRESS", "ROLE", "STATE", "APPLIED", "PREPARED");
                for (addr, st) in client.node_statuses().await {
                    match st {
                        Ok(n) => println!(
                            "{:<22} {:<12} {:<6} {:>8} {:>9}",
                            addr,
                            format!("participant {}", n.id),
                            "up",
                            n.applied_index,
                            n.prepared
                        ),
                        Err(e) => println!("{:<22} {:<12} {:<6} {:>8} {:>9}  {e}", addr, "?", "down", "-", "-"),
                    }
                }
                3
            }
        }
    })
}

fn main() {
    let cli = Cli::parse();
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = match cli.command {
        Some(Command::Coordinator(args)) => {
            treaty_common::init_tracing();
            runtime().block_on(treaty_coordinator::cli::main_with(args))
        }
        Some(Command::Participant(args)) => {
            treaty_common::init_tracing();
            runtime().block_on(treaty_participant::cli::main_with(args))
        }
        Some(Command::Demo(args)) => demo::run(args),
        Some(Command::Run(args)) => runtime().block_on(treaty_client::batch::run(Client::new(cli.endpoints), args)),
        Some(Command::Health { addr, coordinator }) => runtime().block_on(health(&addr, coordinator)),
        Some(Command::Bench(args)) => runtime().block_on(bench::run(cli.endpoints, args)),
        None if !std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            eprintln!(
                "\nno command given (the shell starts only on a terminal; use `treaty run -` for piped commands)"
            );
            2
        }
        Some(Command::Repl) | None => {
            let rt = runtime();
            repl::run(Client::new(cli.endpoints), &rt)
        }
        Some(cmd) => {
            let rt = runtime();
            let client = Client::new(cli.endpoints);
            match cmd {
                Command::Get { key, stale, verbose } => {
                    let mode = if stale { ReadMode::Stale } else { ReadMode::Linearizable };
                    match rt.block_on(client.get_with(key.as_bytes(), mode)) {
                        Ok(Some(v)) => {
                            use std::io::Write as _;
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(&v.value);
                            let _ = out.write_all(b"\n");
                            if verbose {
                                eprintln!("version {}{}", v.version, if stale { " (stale read)" } else { "" });
                            }
                            0
                        }
                        Ok(None) => {
                            eprintln!("(not found) {}", escape(key.as_bytes()));
                            4
                        }
                        Err(e) => fail(e),
                    }
                }
                Command::Put { key, value } => report(rt.block_on(client.put(key.as_bytes(), value.as_bytes()))),
                Command::Del { key } => report(rt.block_on(client.delete(key.as_bytes()))),
                Command::Cas { key, expected, new } => {
                    report(rt.block_on(client.cas(key.as_bytes(), Some(expected.as_bytes()), new.as_bytes())))
                }
                Command::Status => print_status(&client, &rt),
                Command::Outcome { id } => match id.parse::<treaty_client::TxnId>() {
                    Err(e) => {
                        eprintln!("error: {e}");
                        2
                    }
                    Ok(id) => match rt.block_on(client.outcome(id)) {
                        Ok(o) => {
                            println!("{o}");
                            if matches!(o, Outcome::Committed(_)) {
                                0
                            } else {
                                1
                            }
                        }
                        Err(e) => fail(e),
                    },
                },
                _ => unreachable!("handled above"),
            }
        }
    };
    std::process::exit(code);
}

fn report(r: treaty_client::Result<treaty_client::Committed>) -> i32 {
    match r {
        Ok(c) => {
            println!("OK (commit index {})", c.index);
            0
        }
        Err(e) => fail(e),
    }
}

async fn health(addr: &str, coordinator: bool) -> i32 {
    use std::time::Duration;
    use treaty_common::rpc;
    let timeout = Duration::from_secs(2);
    let status = if coordinator {
        match rpc::connect_coordinator(addr, timeout).await {
            Ok(c) => c.node_status(rpc::deadline(timeout)).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    } else {
        match rpc::connect_participant(addr, timeout).await {
            Ok(c) => c.node_status(rpc::deadline(timeout)).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    match status {
        Ok(s) if s.ready => {
            println!("ok: {} {} at {} applied {}", s.role, s.id, addr, s.applied_index);
            0
        }
        Ok(s) => {
            println!("not ready: {} {} at {} is catching up (applied {})", s.role, s.id, addr, s.applied_index);
            1
        }
        Err(e) => {
            println!("down: {addr}: {e}");
            1
        }
    }
}
