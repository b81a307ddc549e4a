//! Node administration: `relay`, `certs`, `inspect`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

/// `endophyte relay`'s flags.
#[derive(Args)]
pub struct RelayArgs {
    /// Routes as LISTEN=UPSTREAM, e.g. 0.0.0.0:7500=10.0.0.2:7400 (repeatable).
    #[arg(long = "route", required = true)]
    routes: Vec<String>,
}

/// Forwards every route until the process ends.
///
/// # Errors
/// A malformed route or an address that cannot be bound.
pub fn relay(a: RelayArgs) -> anyhow::Result<()> {
    let mut parsed = vec![];
    for r in &a.routes {
        let (l, u) = r
            .split_once('=')
            .with_context(|| format!("route {r:?} is not LISTEN=UPSTREAM"))?;
        let l: SocketAddr = l
            .parse()
            .with_context(|| format!("route {r:?}: bad listen address"))?;
        let u: SocketAddr = u
            .parse()
            .with_context(|| format!("route {r:?}: bad upstream address"))?;
        parsed.push((l, u));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(async move {
            let mut tasks = vec![];
            for (l, u) in parsed {
                let route = endophyte_engine::relay::Route::bind(l, u)
                    .await
                    .with_context(|| format!("binding {l}"))?;
                eprintln!("relay {} -> {u}", route.local_addr()?);
                tasks.push(tokio::spawn(route.run()));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })
}

/// `endophyte certs` subcommands.
#[derive(Subcommand)]
pub enum CertsCmd {
    /// Create a network: a new CA in DIR (ca.pem, ca.key).
    Init {
        /// Directory.
        #[arg(long)]
        dir: PathBuf,
        /// The network's name.
        #[arg(long)]
        network: String,
    },
    /// Sign a node certificate with the CA in DIR (<node>.pem, <node>.key).
    Issue {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Node names (DNS-style), one certificate each.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
    },
}

/// Makes a network's CA or node certificates.
///
/// # Errors
/// The directory cannot be written, or the CA is missing.
pub fn certs(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { dir, network } => {
            endophyte_engine::tls::init_network(&dir, &network)?;
            println!("network {network:?}: CA written to {}", dir.display());
        }
        CertsCmd::Issue { dir, nodes } => {
            for n in nodes {
                endophyte_engine::tls::issue_node(&dir, &n)?;
                println!("node {n:?}: {0}/{n}.pem, {0}/{n}.key", dir.display());
            }
        }
    }
    Ok(())
}

/// `endophyte inspect`'s flags.
#[derive(Args)]
pub struct InspectArgs {
    /// The VMM's attach socket.
    #[arg(long)]
    socket: PathBuf,
}

/// Prints what the inspection found.
///
/// # Errors
/// Attaching failed, or the two views of guest RAM differ.
pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let r = endophyte_attach::inspect::inspect(&a.socket)
        .with_context(|| format!("inspecting the VM behind {}", a.socket.display()))?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    if !r.hashes_match {
        bail!("guest RAM seen by the sidecar differs from the VMM's");
    }
    Ok(())
}
