//! `treaty-participant`: parse flags, set up tracing, run.

use clap::Parser;

fn main() {
    let args = treaty_participant::cli::Args::parse();
    let security = args.security.clone();
    std::process::exit(security.run("treaty-participant", treaty_participant::cli::main_with(args)));
}
