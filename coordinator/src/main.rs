//! `treaty-coordinator`: parse flags, set up tracing, run.

use clap::Parser;

fn main() {
    let args = treaty_coordinator::cli::Args::parse();
    let security = args.security.clone();
    std::process::exit(security.run("treaty-coordinator", treaty_coordinator::cli::main_with(args)));
}
