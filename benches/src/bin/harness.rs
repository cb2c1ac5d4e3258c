//! `keel-harness SCENARIO [--model PATH] [--json] [--out DIR] [--seconds S]`: the benchmark
//! harness (the same as `keel bench`).

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "keel-harness", about = "Keel's benchmark harness")]
struct Cli {
    #[command(flatten)]
    args: keel_benches::harness::Args,
}

fn main() -> ExitCode {
    match keel_benches::harness::run(&Cli::parse().args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
