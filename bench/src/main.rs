//! `endophyte-bench`: the bench harness's command.

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "endophyte-bench", version, about = "Endophyte's bench harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure what this machine can do at all: memcpy, raw UDP and TCP over loopback, lz4 on guest-like
    /// pages. Prints JSON: a list of {name, value, unit, how}.
    Limits {
        /// Time spent on each figure.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        each: Duration,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Limits { each } => {
            let figures = endophyte_bench::limits::measure_all(each)?;
            println!("{}", serde_json::to_string_pretty(&figures)?);
        }
    }
    Ok(())
}
