//! The `endophyte` command.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "endophyte",
    version,
    about = "Replicates a running KVM VM's memory and live-migrates it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to a VMM's agent socket, pause the VM briefly and check that the RAM the sidecar maps is
    /// the RAM the VMM has (prints JSON).
    Inspect {
        /// The VMM's attach socket.
        #[arg(long)]
        socket: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Inspect { socket } => {
            let r = endophyte::inspect::inspect(&socket)
                .with_context(|| format!("inspecting the VM behind {}", socket.display()))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if !r.hashes_match {
                bail!("guest RAM seen by the sidecar differs from the VMM's");
            }
        }
    }
    Ok(())
}
