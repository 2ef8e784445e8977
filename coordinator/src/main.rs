//! `treaty-coordinator`: parse flags, set up tracing, run.

use clap::Parser;

fn main() {
    let args = treaty_coordinator::cli::Args::parse();
    let runtime = match args.security.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("treaty-coordinator: cannot start its threads: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(runtime.block_on(treaty_coordinator::cli::main_with(args)));
}
