//! `treaty`: the command-line client. One-shot commands, the REPL, `demo`
//! (a local cluster of processes) and `bench`.
//!
//! Exit status: 0 success; 1 a transaction aborted or failed; 2 bad input;
//! 3 cluster unavailable; 4 `get` of a missing key.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use treaty_client::{credentials, Client, Error, Identity, Outcome, ReadMode, Security, Txn, Write};
use treaty_common::rpc::NodeStatus;
use treaty_common::types::escape;

mod batch;
mod bench;
mod demo;
mod repl;
mod script;

const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005";

/// Treaty: a replicated key-value store where every write is a two-phase-commit transaction.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    /// Participant endpoints to talk to, comma-separated (fails over in order).
    #[arg(long, env = "TREATY_ENDPOINTS", value_delimiter = ',', default_value = DEFAULT_ENDPOINTS, global = true)]
    endpoints: Vec<String>,
    /// Directory with the cluster's `ca.pem` and the client certificate
    /// (`client-admin.pem`, `client-admin.key`). Without it, the directory
    /// `treaty demo` or `docker/cluster.sh up` registered for the endpoints.
    #[arg(long, env = "TREATY_CERTS", value_name = "DIR", global = true)]
    certs: Option<PathBuf>,
    /// Connect without TLS (only to a cluster started with --insecure).
    #[arg(long, env = "TREATY_INSECURE", global = true, conflicts_with = "certs")]
    insecure: bool,
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
    /// List the keys that start with PREFIX, in byte order, as `KEY = VALUE`
    /// lines (`scan ""` lists every key). Streams page by page.
    Scan {
        prefix: String,
        /// Continue from this key (the `next` a cut-short listing printed).
        #[arg(long, value_name = "KEY")]
        from: Option<String>,
        #[command(flatten)]
        opts: RangeOpts,
    },
    /// List the keys from START (inclusive) to END (exclusive; default: the
    /// last key), in byte order, as `KEY = VALUE` lines.
    Range {
        start: String,
        end: Option<String>,
        #[command(flatten)]
        opts: RangeOpts,
    },
    /// Set a key. The value is the argument, or with `-` standard input,
    /// or with `--file F` a file's contents (bytes as they are, up to 1 MiB).
    Put {
        key: String,
        /// The value; `-` reads it from standard input.
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
    },
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
    Run(batch::RunArgs),
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
    /// Make the cluster's CA and certificates (see docs/security.md).
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
}

/// Options of `scan` and `range`.
#[derive(clap::Args, Debug)]
struct RangeOpts {
    /// At most N entries; if more remain, says where the rest starts.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Print keys only, not values.
    #[arg(long)]
    keys_only: bool,
    /// Serve from one replica's local state even if it may be behind.
    #[arg(long)]
    stale: bool,
    /// One JSON object per key (`key`, `value`, `version`; `key_base64` /
    /// `value_base64` for bytes that are not UTF-8), and `{"status":"more","next":...}`
    /// when --limit cut the listing short.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum CertsAction {
    /// Create a new cluster CA in DIR with certificates for the coordinator,
    /// participants 1..=N and the client `admin`.
    Create {
        dir: PathBuf,
        /// Number of participants to make certificates for.
        #[arg(long, default_value_t = 5)]
        participants: u64,
    },
    /// Let the CLI find DIR's client certificate for the given --endpoints
    /// (what `treaty demo` and `docker/cluster.sh up` do; see docs/cli.md).
    Register { dir: PathBuf },
    /// Forget the registration of DIR for the given --endpoints.
    Unregister { dir: PathBuf },
    /// Issue one more certificate from the CA in DIR: `participant 6` or `client NAME`.
    Issue {
        dir: PathBuf,
        #[arg(value_parser = ["participant", "client"])]
        kind: String,
        /// The participant id, or the client name (a-z, 0-9, -).
        name: String,
    },
}

fn range_cmd(prefix: bool, start: Vec<u8>, end: Option<Vec<u8>>, opts: &RangeOpts) -> script::RangeCmd {
    script::RangeCmd {
        prefix,
        end: if prefix { treaty_client::prefix_end(&start) } else { end },
        start,
        from: None,
        limit: opts.limit,
        keys_only: opts.keys_only,
        stale: opts.stale,
    }
}

/// `treaty scan` / `treaty range`: streams the listing to stdout.
fn list_range(client: &Client, rt: &tokio::runtime::Runtime, r: &script::RangeCmd, json: bool) -> i32 {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let result = rt.block_on(batch::print_range(&mut out, client, r, json, None));
    let _ = std::io::Write::flush(&mut out);
    match result {
        Ok((count, next)) => {
            if let (Some(next), false) = (next, json) {
                eprintln!("(more: continue with `treaty {}`)", r.continue_at(&next));
            } else if count == 0 && !json {
                eprintln!("(no keys)");
            }
            0
        }
        Err(e) => fail(e),
    }
}

fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Invalid(_) | Error::Denied(_) => 2,
        Error::Unavailable(_) | Error::NotReady(_) | Error::Fenced(_) | Error::NotCommitted(_) => 3,
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
                if let Some(why) = &s.coordinator.fenced {
                    println!("COORDINATOR: {why}");
                }
                println!(
                    "{:<15} {:<22} {:<6} {:>8} {:>9} {:>8}  NOTE",
                    "NODE", "ADDRESS", "STATE", "APPLIED", "PREPARED", "LEASE"
                );
                println!(
                    "{:<15} {:<22} {:<6} {:>8} {:>9} {:>8}  {}",
                    "coordinator",
                    s.coordinator.addr,
                    "up",
                    s.coordinator.applied_index,
                    s.coordinator.prepared,
                    "-",
                    work_per_commit(&s.coordinator, "commits")
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
                            note.push(work_per_commit(&n, "applied"));
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

fn certs(action: CertsAction, endpoints: &[String]) -> i32 {
    match action {
        CertsAction::Register { dir } => {
            if let Err(e) =
                treaty_common::tls::Tls::load(&dir, Identity::Client(treaty_common::tls::DEFAULT_CLIENT.into()))
            {
                eprintln!("error: {e}");
                return 2;
            }
            credentials::register(endpoints, &dir);
            0
        }
        CertsAction::Unregister { dir } => {
            credentials::unregister(endpoints, &dir);
            0
        }
        CertsAction::Create { dir, participants } => match treaty_common::tls::create(&dir, participants) {
            Ok(()) => {
                println!(
                    "created a cluster CA and certificates for the coordinator, participants 1..={participants} and \
                     client admin in {}",
                    dir.display()
                );
                println!(
                    "keep ca.key offline once every certificate is issued; give each node ca.pem and its own \
                     .pem/.key (see docs/security.md)"
                );
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        },
        CertsAction::Issue { dir, kind, name } => {
            let identity = match kind.as_str() {
                "participant" => match name.parse::<u64>() {
                    Ok(id) if id > 0 => Identity::Participant(id),
                    _ => {
                        eprintln!("error: {name:?} is not a participant id (1, 2, ...)");
                        return 2;
                    }
                },
                _ if treaty_common::tls::valid_client_name(&name) => Identity::Client(name),
                _ => {
                    eprintln!("error: {name:?} is not a client name: use 1 to 63 of a-z, 0-9 and -");
                    return 2;
                }
            };
            match treaty_common::tls::issue(&dir, &identity) {
                Ok(path) => {
                    println!("issued {}", path.display());
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    2
                }
            }
        }
    }
}

/// Reads the value of `put` from the argument, standard input or a file.
fn put_value(value: Option<String>, file: Option<PathBuf>) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let limit = treaty_common::types::MAX_VALUE_LEN as u64;
    let mut buf = Vec::new();
    let (read, what) = match (value, file) {
        (Some(v), None) if v != "-" => return Ok(v.into_bytes()),
        (_, Some(path)) => {
            let f = std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            (f.take(limit + 1).read_to_end(&mut buf), path.display().to_string())
        }
        _ => (std::io::stdin().lock().take(limit + 1).read_to_end(&mut buf), "standard input".to_string()),
    };
    read.map_err(|e| format!("cannot read {what}: {e}"))?;
    if buf.len() as u64 > limit {
        return Err(format!(
            "the value in {what} is over the 1 MiB limit: store large objects elsewhere and keep a reference"
        ));
    }
    Ok(buf)
}

fn main() {
    // `treaty demo` re-executes this binary as its nodes.
    let mut argv = std::env::args();
    match argv.nth(1).as_deref() {
        Some("coordinator") | Some("participant") => {
            let role = std::env::args().nth(1).unwrap();
            let rest: Vec<String> = std::env::args().skip(2).collect();
            treaty_common::init_tracing();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            let code = if role == "coordinator" {
                let args =
                    treaty_coordinator::cli::Args::parse_from(std::iter::once("treaty-coordinator".into()).chain(rest));
                rt.block_on(treaty_coordinator::cli::main_with(args))
            } else {
                let args =
                    treaty_participant::cli::Args::parse_from(std::iter::once("treaty-participant".into()).chain(rest));
                rt.block_on(treaty_participant::cli::main_with(args))
            };
            std::process::exit(code);
        }
        _ => {}
    }
    let cli = Cli::parse();
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let security = || credentials::client_security(cli.certs.as_deref(), cli.insecure, &cli.endpoints);
    let client = || security().map(|s| Client::new(cli.endpoints.clone(), s));
    let code = match cli.command {
        Some(Command::Demo(args)) => demo::run(args),
        Some(Command::Certs { action }) => certs(action, &cli.endpoints),
        None if !std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            eprintln!(
                "\nno command given (the shell starts only on a terminal; use `treaty run -` for piped commands)"
            );
            2
        }
        Some(cmd) => match security() {
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
            Ok(security) => run_command(Some(cmd), &cli.endpoints, security, runtime),
        },
        None => match client() {
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
            Ok(client) => repl::run(client, &runtime()),
        },
    };
    std::process::exit(code);
}

fn run_command(
    cmd: Option<Command>,
    endpoints: &[String],
    security: Security,
    runtime: impl Fn() -> tokio::runtime::Runtime,
) -> i32 {
    let client = || Client::new(endpoints.to_vec(), security.clone());
    match cmd {
        Some(Command::Run(args)) => runtime().block_on(batch::run(client(), args)),
        Some(Command::Health { addr, coordinator }) => runtime().block_on(health(&addr, coordinator, &security)),
        Some(Command::Bench(args)) => runtime().block_on(bench::run(endpoints.to_vec(), security.clone(), args)),
        Some(Command::Repl) | None => repl::run(client(), &runtime()),
        Some(cmd) => {
            let rt = runtime();
            let client = client();
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
                Command::Scan { prefix, from, opts } => {
                    let r = script::RangeCmd {
                        from: from.map(String::into_bytes),
                        ..range_cmd(true, prefix.into_bytes(), None, &opts)
                    };
                    list_range(&client, &rt, &r, opts.json)
                }
                Command::Range { start, end, opts } => {
                    let r = range_cmd(false, start.into_bytes(), end.map(String::into_bytes), &opts);
                    list_range(&client, &rt, &r, opts.json)
                }
                Command::Put { key, value, file } => match put_value(value, file) {
                    Ok(value) => report(rt.block_on(client.put(key.as_bytes(), &value))),
                    Err(e) => {
                        eprintln!("error: {e}");
                        2
                    }
                },
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
    }
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

async fn health(addr: &str, coordinator: bool, security: &Security) -> i32 {
    use std::time::Duration;
    use treaty_common::net::RpcClient as _;
    use treaty_common::rpc::{self, CoordinatorServiceClient, ParticipantServiceClient};
    use treaty_common::tls::Expect;
    let timeout = Duration::from_secs(2);
    let expect = if coordinator { Expect::Coordinator } else { Expect::AnyNode };
    let status = match treaty_common::net::connect(addr, security, &expect, timeout).await {
        Err(e) => Err(e.to_string()),
        Ok(io) if coordinator => {
            let (c, dispatch) = CoordinatorServiceClient::start(io);
            tokio::spawn(dispatch);
            c.node_status(rpc::deadline(timeout)).await.map_err(|e| e.to_string())
        }
        Ok(io) => {
            let (c, dispatch) = ParticipantServiceClient::start(io);
            tokio::spawn(dispatch);
            c.node_status(rpc::deadline(timeout)).await.map_err(|e| e.to_string())
        }
    };
    match status {
        Ok(s) if s.fenced.is_some() && coordinator => {
            println!("not ready: coordinator at {addr}: {}", s.fenced.unwrap_or_default());
            1
        }
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

/// "commits 120  syncs 9 (0.08/commit)  rpcs 31 (0.26/commit)": what one
/// commit cost this node since it started (batching shows as ratios below 1).
fn work_per_commit(n: &NodeStatus, commits: &str) -> String {
    let per = |x: u64| if n.commits == 0 { "-".to_string() } else { format!("{:.2}", x as f64 / n.commits as f64) };
    format!(
        "{commits} {}  syncs {} ({}/commit)  rpcs {} ({}/commit)",
        n.commits,
        n.syncs,
        per(n.syncs),
        n.rpcs,
        per(n.rpcs)
    )
}
