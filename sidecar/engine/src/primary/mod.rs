//! `endophyte sidecar`: epoch replication of one running VM to its backups.
//!
//! Two halves share one [`Sender`] state machine under a mutex:
//!
//! - the **epoch loop** (a plain thread, because the attach protocol is blocking): every `epoch_ms` it
//!   pauses the guest, harvests the dirty pages, copies them from the read-only mapping of guest RAM into the
//!   bounded staging buffer, resumes the guest, and then cuts the staged pages into chunks (zero pages elided,
//!   lz4) and hands them to the sender. When an epoch's dirty pages do not fit the staging buffer, the guest
//!   stays paused while they are encoded straight from guest RAM (the `pause` emergency policy; counted as an
//!   overflow epoch). Before that happens, live pre-copy rounds send the dirty pages from running RAM
//!   and harvest again until the remainder fits. A backup that (re)joins first gets every page changed since the epoch it holds, read
//!   from live RAM before the pause (all of RAM when the sidecar cannot tell, as on its first epoch);
//! - the **driver** (a tokio task): owns the QUIC paths, feeds their messages into the sender, sends what it
//!   asks, and records durability and RPO.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use endophyte_attach::bitmap::DirtyBitmap;
use endophyte_attach::client::AttachClient;
use endophyte_wire::{
    ChunkBuilder, EncodedFrame, EpochStart, Event, Hello, PageChunk, Sender, SenderConfig,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::SidecarConfig;
use crate::tls::Identity;
use crate::transport::{run_client_path, PathEvent, PathTarget};

/// Epochs of dirty-page history kept for resyncing a backup that fell behind; older gaps mean a full resync.
const HISTORY_EPOCHS: usize = 4096;
/// Most live pre-copy rounds before an epoch's pause.
const MAX_PRECOPY_ROUNDS: usize = 5;

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

/// What a sidecar run did; printed as JSON at exit.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SidecarReport {
    /// VM name.
    pub vm_id: String,
    /// Guest RAM bytes (extent of guest physical memory).
    pub mem_bytes: u64,
    /// Epochs cut in this run.
    pub epochs: u64,
    /// Epochs of this run that became durable.
    pub epochs_committed: u64,
    /// Newest durable epoch.
    pub durable_epoch: u64,
    /// Newest epoch cut.
    pub last_epoch: u64,
    /// Epoch length at the end of the run (configured, or tuned to the path), ms.
    pub epoch_ms: u64,
    /// Staging buffer size at the end of the run (configured, or tuned to the path), bytes.
    pub staging_bytes: u64,
    /// Paths per backup (total over backups in `paths_total`).
    pub paths: usize,
    /// Paths over all backups.
    pub paths_total: usize,
    /// Backups.
    pub backups: usize,
    /// Bytes of dirty pages harvested (pages x page size).
    pub dirty_bytes: u64,
    /// Bytes of pages shipped in resync prefixes (first epoch: all of RAM).
    pub resync_bytes: u64,
    /// Frame bytes written to paths, all backups, retransmissions included.
    pub wire_bytes: u64,
    /// Page bytes / chunk body bytes over all chunks encoded (zero pages and lz4 both count).
    pub compression_ratio: f64,
    /// Guest pause per epoch (pause + harvest + staging copy + resume), ms.
    pub epoch_pause_ms_p50: f64,
    /// 99th percentile of the same.
    pub epoch_pause_ms_p99: f64,
    /// Largest epoch pause, ms.
    pub epoch_pause_ms_max: f64,
    /// Age of the newest durable epoch, ms, sampled every 10 ms in steady state: from the first durable
    /// epoch cut after the initial full copy (see `initial_sync_ms`) became durable.
    pub rpo_ms_p50: f64,
    /// 99th percentile of the same.
    pub rpo_ms_p99: f64,
    /// From the sidecar's start until the first epoch (the initial full copy) was durable, ms.
    pub initial_sync_ms: f64,
    /// Epochs whose dirty pages did not fit the staging buffer (the guest stayed paused while they were
    /// encoded).
    pub overflow_epochs: u64,
    /// Live pre-copy rounds run before pauses (see the module docs).
    pub precopy_rounds: u64,
    /// Times a backup was resynced (first contact included).
    pub resyncs: u64,
    /// Path failures seen (each reconnects by itself).
    pub path_failures: u64,
    /// Errors backups reported.
    pub peer_errors: Vec<String>,
    /// Committed epoch per backup, in configuration order.
    pub backup_committed: Vec<u64>,
    /// Throttle curve in use.
    pub curve: String,
    /// Median vCPU throttle over epochs, percent.
    pub throttle_pct_p50: f64,
    /// Largest vCPU throttle set, percent.
    pub throttle_pct_max: f64,
    /// Median pressure over epochs, `0..=1`.
    pub pressure_p50: f64,
    /// Largest pressure seen.
    pub pressure_max: f64,
    /// Emergencies: epochs whose dirty pages overflowed staging, under either policy (`pause`: the guest
    /// stayed paused while they were sent; `discard`: the pause was abandoned).
    pub emergency_events: u64,
    /// Pauses abandoned under the `discard` policy.
    pub discarded_pauses: u64,
    /// Dirty bytes harvested per second, over the run.
    pub dirty_bytes_per_s: f64,
    /// Chunk body bytes (what went on the wire, compressed) the slowest backup acknowledged per second,
    /// over the run.
    pub drain_bytes_per_s: f64,
    /// Smoothed round-trip time per backup (its fastest path, from Ping/Pong), ms; 0 when not measured.
    pub backup_rtt_ms: Vec<f64>,
    /// Whether the final epoch became durable before the sidecar exited.
    pub final_epoch_durable: bool,
    /// Whether guest console output was held until durable (output commit).
    pub output_commit: bool,
    /// Console bytes released once their epoch was durable.
    pub console_bytes_released: u64,
    /// Console bytes released at exit without a durable epoch (replication stopped, the VM went on).
    pub console_bytes_released_at_exit: u64,
    /// The migration this run ended with, if it did.
    pub migration: Option<crate::migrate::MigrationReport>,
}

struct Inner {
    sender: Sender,
    path_tx: Vec<Vec<Option<mpsc::UnboundedSender<EncodedFrame>>>>,
    pause_at: BTreeMap<u64, Instant>,
    first_epoch: Option<u64>,
    rpo_samples: Vec<f64>,
    wire_bytes: u64,
    path_failures: u64,
    resyncs: u64,
    peer_errors: Vec<String>,
    /// Output commit: console bytes by the epoch that produced them, released once it is durable.
    held_console: BTreeMap<u64, Vec<u8>>,
    console_out: Box<dyn Write + Send>,
    console_released: u64,
    started: Instant,
    /// RPO is sampled once epochs cut after the initial full copy became durable start to become durable.
    steady_from: Option<u64>,
    initial_sync: Option<Duration>,
    /// Bandwidth cap in force (`--max-bandwidth`, changed at run time through the control API).
    max_bandwidth: Option<u64>,
    /// What the epoch loop last measured and decided, for `GET /v1/status`.
    live: Live,
    /// The migration requested through the control API, if any (the last one, once finished).
    migration: Option<MigrationCtl>,
    /// Generation of the switchover waiting for the target's answer.
    switch_pending: Option<u64>,
    /// The target's answer to it (SwitchedOver, SwitchoverAborted or an Error).
    switch_reply: Option<endophyte_wire::Message>,
    /// A client read the finished migration's status (the sidecar waits for that before exiting).
    final_fetched: bool,
    /// Per backup, from an epoch's pause until that backup committed it, ms (EWMA, weight 1/4): what a
    /// switchover's final transfer takes.
    commit_lag_ms: Vec<Option<f64>>,
}

/// A migration's state, shared by the epoch loop (which runs it) and the control API (which reports it).
struct MigrationCtl {
    request: crate::migrate::MigrateRequest,
    target: usize,
    started: Instant,
    phase: crate::migrate::Phase,
    predicted_ms: Option<f64>,
    /// `SwitchoverWarmup` went to the target.
    warmed: bool,
    wire_at_start: u64,
    error: Option<String>,
    report: Option<crate::migrate::MigrationReport>,
}

/// The epoch loop's latest figures, published for the control API.
#[derive(Clone, Copy, Debug, Default)]
struct Live {
    epoch: u64,
    epoch_ms: u64,
    throttle: f64,
    pressure: f64,
    dirty_rate: f64,
    drain_rate: f64,
    emergencies: u64,
}

impl Inner {
    fn release_console(&mut self, durable: u64) {
        while self
            .held_console
            .first_key_value()
            .is_some_and(|(&e, _)| e <= durable)
        {
            let (_, bytes) = self.held_console.pop_first().expect("non-empty");
            self.console_released += bytes.len() as u64;
            let _ = self.console_out.write_all(&bytes);
        }
        let _ = self.console_out.flush();
    }
}

struct Shared {
    inner: Mutex<Inner>,
    /// VM name, node name, guest RAM bytes, backup names: fixed for the run.
    meta: (String, String, u64, Vec<String>),
    cv: Condvar,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (up to `limit`) until `ok` holds; returns whether it does.
    fn wait_until(&self, limit: Duration, mut ok: impl FnMut(&Inner) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.lock();
        loop {
            if ok(&g) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            g = self
                .cv
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// The paths of backup `spec`: path `i` goes direct or through a relay, alternating.
fn targets(spec: &crate::config::BackupSpec, n: usize) -> Vec<PathTarget> {
    (0..n)
        .map(|i| {
            let k = i % (spec.via.len() + 1);
            let via = (k > 0).then(|| spec.via[k - 1]);
            PathTarget {
                addr: via.unwrap_or(spec.addr),
                server_name: spec.name.clone(),
                via,
            }
        })
        .collect()
}

/// One staged range: `(gpa, offset in staging, length in bytes)`.
pub type StagedRange = (u64, usize, usize);
type CopyJob<'a> = (&'a [StagedRange], &'a mut [u8], usize);

/// Copies the pages named by `bitmaps` from guest RAM into `staging`, range by range (ranges coalesced from
/// the bitmaps), and returns `(gpa, staging offset, length in bytes)` per range. This is the memcpy inside
/// the epoch pause. Copies of random pages are bound by memory latency rather than bandwidth, so above
/// 1 MiB the ranges are split between `copy_threads` threads (the paused vCPUs leave their cores idle).
///
/// # Errors
/// A range outside guest RAM ([`endophyte_attach::client::ClientError::OutOfRange`]).
///
/// # Panics
/// If the pages do not fit `staging` (callers check the count first).
pub fn stage_dirty(
    client: &AttachClient,
    bitmaps: &[DirtyBitmap],
    staging: &mut [u8],
    copy_threads: usize,
) -> Result<Vec<StagedRange>, endophyte_attach::client::ClientError> {
    let mut off = 0usize;
    let mut index = Vec::new();
    for bm in bitmaps {
        for r in bm.ranges() {
            let len = r.len_bytes as usize;
            index.push((r.gpa, off, len));
            off += len;
        }
    }
    let threads = if off < 1 << 20 {
        1
    } else {
        copy_threads.max(1)
    };
    // Cut the ranges into `threads` runs of about equal bytes, each with its own slice of staging.
    let per = off.div_ceil(threads);
    let mut jobs: Vec<CopyJob<'_>> = Vec::new();
    let mut rest = &mut staging[..off];
    let (mut start, mut base) = (0usize, 0usize);
    while start < index.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < index.len() && (bytes < per || end == start) {
            bytes += index[end].2;
            end += 1;
        }
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(bytes);
        rest = tail;
        jobs.push((&index[start..end], mine, base));
        base += bytes;
        start = end;
    }
    let copy = |(ranges, dst, base): CopyJob<'_>| {
        for &(gpa, o, len) in ranges {
            client.read(gpa, &mut dst[o - base..o - base + len])?;
        }
        Ok::<(), endophyte_attach::client::ClientError>(())
    };
    if jobs.len() <= 1 {
        jobs.into_iter().try_for_each(copy)?;
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs.into_iter().map(|j| s.spawn(move || copy(j))).collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("copy thread panicked"))
        })?;
    }
    Ok(index)
}

/// Runs the sidecar until `opts.duration` passes or a signal arrives; then cuts a final epoch, waits (up to
/// 30 s) for it to become durable and returns the report.
///
/// # Errors
/// Configuration, certificate or attach failures, named.
pub fn run_sidecar(cfg: SidecarConfig, opts: RunOptions) -> anyhow::Result<SidecarReport> {
    cfg.validate()?;
    let identity = Identity::load(&cfg.certs, &cfg.node)
        .with_context(|| format!("loading node {:?}'s certificates", cfg.node))?;
    let client = AttachClient::connect(&cfg.attach_socket, "endophyte-sidecar")
        .with_context(|| format!("attaching to {}", cfg.attach_socket.display()))?;
    let info = client.info().clone();
    let page_size = info.page_size as usize;
    let mem_bytes = info
        .regions
        .iter()
        .map(|r| r.gpa + r.size_bytes)
        .max()
        .unwrap_or(0);
    anyhow::ensure!(mem_bytes > 0, "the VM has no guest RAM regions");

    let paths: Vec<usize> = cfg
        .backups
        .iter()
        .map(|b| b.paths.unwrap_or(cfg.paths_per_backup))
        .collect();
    let session = crate::backup::random_u64();
    let sender = Sender::new(
        SenderConfig {
            quorum: cfg.quorum,
            session,
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
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            sender,
            path_tx: paths.iter().map(|&n| vec![None; n]).collect(),
            pause_at: BTreeMap::new(),
            first_epoch: None,
            rpo_samples: Vec::new(),
            wire_bytes: 0,
            path_failures: 0,
            resyncs: 0,
            peer_errors: Vec::new(),
            held_console: BTreeMap::new(),
            console_out,
            console_released: 0,
            started: Instant::now(),
            steady_from: None,
            initial_sync: None,
            max_bandwidth: cfg.max_bandwidth,
            live: Live {
                epoch_ms: cfg.epoch_ms,
                ..Live::default()
            },
            migration: None,
            switch_pending: None,
            switch_reply: None,
            final_fetched: false,
            commit_lag_ms: vec![None; paths.len()],
        }),
        meta: (
            cfg.vm_id.clone(),
            cfg.node.clone(),
            mem_bytes,
            cfg.backups.iter().map(|b| b.name.clone()).collect(),
        ),
        cv: Condvar::new(),
        wake: tokio::sync::Notify::new(),
        stop: AtomicBool::new(false),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("endophyte-net")
        .build()?;
    let client_cfg = identity.client_config_with(cfg.congestion)?;
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let path_stop = Arc::new(tokio::sync::Notify::new());
    for (b, spec) in cfg.backups.iter().enumerate() {
        for (p, target) in targets(spec, paths[b]).into_iter().enumerate() {
            let hello = Hello {
                session,
                path: p as u32,
                page_size: page_size as u32,
                mem_bytes,
                vm_id: cfg.vm_id.clone(),
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
    rt.spawn(drive(shared.clone(), ev_rx));
    if let Some(path) = &cfg.control_socket {
        let listener = {
            let _rt = rt.enter();
            crate::control::bind_unix(path)?
        };
        rt.spawn(crate::control::serve_unix(
            listener,
            path.clone(),
            control_router(shared.clone()),
            std::future::pending(),
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
            shared.stop.store(true, Ordering::SeqCst);
            shared.cv.notify_all();
        });
    }
    if let Some(d) = opts.duration.filter(|_| !opts.duration_after_initial_copy) {
        let shared = shared.clone();
        rt.spawn(async move {
            tokio::time::sleep(d).await;
            shared.stop.store(true, Ordering::SeqCst);
            shared.cv.notify_all();
        });
    }

    let mut ep = EpochLoop {
        client,
        shared: shared.clone(),
        cfg: cfg.clone(),
        opts: opts.clone(),
        page_size,
        mem_bytes,
        staging: Vec::new(),
        history: BTreeMap::new(),
        next_epoch: 1,
        pauses_ms: Vec::new(),
        dirty_bytes: 0,
        resync_bytes: 0,
        raw_bytes: 0,
        body_bytes: 0,
        overflow_epochs: 0,
        discards: 0,
        precopy_rounds: 0,
        last_dirty_bytes: 0,
        epochs: 0,
        session,
        hash_out: None,
        last_pause_at: None,
        controller: crate::throttle::Controller::new(throttle_curves::Curve::parse(&cfg.curve)?),
        throttle_now: 0.0,
        last_sample: (Instant::now(), 0),
        last_drain: (Instant::now(), vec![0; paths.len()]),
        throttles: Vec::new(),
        pressures: Vec::new(),
        run_started: Instant::now(),
        output_commit: false,
        epoch_console: Vec::new(),
        console_at_exit: 0,
        throttle_floor: 0.0,
        peak_drain: 0.0,
        migrated: false,
        min_rtt: None,
        pause_state: bytes::Bytes::new(),
    };
    let result = ep.run();
    if ep.migrated {
        // Whoever asked for the migration learns how it ended before the control socket goes away.
        shared.wait_until(Duration::from_secs(5), |g| g.final_fetched);
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

/// A token bucket for `--max-bandwidth`: `rate` bytes/s, bursts up to 50 ms worth (at least 1 MiB).
/// Sending may overdraw it; nothing more goes out until it is back above zero.
struct Bucket {
    limit: u64,
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate_bytes_per_s: u64) -> Self {
        Self {
            limit: rate_bytes_per_s,
            rate: rate_bytes_per_s as f64,
            tokens: 0.0,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let burst = (self.rate * 0.05).max(1048576.0);
        self.tokens = (self.tokens + self.rate * (now - self.at).as_secs_f64()).min(burst);
        self.at = now;
    }

    /// When the bucket is back above zero (now if it is).
    fn ready_at(&self) -> Instant {
        if self.tokens >= 0.0 {
            self.at
        } else {
            self.at + Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

async fn drive(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<((usize, usize), PathEvent)>,
) {
    let mut rpo_tick = tokio::time::interval(Duration::from_millis(10));
    let mut bucket: Option<Bucket> = None;
    loop {
        let timeout = {
            let mut g = shared.lock();
            let g = &mut *g;
            let now = Instant::now();
            // The cap may change at run time (`PUT /v1/max-bandwidth`).
            if bucket.as_ref().map(|b| b.limit) != g.max_bandwidth {
                bucket = g.max_bandwidth.map(Bucket::new);
            }
            if g.sender.poll_timeout().is_some_and(|t| t <= now) {
                g.sender.handle_timeout(now);
            }
            if let Some(b) = &mut bucket {
                b.refill(now);
            }
            while bucket.as_ref().is_none_or(|b| b.tokens >= 0.0) {
                let Some(t) = g.sender.poll_transmit(now) else {
                    break;
                };
                if let Some(tx) = &g.path_tx[t.backup][t.path] {
                    let frame = t.msg.encode();
                    g.wire_bytes += frame.len() as u64;
                    if let Some(b) = &mut bucket {
                        b.tokens -= frame.len() as f64;
                    }
                    let _ = tx.send(frame);
                }
            }
            while let Some(ev) = g.sender.poll_event() {
                match ev {
                    Event::Durable { epoch } => {
                        tracing::debug!(epoch, "durable");
                        g.release_console(epoch);
                        if g.steady_from.is_none() && g.first_epoch.is_some_and(|f| epoch >= f) {
                            let cut = g.pause_at.keys().next_back().copied().unwrap_or(epoch);
                            g.steady_from = Some(cut + 1);
                            g.initial_sync = Some(g.started.elapsed());
                            tracing::info!(
                                epoch,
                                ms = g.started.elapsed().as_millis() as u64,
                                "initial copy durable"
                            );
                        }
                    }
                    Event::NeedsResync { backup, committed } => {
                        g.resyncs += 1;
                        tracing::info!(
                            backup,
                            committed,
                            "backup joins; resync from its committed epoch"
                        );
                    }
                    Event::BackupLost { backup } => {
                        tracing::warn!(
                            backup,
                            "backup lost its last path; it will resync when it returns"
                        )
                    }
                    Event::BackupCommitted { backup, epoch } => {
                        if let Some(at) = g.pause_at.get(&epoch) {
                            let lag = at.elapsed().as_secs_f64() * 1e3;
                            let l = &mut g.commit_lag_ms[backup];
                            *l = Some(l.map_or(lag, |o| o * 0.75 + lag * 0.25));
                        }
                    }
                    Event::PeerError {
                        backup,
                        path,
                        code,
                        message,
                    } => {
                        tracing::warn!(backup, path, ?code, "backup refused: {message}");
                        g.peer_errors
                            .push(format!("backup {backup} path {path}: {message}"));
                    }
                }
            }
            shared.cv.notify_all();
            let limited = bucket
                .as_ref()
                .filter(|b| b.tokens < 0.0)
                .map(Bucket::ready_at);
            match (g.sender.poll_timeout(), limited) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        let sleep = async {
            match timeout {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => {
                let Some(((b, p), ev)) = ev else { return };
                let mut g = shared.lock();
                let now = Instant::now();
                match ev {
                    PathEvent::Up { welcome, tx } => {
                        tracing::info!(backup = b, path = p, node = %welcome.node, committed = welcome.committed_epoch, "path up");
                        g.path_tx[b][p] = Some(tx);
                        g.sender.handle_path_up(b, p, &welcome, now);
                    }
                    PathEvent::Message(m) if is_switch_reply(&g, b, &m) => {
                        g.switch_reply = Some(m);
                        shared.cv.notify_all();
                    }
                    PathEvent::Message(m) => {
                        if let Err(e) = g.sender.handle_message(b, p, m, now) {
                            tracing::warn!("{e}");
                            g.path_tx[b][p] = None;
                        }
                    }
                    PathEvent::Down(why) => {
                        if g.path_tx[b][p].take().is_some() {
                            g.path_failures += 1;
                        }
                        tracing::warn!(backup = b, path = p, "path down: {why}");
                        g.sender.handle_path_down(b, p);
                    }
                }
            }
            _ = shared.wake.notified() => {}
            _ = sleep => {}
            _ = rpo_tick.tick() => {
                let mut g = shared.lock();
                let d = g.sender.durable_epoch();
                let steady = g.steady_from.is_some_and(|s| d >= s);
                if let Some(&at) = g.pause_at.get(&d).filter(|_| steady) {
                    let age = at.elapsed().as_secs_f64() * 1e3;
                    if g.rpo_samples.len() < 4_000_000 {
                        g.rpo_samples.push(age);
                    }
                }
                let floor = g.first_epoch.unwrap_or(0).max(d);
                while g.pause_at.first_key_value().is_some_and(|(&e, _)| e < floor) {
                    g.pause_at.pop_first();
                }
            }
        }
    }
}

/// Whether `m`, from backup `b`, answers the switchover in progress (and so bypasses the sender).
fn is_switch_reply(g: &Inner, b: usize, m: &endophyte_wire::Message) -> bool {
    use endophyte_wire::{ErrorCode, Message};
    let (Some(generation), Some(target)) =
        (g.switch_pending, g.migration.as_ref().map(|m| m.target))
    else {
        return false;
    };
    b == target
        && match m {
            Message::SwitchoverReady(r) => r.generation == generation,
            Message::SwitchedOver { generation: gn, .. } => *gn == generation,
            Message::Error { code, .. } => {
                matches!(code, ErrorCode::SwitchoverFailed | ErrorCode::Fenced)
            }
            _ => false,
        }
}

struct EpochLoop {
    client: AttachClient,
    shared: Arc<Shared>,
    cfg: SidecarConfig,
    opts: RunOptions,
    page_size: usize,
    mem_bytes: u64,
    staging: Vec<u8>,
    /// Dirty pages harvested at each epoch of this run (for resyncing a backup from an epoch it holds).
    history: BTreeMap<u64, Vec<DirtyBitmap>>,
    next_epoch: u64,
    pauses_ms: Vec<f64>,
    dirty_bytes: u64,
    resync_bytes: u64,
    raw_bytes: u64,
    body_bytes: u64,
    overflow_epochs: u64,
    discards: u64,
    precopy_rounds: u64,
    last_dirty_bytes: u64,
    epochs: u64,
    session: u64,
    hash_out: Option<std::fs::File>,
    last_pause_at: Option<Instant>,
    controller: crate::throttle::Controller,
    throttle_now: f64,
    /// When the controller last saw a harvest, and the dirty byte count then.
    last_sample: (Instant, u64),
    /// When the controller last saw the drain, and each backup's acknowledged bytes then.
    last_drain: (Instant, Vec<u64>),
    throttles: Vec<f64>,
    pressures: Vec<f64>,
    run_started: Instant,
    output_commit: bool,
    epoch_console: Vec<u8>,
    console_at_exit: u64,
    /// Converging: the throttle does not go below this.
    throttle_floor: f64,
    /// Highest drain rate the controller measured: the paths' capacity, for predicting a switchover.
    peak_drain: f64,
    /// The VM runs on the migration target now; this sidecar is done.
    migrated: bool,
    /// Lowest RTT to the migration target seen while converging.
    min_rtt: Option<Duration>,
    /// vCPU and device state saved at the last pause (empty if saving failed).
    pause_state: bytes::Bytes,
}

/// Timings of a switchover's pause at the source, from its start.
struct SwitchTimes {
    t0: Instant,
    paused: Duration,
    harvested: Duration,
    staged: Duration,
}

/// Where a resync's pages come from.
enum PageSet {
    All,
    Union(Vec<DirtyBitmap>),
}

impl EpochLoop {
    fn run(&mut self) -> anyhow::Result<()> {
        if let Some(p) = &self.opts.ram_hashes {
            self.hash_out = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            );
        }
        // Allocate and touch the staging buffer now, so that no epoch pause pays for its page faults.
        self.staging = vec![0xa5u8; self.cfg.staging as usize];
        if self.cfg.output_commit {
            match self.client.hold_console(true) {
                Ok(()) => self.output_commit = true,
                Err(e) => {
                    tracing::warn!("output commit unavailable, guest output is not held: {e}")
                }
            }
        }
        self.client
            .start_dirty_log()
            .context("starting dirty logging")?;
        // Wait for backups to say where they are (up to 30 s for the first).
        let quorum = self.cfg.quorum;
        self.shared.wait_until(Duration::from_secs(30), |g| {
            (0..g.sender.backups())
                .filter(|&b| g.sender.is_streaming(b))
                .count()
                >= quorum
        });
        let mut last_pause = Instant::now();
        loop {
            // Read each time: the epoch length may follow the measured bandwidth-delay product, and a
            // migration converging shortens it.
            let switch_to = self.converge()?;
            let epoch_len = Duration::from_millis(self.epoch_ms_now());
            let stopping = self.stopping();
            // Pace epochs; also wait while the backups cannot take another one.
            let due = last_pause + epoch_len;
            if !stopping {
                let shared = self.shared.clone();
                shared.wait_until(
                    due.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
                    |_| Instant::now() >= due || shared.stop.load(Ordering::SeqCst),
                );
            }
            let budget = self.cfg.max_unacked as usize;
            let shared = self.shared.clone();
            // Converging: one epoch at a time to the target (up to 1 s), so that each epoch's lag from
            // pause to commit is what the final epoch will see, not a queue behind earlier ones.
            let converging_to = {
                let g = self.shared.lock();
                g.migration
                    .as_ref()
                    .filter(|m| m.phase == crate::migrate::Phase::Converging)
                    .map(|m| m.target)
            };
            let last_cut = self.next_epoch - 1;
            if let Some(t) = converging_to {
                shared.wait_until(Duration::from_secs(1), |g| {
                    g.sender.committed(t) >= last_cut
                        || !g.sender.is_streaming(t)
                        || shared.stop.load(Ordering::SeqCst)
                });
            }
            shared.wait_until(Duration::from_secs(3600), |g| {
                (g.sender.can_begin_epoch() && g.sender.max_unacked_bytes() < budget)
                    || shared.stop.load(Ordering::SeqCst)
            });
            last_pause = Instant::now();
            self.epoch(stopping && switch_to.is_none(), switch_to)?;
            if self.migrated {
                // The VM runs on the target; its VMM here is gone, and everything it held is durable.
                let mut g = self.shared.lock();
                let rest: Vec<u8> = std::mem::take(&mut g.held_console)
                    .into_values()
                    .flatten()
                    .collect();
                g.console_released += rest.len() as u64;
                let _ = g.console_out.write_all(&rest);
                let _ = g.console_out.flush();
                return Ok(());
            }
            if stopping && switch_to.is_none() {
                break;
            }
        }
        // The final epoch: wait (up to 30 s) until every backup that is up holds it, and at least the quorum.
        let last = self.next_epoch - 1;
        let done = self.shared.wait_until(Duration::from_secs(30), |g| {
            g.sender.durable_epoch() >= last
                && (0..g.sender.backups())
                    .all(|b| !g.sender.is_streaming(b) || g.sender.committed(b) >= last)
        });
        if !done {
            tracing::warn!(epoch = last, "final epoch not on every backup after 30 s");
        }
        if self.output_commit {
            // Replication stops but the VM goes on: what is still held belongs to it and is released.
            let mut g = self.shared.lock();
            let durable = g.sender.durable_epoch();
            g.release_console(durable);
            let rest: Vec<u8> = std::mem::take(&mut g.held_console)
                .into_values()
                .flatten()
                .collect();
            if !rest.is_empty() {
                tracing::warn!(
                    bytes = rest.len(),
                    "releasing console output of epochs that never became durable"
                );
                self.console_at_exit = rest.len() as u64;
                let _ = g.console_out.write_all(&rest);
                let _ = g.console_out.flush();
            }
            drop(g);
            let _ = self.client.hold_console(false);
        }
        let _ = self.client.stop_dirty_log();
        // Replication stops; the guest must not stay slowed down for it.
        if self.throttle_now > 0.0 {
            self.client
                .set_throttle(0.0)
                .context("clearing the vCPU throttle")?;
        }
        Ok(())
    }

    /// Epoch length now: the configured (or tuned) one, or, while a migration converges, half its downtime
    /// budget (at least 10 ms) when that is shorter.
    fn epoch_ms_now(&self) -> u64 {
        let g = self.shared.lock();
        match g
            .migration
            .as_ref()
            .filter(|m| m.phase == crate::migrate::Phase::Converging)
        {
            Some(m) => self.cfg.epoch_ms.min((m.request.downtime_ms / 2).max(10)),
            None => self.cfg.epoch_ms,
        }
    }

    /// Before each epoch, while a migration converges: switch over now (returns the target), go on
    /// converging (raising the throttle floor), or give up at the deadline. See [`crate::migrate`].
    fn converge(&mut self) -> anyhow::Result<Option<usize>> {
        use crate::migrate::Phase;
        let mut g = self.shared.lock();
        let Some(m) = g
            .migration
            .as_ref()
            .filter(|m| m.phase == Phase::Converging)
        else {
            return Ok(None);
        };
        let (req, target, started) = (m.request.clone(), m.target, m.started);
        if !m.warmed {
            // Let the target start what the switchover will need while the guest still runs here.
            let generation = self.cfg.generation + 1;
            if let Some(tx) = g.path_tx[target].iter().flatten().next() {
                let _ = tx.send(endophyte_wire::Message::SwitchoverWarmup { generation }.encode());
                g.migration.as_mut().expect("checked above").warmed = true;
            }
        }
        let committed = g.sender.committed(target);
        let current =
            g.sender.is_streaming(target) && committed + 2 >= self.next_epoch && committed > 0;
        // The lowest RTT seen: the smoothed one includes queueing behind this sidecar's own chunks, which
        // the switchover's few messages do not wait for.
        if let Some(r) = g.sender.rtt(target) {
            self.min_rtt = Some(self.min_rtt.map_or(r, |m| m.min(r)));
        }
        let rtt_ms = self.min_rtt.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        // The final transfer takes what recent epochs took from their pause to the target's commit
        // (measured at the converged epoch length); before there is such a measure, the last epoch's dirty
        // bytes at the best drain rate seen. Then Switchover/Ready and Commit/SwitchedOver: two round
        // trips. Not predicted: the target's VMM start and restore (see docs/migration.md).
        let transfer_ms = g.commit_lag_ms[target].unwrap_or_else(|| {
            let capacity = match g.max_bandwidth {
                Some(cap) => self.peak_drain.min(cap as f64),
                None => self.peak_drain,
            }
            .max(1.0);
            self.last_dirty_bytes as f64 / capacity * 1e3
        });
        let predicted = transfer_ms + 2.0 * rtt_ms;
        let m = g.migration.as_mut().expect("checked above");
        m.predicted_ms = Some(predicted);
        let budget = req.downtime_ms as f64;
        if current && predicted <= budget {
            m.phase = Phase::Switching;
            return Ok(Some(target));
        }
        if started.elapsed() < Duration::from_millis(req.deadline_ms) {
            // As QEMU's auto-converge: slow the guest a step more each epoch it does not fit, but only
            // while the data itself is the problem (at the best drain rate seen, the last epoch's pages
            // take over half the budget); the fixed part of the lag (journal fsync, round trips) does
            // not shrink with the throttle.
            let data_ms = self.last_dirty_bytes as f64 / self.peak_drain.max(1.0) * 1e3;
            if current && data_ms > budget / 2.0 {
                self.throttle_floor = (self.throttle_floor + 0.05).min(0.99);
            }
            return Ok(None);
        }
        if req.force && g.sender.is_streaming(target) && committed > 0 {
            tracing::warn!(
                predicted_ms = predicted,
                budget_ms = budget,
                "migration deadline: switching over anyway (--force)"
            );
            g.migration.as_mut().expect("checked above").phase = Phase::Switching;
            return Ok(Some(target));
        }
        let why = if current {
            format!(
                "did not converge within {} ms: the predicted downtime is {predicted:.1} ms against a budget of {budget} ms (the throttle reached {:.0} %); --force switches over anyway",
                req.deadline_ms,
                self.throttle_now * 100.0
            )
        } else {
            format!(
                "did not converge within {} ms: the target's replica is not current (it committed epoch {committed}; this sidecar is at {})",
                req.deadline_ms,
                self.next_epoch.saturating_sub(1)
            )
        };
        drop(g);
        self.migration_failed(why);
        Ok(None)
    }

    fn migration_failed(&mut self, why: String) {
        tracing::warn!("migration failed: {why}");
        self.throttle_floor = 0.0;
        let mut g = self.shared.lock();
        g.switch_pending = None;
        if let Some(m) = g.migration.as_mut() {
            m.phase = crate::migrate::Phase::Failed;
            m.error = Some(why);
        }
    }

    /// During a switchover's pause: takes the vCPU and device state saved at this pause. Without one
    /// the guest resumes, the migration is marked failed and the epoch goes on as an ordinary one
    /// (returns `None`).
    fn save_for_switch(
        &mut self,
        t0: Instant,
        paused: Duration,
        harvested: Duration,
    ) -> Option<(SwitchTimes, Vec<u8>)> {
        if self.pause_state.is_empty() {
            let _ = self.client.resume();
            self.migration_failed(
                "saving vCPU and device state at the source failed (see the log)".into(),
            );
            return None;
        }
        Some((
            SwitchTimes {
                t0,
                paused,
                harvested,
                staged: t0.elapsed(),
            },
            self.pause_state.to_vec(),
        ))
    }

    /// After the final epoch went out with the guest paused: waits for the target to commit it, has it
    /// prepare the VM (`Switchover` / `SwitchoverReady`), commits (`SwitchoverCommit` / `SwitchedOver`),
    /// and either ends this sidecar (the VM runs on the target) or resumes the guest here. See
    /// [`crate::migrate`] for why the source may resume before the commit and never after.
    fn finish_switchover(
        &mut self,
        e: u64,
        target: usize,
        (times, state): (SwitchTimes, Vec<u8>),
    ) -> anyhow::Result<()> {
        use endophyte_wire::Message;
        let name = self.shared.meta.3[target].clone();
        let committed = self.shared.wait_until(Duration::from_secs(10), |g| {
            g.sender.committed(target) >= e || !g.sender.is_streaming(target)
        }) && self.shared.lock().sender.committed(target) >= e;
        if !committed {
            return self.abandon_switch(
                None,
                format!("target {name} did not commit the final epoch {e} within 10 s"),
            );
        }
        let t_committed = times.t0.elapsed();
        let generation = self.cfg.generation + 1;
        let verify = {
            let g = self.shared.lock();
            g.migration.as_ref().is_some_and(|m| m.request.verify)
        };
        let send = |me: &Self, msg: &Message| -> bool {
            let mut g = me.shared.lock();
            g.switch_pending = Some(generation);
            g.switch_reply = None;
            match g.path_tx[target].iter().flatten().next() {
                Some(tx) => tx.send(msg.encode()).is_ok(),
                None => false,
            }
        };
        // An answer, or `None` after `limit` or once every path to the target is down.
        let wait = |me: &Self, limit: Duration| -> Option<Message> {
            me.shared.wait_until(limit, |g| {
                g.switch_reply.is_some() || g.path_tx[target].iter().all(Option::is_none)
            });
            me.shared.lock().switch_reply.take()
        };
        let prepare = Message::Switchover(endophyte_wire::Switchover {
            generation,
            session: self.session,
            epoch: e,
            verify,
            state: state.into(),
        });
        if !send(self, &prepare) {
            return self.abandon_switch(None, format!("no path to target {name} is up"));
        }
        let ready = match wait(self, Duration::from_secs(10)) {
            Some(Message::SwitchoverReady(r)) => r,
            Some(Message::Error { message, .. }) => {
                return self.abandon_switch(
                    Some(generation),
                    format!("target {name} refused the switchover: {message}"),
                )
            }
            Some(other) => {
                return self.abandon_switch(
                    Some(generation),
                    format!("target {name} answered the switchover with {}", other.name()),
                )
            }
            None => {
                return self.abandon_switch(
                    Some(generation),
                    format!(
                        "target {name} did not get the VM ready within 10 s, or its paths went down; it was never told to resume it"
                    ),
                )
            }
        };
        let t_ready = times.t0.elapsed();
        // The decision: from here the source never resumes.
        if !send(self, &Message::SwitchoverCommit { generation }) {
            tracing::error!(target = %name, "no path up to send the commit");
        }
        let resume_us = match wait(self, Duration::from_secs(10)) {
            Some(Message::SwitchedOver {
                generation: g,
                resume_us,
            }) if g == generation => resume_us,
            other => {
                let why = format!(
                    "target {name} did not confirm resuming generation {generation} after the commit ({}): the guest stays paused here, since it may run there; check the target (its fence.json and VMM) before doing anything",
                    other.map_or("no answer".to_string(), |m| m.name().to_string())
                );
                {
                    let mut g = self.shared.lock();
                    g.switch_pending = None;
                    if let Some(m) = g.migration.as_mut() {
                        m.phase = crate::migrate::Phase::Failed;
                        m.error = Some(why.clone());
                    }
                }
                anyhow::bail!(why);
            }
        };
        let t_ack = times.t0.elapsed();
        // The source stays paused for good: what it holds can be checked now at no cost to downtime.
        let source_ram_hash = if verify {
            self.client.vmm_hash().unwrap_or_default()
        } else {
            String::new()
        };
        let source_guest_pages = crate::demo::guest_pages_written(&self.client).unwrap_or(0);
        if let Err(e) = self.client.shutdown() {
            tracing::warn!("shutting the source VMM down: {e}");
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let us = |u: u64| u as f64 / 1e3;
        let mut b = crate::migrate::DowntimeBreakdown {
            pause_ms: ms(times.paused),
            harvest_ms: ms(times.harvested - times.paused),
            stage_ms: ms(times.staged - times.harvested),
            final_transfer_ms: ms(t_committed - times.staged),
            target_start_ms: us(ready.settle_us + ready.spawn_us),
            restore_ms: us(ready.restore_us),
            verify_ms: us(ready.verify_us),
            commit_ms: ms(t_ack - t_ready) - us(resume_us),
            resume_ms: us(resume_us),
            network_ms: 0.0,
        };
        let accounted = b.pause_ms
            + b.harvest_ms
            + b.stage_ms
            + b.final_transfer_ms
            + b.target_start_ms
            + b.restore_ms
            + b.verify_ms
            + b.commit_ms
            + b.resume_ms;
        b.network_ms = (ms(t_ack) - accounted).max(0.0);
        let mut g = self.shared.lock();
        g.switch_pending = None;
        let wire = g.wire_bytes;
        let m = g.migration.as_mut().expect("a migration is running");
        let report = crate::migrate::MigrationReport {
            to: name.clone(),
            generation,
            epoch: e,
            downtime_ms: ms(t_ack) - b.verify_ms,
            downtime_with_verify_ms: ms(t_ack),
            breakdown: b,
            converge_ms: ms(times.t0 - m.started),
            total_ms: ms(m.started.elapsed()),
            bytes_sent: wire - m.wire_at_start,
            predicted_downtime_ms: m.predicted_ms.unwrap_or(0.0),
            converged: m
                .predicted_ms
                .is_some_and(|p| p <= m.request.downtime_ms as f64),
            target_ram_hash: ready.ram_hash,
            source_ram_hash,
            source_guest_pages,
        };
        tracing::info!(target = %name, generation, epoch = e, downtime_ms = report.downtime_ms, "migrated: the VM runs on the target");
        m.phase = crate::migrate::Phase::Done;
        m.report = Some(report);
        drop(g);
        self.cfg.generation = generation;
        self.migrated = true;
        Ok(())
    }

    /// A switchover that failed before the commit: the target is told to drop what it prepared (when it
    /// got that far), and the guest resumes here.
    fn abandon_switch(&mut self, generation: Option<u64>, why: String) -> anyhow::Result<()> {
        if let Some(generation) = generation {
            let g = self.shared.lock();
            let target = g.migration.as_ref().map(|m| m.target);
            if let Some(tx) = target.and_then(|t| g.path_tx[t].iter().flatten().next()) {
                let _ = tx.send(endophyte_wire::Message::SwitchoverAbort { generation }.encode());
            }
        }
        self.client
            .resume()
            .context("resuming the guest after a failed switchover")?;
        self.migration_failed(why);
        Ok(())
    }

    /// Whether the run should end: a signal, `--duration`, or the demo's duration after the initial copy.
    /// Sets the stop flag, so that back-pressure waits end too.
    fn stopping(&self) -> bool {
        let steady_done = self.opts.duration_after_initial_copy
            && self.opts.duration.is_some_and(|d| {
                let g = self.shared.lock();
                g.initial_sync.is_some_and(|t| g.started.elapsed() >= t + d)
            });
        if steady_done {
            self.shared.stop.store(true, Ordering::SeqCst);
        }
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn epoch(&mut self, last: bool, switch_to: Option<usize>) -> anyhow::Result<()> {
        let e = {
            let g = self.shared.lock();
            let floor = (0..g.sender.backups())
                .map(|b| g.sender.committed(b))
                .max()
                .unwrap_or(0);
            drop(g);
            self.next_epoch.max(floor + 1)
        };
        self.next_epoch = e + 1;
        self.epochs += 1;
        let starts: Vec<EpochStart> = {
            let mut g = self.shared.lock();
            g.first_epoch.get_or_insert(e);
            (0..g.sender.backups())
                .map(|b| g.sender.begin_epoch(b, e))
                .collect()
        };
        // Resync prefixes, read from live RAM before the pause: anything the guest changes after a page was
        // read is dirty and comes again in this epoch's delta.
        // Backups that need the same pages (all of RAM, or the same history) share one encoding.
        let mut groups: Vec<(Option<u64>, Vec<usize>)> = Vec::new();
        for (b, s) in starts.iter().enumerate() {
            if let EpochStart::Resync { from, from_session } = *s {
                let key = self.history_covers(from, from_session).then_some(from);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, bs)) => bs.push(b),
                    None => groups.push((key, vec![b])),
                }
            }
        }
        for (key, backups) in groups {
            let set = match key {
                Some(from) => self.pages_since(from, e),
                None => PageSet::All,
            };
            let n = self.send_pages(e, &backups, &set)?;
            self.resync_bytes += n * self.page_size as u64 * backups.len() as u64;
            tracing::info!(?backups, from = ?key, epoch = e, pages = n, "resync prefix sent");
        }
        let targets: Vec<usize> = starts
            .iter()
            .enumerate()
            .filter(|(_, s)| !matches!(s, EpochStart::NotStreaming))
            .map(|(b, _)| b)
            .collect();

        // Pre-copy rounds: when the pages dirtied since the last pause would not fit the staging buffer (after
        // a resync prefix, or when the last epoch came close), send them from live RAM and harvest again, so
        // that the pause only stages what is left. Anything rewritten after its live read is dirty again and
        // comes in a later round or in the pause.
        let mut precopied: Option<Vec<DirtyBitmap>> = None;
        let resynced = starts
            .iter()
            .any(|s| matches!(s, EpochStart::Resync { .. }));
        // Discard policy: when the pause finds more than staging holds, the pause is abandoned (the pages go
        // back to the VMM, the guest runs on) and the epoch goes on with more pre-copy; it ends at the first
        // pause whose pages fit. The replica falls behind meanwhile instead of the guest standing still.
        let mut discarded = false;
        let (t0, vmm_pause, t_paused, harvest, t_harvested, pages, bytes, fits) = loop {
            let long_epoch = self
                .last_pause_at
                .is_none_or(|t| t.elapsed() > 2 * Duration::from_millis(self.cfg.epoch_ms));
            let precopy =
                discarded || resynced || long_epoch || self.last_dirty_bytes > self.cfg.staging / 2;
            // Stopping: no more rounds; the final epoch is cut at the next pause. Switching over: the
            // migration converged, so the pause takes what is left.
            if precopy && !self.stopping() && switch_to.is_none() {
                let mut previous_round = u64::MAX;
                for _ in 0..MAX_PRECOPY_ROUNDS {
                    let h = self.client.harvest().context("harvesting dirty pages")?;
                    // Console output handed over with any harvest belongs to this epoch.
                    self.epoch_console.extend_from_slice(&h.console);
                    let bytes =
                        h.bitmaps.iter().map(|b| b.count()).sum::<u64>() * self.page_size as u64;
                    // Small enough for the pause: leave it to the pause. Not converging (the guest
                    // dirtied nearly as much as the last round sent) with the throttle already at the
                    // curve's top: more rounds only delay the pause and the emergency policy, which is
                    // what decides how this ends. Below the top, rounds go on while the throttle rises.
                    let throttle_spent =
                        self.throttle_now >= self.controller.curve().max_throttle() - 0.005;
                    if bytes <= self.cfg.staging / 2
                        || (throttle_spent && bytes > previous_round / 10 * 9)
                    {
                        self.client.release(h.seq, false)?;
                        break;
                    }
                    previous_round = bytes;
                    self.dirty_bytes += bytes;
                    let r = self.send_pages(e, &targets, &PageSet::Union(h.bitmaps.clone()));
                    self.client.release(h.seq, r.is_ok())?;
                    r?;
                    self.precopy_rounds += 1;
                    // A pre-copy round is where a guest that outruns the paths shows: let the controller
                    // throttle it now, not only at the end of this (long) epoch.
                    self.last_dirty_bytes = bytes;
                    self.control()?;
                    match &mut precopied {
                        None => precopied = Some(h.bitmaps),
                        Some(acc) => acc
                            .iter_mut()
                            .zip(&h.bitmaps)
                            .for_each(|(a, b)| a.or_assign(b)),
                    }
                }
            }

            // The pause.
            let t0 = Instant::now();
            self.last_pause_at = Some(t0);
            let vmm_pause = self.client.pause().context("pausing the guest")?;
            let t_paused = t0.elapsed();
            self.shared.lock().pause_at.insert(e, t0);
            let harvest = match self.client.harvest() {
                Ok(h) => h,
                Err(err) => {
                    let _ = self.client.resume();
                    return Err(err).context("harvesting dirty pages");
                }
            };
            if let Some(f) = self
                .hash_out
                .as_mut()
                .filter(|_| !self.opts.final_hash_only || last)
            {
                let h = self.client.vmm_hash().context("hashing guest RAM")?;
                // One write per line, so a reader never sees half of one.
                let line = format!("{}\n", serde_json::json!({"epoch": e, "ram_hash": h}));
                f.write_all(line.as_bytes())?;
            }
            self.epoch_console.extend_from_slice(&harvest.console);
            let t_harvested = t0.elapsed();
            // vCPU and device state at this pause: the epoch's end marker carries it, so that a backup
            // can start the VM from the epoch (promote), and a switchover hands it to the target.
            self.pause_state = match self.client.save_state() {
                Ok(s) => serde_json::to_vec(&s)
                    .expect("JSON values serialize")
                    .into(),
                Err(err) => {
                    tracing::warn!(
                        epoch = e,
                        "saving vCPU and device state failed; this epoch cannot be promoted: {err}"
                    );
                    bytes::Bytes::new()
                }
            };
            let pages: u64 = harvest.bitmaps.iter().map(|b| b.count()).sum();
            let bytes = pages * self.page_size as u64;
            self.dirty_bytes += bytes;
            self.last_dirty_bytes = bytes;
            let fits = bytes <= self.cfg.staging;
            // Stopping: the final epoch is cut even when it overflows (as under `pause`), so that the
            // sidecar can exit with the replica consistent rather than discard forever.
            if !fits
                && self.cfg.emergency == crate::config::Emergency::Discard
                && !self.stopping()
                && switch_to.is_none()
            {
                self.client.release(harvest.seq, false)?;
                self.client.resume().context("resuming the guest")?;
                // Not consumed: these pages are harvested again.
                self.dirty_bytes -= bytes;
                self.discards += 1;
                tracing::warn!(
                    epoch = e,
                    dirty_bytes = bytes,
                    staging = self.cfg.staging,
                    "emergency (discard): the pause's pages overflow staging; guest resumed, epoch continues"
                );
                discarded = true;
                continue;
            }
            break (
                t0,
                vmm_pause,
                t_paused,
                harvest,
                t_harvested,
                pages,
                bytes,
                fits,
            );
        };
        // A switchover keeps the guest paused from here until the target answers: its state is saved now.
        let mut switch = None;
        let staged = if fits {
            // Copy the dirty ranges into staging while the guest stands still.
            let index = match stage_dirty(&self.client, &harvest.bitmaps, &mut self.staging, 2) {
                Ok(i) => i,
                Err(err) => {
                    let _ = self.client.resume();
                    return Err(err).context("copying dirty pages");
                }
            };
            let t_copied = t0.elapsed();
            if switch_to.is_some() {
                switch = self.save_for_switch(t0, t_paused, t_harvested);
            } else {
                self.client.resume().context("resuming the guest")?;
            }
            tracing::debug!(epoch = e, pages, ?vmm_pause, ?t_paused, ?t_harvested, ?t_copied, resumed = ?t0.elapsed(), "epoch pause");
            Some(index)
        } else {
            None
        };
        let pause_ms_if_staged = t0.elapsed().as_secs_f64() * 1e3;
        let result = if let Some(index) = staged {
            self.pauses_ms.push(pause_ms_if_staged);
            self.send_staged(e, &targets, &index)
        } else {
            // Overflow: the guest stays paused while the pages are encoded from RAM (pause policy).
            self.overflow_epochs += 1;
            tracing::warn!(
                epoch = e,
                dirty_bytes = bytes,
                staging = self.cfg.staging,
                "epoch overflows staging; guest stays paused while it is sent"
            );
            if switch_to.is_some() {
                switch = self.save_for_switch(t0, t_paused, t_harvested);
            }
            let r = self.send_pages(e, &targets, &PageSet::Union(harvest.bitmaps.clone()));
            if switch.is_none() || r.is_err() {
                self.client.resume().context("resuming the guest")?;
            }
            self.pauses_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            r.map(|_| ())
        };
        match &result {
            Ok(()) => self.client.release(harvest.seq, true)?,
            Err(_) => self.client.release(harvest.seq, false)?,
        }
        if result.is_err() && switch.is_some() {
            let _ = self.client.resume();
        }
        result?;
        {
            let mut g = self.shared.lock();
            if !self.epoch_console.is_empty() {
                g.held_console
                    .insert(e, std::mem::take(&mut self.epoch_console));
            }
            for &b in &targets {
                g.sender
                    .end_epoch_with_state(b, e, self.pause_state.clone());
            }
        }
        self.shared.wake.notify_one();
        let mut changed = harvest.bitmaps;
        if let Some(pre) = precopied {
            changed
                .iter_mut()
                .zip(&pre)
                .for_each(|(a, b)| a.or_assign(b));
        }
        self.history.insert(e, changed);
        if let (Some(target), Some(times)) = (switch_to, switch) {
            self.finish_switchover(e, target, times)?;
            if self.migrated {
                return Ok(());
            }
        }
        self.control()?;
        while self.history.len() > HISTORY_EPOCHS {
            self.history.pop_first();
        }
        Ok(())
    }

    /// Whether this run's history says what changed after epoch `from` of session `from_session`: only an
    /// epoch this run cut and still remembers does (history is pruned from the oldest end only, so every
    /// epoch cut after it is there too). An empty replica, another session's epoch or a pruned one do not.
    fn history_covers(&self, from: u64, from_session: u64) -> bool {
        from_session == self.session && self.history.contains_key(&from)
    }

    /// Page bytes (pages x page size) the slowest streaming backup acknowledged since the last drain
    /// measurement, and the time that took; starts the next measurement.
    fn drained(&mut self) -> (Duration, u64) {
        let now = Instant::now();
        let g = self.shared.lock();
        // In page bytes, as the dirty rate it is compared with: chunk bodies would make a compressible
        // guest (or one with many zero pages) look like a slow path and throttle it for nothing.
        let acked: Vec<u64> = (0..g.sender.backups())
            .map(|b| g.sender.acked_pages(b) * self.page_size as u64)
            .collect();
        let (then, acked_then) = &self.last_drain;
        let drained = (0..acked.len())
            .filter(|&b| g.sender.is_streaming(b))
            .map(|b| acked[b] - acked_then[b])
            .min()
            .unwrap_or(0);
        let elapsed = now - *then;
        drop(g);
        self.last_drain = (now, acked);
        (elapsed, drained)
    }

    /// Feeds this epoch's (or pre-copy round's) measurements to the throttle controller and sets the
    /// throttle it decides.
    fn control(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let (then, dirty_then) = self.last_sample;
        // Acknowledgements come in bursts: a drain window much shorter than an epoch (right after a
        // mid-send sample) says more about the burst than the path, and is left to the next sample.
        let (drain_elapsed, drained_bytes) =
            if self.last_drain.0.elapsed() >= Duration::from_millis(self.cfg.epoch_ms / 2) {
                self.drained()
            } else {
                (Duration::ZERO, 0)
            };
        let d = self.controller.sample(crate::throttle::EpochSample {
            elapsed: now - then,
            dirty_bytes: self.dirty_bytes - dirty_then,
            drain_elapsed,
            drained_bytes,
            staged_bytes: self.last_dirty_bytes,
            staging_capacity_bytes: self.cfg.staging,
        });
        self.last_sample = (now, self.dirty_bytes);
        self.pressures.push(d.pressure);
        self.tune(d.drain_rate);
        self.apply(d)?;
        self.throttles.push(self.throttle_now);
        Ok(())
    }

    /// During a long send (pre-copy round, resync prefix, overflow): at most once per epoch length, a
    /// drain-only sample, so that a path slowing down raises the throttle now rather than when the send
    /// ends ([`crate::throttle::Controller::sample_drain`]).
    fn control_mid_send(&mut self) -> anyhow::Result<()> {
        if self.last_drain.0.elapsed() < Duration::from_millis(self.cfg.epoch_ms) {
            return Ok(());
        }
        let (elapsed, drained) = self.drained();
        let d = self.controller.sample_drain(elapsed, drained);
        self.apply(d)
    }

    /// Publishes a decision for the control API and sets its throttle when it moved by a point or more.
    fn apply(&mut self, mut d: crate::throttle::Decision) -> anyhow::Result<()> {
        d.throttle = d.throttle.max(self.throttle_floor);
        self.peak_drain = self.peak_drain.max(d.drain_rate);
        {
            let mut g = self.shared.lock();
            g.live = Live {
                epoch: self.next_epoch.saturating_sub(1),
                epoch_ms: self.cfg.epoch_ms,
                throttle: d.throttle,
                pressure: d.pressure,
                dirty_rate: d.dirty_rate,
                drain_rate: d.drain_rate,
                emergencies: self.overflow_epochs + self.discards,
            };
        }
        if (d.throttle - self.throttle_now).abs() >= 0.01 {
            self.client
                .set_throttle(d.throttle)
                .context("setting the vCPU throttle")?;
            tracing::debug!(
                pressure = d.pressure,
                throttle = d.throttle,
                dirty_rate = d.dirty_rate,
                drain_rate = d.drain_rate,
                "throttle"
            );
            self.throttle_now = d.throttle;
        }
        Ok(())
    }

    /// LAN/WAN tuning: the settings the operator left alone follow the bandwidth-delay product of the slowest
    /// backup's path ([`crate::throttle::tune`]). Staging only grows (the buffer is touched here, outside
    /// any pause).
    fn tune(&mut self, drain_rate: f64) {
        let rtt = {
            let g = self.shared.lock();
            (0..g.sender.backups())
                .filter(|&b| g.sender.is_streaming(b))
                .filter_map(|b| g.sender.rtt(b))
                .max()
        };
        let (Some(rtt), true) = (rtt, drain_rate > 0.0) else {
            return;
        };
        let t = crate::throttle::tune(rtt, drain_rate);
        let explicit = self.cfg.explicit;
        if !explicit.epoch_ms && t.epoch_ms != self.cfg.epoch_ms {
            tracing::info!(
                epoch_ms = t.epoch_ms,
                ?rtt,
                "epoch length follows the path's RTT"
            );
            self.cfg.epoch_ms = t.epoch_ms;
        }
        if !explicit.staging && t.staging_bytes > self.cfg.staging {
            tracing::info!(
                staging = t.staging_bytes,
                drain_rate,
                "staging grows with the bandwidth-delay product"
            );
            self.cfg.staging = t.staging_bytes;
            self.staging.resize(t.staging_bytes as usize, 0xa5);
        }
        if !explicit.max_unacked && t.in_flight_bytes != self.cfg.max_unacked {
            self.cfg.max_unacked = t.in_flight_bytes;
        }
    }

    /// Pages changed after epoch `from`, up to (not including) epoch `e`'s delta; see
    /// [`EpochLoop::history_covers`].
    fn pages_since(&self, from: u64, e: u64) -> PageSet {
        let mut acc: Option<Vec<DirtyBitmap>> = None;
        for (_, bms) in self.history.range(from + 1..e) {
            match &mut acc {
                None => acc = Some(bms.clone()),
                Some(a) => {
                    for (x, y) in a.iter_mut().zip(bms) {
                        x.or_assign(y);
                    }
                }
            }
        }
        match acc {
            Some(a) => PageSet::Union(a),
            None => PageSet::Union(vec![]),
        }
    }

    fn push(&mut self, targets: &[usize], chunk: PageChunk) -> anyhow::Result<()> {
        self.raw_bytes += u64::from(chunk.n_pages) * self.page_size as u64;
        self.body_bytes += chunk.body.len() as u64;
        {
            let mut g = self.shared.lock();
            for &b in targets {
                g.sender.push_chunk(b, chunk.clone());
            }
        }
        self.shared.wake.notify_one();
        let budget = self.cfg.max_unacked as usize;
        // Back-pressure; a stop request ends the wait, so that a stuck backup cannot keep the sidecar from
        // cutting its final epoch and exiting.
        let shared = self.shared.clone();
        shared.wait_until(Duration::from_secs(3600), |g| {
            targets
                .iter()
                .all(|&b| g.sender.unacked_bytes(b) < budget || !g.sender.is_streaming(b))
                || shared.stop.load(Ordering::SeqCst)
        });
        self.control_mid_send()
    }

    fn send_staged(
        &mut self,
        e: u64,
        targets: &[usize],
        index: &[(u64, usize, usize)],
    ) -> anyhow::Result<()> {
        let ps = self.page_size;
        let mut builder = ChunkBuilder::new(e, ps, self.cfg.chunk_pages);
        let staging = std::mem::take(&mut self.staging);
        let mut send = || -> anyhow::Result<()> {
            for &(gpa, off, len) in index {
                for i in (0..len).step_by(ps) {
                    builder.push(gpa + i as u64, &staging[off + i..off + i + ps]);
                    if builder.is_full() {
                        let c = builder.finish(self.cfg.compress);
                        self.push(targets, c)?;
                    }
                }
            }
            if !builder.is_empty() {
                let c = builder.finish(self.cfg.compress);
                self.push(targets, c)?;
            }
            Ok(())
        };
        let r = send();
        self.staging = staging;
        r
    }

    /// Encodes pages straight from guest RAM; returns how many.
    fn send_pages(&mut self, e: u64, targets: &[usize], set: &PageSet) -> anyhow::Result<u64> {
        let ps = self.page_size;
        let mut builder = ChunkBuilder::new(e, ps, self.cfg.chunk_pages);
        let mut page = vec![0u8; ps];
        let mut n = 0u64;
        let emit = |me: &mut Self,
                    gpa: u64,
                    page: &mut Vec<u8>,
                    builder: &mut ChunkBuilder|
         -> anyhow::Result<()> {
            me.client.read(gpa, page).context("reading guest RAM")?;
            builder.push(gpa, page);
            if builder.is_full() {
                let c = builder.finish(me.cfg.compress);
                me.push(targets, c)?;
            }
            Ok(())
        };
        match set {
            PageSet::All => {
                let regions: Vec<(u64, u64)> = self
                    .client
                    .info()
                    .regions
                    .iter()
                    .map(|r| (r.gpa, r.size_bytes))
                    .collect();
                for (gpa, size) in regions {
                    for off in (0..size).step_by(ps) {
                        emit(self, gpa + off, &mut page, &mut builder)?;
                        n += 1;
                    }
                }
            }
            PageSet::Union(bms) => {
                for bm in bms {
                    for idx in bm.iter_pages() {
                        emit(
                            self,
                            bm.base_gpa() + idx * ps as u64,
                            &mut page,
                            &mut builder,
                        )?;
                        n += 1;
                    }
                }
            }
        }
        if !builder.is_empty() {
            let c = builder.finish(self.cfg.compress);
            self.push(targets, c)?;
        }
        Ok(n)
    }

    fn report(&mut self, cfg: &SidecarConfig, paths: &[usize]) -> SidecarReport {
        let mut g = self.shared.lock();
        let durable = g.sender.durable_epoch();
        let first = g.first_epoch.unwrap_or(1);
        let last = self.next_epoch.saturating_sub(1);
        let mut rpo = std::mem::take(&mut g.rpo_samples);
        let mut pauses = self.pauses_ms.clone();
        SidecarReport {
            vm_id: cfg.vm_id.clone(),
            mem_bytes: self.mem_bytes,
            epochs: self.epochs,
            epochs_committed: if durable >= first {
                durable - first + 1
            } else {
                0
            }
            .min(self.epochs),
            durable_epoch: durable,
            last_epoch: last,
            epoch_ms: self.cfg.epoch_ms,
            staging_bytes: self.cfg.staging,
            paths: paths.first().copied().unwrap_or(0),
            paths_total: paths.iter().sum(),
            backups: paths.len(),
            dirty_bytes: self.dirty_bytes,
            resync_bytes: self.resync_bytes,
            wire_bytes: g.wire_bytes,
            compression_ratio: if self.body_bytes > 0 {
                self.raw_bytes as f64 / self.body_bytes as f64
            } else {
                0.0
            },
            epoch_pause_ms_p50: percentile(&mut pauses, 0.5),
            epoch_pause_ms_p99: percentile(&mut pauses, 0.99),
            epoch_pause_ms_max: pauses.iter().copied().fold(0.0, f64::max),
            rpo_ms_p50: percentile(&mut rpo, 0.5),
            rpo_ms_p99: percentile(&mut rpo, 0.99),
            initial_sync_ms: g.initial_sync.map_or(0.0, |d| d.as_secs_f64() * 1e3),
            overflow_epochs: self.overflow_epochs,
            precopy_rounds: self.precopy_rounds,
            resyncs: g.resyncs,
            path_failures: g.path_failures,
            peer_errors: g.peer_errors.clone(),
            backup_committed: (0..g.sender.backups())
                .map(|b| g.sender.committed(b))
                .collect(),
            curve: self.controller.curve().to_string(),
            throttle_pct_p50: percentile(&mut self.throttles.clone(), 0.5) * 100.0,
            throttle_pct_max: self.throttles.iter().copied().fold(0.0, f64::max) * 100.0,
            pressure_p50: percentile(&mut self.pressures.clone(), 0.5),
            pressure_max: self.pressures.iter().copied().fold(0.0, f64::max),
            emergency_events: self.overflow_epochs + self.discards,
            discarded_pauses: self.discards,
            dirty_bytes_per_s: self.dirty_bytes as f64 / self.run_started.elapsed().as_secs_f64(),
            drain_bytes_per_s: (0..g.sender.backups())
                .filter(|&b| g.sender.committed(b) > 0)
                .map(|b| g.sender.acked_bytes(b))
                .min()
                .unwrap_or(0) as f64
                / self.run_started.elapsed().as_secs_f64(),
            backup_rtt_ms: (0..g.sender.backups())
                .map(|b| g.sender.rtt(b).map_or(0.0, |d| d.as_secs_f64() * 1e3))
                .collect(),
            final_epoch_durable: durable >= last && last > 0,
            output_commit: self.output_commit,
            console_bytes_released: g.console_released,
            console_bytes_released_at_exit: self.console_at_exit,
            migration: g.migration.as_ref().and_then(|m| m.report.clone()),
        }
    }
}

/// The sidecar's control API ([`crate::control`]): `GET /v1/status`, `PUT /v1/max-bandwidth`.
fn control_router(shared: Arc<Shared>) -> axum::Router {
    use crate::control::{ApiError, MaxBandwidth};
    use axum::extract::State;
    use axum::Json;
    axum::Router::new()
        .route(
            "/v1/status",
            axum::routing::get(|State(s): State<Arc<Shared>>| async move { Json(status(&s)) }),
        )
        .route(
            "/v1/max-bandwidth",
            axum::routing::put(
                |State(s): State<Arc<Shared>>, Json(m): Json<MaxBandwidth>| async move {
                    if m.bytes_per_s == Some(0) {
                        return Err(ApiError::bad_request(
                            "bytes_per_s must be above 0 (null lifts the cap)",
                        ));
                    }
                    s.lock().max_bandwidth = m.bytes_per_s;
                    s.wake.notify_one();
                    tracing::info!(bytes_per_s = ?m.bytes_per_s, "bandwidth cap changed");
                    Ok(Json(m))
                },
            ),
        )
        .route(
            "/v1/migrate",
            axum::routing::post(
                |State(s): State<Arc<Shared>>,
                 Json(req): Json<crate::migrate::MigrateRequest>| async move {
                    start_migration(&s, req).map(|st| (axum::http::StatusCode::ACCEPTED, Json(st)))
                },
            ),
        )
        .route(
            "/v1/migration",
            axum::routing::get(|State(s): State<Arc<Shared>>| async move {
                let mut g = s.lock();
                let st = migration_status(&g)
                    .ok_or_else(|| ApiError::not_found("no migration was requested"))?;
                if matches!(
                    st.phase,
                    crate::migrate::Phase::Done | crate::migrate::Phase::Failed
                ) {
                    g.final_fetched = true;
                    s.cv.notify_all();
                }
                Ok::<_, ApiError>(Json(st))
            }),
        )
        .with_state(shared)
}

fn start_migration(
    s: &Shared,
    req: crate::migrate::MigrateRequest,
) -> Result<crate::migrate::MigrationStatus, crate::control::ApiError> {
    use crate::control::ApiError;
    use crate::migrate::Phase;
    let names = &s.meta.3;
    let target = names.iter().position(|n| *n == req.to).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{:?} is not one of this sidecar's backups ({})",
            req.to,
            names.join(", ")
        ))
    })?;
    if req.downtime_ms == 0 || req.deadline_ms == 0 {
        return Err(ApiError::bad_request(
            "downtime_ms and deadline_ms must be above 0",
        ));
    }
    let mut g = s.lock();
    if let Some(m) = &g.migration {
        match m.phase {
            Phase::Converging | Phase::Switching => {
                return Err(ApiError::conflict(format!(
                    "a migration to {} is already running ({:?})",
                    m.request.to, m.phase
                )))
            }
            Phase::Done => {
                return Err(ApiError::conflict(format!(
                    "this VM already migrated to {}; this sidecar is exiting",
                    m.request.to
                )))
            }
            Phase::Failed => {}
        }
    }
    tracing::info!(to = %req.to, downtime_ms = req.downtime_ms, deadline_ms = req.deadline_ms, force = req.force, "migration requested");
    g.final_fetched = false;
    // Measured afresh at the converging epoch length.
    g.commit_lag_ms[target] = None;
    g.migration = Some(MigrationCtl {
        request: req,
        target,
        started: Instant::now(),
        phase: Phase::Converging,
        predicted_ms: None,
        warmed: false,
        wire_at_start: g.wire_bytes,
        error: None,
        report: None,
    });
    drop(g);
    s.cv.notify_all();
    Ok(migration_status(&s.lock()).expect("just set"))
}

fn migration_status(g: &Inner) -> Option<crate::migrate::MigrationStatus> {
    let m = g.migration.as_ref()?;
    let elapsed = m.started.elapsed().as_secs_f64();
    let sent = g.wire_bytes - m.wire_at_start;
    Some(crate::migrate::MigrationStatus {
        request: m.request.clone(),
        phase: m.phase,
        elapsed_ms: elapsed * 1e3,
        predicted_downtime_ms: m.predicted_ms,
        bytes_sent: sent,
        rate_bytes_per_s: if elapsed > 0.0 {
            sent as f64 / elapsed
        } else {
            0.0
        },
        throttle: g.live.throttle,
        error: m.error.clone(),
        report: m.report.clone(),
    })
}

fn status(s: &Shared) -> crate::control::SidecarStatus {
    let g = s.lock();
    let (vm_id, node, mem_bytes, names) = &s.meta;
    let durable = g.sender.durable_epoch();
    crate::control::SidecarStatus {
        vm_id: vm_id.clone(),
        node: node.clone(),
        mem_bytes: *mem_bytes,
        epoch: g.live.epoch,
        durable_epoch: durable,
        rpo_ms: g
            .pause_at
            .get(&durable)
            .filter(|_| g.first_epoch.is_some_and(|f| durable >= f))
            .map(|at| at.elapsed().as_secs_f64() * 1e3),
        epoch_ms: g.live.epoch_ms,
        throttle: g.live.throttle,
        pressure: g.live.pressure,
        dirty_bytes_per_s: g.live.dirty_rate,
        drain_bytes_per_s: g.live.drain_rate,
        emergency_events: g.live.emergencies,
        max_bandwidth: g.max_bandwidth,
        backups: names
            .iter()
            .enumerate()
            .map(|(b, name)| crate::control::BackupStatus {
                name: name.clone(),
                paths_up: g.path_tx[b].iter().filter(|t| t.is_some()).count(),
                paths: g.path_tx[b].len(),
                streaming: g.sender.is_streaming(b),
                committed_epoch: g.sender.committed(b),
                rtt_ms: g.sender.rtt(b).map(|d| d.as_secs_f64() * 1e3),
                unacked_bytes: g.sender.unacked_bytes(b) as u64,
            })
            .collect(),
    }
}
