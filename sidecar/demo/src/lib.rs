//! `endophyte demo replicate`: everything on loopback, started by one command.
//!
//! It makes a network CA and node certificates in a scratch directory, starts two `endophyte backup`
//! processes and a testvm VMM process (this same binary, `endophyte testvm-serve`), runs the sidecar in this
//! process for the given duration, and then checks, independently of the sidecar's own bookkeeping, that each
//! backup's replica file hashes to the guest RAM hash the VMM computed at the last durable epoch's pause.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use endophyte_attach::client::AttachClient;
use serde::Serialize;

use crate::config::{BackupSpec, SidecarConfig};
use crate::replicate::{run_sidecar, RunOptions};

/// Arguments of `endophyte demo replicate`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicateArgs {
    /// How long to replicate once the initial full copy is durable on both backups.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Guest RAM.
    #[arg(long, default_value = "1GiB", value_parser = crate::config::parse_bytes)]
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
    #[arg(long, default_value = "32MiB", value_parser = crate::config::parse_bytes)]
    pub staging: u64,
    /// Send chunks uncompressed.
    #[arg(long)]
    pub no_compress: bool,
    /// Throttle curve (throttle-curves string form; a bare kind takes its defaults).
    #[arg(long, default_value = "linear:start=0.5,max=0.9")]
    pub curve: String,
    /// What to do when an epoch overflows staging.
    #[arg(long, value_enum, default_value = "pause")]
    pub emergency: crate::config::Emergency,
    /// Cap on what the sidecar sends, both backups together (e.g. 20MB/s). It is applied through the
    /// sidecar's control API once the initial full copy is durable, so that a capped run does not spend
    /// minutes on the copy; `--cap-initial-copy` caps that too.
    #[arg(long, value_parser = crate::config::parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Apply `--max-bandwidth` from the start, to the initial full copy as well.
    #[arg(long)]
    pub cap_initial_copy: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// Output format.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    /// Human-readable summary.
    Text,
    /// One JSON object.
    Json,
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

struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_for(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while !path.exists() {
        if t.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Sum of the guest's own pages-written counters, found by their magic in the first 64 MiB of guest RAM.
pub fn guest_pages_written(c: &AttachClient) -> anyhow::Result<u64> {
    use testvm::guest;
    let page = c.info().page_size;
    let limit = c
        .info()
        .regions
        .iter()
        .map(|r| r.gpa + r.size_bytes)
        .max()
        .unwrap_or(0)
        .min(64 << 20);
    let read = |gpa: u64| -> anyhow::Result<u64> {
        let mut b = [0u8; 8];
        c.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    let mut total = 0;
    let mut found = 0;
    for g in (0..limit).step_by(page as usize) {
        if read(g + guest::status::MAGIC as u64)? == guest::STATUS_MAGIC {
            total += read(g + guest::status::PAGES_WRITTEN as u64)?;
            found += 1;
        }
    }
    if found == 0 {
        bail!("no guest status record found");
    }
    Ok(total)
}

/// BLAKE3 of a file, hex.
pub fn hash_file(path: &Path) -> anyhow::Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h).with_context(|| format!("hashing {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// The epoch a backup's replica file holds durably, from its `state.json` (its last checkpoint).
pub fn checkpoint_on_disk(vm_dir: &Path) -> anyhow::Result<u64> {
    let p = vm_dir.join("state.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
    )?;
    v["checkpoint_epoch"]
        .as_u64()
        .context("state.json has no checkpoint_epoch")
}

/// Waits (up to `limit`) until the backup checkpointed `epoch` (it does within about 2 s of committing it,
/// sooner when idle); returns the last checkpoint seen.
pub fn wait_checkpoint(vm_dir: &Path, epoch: u64, limit: Duration) -> anyhow::Result<u64> {
    let t = Instant::now();
    loop {
        let c = checkpoint_on_disk(vm_dir)?;
        if c >= epoch || t.elapsed() > limit {
            return Ok(c);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the demo and prints its summary.
///
/// # Errors
/// If a component fails to start, or the replicas do not match (after printing the summary).
pub fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("endophyte-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = replicate_in(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let summary = result?;
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

/// The demo's processes on loopback: two backups (each with a relay on every other path) and a testvm VMM.
struct Cluster {
    kids: Kids,
    certs: PathBuf,
    backups: Vec<BackupSpec>,
    /// Each backup's directory for the demo VM.
    data_dirs: Vec<PathBuf>,
    /// The VMM's attach socket.
    socket: PathBuf,
}

fn start_cluster(dir: &Path, paths: usize, mem: u64, workload: &str) -> anyhow::Result<Cluster> {
    let exe = std::env::current_exe()?;
    let certs = dir.join("certs");
    crate::tls::init_network(&certs, "demo")?;
    for n in ["primary", "backup-1", "backup-2"] {
        crate::tls::issue_node(&certs, n)?;
    }
    let mut kids = Kids(vec![]);
    let mut backups = vec![];
    let mut data_dirs: Vec<PathBuf> = vec![];
    for (i, name) in ["backup-1", "backup-2"].iter().enumerate() {
        let addr = free_udp_port()?;
        let data = dir.join(format!("data-{}", i + 1));
        kids.0.push(
            Command::new(&exe)
                .args(["backup", "--listen", &addr.to_string(), "--node", name])
                .arg("--certs")
                .arg(&certs)
                .arg("--data-dir")
                .arg(&data)
                .stdin(Stdio::null())
                .spawn()
                .context("starting a backup")?,
        );
        // Every other path of each backup goes through a relay.
        let relay = free_udp_port()?;
        kids.0.push(
            Command::new(&exe)
                .args(["relay", "--route", &format!("{relay}={addr}")])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a relay")?,
        );
        backups.push(BackupSpec {
            name: name.to_string(),
            addr,
            paths: Some(paths),
            via: vec![relay],
        });
        data_dirs.push(data.join("demo-vm"));
    }
    let socket = dir.join("vm.sock");
    kids.0.push(
        Command::new(&exe)
            .args(["testvm-serve", "--fill", "--workload", workload])
            .arg("--mem")
            .arg(mem.to_string())
            .arg("--attach-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .context("starting testvm")?,
    );
    wait_for(&socket, Duration::from_secs(60))?;
    Ok(Cluster {
        kids,
        certs,
        backups,
        data_dirs,
        socket,
    })
}

fn replicate_in(args: &ReplicateArgs, dir: &Path) -> anyhow::Result<ReplicateSummary> {
    let Cluster {
        kids: _kids,
        certs,
        backups,
        data_dirs,
        socket,
    } = start_cluster(dir, args.paths, args.mem, &args.workload)?;
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
                    let s = crate::control::request(&control, "GET", "/v1/status", None)?;
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
                crate::control::request(
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
        explicit: crate::config::Explicit {
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
    let report = run_sidecar(
        cfg,
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

/// Arguments of `endophyte demo migrate` (and of `endophyte demo` with none).
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1GiB", value_parser = crate::config::parse_bytes)]
    pub mem: u64,
    /// Guest workload (testvm syntax).
    #[arg(long, default_value = "hotset:size=256M,rate=12800,print=50000")]
    pub workload: String,
    /// How long to replicate after the initial copy before migrating.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub replicate_for: Duration,
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
    pub downtime_breakdown_ms: crate::migrate::DowntimeBreakdown,
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
    /// The backup the VM moved to.
    pub target: String,
}

/// `endophyte demo migrate`: replicate a running guest to two backups, migrate it to one of them, check it
/// runs there, print a summary.
///
/// # Errors
/// A process failed to start, or a check failed (the summary is printed first).
pub fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("endophyte-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = migrate_in(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let s = result?;
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
                "  initial full copy   durable after {:.1} s, then replicated for {:?}",
                s.initial_sync_ms / 1e3,
                args.replicate_for
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

fn migrate_in(args: &MigrateArgs, dir: &Path) -> anyhow::Result<MigrateSummary> {
    let Cluster {
        mut kids,
        certs,
        backups,
        data_dirs,
        socket,
    } = start_cluster(dir, args.paths, args.mem, &args.workload)?;
    let control = dir.join("sidecar.ctl");
    let cfg = SidecarConfig {
        vm_id: "demo-vm".into(),
        attach_socket: socket.clone(),
        certs,
        node: "primary".into(),
        paths_per_backup: args.paths,
        quorum: 2,
        control_socket: Some(control.clone()),
        backups,
        ..SidecarConfig::default()
    };
    let sidecar = std::thread::spawn(move || {
        run_sidecar(
            cfg,
            RunOptions {
                console_out: Some(std::env::temp_dir().join("endophyte-demo-console.log")),
                ..RunOptions::default()
            },
        )
    });
    // Replicate: the initial copy, then `replicate_for` of steady state.
    let t = Instant::now();
    let initial_sync_ms = loop {
        if sidecar.is_finished() {
            bail!("the sidecar stopped before the migration");
        }
        if control.exists() {
            let s = crate::control::request(&control, "GET", "/v1/status", None)?;
            if s["rpo_ms"].is_number() {
                break t.elapsed().as_secs_f64() * 1e3;
            }
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the initial copy was not durable after 10 min");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(args.replicate_for);
    let target = "backup-2".to_string();
    let req = crate::migrate::MigrateRequest {
        to: target.clone(),
        downtime_ms: args.downtime.as_millis().max(1) as u64,
        deadline_ms: args.deadline.as_millis().max(1) as u64,
        force: false,
        verify: true,
    };
    let st = crate::migrate::run_cli(&control, &req, matches!(args.output, Output::Text))?;
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
    let p0 = report.source_guest_pages;
    Ok(MigrateSummary {
        mem_bytes: args.mem,
        downtime_ms: report.downtime_ms,
        downtime_breakdown_ms: report.breakdown.clone(),
        downtime_with_verify_ms: report.downtime_with_verify_ms,
        predicted_downtime_ms: report.predicted_downtime_ms,
        converge_ms: report.converge_ms,
        total_ms: report.total_ms,
        bytes_sent: report.bytes_sent,
        memory_hash_match: !report.source_ram_hash.is_empty()
            && report.source_ram_hash == report.target_ram_hash,
        guest_progress_continued: p1 >= p0 && p2 > p1,
        target_vm_running: source_gone && p2 > p1,
        guest_pages: [p0, p1, p2],
        initial_sync_ms,
        target,
    })
}
