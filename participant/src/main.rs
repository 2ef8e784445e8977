//! `treaty-participant`: parse flags, set up tracing, run.

use clap::Parser;

#[tokio::main]
async fn main() {
    let args = treaty_participant::cli::Args::parse();
    std::process::exit(treaty_participant::cli::main_with(args).await);
}
