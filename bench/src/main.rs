//! `endophyte-bench`: the bench harness's command.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use endophyte_bench::run::Plan;

#[derive(Parser)]
#[command(name = "endophyte-bench", version, about = "Endophyte's bench harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The CI-sized subset (about 6 minutes here): limits, the emulator check, replication and migration
    /// (Endophyte and QEMU) on LAN at 256 MiB, paths, failover, compression. Needs root.
    Quick(RunArgs),
    /// Every scenario on every profile, 1 and 4 GiB, 10/50/200 MB/s, 10 migrations per cell: hours.
    /// The options narrow it.
    Full(RunArgs),
    /// Rewrite report.md and the plots from a report.json (e.g. one from another machine).
    Render {
        /// The report.json.
        report: PathBuf,
        /// Where report.md and the plots go (default: beside the report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Measure what this machine can do at all: memcpy, raw UDP and TCP over loopback, lz4 on guest-like
    /// pages. Prints JSON: a list of {name, value, unit, how}.
    Limits {
        /// Time spent on each figure.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        each: Duration,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Where report.json, report.md, the plots and the scenario logs (work/) go.
    #[arg(long, default_value = "bench-report")]
    out: PathBuf,
    /// Only these scenarios (limits, emulator, replication, migration, paths, failover, compression).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Profiles of the replication and migration grid (loopback, lan, wan, thin-wan).
    #[arg(long, value_delimiter = ',')]
    profiles: Vec<String>,
    /// VM sizes of the grid (e.g. 1GiB,4GiB).
    #[arg(long, value_delimiter = ',', value_parser = endophyte_engine::config::parse_bytes)]
    sizes: Vec<u64>,
    /// Dirty-rate targets of the grid, MB/s (e.g. 10,50,200).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Migrations per cell, each system.
    #[arg(long)]
    runs: Option<usize>,
    /// Leave out the QEMU peer.
    #[arg(long)]
    no_qemu: bool,
    /// The QEMU peer's accelerator: `kvm` (the same emulating KVM as Endophyte's guest) or `tcg`.
    #[arg(long, value_enum, default_value_t = endophyte_bench::qemu::Accel::Kvm)]
    qemu_accel: endophyte_bench::qemu::Accel,
    /// How long one QEMU migration may take before it is cancelled and counted as not converged
    /// (default: the mode's, 60 s quick, 300 s full).
    #[arg(long, value_parser = humantime::parse_duration)]
    qemu_limit: Option<Duration>,
    /// Downtime budget of every migration, both systems (default 50 ms). A switchover takes at least three
    /// round trips, so a profile with a long one needs more: `wan`'s 50 ms RTT puts the floor at 150 ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    downtime: Option<Duration>,
}

fn plan(mut p: Plan, a: &RunArgs) -> Plan {
    if !a.only.is_empty() {
        p.only = a.only.clone();
    }
    if !a.profiles.is_empty() {
        p.profiles = a.profiles.clone();
    }
    if !a.sizes.is_empty() {
        p.sizes = a.sizes.clone();
    }
    if !a.rates.is_empty() {
        p.rates = a.rates.clone();
    }
    if let Some(r) = a.runs {
        p.runs = r;
        p.qemu_runs = r;
    }
    p.no_qemu = a.no_qemu;
    p.qemu_accel = a.qemu_accel;
    if let Some(l) = a.qemu_limit {
        p.qemu_limit = l;
    }
    if let Some(d) = a.downtime {
        p.downtime = d;
    }
    p
}

fn run(p: Plan, a: &RunArgs) -> anyhow::Result<()> {
    for name in &p.profiles {
        endophyte_bench::topology::profile_named(name).map_err(|e| anyhow::anyhow!(e))?;
    }
    let rep = endophyte_bench::run::run(&p, &a.out)?;
    let mut files = rep.write(&a.out)?;
    files.extend(endophyte_bench::plot::plots(&rep, &a.out)?);
    let _ = std::fs::remove_file(a.out.join("report.partial.json"));
    print!("{}", rep.markdown());
    for f in files {
        eprintln!("bench: wrote {}", f.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Quick(a) => run(plan(Plan::quick(), &a), &a)?,
        Cmd::Full(a) => run(plan(Plan::full(), &a), &a)?,
        Cmd::Render { report, out } => {
            let bytes = std::fs::read(&report)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", report.display()))?;
            let rep: endophyte_bench::report::Report = serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{} is not a bench report: {e}", report.display()))?;
            let dir = out.unwrap_or_else(|| {
                report
                    .parent()
                    .map_or_else(|| PathBuf::from("."), PathBuf::from)
            });
            let mut files = rep.write(&dir)?;
            files.extend(endophyte_bench::plot::plots(&rep, &dir)?);
            for f in files {
                eprintln!("bench: wrote {}", f.display());
            }
        }
        Cmd::Limits { each } => {
            let figures = endophyte_bench::limits::measure_all(each)?;
            println!("{}", serde_json::to_string_pretty(&figures)?);
        }
    }
    Ok(())
}
