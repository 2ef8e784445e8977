//! `treaty-coordinator`: parse flags, set up tracing, run.

use clap::Parser;

#[tokio::main]
async fn main() {
    let args = treaty_coordinator::cli::Args::parse();
    std::process::exit(treaty_coordinator::cli::main_with(args).await);
}
