//! `treaty-faults`: run fault-injection campaigns.
//!
//! ```sh
//! cargo run -p treaty-faults --release -- --seeds 20
//! cargo run -p treaty-faults -- --seeds 3 --broken     # must report violations
//! cargo run -p treaty-faults --release -- --seeds 2 --faults kill-coordinator,pause-coordinator
//! cargo run -p treaty-faults --release -- --seeds 2 --each-kind   # a table per fault kind
//! ```
//!
//! `TREATY_FAULTS_DUMP=DIR` writes the history of every key group that fails
//! the check to `DIR/seedS-groupG.txt` (one operation per line: call, result,
//! call and return times, transaction id, commit index, endpoint); with
//! `TREATY_FAULTS_DUMP_ALL=1` it writes every group plus every node's log.

use std::time::Duration;

use clap::Parser;
use treaty_faults::{CampaignConfig, FaultKind};

#[derive(Parser, Debug)]
#[command(about = "Fault-injection campaigns against a real Treaty cluster, checked for linearizability")]
struct Args {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    start: u64,
    /// Seconds of workload per seed.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Run without faults.
    #[arg(long)]
    no_faults: bool,
    /// Run the deliberately broken build (reads skip the prepared-key wait).
    #[arg(long)]
    broken: bool,
    /// Inject only these kinds of fault (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// Run the seeds once per fault kind (only that kind injected) and print
    /// a table: runs, operations, result and worst committed write per kind.
    #[arg(long)]
    each_kind: bool,
    /// Each key on this many of the 5 participants (default: all).
    #[arg(long)]
    replication: Option<usize>,
}

/// Totals for one set of runs.
#[derive(Default)]
struct Tally {
    runs: u64,
    passed: u64,
    ops: usize,
    faults: usize,
    worst_write_ms: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let kinds = if args.faults.is_empty() { FaultKind::ALL.to_vec() } else { args.faults.clone() };
    let sets: Vec<(String, Vec<FaultKind>)> = if args.each_kind {
        kinds.iter().map(|k| (format!("{k:?}"), vec![*k])).collect()
    } else {
        vec![(if args.faults.is_empty() { "all".into() } else { format!("{kinds:?}") }, kinds)]
    };
    let mut tallies = Vec::new();
    for (name, kinds) in sets {
        let mut t = Tally::default();
        for seed in args.start..args.start + args.seeds {
            let mut cfg = CampaignConfig::new(seed);
            cfg.duration = Duration::from_secs(args.seconds);
            cfg.clients = args.clients;
            cfg.faults = !args.no_faults;
            cfg.kinds = kinds.clone();
            cfg.broken = args.broken;
            cfg.replication = args.replication;
            t.runs += 1;
            match treaty_faults::run(cfg).await {
                Ok(r) => {
                    println!("[{name}] {}", r.summary());
                    t.ops += r.ops;
                    t.faults += r.faults.len();
                    t.worst_write_ms = t.worst_write_ms.max(r.worst_write_ms);
                    if r.linearizable() {
                        t.passed += 1;
                    }
                }
                Err(e) => println!("[{name}] seed {seed}: harness error: {e:#}"),
            }
        }
        tallies.push((name, t));
    }
    println!("\n{:<22} {:>5} {:>7} {:>8} {:>18}  RESULT", "FAULTS", "RUNS", "FAULTS", "OPS", "WORST WRITE (ms)");
    let mut failed = 0;
    for (name, t) in &tallies {
        failed += t.runs - t.passed;
        let result =
            if t.passed == t.runs { "all linearizable".to_string() } else { format!("{} FAILED", t.runs - t.passed) };
        println!("{name:<22} {:>5} {:>7} {:>8} {:>18}  {result}", t.runs, t.faults, t.ops, t.worst_write_ms);
    }
    std::process::exit(if failed > 0 { 1 } else { 0 });
}
