//! `treaty-participant`: parse flags, set up tracing, run.

use clap::Parser;

fn main() {
    let args = treaty_participant::cli::Args::parse();
    let runtime = match args.security.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("treaty-participant: cannot start its threads: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(runtime.block_on(treaty_participant::cli::main_with(args)));
}
