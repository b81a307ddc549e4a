//! `endophyte demo services`: the example key-value service (`examples/kv-service`) attached to a
//! replicated guest, which is migrated to one backup and then, once killed there, promoted on the other.
//! The service's twins on the backups restore its state each time; the check is against the service's
//! own record of what it contributed to the very epoch the VM resumed from.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use endophyte_attach::client::AttachClient;
use endophyte_engine::config::SidecarConfig;
use endophyte_engine::primary::{run_sidecar, RunOptions};
use endophyte_kv_service::store::{read_log, Event};
use endophyte_vmm::attach::AttachSource;
use endophyte_vmm::Tracking;
use serde::Serialize;

use crate::cluster::{start_cluster, wait_for, Cluster};
use crate::Output;

/// Arguments of `endophyte demo services`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServicesArgs {
    /// Guest RAM.
    #[arg(long, default_value = "64MiB", value_parser = endophyte_engine::config::parse_bytes)]
    pub mem: u64,
    /// Guest workload (testvm syntax).
    #[arg(long, default_value = "hotset:size=16M,rate=2000")]
    pub workload: String,
    /// How long to replicate (with the service written to) before migrating.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub replicate_for: Duration,
    /// Writes per second a client makes to the key-value service throughout.
    #[arg(long, default_value_t = 200)]
    pub writes_per_s: u64,
    /// Downtime budget of the migration.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub downtime: Duration,
    /// Paths per backup (every other one through a relay).
    #[arg(long, default_value_t = 2)]
    pub paths: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// What a twin restored, against what the service contributed to that epoch.
#[derive(Debug, Default, Serialize)]
pub struct RestoreCheck {
    /// The backup.
    pub node: String,
    /// The committed epoch the VM resumed from there.
    pub epoch: u64,
    /// The epoch the restored state was contributed at (the same, unless the service skipped).
    pub contributed_epoch: u64,
    /// Keys in the restored state.
    pub keys: usize,
    /// Writes the restored state had seen.
    pub writes: u64,
    /// BLAKE3 of the restored state equals that of the service's contribution to `epoch`.
    pub matches: bool,
}

/// The services demo's result.
#[derive(Debug, Serialize)]
pub struct ServicesSummary {
    /// The twins restored exactly the state of the committed epoch, on the migration's target and
    /// after the promote.
    pub service_state_matches: bool,
    /// The migration target's twin.
    pub on_target: RestoreCheck,
    /// The promoted backup's twin.
    pub after_promote: RestoreCheck,
    /// Contribution rounds (ask to answer, inside the epoch's pause), ms.
    pub contribution_ms_p50: f64,
    /// 99th percentile of the same.
    pub contribution_ms_p99: f64,
    /// Epochs the service contributed to.
    pub epochs_contributed: usize,
    /// Contributions that were late or failed.
    pub service_failures: u64,
    /// Writes the client made to the service.
    pub writes: u64,
    /// Epoch pause p99 with the service taking part, ms.
    pub epoch_pause_ms_p99: f64,
    /// The migration's downtime, ms.
    pub downtime_ms: f64,
    /// Migration phases the service was told of, in order.
    pub phases: Vec<String>,
}

/// `endophyte demo services`: see the module docs.
///
/// # Errors
/// A process failed to start, or a check failed (the summary is printed first).
pub fn demo(args: ServicesArgs) -> anyhow::Result<()> {
    let s = crate::cluster::in_scratch_dir("services", |d| run_in(&args, d))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&s)?),
        Output::Text => {
            println!("A key-value service rode along with a replicated guest:");
            println!(
                "  contributions       {} epochs, {:.2} ms p50 / {:.2} ms p99 (epoch pause p99 {:.2} ms), {} failures; {} client writes",
                s.epochs_contributed,
                s.contribution_ms_p50,
                s.contribution_ms_p99,
                s.epoch_pause_ms_p99,
                s.service_failures,
                s.writes
            );
            println!("  migration phases    {}", s.phases.join(" -> "));
            for c in [&s.on_target, &s.after_promote] {
                println!(
                    "  restored on {:<9} epoch {} (contributed at {}), {} keys after {} writes: matches the contribution {}",
                    c.node, c.epoch, c.contributed_epoch, c.keys, c.writes, c.matches
                );
            }
            println!("  service state matches {}", s.service_state_matches);
        }
    }
    if !s.service_state_matches {
        bail!("a twin's restored state is not the committed epoch's (see the summary)");
    }
    Ok(())
}

/// Starts `endophyte example-kv` with `args`.
/// Its stderr goes to `stderr` (the twins' sessions end with an error when the demo stops their
/// backups).
fn kv(kids: &mut crate::cluster::Kids, args: &[String], stderr: &Path) -> anyhow::Result<()> {
    kids.0.push(
        Command::new(std::env::current_exe()?)
            .arg("example-kv")
            .args(args)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(stderr)?)
            .spawn()
            .context("starting the key-value service")?,
    );
    Ok(())
}

/// Writes `key-N value` pairs to the service's API at `rate` per second until `stop`.
fn writer(api: PathBuf, rate: u64, stop: Arc<AtomicBool>, n: Arc<AtomicU64>) -> anyhow::Result<()> {
    wait_for(&api, Duration::from_secs(30))?;
    let conn = UnixStream::connect(&api)?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let every = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        let i = n.fetch_add(1, Ordering::Relaxed);
        writeln!(w, "SET key-{} {i}", i % 97)?;
        line.clear();
        r.read_line(&mut line)?;
        if line.trim() != "OK" {
            bail!("the service answered {line:?}");
        }
        std::thread::sleep(every);
    }
    Ok(())
}

/// The last restore in a twin's log, checked against the primary service's contributions.
fn check(node: &str, twin_log: &Path, contributed: &[Event]) -> anyhow::Result<RestoreCheck> {
    let Some(Event::Restored {
        epoch,
        contributed_epoch,
        hash,
        state,
    }) = read_log(twin_log)?
        .into_iter()
        .rev()
        .find(|e| matches!(e, Event::Restored { .. }))
    else {
        bail!("the twin on {node} restored nothing");
    };
    let want = contributed.iter().find_map(|e| match e {
        Event::Contributed { epoch: e, hash, .. } if *e == contributed_epoch => Some(hash.clone()),
        _ => None,
    });
    Ok(RestoreCheck {
        node: node.into(),
        epoch,
        contributed_epoch,
        keys: state.map.len(),
        writes: state.writes,
        matches: contributed_epoch == epoch && want.as_deref() == Some(hash.as_str()),
    })
}

fn run_in(args: &ServicesArgs, dir: &Path) -> anyhow::Result<ServicesSummary> {
    let cluster = start_cluster(
        dir,
        args.paths,
        args.mem,
        &args.workload,
        endophyte_engine::store::Durability::Disk,
    )?;
    let base = cluster.sidecar_config(args.paths);
    let Cluster {
        mut kids,
        data_dirs,
        socket,
        controls,
        services,
        ..
    } = cluster;
    let names = ["backup-1", "backup-2"];
    let twin_logs: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.join(format!("kv-{n}.jsonl")))
        .collect();
    for (svc, log) in services.iter().zip(&twin_logs) {
        wait_for(svc, Duration::from_secs(30))?;
        let a = ["--hooks", "restore", "--services"].map(String::from);
        kv(
            &mut kids,
            &[&a[..], &[path(svc), "--log".into(), path(log)]].concat(),
            &log.with_extension("stderr"),
        )?;
    }
    let control = dir.join("sidecar.ctl");
    let svc = dir.join("sidecar.svc");
    let vmm = Arc::new(AttachSource::connect(&socket, Tracking::DirtyLog)?);
    let cfg = SidecarConfig {
        control_socket: Some(control.clone()),
        services_socket: Some(svc.clone()),
        ..base
    };
    let sidecar = std::thread::spawn(move || run_sidecar(cfg, vmm, RunOptions::default()));
    wait_for(&svc, Duration::from_secs(30))?;
    let (api, log) = (dir.join("kv.api"), dir.join("kv-primary.jsonl"));
    kv(
        &mut kids,
        &[
            "--hooks".into(),
            "epoch,migration".into(),
            "--services".into(),
            path(&svc),
            "--api".into(),
            path(&api),
            "--log".into(),
            path(&log),
        ],
        &log.with_extension("stderr"),
    )?;
    let (stop, writes) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let w = {
        let (stop, writes, rate) = (stop.clone(), writes.clone(), args.writes_per_s);
        std::thread::spawn(move || writer(api, rate, stop, writes))
    };
    // Replicate with the service taking part, then migrate to backup-1.
    let t = Instant::now();
    while !endophyte_engine::control::request(&control, "GET", "/v1/status", None)
        .is_ok_and(|s| s["rpo_ms"].is_number())
    {
        if t.elapsed() > Duration::from_secs(300) || sidecar.is_finished() {
            bail!("the initial copy did not become durable");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(args.replicate_for);
    let req = endophyte_engine::migrate::MigrateRequest {
        to: names[0].into(),
        downtime_ms: args.downtime.as_millis().max(1) as u64,
        deadline_ms: 60_000,
        force: false,
        verify: false,
    };
    let st = endophyte_engine::migrate::run_cli(&control, &req, false)?;
    let report = sidecar
        .join()
        .map_err(|_| anyhow::anyhow!("the sidecar thread panicked"))?
        .context("the sidecar")?;
    stop.store(true, Ordering::Relaxed);
    let _ = w.join();
    let Some(m) = st.report else {
        bail!("the migration failed: {}", st.error.unwrap_or_default());
    };
    let events = read_log(&log)?;
    let mut on_target = check(names[0], &twin_logs[0], &events)?;
    on_target.matches &= on_target.epoch == m.epoch;
    // The VM dies on backup-1; backup-2 promotes its replica (once the old primary's lease ran out).
    AttachClient::connect(data_dirs[0].join("vmm.sock"), "demo-check")?.shutdown()?;
    let t = Instant::now();
    let body = serde_json::json!({ "vm": "demo-vm", "force": false, "verify": false });
    let promoted = loop {
        match endophyte_engine::control::request(&controls[1], "POST", "/v1/promote", Some(&body)) {
            Ok(v) => break v,
            Err(e) if t.elapsed() < Duration::from_secs(20) => {
                tracing::debug!("promote not yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.context("promoting on backup-2")),
        }
    };
    let mut after_promote = check(names[1], &twin_logs[1], &events)?;
    after_promote.matches &= promoted["epoch"].as_u64() == Some(after_promote.epoch);
    if let Some(sock) = promoted["vmm_socket"].as_str() {
        let _ = AttachClient::connect(sock, "demo-check").and_then(|c| c.shutdown());
    }
    let phases = events
        .iter()
        .filter_map(|e| match e {
            Event::Phase { phase, .. } => Some(phase.clone()),
            _ => None,
        })
        .collect();
    Ok(ServicesSummary {
        service_state_matches: on_target.matches && after_promote.matches,
        on_target,
        after_promote,
        contribution_ms_p50: report.service_contribution_ms_p50,
        contribution_ms_p99: report.service_contribution_ms_p99,
        epochs_contributed: events
            .iter()
            .filter(|e| matches!(e, Event::Contributed { .. }))
            .count(),
        service_failures: report.service_failures,
        writes: writes.load(Ordering::Relaxed),
        epoch_pause_ms_p99: report.epoch_pause_ms_p99,
        downtime_ms: m.downtime_ms,
        phases,
    })
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
