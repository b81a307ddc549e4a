//! `endophyte demo qemu`: a QEMU/KVM guest of the project's own (testvm's hot-set workload, RAM filled by
//! the host) replicated to two backups whose VMs start as QEMUs, migrated live to one of them, then that
//! target killed and the replica promoted on the other. Every check is on evidence from outside the
//! sidecar: the guest's own counter read by each QEMU (`xp` on a monitor of the demo's), QEMU's own
//! `pmemsave` of guest RAM against the replica's bytes, the processes' exits.
//!
//! - [`vm`]: the guest's QEMUs and what the demo reads of them;
//! - [`peer`]: QEMU's own migration of the same guest, for comparison (`--compare-qemu`).

pub mod peer;
pub mod vm;

use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use endophyte_engine::config::SidecarConfig;
use endophyte_engine::primary::{run_sidecar, RunOptions, SidecarReport};
use endophyte_qemu::{EpochMode, QemuSource};
use serde::Serialize;
use serde_json::json;

use crate::cluster::{start_backups, Backups};
use crate::Output;
use vm::{boot, connect, counter_over, Guest};

/// A child process killed and reaped when dropped.
pub(crate) struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Arguments of `endophyte demo qemu`.
#[derive(clap::Args, Debug, Clone)]
pub struct QemuArgs {
    /// Guest RAM (whole MiB).
    #[arg(long, default_value = "256MiB", value_parser = endophyte_engine::config::parse_bytes)]
    pub mem: u64,
    /// The guest's hot set, from 4 MiB up.
    #[arg(long, default_value = "64MiB", value_parser = endophyte_engine::config::parse_bytes)]
    pub hot: u64,
    /// Page writes per second (12800: 50 MB/s of dirty pages when the hot set is larger).
    #[arg(long, default_value_t = 12800)]
    pub rate: u64,
    /// How long to replicate after the initial copy before migrating (the replication figures).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub replicate_for: Duration,
    /// How long to watch each guest run before checking it.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub run_after: Duration,
    /// Downtime budget of the migration (QEMU's own default `downtime-limit`; `--compare-qemu` gives
    /// QEMU's migration the same).
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub downtime: Duration,
    /// Give up converging after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Paths per backup (every other one through a relay).
    #[arg(long, default_value_t = 2)]
    pub paths: usize,
    /// Start the source QEMU without userfaultfd (a seccomp filter refuses it, as container runtimes'
    /// default profiles do): epochs fall back to pre-copy migrations cut with `stop`.
    #[arg(long)]
    pub deny_userfaultfd: bool,
    /// Also migrate a second copy of the guest with QEMU's own migration, for comparison.
    #[arg(long)]
    pub compare_qemu: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// The QEMU demo's result.
#[derive(Debug, Serialize)]
pub struct QemuSummary {
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// How the sidecar cuts epochs (`background-snapshot`, or `pre-copy` where QEMU refuses those).
    pub epoch_mode: String,
    /// Epochs committed by both backups over the run (migration included).
    pub epochs_committed: u64,
    /// Guest pause per epoch, ms (the migration's final pause included).
    pub epoch_pause_ms_p50: f64,
    /// 99th percentile of the same.
    pub epoch_pause_ms_p99: f64,
    /// Time from one epoch's cut to the next's, ms: for background snapshots, about one whole
    /// snapshot's stream.
    pub epoch_period_ms_p50: f64,
    /// Age of the newest committed epoch, sampled every 10 ms after the initial copy, ms.
    pub rpo_ms_p50: f64,
    /// 99th percentile of the same.
    pub rpo_ms_p99: f64,
    /// Frame bytes sent per byte of changed (or initially copied) page, per backup.
    pub wire_bytes_per_changed_byte: f64,
    /// CPU the sidecar (this process) used per epoch during `replicate_for`, ms.
    pub sidecar_cpu_ms_per_epoch: f64,
    /// CPU QEMU's threads other than its vCPU used per epoch then (its main loop and migration thread
    /// writing each snapshot), ms.
    pub qemu_cpu_ms_per_epoch: f64,
    /// The replica on the backup that was not the target, at the migration's final epoch, equals the
    /// source QEMU's own `pmemsave` of guest RAM at that epoch's pause (BLAKE3, the PC's legacy window
    /// 0xa0000-0x100000 masked).
    pub replica_matches_guest: bool,
    /// Guest downtime of the migration, ms.
    pub migration_downtime_ms: f64,
    /// Where it went, ms.
    pub migration_downtime_breakdown_ms: endophyte_engine::migrate::DowntimeBreakdown,
    /// From the migration request to the pause, ms.
    pub migration_converge_ms: f64,
    /// From the migration request to the target's confirmation, ms.
    pub migration_total_ms: f64,
    /// Frame bytes the migration sent (to both backups).
    pub migration_wire_bytes: u64,
    /// The target's QEMU had loaded the replica before the switchover.
    pub target_preloaded: bool,
    /// The guest's counter on the target started at or above the source's at the final pause, and
    /// advanced; the source QEMU exited.
    pub target_guest_continued: bool,
    /// From killing the target's QEMU to the promoted QEMU's start (the backup's lease included), ms.
    pub promote_ms: f64,
    /// The promoted guest's counter started at or above the replica's and advanced.
    pub promoted_guest_continued: bool,
    /// The guest's counter: the source's at the final pause, the target's at first and last look, the
    /// promoted guest's at first and last look.
    pub guest_pages: [u64; 5],
    /// QEMU's own migration of the same guest (`--compare-qemu`).
    pub qemu_own_migration: Option<peer::QemuMigration>,
}

/// `endophyte demo qemu`: see the module docs.
///
/// # Errors
/// QEMU or a process failed to start, or a check failed (the summary is printed first).
pub fn demo(args: QemuArgs) -> anyhow::Result<()> {
    if args.mem % (1 << 20) != 0 || args.mem < (16 << 20) {
        bail!("--mem must be whole MiB, 16 MiB or more");
    }
    if args.hot + testvm::qemu_guest::WORK_START > args.mem {
        bail!("--hot must fit in guest RAM above 4 MiB");
    }
    let s = crate::cluster::in_scratch_dir("demo-qemu", |d| demo_in(&args, d))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&s)?),
        Output::Text => print_text(&s, &args),
    }
    let peer_ok = s
        .qemu_own_migration
        .as_ref()
        .is_none_or(|m| m.guest_continued);
    if !(s.replica_matches_guest
        && s.target_guest_continued
        && s.promoted_guest_continued
        && peer_ok)
    {
        bail!("a check failed (see the summary)");
    }
    Ok(())
}

fn print_text(s: &QemuSummary, args: &QemuArgs) {
    println!(
        "A {} MiB QEMU/KVM guest ({} MB/s of page writes over a {} MiB hot set), epochs as {}:",
        s.mem_bytes >> 20,
        args.rate * 4096 / 1_000_000,
        args.hot >> 20,
        s.epoch_mode
    );
    println!(
        "  replicated           {} epochs to 2 backups; pause p50 {:.1} ms, p99 {:.1} ms; period p50 {:.0} ms; RPO p50 {:.0} ms, p99 {:.0} ms",
        s.epochs_committed, s.epoch_pause_ms_p50, s.epoch_pause_ms_p99, s.epoch_period_ms_p50, s.rpo_ms_p50, s.rpo_ms_p99
    );
    println!(
        "  cost                 {:.2} wire bytes per changed byte per backup; CPU per epoch: sidecar {:.0} ms, QEMU {:.0} ms",
        s.wire_bytes_per_changed_byte, s.sidecar_cpu_ms_per_epoch, s.qemu_cpu_ms_per_epoch
    );
    println!("  replica = pmemsave   {}", s.replica_matches_guest);
    println!(
        "  migrated to backup-2 downtime {:.1} ms ({}), converge {:.0} ms, total {:.0} ms, {:.1} MB sent, target preloaded {}",
        s.migration_downtime_ms,
        s.migration_downtime_breakdown_ms.steps(),
        s.migration_converge_ms,
        s.migration_total_ms,
        s.migration_wire_bytes as f64 / 1e6,
        s.target_preloaded
    );
    println!(
        "  target guest goes on {} (pages {} at the pause, {} then {} there)",
        s.target_guest_continued, s.guest_pages[0], s.guest_pages[1], s.guest_pages[2]
    );
    println!(
        "  promoted on backup-1 {} after the target was killed; guest goes on {} (pages {} then {})",
        format_args!("{:.0} ms", s.promote_ms),
        s.promoted_guest_continued,
        s.guest_pages[3],
        s.guest_pages[4]
    );
    if let Some(m) = &s.qemu_own_migration {
        println!(
            "  QEMU's own migration downtime {:.0} ms, total {:.0} ms, {:.1} MB sent, guest goes on {}",
            m.downtime_ms,
            m.total_ms,
            m.transferred_bytes as f64 / 1e6,
            m.guest_continued
        );
    }
}

fn demo_in(args: &QemuArgs, dir: &Path) -> anyhow::Result<QemuSummary> {
    let elf = dir.join("guest.elf");
    std::fs::write(&elf, testvm::qemu_guest::GUEST_ELF)?;
    let guest = Guest {
        elf,
        mem: args.mem,
        hot_pages: args.hot / 4096,
        rate: args.rate,
        tsc_hz: testvm::qemu_guest::tsc_hz(),
    };
    let Backups {
        kids: _kids,
        certs,
        backups,
        data_dirs,
        controls,
        ..
    } = start_backups(
        dir,
        args.paths,
        &["--target-qemu".into(), guest.target_template()],
    )?;
    let mut src = boot(dir, "source", &guest, &[], args.deny_userfaultfd)?;
    let source = QemuSource::connect(&src.sidecar_qmp, dir)?;
    let epoch_mode = match source.mode() {
        EpochMode::PreCopy { .. } => "pre-copy",
        _ => "background-snapshot",
    }
    .to_string();
    let control = dir.join("sidecar.ctl");
    let cfg = SidecarConfig {
        vm_id: "demo-vm".into(),
        qmp: Some(src.sidecar_qmp.clone()),
        certs,
        node: "primary".into(),
        paths_per_backup: args.paths,
        quorum: 2,
        control_socket: Some(control.clone()),
        backups,
        ..SidecarConfig::default()
    };
    let sidecar =
        std::thread::spawn(move || run_sidecar(cfg, Arc::new(source), RunOptions::default()));

    // Replicate: the initial copy, then `replicate_for` of steady state, with the CPU it costs.
    let t = Instant::now();
    loop {
        if sidecar.is_finished() {
            let r = sidecar
                .join()
                .map_err(|_| anyhow::anyhow!("the sidecar panicked"))?;
            bail!("the sidecar stopped before the migration: {:?}", r.err());
        }
        if control.exists() {
            let s = endophyte_engine::control::request(&control, "GET", "/v1/status", None)?;
            if s["rpo_ms"].is_number() {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the initial copy was not committed after 10 min");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let epoch_now = || -> anyhow::Result<u64> {
        let s = endophyte_engine::control::request(&control, "GET", "/v1/status", None)?;
        Ok(s["epoch"].as_u64().unwrap_or(0))
    };
    let qemu_pid = src.child.id();
    let (e0, own0, qemu0) = (epoch_now()?, vm::own_cpu(), vm::non_vcpu_cpu(qemu_pid));
    std::thread::sleep(args.replicate_for);
    let (e1, own1, qemu1) = (epoch_now()?, vm::own_cpu(), vm::non_vcpu_cpu(qemu_pid));
    let epochs = (e1 - e0).max(1) as f64;

    // Migrate to backup-2.
    let req = endophyte_engine::migrate::MigrateRequest {
        to: "backup-2".into(),
        downtime_ms: args.downtime.as_millis().max(1) as u64,
        deadline_ms: args.deadline.as_millis().max(1) as u64,
        force: false,
        verify: true,
    };
    let st =
        endophyte_engine::migrate::run_cli(&control, &req, matches!(args.output, Output::Text))?;
    let Some(migration) = st.report.clone() else {
        bail!(
            "the migration failed: {}",
            st.error.as_deref().unwrap_or("no reason given")
        );
    };
    let report: SidecarReport = sidecar
        .join()
        .map_err(|_| anyhow::anyhow!("the sidecar thread panicked"))?
        .context("the sidecar")?;
    let source_gone = wait_exit(&mut src.child, Duration::from_secs(10))?;
    // The source's RAM file outlives it: the guest's counter at the final pause.
    let (_, at_pause) = testvm::qemu_guest::status_in_file(&src.ram)?
        .context("the source's RAM holds no guest status record")?;
    let mut on_target = connect(&data_dirs[1].join("probe.qmp"), Duration::from_secs(10))?;
    let (t1, t2) = counter_over(&mut on_target, args.run_after)?;

    // The other backup's replica at the final epoch against the source QEMU's pmemsave at its pause.
    let b1 = endophyte_engine::control::request(&controls[0], "GET", "/v1/status", None)?;
    let b1_epoch = b1["vms"][0]["committed_epoch"].as_u64().unwrap_or(0);
    let replica_matches_guest = b1_epoch == migration.epoch
        && !migration.source_ram_hash.is_empty()
        && replica_hash(&data_dirs[0], args.mem)? == migration.source_ram_hash;

    // The target dies; backup-1 promotes its replica once the lease ran out.
    let fence = endophyte_engine::fence::load(&data_dirs[1])?
        .context("the target holds no fence record")?;
    let killed = Instant::now();
    endophyte_engine::fence::kill(fence.fence.vmm_pid);
    let body = json!({ "vm": "demo-vm", "force": false, "verify": true });
    loop {
        match endophyte_engine::control::request(&controls[0], "POST", "/v1/promote", Some(&body)) {
            Ok(_) => break,
            Err(e)
                if killed.elapsed() < Duration::from_secs(30)
                    && e.to_string().contains("lease") =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context("promoting on backup-1"),
        }
    }
    let promote_ms = killed.elapsed().as_secs_f64() * 1e3;
    let mut promoted = connect(&data_dirs[0].join("probe.qmp"), Duration::from_secs(10))?;
    let (p1, p2) = counter_over(&mut promoted, args.run_after)?;
    let _ = promoted.execute("quit", serde_json::Value::Null);
    drop(src);

    let qemu_own_migration = if args.compare_qemu {
        Some(peer::qemu_own_migration(
            dir,
            &guest,
            args.replicate_for,
            args.downtime,
        )?)
    } else {
        None
    };
    // Changed pages (the initial copy's included) count once; a backup gets each once, plus resyncs.
    let backups = report.backups.max(1) as u64;
    let changed = report.dirty_bytes.max(1) as f64;
    Ok(QemuSummary {
        mem_bytes: args.mem,
        epoch_mode,
        epochs_committed: report.epochs_committed,
        epoch_pause_ms_p50: report.epoch_pause_ms_p50,
        epoch_pause_ms_p99: report.epoch_pause_ms_p99,
        epoch_period_ms_p50: report.epoch_period_ms_p50,
        rpo_ms_p50: report.rpo_ms_p50,
        rpo_ms_p99: report.rpo_ms_p99,
        wire_bytes_per_changed_byte: report.wire_bytes as f64 / backups as f64 / changed,
        sidecar_cpu_ms_per_epoch: (own1 - own0).as_secs_f64() * 1e3 / epochs,
        qemu_cpu_ms_per_epoch: (qemu1 - qemu0).as_secs_f64() * 1e3 / epochs,
        replica_matches_guest,
        migration_downtime_ms: migration.downtime_ms,
        migration_downtime_breakdown_ms: migration.breakdown.clone(),
        migration_converge_ms: migration.converge_ms,
        migration_total_ms: migration.total_ms,
        migration_wire_bytes: migration.bytes_sent,
        target_preloaded: migration.target_preloaded,
        target_guest_continued: source_gone && t1 >= at_pause && t2 > t1,
        promote_ms,
        promoted_guest_continued: p1 >= at_pause && p2 > p1,
        guest_pages: [at_pause, t1, t2, p1, p2],
        qemu_own_migration,
    })
}

/// Waits up to `limit` for `child` to exit; whether it did.
fn wait_exit(child: &mut Child, limit: Duration) -> anyhow::Result<bool> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(false)
}

/// The replica's main RAM hashed as the QEMU source hashes `pmemsave`'s output.
fn replica_hash(vm_dir: &Path, mem: u64) -> anyhow::Result<String> {
    let path = vm_dir.join("replica.img");
    let mut ram = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if (ram.len() as u64) < mem {
        bail!("{} is shorter than guest RAM", path.display());
    }
    Ok(endophyte_qemu::source::hash::masked_ram_hash(
        &mut ram[..mem as usize],
    ))
}
