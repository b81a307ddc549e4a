//! `endophyte demo migrate` (and `endophyte demo` with no subcommand): replicate a running guest to two
//! backups, migrate it to one of them, and check on evidence from outside the sidecar that it runs there:
//! the RAM hashes both VMMs compute, and the guest's own page counter before and after.

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
use crate::probe::guest_pages_written;
use crate::Output;

/// Arguments of `endophyte demo migrate` (and of `endophyte demo` with none).
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// When the backups count an epoch as committed: `disk` (journal fsynced) or `memory` (written).
    #[arg(long, value_enum, default_value = "disk")]
    pub durability: endophyte_engine::store::Durability,
    /// Guest RAM.
    #[arg(long, default_value = "1GiB", value_parser = endophyte_engine::config::parse_bytes)]
    pub mem: u64,
    /// Guest workload (testvm syntax).
    #[arg(long, default_value = "hotset:size=256M,rate=12800,print=50000")]
    pub workload: String,
    /// How long to replicate after the initial copy before migrating (then, until the replica is current:
    /// the RPO below `--current-rpo`).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub replicate_for: Duration,
    /// The replica counts as current, and the migration starts, once the sidecar's RPO is below this
    /// (after the initial copy the backups may still be committing the epochs that piled up behind it).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub current_rpo: Duration,
    /// How long to let the guest run on the target before checking it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub run_after: Duration,
    /// Downtime budget.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub downtime: Duration,
    /// Give up converging after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Paths per backup (every other one through a relay).
    #[arg(long, default_value_t = 4)]
    pub paths: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// The migration demo's result.
#[derive(Debug, Serialize)]
pub struct MigrateSummary {
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Guest downtime, ms: from the source's pause until the target's confirmation, without the
    /// verification hash (see `downtime_with_verify_ms`).
    pub downtime_ms: f64,
    /// Where it went, ms.
    pub downtime_breakdown_ms: endophyte_engine::migrate::DowntimeBreakdown,
    /// The downtime including the target hashing guest RAM for `memory_hash_match`, ms.
    pub downtime_with_verify_ms: f64,
    /// Predicted downtime when the switchover started, ms.
    pub predicted_downtime_ms: f64,
    /// From the migration request to the pause, ms.
    pub converge_ms: f64,
    /// From the migration request to the target's confirmation, ms.
    pub total_ms: f64,
    /// Frame bytes sent during the migration (to both backups).
    pub bytes_sent: u64,
    /// Page bytes of the final epoch: the delta the switchover carried.
    pub final_epoch_bytes: u64,
    /// Bytes of the vCPU and device state the switchover carried.
    pub state_bytes: u64,
    /// Guest RAM hash at the source's final pause (by the source VMM) equals the guest RAM hash on the
    /// target before it resumed (by the target VMM).
    pub memory_hash_match: bool,
    /// The guest's own page counter on the target started at or above the source's last value and
    /// advanced.
    pub guest_progress_continued: bool,
    /// The target VMM runs the guest (its counter advances over `run_after`) and the source VMM exited.
    pub target_vm_running: bool,
    /// The guest's page counter: source at the final pause, target at the first and last look.
    pub guest_pages: [u64; 3],
    /// Initial full copy, ms.
    pub initial_sync_ms: f64,
    /// From the initial copy's durability until the migration request: `replicate_for`, then until the
    /// RPO was below `current_rpo`, ms.
    pub replicated_ms: f64,
    /// The backup the VM moved to.
    pub target: String,
}

/// `endophyte demo migrate`: replicate a running guest to two backups, migrate it to one of them, check it
/// runs there, print a summary.
///
/// # Errors
/// A process failed to start, or a check failed (the summary is printed first).
pub fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let s = crate::cluster::in_scratch_dir("demo", |d| migrate_in(&args, d))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&s)?),
        Output::Text => {
            let b = &s.downtime_breakdown_ms;
            println!(
                "Migrated a running {} MiB guest to {} over {} paths:",
                s.mem_bytes >> 20,
                s.target,
                args.paths
            );
            println!(
                "  initial full copy   durable after {:.1} s, then replicated for {:.1} s (until the RPO was below {:?})",
                s.initial_sync_ms / 1e3,
                s.replicated_ms / 1e3,
                args.current_rpo
            );
            println!(
                "  converge            {:.0} ms (predicted downtime {:.1} ms, budget {:?})",
                s.converge_ms, s.predicted_downtime_ms, args.downtime
            );
            println!(
                "  downtime            {:.1} ms: {}",
                s.downtime_ms,
                b.steps()
            );
            println!(
                "  check               the target hashed guest RAM for {:.0} ms before resuming (the guest stood still {:.0} ms in all)",
                b.verify_ms, s.downtime_with_verify_ms
            );
            println!(
                "  total               {:.0} ms, {:.1} MB sent",
                s.total_ms,
                s.bytes_sent as f64 / 1e6
            );
            println!("  memory hashes match {}", s.memory_hash_match);
            println!(
                "  guest continued     {} (pages: {} at the source's pause, {} then {} on the target)",
                s.guest_progress_continued, s.guest_pages[0], s.guest_pages[1], s.guest_pages[2]
            );
            println!("  target VM running   {}", s.target_vm_running);
        }
    }
    if !(s.memory_hash_match && s.guest_progress_continued && s.target_vm_running) {
        bail!("the migrated VM failed a check (see the summary)");
    }
    Ok(())
}

/// Polls the sidecar's `/v1/status` on `control` every 50 ms until `ok` holds; returns the ms since `t`.
///
/// # Errors
/// The sidecar stopped, the control socket failed, or `limit` passed since `t` without `what`.
fn wait_for_status<T>(
    control: &Path,
    sidecar: &std::thread::JoinHandle<T>,
    (t, limit): (Instant, Duration),
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<f64> {
    loop {
        if sidecar.is_finished() {
            bail!("the sidecar stopped before the migration");
        }
        if control.exists() {
            let s = endophyte_engine::control::request(control, "GET", "/v1/status", None)?;
            if ok(&s) {
                return Ok(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        if t.elapsed() > limit {
            bail!("waited {limit:?} for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn migrate_in(args: &MigrateArgs, dir: &Path) -> anyhow::Result<MigrateSummary> {
    let cluster = start_cluster(dir, args.paths, args.mem, &args.workload, args.durability)?;
    let base = cluster.sidecar_config(args.paths);
    let Cluster {
        mut kids,
        data_dirs,
        socket,
        ..
    } = cluster;
    let control = dir.join("sidecar.ctl");
    // The demo's own view of the source guest: a second attach connection whose mapping of guest RAM
    // outlives the source VMM, so that the guest's counter at the final pause can be read after the
    // switchover (the source VMM stays paused from that pause until it exits).
    let source_probe = AttachClient::connect(&socket, "demo-check")?;
    let vmm = Arc::new(AttachSource::connect(&socket, Tracking::DirtyLog)?);
    let cfg = SidecarConfig {
        control_socket: Some(control.clone()),
        ..base
    };
    let sidecar = std::thread::spawn(move || {
        run_sidecar(
            cfg,
            vmm,
            RunOptions {
                console_out: Some(std::env::temp_dir().join("endophyte-demo-console.log")),
                ..RunOptions::default()
            },
        )
    });
    // Replicate: the initial copy, then `replicate_for` of steady state.
    let t = Instant::now();
    let initial_sync_ms = wait_for_status(
        &control,
        &sidecar,
        (t, Duration::from_secs(600)),
        "the initial copy to be durable",
        |s| s["rpo_ms"].is_number(),
    )?;
    std::thread::sleep(args.replicate_for);
    // The replica is current once the RPO is low: epochs queued behind the initial copy are committed.
    let rpo_ms = args.current_rpo.as_secs_f64() * 1e3;
    let what = format!("the RPO to fall below {:?}", args.current_rpo);
    wait_for_status(
        &control,
        &sidecar,
        (t, Duration::from_secs(900)),
        &what,
        |s| s["rpo_ms"].as_f64().is_some_and(|r| r < rpo_ms),
    )?;
    let replicated_ms = t.elapsed().as_secs_f64() * 1e3 - initial_sync_ms;
    let target = "backup-2".to_string();
    let req = endophyte_engine::migrate::MigrateRequest {
        to: target.clone(),
        downtime_ms: args.downtime.as_millis().max(1) as u64,
        deadline_ms: args.deadline.as_millis().max(1) as u64,
        force: false,
        verify: true,
    };
    let st =
        endophyte_engine::migrate::run_cli(&control, &req, matches!(args.output, Output::Text))?;
    let report = match (&st.report, &st.error) {
        (Some(r), _) => r.clone(),
        (None, e) => bail!(
            "the migration failed: {}",
            e.as_deref().unwrap_or("no reason given")
        ),
    };
    let sidecar_result = sidecar
        .join()
        .map_err(|_| anyhow::anyhow!("the sidecar thread panicked"))?;
    sidecar_result.context("the sidecar")?;
    // The source VMM exits once the target runs the guest.
    let source_gone = {
        let vmm = kids.0.last_mut().expect("the VMM is the last child");
        let t = Instant::now();
        loop {
            if vmm.try_wait()?.is_some() {
                break true;
            }
            if t.elapsed() > Duration::from_secs(10) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let target_dir = &data_dirs[1];
    let on_target = AttachClient::connect(target_dir.join("vmm.sock"), "demo-check")
        .context("attaching to the VM on the target")?;
    let p1 = guest_pages_written(&on_target)?;
    std::thread::sleep(args.run_after);
    let p2 = guest_pages_written(&on_target)?;
    let _ = on_target.shutdown();
    let p0 = guest_pages_written(&source_probe)?;
    Ok(MigrateSummary {
        mem_bytes: args.mem,
        downtime_ms: report.downtime_ms,
        downtime_breakdown_ms: report.breakdown.clone(),
        downtime_with_verify_ms: report.downtime_with_verify_ms,
        predicted_downtime_ms: report.predicted_downtime_ms,
        converge_ms: report.converge_ms,
        total_ms: report.total_ms,
        bytes_sent: report.bytes_sent,
        final_epoch_bytes: report.final_epoch_bytes,
        state_bytes: report.state_bytes,
        memory_hash_match: !report.source_ram_hash.is_empty()
            && report.source_ram_hash == report.target_ram_hash,
        guest_progress_continued: p1 >= p0 && p2 > p1,
        target_vm_running: source_gone && p2 > p1,
        guest_pages: [p0, p1, p2],
        initial_sync_ms,
        replicated_ms,
        target,
    })
}
