//! `endophyte sidecar`: epoch replication of one running VM to its backups, and its migration source.
//!
//! Two halves share one [`endophyte_wire::Sender`] under a mutex ([`shared`]):
//!
//! - the **epoch loop** ([`epoch`], a plain thread, because VMM calls block): every epoch length it cuts a
//!   consistent epoch from the VMM (pause, harvest, stage, resume; or one full snapshot filtered by page
//!   hashes, [`snapshot`]) and hands its chunks to the sender ([`encode`]), throttles the guest along the
//!   curve ([`pacing`]), keeps the dirty-page history for resyncs ([`history`]), and runs a migration's
//!   converge and switchover ([`migration`]);
//! - the **path driver** ([`driver`], a tokio task): owns the QUIC paths, feeds their messages into the
//!   sender, sends what it asks within the bandwidth cap, and records durability and RPO.
//!
//! The control API ([`api`]) reads and changes the shared state; the report at exit is [`report`]. The VMM
//! is an [`endophyte_vmm::SourceVmm`]: nothing here knows which kind.

mod api;
mod authority;
mod contribute;
mod driver;
mod encode;
mod epoch;
mod fencing;
mod gate;
mod guard;
mod history;
mod metrics;
mod migration;
mod pacing;
mod report;
mod shared;
mod snapshot;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use endophyte_vmm::SourceVmm;
use endophyte_wire::{Hello, Sender, SenderConfig};
use tokio::sync::mpsc;

pub use encode::{stage_dirty, StagedRange};
pub use report::SidecarReport;

use crate::config::SidecarConfig;
use crate::tls::Identity;
use crate::transport::run_client_path;

/// Extra knobs for tests, the demo and operators.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop after this long (at an epoch boundary); `None` runs until SIGINT/SIGTERM.
    pub duration: Option<Duration>,
    /// Count `duration` from the moment the initial full copy is durable instead of from the start, so
    /// that a short run still shows steady-state replication (the demo does this).
    pub duration_after_initial_copy: bool,
    /// Append `{"epoch", "ram_hash"}` lines: the VMM's BLAKE3 of guest RAM taken during each epoch's pause.
    /// Costs a full RAM hash per pause; meant for tests and the demo's final epoch.
    pub ram_hashes: Option<PathBuf>,
    /// Record the RAM hash only on the final epoch (cheap); used by the demo.
    pub final_hash_only: bool,
    /// Write the final [`SidecarReport`] here as JSON.
    pub report: Option<PathBuf>,
    /// Where released guest console output goes (appended); stderr when `None`.
    pub console_out: Option<PathBuf>,
}

/// Runs the sidecar for `vmm` until `opts.duration` passes, a signal arrives or the VM migrated away; then
/// cuts a final epoch, waits (up to 30 s) for it to become durable and returns the report.
///
/// # Errors
/// Configuration, certificate and VMM failures, named; a switchover left in doubt (the guest stays
/// paused).
pub fn run_sidecar(
    cfg: SidecarConfig,
    vmm: Arc<dyn SourceVmm>,
    opts: RunOptions,
) -> anyhow::Result<SidecarReport> {
    cfg.validate()?;
    let identity = Identity::load(&cfg.certs, &cfg.node)
        .with_context(|| format!("loading node {:?}'s certificates", cfg.node))?;
    let geometry = vmm.geometry().clone();
    let page_size = geometry.page_size as usize;
    let mem_bytes = geometry.mem_bytes();
    anyhow::ensure!(mem_bytes > 0, "{} has no guest RAM", vmm.name());
    let caps = vmm.capabilities();
    tracing::info!(vmm = %vmm.name(), ?caps, mem_bytes, "replicating");

    let paths: Vec<usize> = cfg
        .backups
        .iter()
        .map(|b| b.paths.unwrap_or(cfg.paths_per_backup))
        .collect();
    let session = crate::random_u64();
    let sender = Sender::new(
        SenderConfig {
            quorum: cfg.quorum,
            session,
            ping_interval: cfg.ping_interval(),
            ..SenderConfig::default()
        },
        &paths,
    );
    let console_out: Box<dyn Write + Send> = match &opts.console_out {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => Box::new(std::io::stderr()),
    };
    let shared = Arc::new(shared::Shared::new(
        sender,
        &paths,
        shared::Meta {
            vm_id: cfg.vm_id.clone(),
            node: cfg.node.clone(),
            mem_bytes,
            backups: cfg.backups.iter().map(|b| b.name.clone()).collect(),
            // Under an authority its hold is the fence: the backups' leases bound nothing.
            fence_after: (cfg.self_fence != crate::config::SelfFencePolicy::Off
                && cfg.authority.is_none())
            .then(|| cfg.fence_after()),
        },
        crate::services::console::Console::new(console_out),
        cfg.max_bandwidth,
        cfg.epoch_ms,
    ));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("endophyte-net")
        .build()?;
    // Every pause and resume goes through the gate, so that a fenced guest stays paused. The VM is
    // claimed at the authority before any path connects: each Hello carries the generation held.
    let mut cfg = cfg;
    let gate = Arc::new(gate::GatedVmm::new(vmm.clone()));
    let vmm: Arc<dyn SourceVmm> = gate.clone();
    if let Some(a) = &cfg.authority {
        cfg.generation = authority::start(
            &rt,
            a,
            (&cfg.vm_id, &cfg.node),
            gate.clone(),
            shared.clone(),
            (cfg.self_fence, Duration::from_millis(cfg.guard_ms)),
        )?;
    } else {
        tracing::warn!("no fencing authority (--etcd): a promote on a backup is not fenced against this copy; see docs/fencing.md");
    }
    let client_cfg = identity.client_config_with(cfg.congestion)?;
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let path_stop = Arc::new(tokio::sync::Notify::new());
    for (b, spec) in cfg.backups.iter().enumerate() {
        for (p, target) in driver::targets(spec, paths[b]).into_iter().enumerate() {
            let hello = Hello {
                session,
                path: p as u32,
                page_size: page_size as u32,
                mem_bytes,
                vm_id: cfg.vm_id.clone(),
                generation: cfg.generation,
            };
            rt.spawn(run_client_path(
                client_cfg.clone(),
                target,
                hello,
                (b, p),
                ev_tx.clone(),
                path_stop.clone(),
            ));
        }
    }
    drop(ev_tx);
    rt.spawn(driver::drive(shared.clone(), ev_rx));
    if let Some(path) = &cfg.control_socket {
        let listener = {
            let _rt = rt.enter();
            crate::control::bind_unix(path)?
        };
        rt.spawn(crate::control::serve_unix(
            listener,
            path.clone(),
            api::router(shared.clone()),
            std::future::pending(),
        ));
    }
    if let Some(path) = &cfg.services_socket {
        let listener = {
            let _rt = rt.enter();
            crate::control::bind_unix(path)?
        };
        rt.spawn(crate::services::grpc::serve(
            listener,
            path.clone(),
            crate::services::grpc::ServicesServer::new(
                shared.services.clone(),
                cfg.node.clone(),
                {
                    let vm = cfg.vm_id.clone();
                    Arc::new(move || vec![vm.clone()])
                },
                crate::services::grpc::NodeRole::Sidecar,
            ),
        ));
    }
    if let Some(addr) = cfg.metrics_listen {
        let listener = {
            let _rt = rt.enter();
            crate::metrics::bind_tcp(addr)?
        };
        rt.spawn(crate::metrics::serve_tcp(
            listener,
            metrics::router(shared.clone()),
        ));
    }
    {
        let shared = shared.clone();
        rt.spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal: stopping at the next epoch boundary");
            shared.request_stop();
        });
    }
    if let Some(d) = opts.duration.filter(|_| !opts.duration_after_initial_copy) {
        let shared = shared.clone();
        rt.spawn(async move {
            tokio::time::sleep(d).await;
            shared.request_stop();
        });
    }

    // Fail closed: the VMM pauses the guest by itself if this sidecar dies or hangs.
    let guard_timeout = Duration::from_millis(cfg.guard_ms);
    let guard_thread = if gate
        .arm_guard(guard_timeout, cfg.generation)
        .context("arming the VMM's run guard")?
    {
        tracing::info!(timeout_ms = cfg.guard_ms, "the VMM's run guard is armed");
        Some(guard::spawn(shared.clone(), gate.clone(), guard_timeout)?)
    } else {
        tracing::warn!(
            "the VMM has no run guard: a sidecar that dies or hangs leaves its guest running"
        );
        None
    };
    let fence_thread = if cfg.authority.is_some() {
        // The authority's hold is the fence: the backups' answers no longer decide whether the guest runs.
        None
    } else if cfg.self_fence == crate::config::SelfFencePolicy::Off {
        tracing::warn!("self-fencing is off: a backup that promotes after its lease may leave two copies running");
        None
    } else {
        Some(
            fencing::spawn(
                shared.clone(),
                gate.clone(),
                cfg.self_fence,
                cfg.fence_quorum(),
                cfg.fence_after(),
            )
            .context("starting the self-fence thread")?,
        )
    };
    let controller = crate::throttle::Controller::new(throttle_curves::Curve::parse(&cfg.curve)?);
    let mut ep = epoch::EpochLoop {
        vmm: vmm.clone(),
        shared: shared.clone(),
        cfg: cfg.clone(),
        opts: opts.clone(),
        page_size,
        session,
        next_epoch: 1,
        staging: Vec::new(),
        history: history::History::new(session),
        pacing: pacing::Pacing::new(controller, caps.throttle, paths.len()),
        stats: report::Stats::new(shared.metrics.epoch_pause.clone()),
        hashes_out: None,
        last_pause_at: None,
        output_commit: false,
        output_at_exit: 0,
        contributions: Vec::new(),
        switch_veto: None,
        migrated: false,
        pause_state: None,
        page_hashes: None,
    };
    let result = ep.run();
    // A permanent error (a supersession, a backup's refusal no retry can fix) ends the run with it.
    let result = match shared.fatal() {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => result,
    };
    shared.request_stop();
    if let Some(t) = fence_thread {
        let _ = t.join();
    }
    if let Some(t) = guard_thread {
        let _ = t.join();
        // A clean stop without an authority leaves the guest running on purpose; on an error, or under an
        // authority, the guard stays armed and the connection's close pauses it.
        if result.is_ok() && cfg.authority.is_none() && !ep.migrated {
            if let Err(e) = gate.disarm_guard() {
                tracing::warn!("disarming the run guard: {e}");
            }
        }
    }
    if ep.migrated {
        // Whoever asked for the migration learns how it ended before the control socket goes away.
        shared.wait_until(Duration::from_secs(5), |g| g.final_fetched);
    }
    let closed = shared.services.close_all(&if ep.migrated {
        format!("VM {:?} migrated away: this sidecar stopped", cfg.vm_id)
    } else {
        format!("the sidecar of VM {:?} stopped", cfg.vm_id)
    });
    if closed > 0 {
        // The sessions' tasks send that status before the runtime goes.
        std::thread::sleep(Duration::from_millis(100));
    }
    if ep.migrated {
        authority::migrated(&rt, &shared);
    } else {
        authority::end(&rt, &shared, &gate);
    }
    path_stop.notify_waiters();
    let report = ep.report(&cfg, &paths);
    rt.shutdown_timeout(Duration::from_secs(1));
    if let Some(path) = &cfg.control_socket {
        let _ = std::fs::remove_file(path);
    }
    result?;
    if let Some(p) = &opts.report {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(report)
}
