//! `treaty`: the command-line client. One-shot commands, the REPL, `demo`
//! (a local cluster of processes) and `bench`.
//!
//! Exit status: 0 success; 1 a transaction aborted or failed; 2 bad input;
//! 3 cluster unavailable; 4 `get` of a missing key.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::json;
use treaty_client::{
    credentials, Client, Condition, Error, Identity, Outcome, ReadMode, Security, TraceEvent, TraceSummary, Txn, TxnId,
    Write,
};
use treaty_common::types::escape;

mod batch;
mod bench;
mod demo;
mod member;
mod repl;
mod script;
mod status;
mod trace;

const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003,127.0.0.1:7004,127.0.0.1:7005";

/// Treaty: a replicated key-value store where every write is a two-phase-commit transaction.
#[derive(Parser, Debug)]
#[command(name = "treaty", version, about, propagate_version = true)]
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
    /// How commands that print data print it: `plain` for people, `json`
    /// for scripts (one JSON object per line; see docs/cli.md). Errors go
    /// to standard error as text either way, with the exit status.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Plain, global = true)]
    output: Output,
    /// Shorthand for `-o json`.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The output format (`-o`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Plain,
    Json,
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
    /// Show every node: up or down, role, applied commit index, keys held.
    Status,
    /// Add or remove a participant while the cluster runs (needs the client
    /// `admin` certificate; see docs/membership.md).
    Member {
        #[command(subcommand)]
        action: member::MemberAction,
    },
    /// Which partition KEY is in and which participants hold it.
    Placement { key: String },
    /// What became of a transaction (by the id an error message named):
    /// exit 0 committed, 1 not committed (or still running), 3 unknown yet.
    Outcome {
        /// The transaction id (32 hex digits).
        id: String,
    },
    /// One transaction's steps on every node, in time order (from the
    /// in-memory trace each node keeps of its recent transactions), or the
    /// slowest recent ones with --last-slow N.
    Trace {
        /// The transaction id (32 hex digits).
        #[arg(required_unless_present = "last_slow")]
        id: Option<String>,
        /// List the N slowest transactions the coordinator remembers instead.
        #[arg(long, value_name = "N", conflicts_with = "id")]
        last_slow: Option<u32>,
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

pub(crate) fn exit_code(e: &Error) -> i32 {
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
            let code = if role == "coordinator" {
                let args =
                    treaty_coordinator::cli::Args::parse_from(std::iter::once("treaty-coordinator".into()).chain(rest));
                args.security.clone().run("treaty coordinator", treaty_coordinator::cli::main_with(args))
            } else {
                let args =
                    treaty_participant::cli::Args::parse_from(std::iter::once("treaty-participant".into()).chain(rest));
                args.security.clone().run("treaty participant", treaty_participant::cli::main_with(args))
            };
            std::process::exit(code);
        }
        _ => {}
    }
    let cli = Cli::parse();
    let json = cli.json || cli.output == Output::Json;
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
            Ok(security) => run_command(Some(cmd), &cli.endpoints, security, json, runtime),
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
    json: bool,
    runtime: impl Fn() -> tokio::runtime::Runtime,
) -> i32 {
    let client = || Client::new(endpoints.to_vec(), security.clone());
    match cmd {
        Some(Command::Run(args)) => runtime().block_on(batch::run(client(), batch::RunArgs { json, ..args })),
        Some(Command::Health { addr, coordinator }) => runtime().block_on(health(&addr, coordinator, &security)),
        Some(Command::Bench(args)) => {
            runtime().block_on(bench::run(endpoints.to_vec(), security.clone(), bench::BenchArgs { json, ..args }))
        }
        Some(Command::Repl) | None => repl::run(client(), &runtime()),
        Some(cmd) => {
            let rt = runtime();
            let client = client();
            match cmd {
                Command::Get { key, stale, verbose } => {
                    let mode = if stale { ReadMode::Stale } else { ReadMode::Linearizable };
                    match rt.block_on(client.get_with(key.as_bytes(), mode)) {
                        Ok(found) if json => {
                            let mut obj = json!({"key": key, "found": found.is_some(), "stale": stale});
                            if let Some(v) = &found {
                                batch::json_bytes(&mut obj, "value", &v.value);
                                obj["version"] = json!(v.version);
                            }
                            println!("{obj}");
                            if found.is_some() {
                                0
                            } else {
                                4
                            }
                        }
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
                    list_range(&client, &rt, &r, json)
                }
                Command::Range { start, end, opts } => {
                    let r = range_cmd(false, start.into_bytes(), end.map(String::into_bytes), &opts);
                    list_range(&client, &rt, &r, json)
                }
                Command::Put { key, value, file } => match put_value(value, file) {
                    Ok(value) => commit(&client, &rt, vec![], vec![Write::Put(key.into_bytes(), value)], json),
                    Err(e) => {
                        eprintln!("error: {e}");
                        2
                    }
                },
                Command::Del { key } => commit(&client, &rt, vec![], vec![Write::Delete(key.into_bytes())], json),
                Command::Cas { key, expected, new } => {
                    let key = key.into_bytes();
                    let condition = Condition::ValueEquals(key.clone(), expected.into_bytes());
                    commit(&client, &rt, vec![condition], vec![Write::Put(key, new.into_bytes())], json)
                }
                Command::Member { action } => rt.block_on(member::run(&client, action, json)),
                Command::Status => {
                    let mut out = std::io::stdout().lock();
                    rt.block_on(status::report(&client, json, &mut out))
                }
                Command::Placement { key } => match treaty_common::types::check_key(key.as_bytes())
                    .and_then(|()| rt.block_on(client.cluster_status()))
                {
                    Ok(s) => {
                        println!("{}", status::placement(&s.placement, key.as_bytes(), json));
                        0
                    }
                    Err(e @ Error::Invalid(_)) => {
                        eprintln!("error: {e}");
                        2
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        3
                    }
                },
                Command::Trace { id, last_slow } => {
                    let id = match id.map(|i| i.parse::<treaty_client::TxnId>()).transpose() {
                        Ok(id) => id,
                        Err(e) => {
                            eprintln!("error: {e}");
                            return 2;
                        }
                    };
                    match rt.block_on(trace::run(&client, id, last_slow, json)) {
                        Ok(code) => code,
                        Err(e) => fail(e),
                    }
                }
                Command::Outcome { id } => match id.parse::<treaty_client::TxnId>() {
                    Err(e) => {
                        eprintln!("error: {e}");
                        2
                    }
                    Ok(id) => match rt.block_on(client.outcome(id)) {
                        Ok(o) => {
                            if json {
                                let (word, index) = match o {
                                    Outcome::Committed(i) => ("committed", Some(i)),
                                    Outcome::Aborted => ("aborted", None),
                                    Outcome::Pending => ("pending", None),
                                    Outcome::Forgotten(_) => ("unknown", None),
                                };
                                println!("{}", json!({"txn": id.to_string(), "outcome": word, "index": index}));
                            } else {
                                println!("{o}");
                            }
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

/// `put`, `del`, `cas`: one transaction; prints where it committed (with
/// its id under `-o json`, for `treaty outcome`).
fn commit(
    client: &Client,
    rt: &tokio::runtime::Runtime,
    conditions: Vec<Condition>,
    writes: Vec<Write>,
    json: bool,
) -> i32 {
    let txn = Txn::new(conditions, writes);
    let id = txn.id;
    match rt.block_on(client.commit(txn)) {
        Ok(c) if json => {
            println!("{}", json!({"status": "committed", "index": c.index, "txn": id.to_string()}));
            0
        }
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
