//! `endophyte demo replicate`: everything on loopback, started by one command.
//!
//! It makes a network CA and node certificates in a scratch directory, starts two `endophyte backup`
//! processes and a testvm VMM process (this same binary, `endophyte testvm-serve`), runs the sidecar in this
//! process for the given duration, and then checks, independently of the sidecar's own bookkeeping, that each
//! backup's replica file hashes to the guest RAM hash the VMM computed at the last durable epoch's pause.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use endophyte_attach::client::AttachClient;
use endophyte_engine::config::SidecarConfig;
use endophyte_engine::primary::{run_sidecar, RunOptions};
use endophyte_vmm::attach::AttachSource;
use endophyte_vmm::Tracking;
use serde::Serialize;

use crate::cluster::{start_cluster, Cluster};
use crate::probe::{guest_pages_written, hash_file, wait_checkpoint};
use crate::Output;

/// Arguments of `endophyte demo replicate`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicateArgs {
    /// When the backups count an epoch as committed: `disk` (journal fsynced) or `memory` (written).
    #[arg(long, value_enum, default_value = "disk")]
    pub durability: endophyte_engine::store::Durability,
    /// How long to replicate once the initial full copy is durable on both backups.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Guest RAM.
    #[arg(long, default_value = "1GiB", value_parser = endophyte_engine::config::parse_bytes)]
    pub mem: u64,
    /// Guest workload (testvm syntax).
    #[arg(long, default_value = "hotset:size=256M,rate=12800,print=50000")]
    pub workload: String,
    /// Epoch length, ms.
    #[arg(long, default_value_t = 100)]
    pub epoch_ms: u64,
    /// Paths per backup (every other one through a relay).
    #[arg(long, default_value_t = 4)]
    pub paths: usize,
    /// Staging buffer.
    #[arg(long, default_value = "32MiB", value_parser = endophyte_engine::config::parse_bytes)]
    pub staging: u64,
    /// Send chunks uncompressed.
    #[arg(long)]
    pub no_compress: bool,
    /// Throttle curve (throttle-curves string form; a bare kind takes its defaults).
    #[arg(long, default_value = "linear:start=0.5,max=0.9")]
    pub curve: String,
    /// What to do when an epoch overflows staging.
    #[arg(long, value_enum, default_value = "pause")]
    pub emergency: endophyte_engine::config::Emergency,
    /// Cap on what the sidecar sends, both backups together (e.g. 20MB/s). It is applied through the
    /// sidecar's control API once the initial full copy is durable, so that a capped run does not spend
    /// minutes on the copy; `--cap-initial-copy` caps that too.
    #[arg(long, value_parser = endophyte_engine::config::parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Apply `--max-bandwidth` from the start, to the initial full copy as well.
    #[arg(long)]
    pub cap_initial_copy: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// The demo's result.
#[derive(Debug, Serialize)]
pub struct ReplicateSummary {
    /// Durable epochs of the run.
    pub epochs_committed: u64,
    /// Epoch length, ms.
    pub epoch_ms: u64,
    /// Paths per backup.
    pub paths: usize,
    /// Backups.
    pub backups: usize,
    /// Dirty bytes harvested.
    pub dirty_bytes: u64,
    /// Frame bytes sent, all backups.
    pub wire_bytes: u64,
    /// Page bytes / chunk body bytes.
    pub compression_ratio: f64,
    /// Epoch pause p50, ms.
    pub epoch_pause_ms_p50: f64,
    /// Epoch pause p99, ms.
    pub epoch_pause_ms_p99: f64,
    /// RPO p50, ms.
    pub rpo_ms_p50: f64,
    /// RPO p99, ms.
    pub rpo_ms_p99: f64,
    /// Each backup's replica equals the guest RAM hash at the last durable epoch's pause.
    pub replica_hash_match: bool,
    /// Pages the guest itself counted as written (its status record, read at the end).
    pub guest_pages_written: u64,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Bytes of the initial full copy (and any resync).
    pub resync_bytes: u64,
    /// Epochs that overflowed staging.
    pub overflow_epochs: u64,
    /// Time until the initial full copy was durable on the quorum, ms (RPO is sampled after it).
    pub initial_sync_ms: f64,
    /// Bytes of console output released after their epoch was durable (output commit).
    pub console_bytes_released: u64,
    /// Last durable epoch, whose hash was compared.
    pub durable_epoch: u64,
    /// Median vCPU throttle, percent.
    pub throttle_pct_p50: f64,
    /// Largest vCPU throttle, percent.
    pub throttle_pct_max: f64,
    /// Emergencies (epochs that overflowed staging).
    pub emergency_events: u64,
    /// Bytes the slowest backup acknowledged per second.
    pub drain_bytes_per_s: f64,
    /// The guest's own write rate in steady state (from the initial copy being durable to the end), from
    /// its own page counter, pages/s.
    pub guest_rate_pages_per_s: f64,
    /// The guest's own write rate over 2 s before replication started (no throttle), pages/s.
    pub guest_free_rate_pages_per_s: f64,
    /// Bandwidth cap in force in steady state, bytes/s (`null`: none).
    pub max_bandwidth: Option<u64>,
}

/// Runs the demo and prints its summary.
///
/// # Errors
/// If a component fails to start, or the replicas do not match (after printing the summary).
pub fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let summary = crate::cluster::in_scratch_dir("demo", |d| replicate_in(&args, d))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&summary)?),
        Output::Text => {
            println!(
                "Replicated a {} MiB guest to {} backups over {} paths each for {:?} after the initial copy:",
                summary.mem_bytes >> 20,
                summary.backups,
                summary.paths,
                args.duration
            );
            println!(
                "  epochs durable      {} (epoch {} ms)",
                summary.epochs_committed, summary.epoch_ms
            );
            println!("  guest pages written {}", summary.guest_pages_written);
            println!(
                "  dirty bytes         {} MiB (+ {} MiB initial copy)",
                summary.dirty_bytes >> 20,
                summary.resync_bytes >> 20
            );
            println!(
                "  wire bytes          {} MiB (compression x{:.2})",
                summary.wire_bytes >> 20,
                summary.compression_ratio
            );
            println!(
                "  epoch pause         p50 {:.2} ms, p99 {:.2} ms",
                summary.epoch_pause_ms_p50, summary.epoch_pause_ms_p99
            );
            println!(
                "  initial full copy   durable after {:.1} s",
                summary.initial_sync_ms / 1e3
            );
            println!(
                "  RPO (steady state)  p50 {:.1} ms, p99 {:.1} ms",
                summary.rpo_ms_p50, summary.rpo_ms_p99
            );
            println!(
                "  guest write rate    {:.0} pages/s (free: {:.0}); throttle p50 {:.0} %, max {:.0} %{}",
                summary.guest_rate_pages_per_s,
                summary.guest_free_rate_pages_per_s,
                summary.throttle_pct_p50,
                summary.throttle_pct_max,
                summary
                    .max_bandwidth
                    .map_or(String::new(), |c| format!(" (cap {:.1} MB/s)", c as f64 / 1e6))
            );
            println!(
                "  emergencies         {}, drain {:.1} MB/s",
                summary.emergency_events,
                summary.drain_bytes_per_s / 1e6
            );
            println!(
                "  console output      {} bytes released once their epoch was durable",
                summary.console_bytes_released
            );
            println!(
                "  replicas match RAM at epoch {}: {}",
                summary.durable_epoch, summary.replica_hash_match
            );
        }
    }
    if !summary.replica_hash_match {
        bail!("a replica does not match the guest RAM of its epoch");
    }
    Ok(())
}

fn replicate_in(args: &ReplicateArgs, dir: &Path) -> anyhow::Result<ReplicateSummary> {
    let Cluster {
        kids: _kids,
        certs,
        backups,
        data_dirs,
        socket,
        ..
    } = start_cluster(dir, args.paths, args.mem, &args.workload, args.durability)?;
    // The guest's own counter: its free write rate first, then (below) its rate in steady state.
    let guest_free_rate_pages_per_s = {
        let probe = AttachClient::connect(&socket, "demo-check")?;
        let (p0, t0) = (guest_pages_written(&probe)?, Instant::now());
        std::thread::sleep(Duration::from_secs(2));
        (guest_pages_written(&probe)? - p0) as f64 / t0.elapsed().as_secs_f64()
    };
    let control = dir.join("sidecar.ctl");
    // Once the initial copy is durable: cap the bandwidth (unless capped from the start) and read the
    // guest's counter, through the sidecar's control API and the attach socket like any operator tool.
    let steady = {
        let (control, socket) = (control.clone(), socket.clone());
        let cap = args.max_bandwidth.filter(|_| !args.cap_initial_copy);
        std::thread::spawn(move || -> anyhow::Result<(u64, Instant)> {
            let t = Instant::now();
            loop {
                if control.exists() {
                    let s =
                        endophyte_engine::control::request(&control, "GET", "/v1/status", None)?;
                    if s["rpo_ms"].is_number() {
                        break;
                    }
                }
                if t.elapsed() > Duration::from_secs(1800) {
                    bail!("the initial copy was not durable after 30 min");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(cap) = cap {
                endophyte_engine::control::request(
                    &control,
                    "PUT",
                    "/v1/max-bandwidth",
                    Some(&serde_json::json!({ "bytes_per_s": cap })),
                )?;
            }
            let probe = AttachClient::connect(&socket, "demo-check")?;
            Ok((guest_pages_written(&probe)?, Instant::now()))
        })
    };
    let hashes = dir.join("ram-hashes.jsonl");
    let cfg = SidecarConfig {
        vm_id: "demo-vm".into(),
        attach_socket: socket.clone(),
        certs: certs.clone(),
        node: "primary".into(),
        epoch_ms: args.epoch_ms,
        staging: args.staging,
        paths_per_backup: args.paths,
        explicit: endophyte_engine::config::Explicit {
            epoch_ms: true,
            staging: true,
            max_unacked: false,
        },
        quorum: 2,
        compress: !args.no_compress,
        curve: args.curve.clone(),
        emergency: args.emergency,
        max_bandwidth: args.max_bandwidth.filter(|_| args.cap_initial_copy),
        control_socket: Some(control),
        backups,
        ..SidecarConfig::default()
    };
    let vmm = Arc::new(AttachSource::connect(&socket, Tracking::DirtyLog)?);
    let report = run_sidecar(
        cfg,
        vmm,
        RunOptions {
            duration: Some(args.duration),
            duration_after_initial_copy: true,
            ram_hashes: Some(hashes.clone()),
            final_hash_only: true,
            report: None,
            console_out: Some(dir.join("console.log")),
        },
    )?;
    let probe = AttachClient::connect(&socket, "demo-check")?;
    let guest_pages_written = guest_pages_written(&probe)?;
    let (pages_steady, steady_from) = steady
        .join()
        .map_err(|_| anyhow::anyhow!("the demo's monitor thread panicked"))?
        .context("watching the sidecar's status")?;
    let guest_rate_pages_per_s =
        (guest_pages_written - pages_steady) as f64 / steady_from.elapsed().as_secs_f64();
    // The final epoch's RAM hash, taken by the VMM during its pause.
    let text = std::fs::read_to_string(&hashes)?;
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().context("no RAM hash recorded")?)?;
    let epoch = last["epoch"].as_u64().context("hash line without epoch")?;
    let ram_hash = last["ram_hash"]
        .as_str()
        .context("hash line without hash")?
        .to_string();
    let mut matches = report.final_epoch_durable && report.durable_epoch == epoch;
    for d in &data_dirs {
        let committed = wait_checkpoint(d, epoch, Duration::from_secs(15))?;
        let h = hash_file(&d.join("replica.img"))?;
        let ok = committed == epoch && h == ram_hash;
        if !ok {
            tracing::error!(dir = %d.display(), committed, epoch, "replica does not match");
        }
        matches &= ok;
    }
    let _ = probe.shutdown();
    Ok(ReplicateSummary {
        epochs_committed: report.epochs_committed,
        epoch_ms: report.epoch_ms,
        paths: report.paths,
        backups: report.backups,
        dirty_bytes: report.dirty_bytes,
        wire_bytes: report.wire_bytes,
        compression_ratio: report.compression_ratio,
        epoch_pause_ms_p50: report.epoch_pause_ms_p50,
        epoch_pause_ms_p99: report.epoch_pause_ms_p99,
        rpo_ms_p50: report.rpo_ms_p50,
        rpo_ms_p99: report.rpo_ms_p99,
        replica_hash_match: matches,
        guest_pages_written,
        mem_bytes: report.mem_bytes,
        resync_bytes: report.resync_bytes,
        overflow_epochs: report.overflow_epochs,
        initial_sync_ms: report.initial_sync_ms,
        console_bytes_released: report.console_bytes_released,
        durable_epoch: report.durable_epoch,
        throttle_pct_p50: report.throttle_pct_p50,
        throttle_pct_max: report.throttle_pct_max,
        emergency_events: report.emergency_events,
        drain_bytes_per_s: report.drain_bytes_per_s,
        guest_rate_pages_per_s,
        guest_free_rate_pages_per_s,
        max_bandwidth: args.max_bandwidth,
    })
}
