//! `treaty-faults`: run fault-injection campaigns.
//!
//! ```sh
//! cargo run -p treaty-faults --release -- --seeds 20
//! cargo run -p treaty-faults -- --seeds 3 --broken     # must report violations
//! ```

use std::time::Duration;

use clap::Parser;

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
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let mut failed = 0;
    for seed in args.start..args.start + args.seeds {
        let mut cfg = treaty_faults::CampaignConfig::new(seed);
        cfg.duration = Duration::from_secs(args.seconds);
        cfg.clients = args.clients;
        cfg.faults = !args.no_faults;
        cfg.broken = args.broken;
        match treaty_faults::run(cfg).await {
            Ok(r) => {
                println!("{}", r.summary());
                if !r.linearizable() {
                    failed += 1;
                }
            }
            Err(e) => {
                println!("seed {seed}: harness error: {e:#}");
                failed += 1;
            }
        }
    }
    println!("{} seeds: {} passed, {failed} failed", args.seeds, args.seeds - failed);
    std::process::exit(if failed > 0 { 1 } else { 0 });
}
