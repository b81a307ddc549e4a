//! The sidecar's report at exit, and the statistics the epoch loop keeps for it.

use serde::Serialize;

use super::epoch::EpochLoop;
use crate::config::SidecarConfig;

/// Counters and samples of the epoch loop.
pub(super) struct Stats {
    /// Epochs cut in this run.
    pub epochs: u64,
    /// Guest pause per epoch, ms.
    pub pauses_ms: Vec<f64>,
    /// Time between consecutive epochs' cuts, ms.
    pub periods_ms: Vec<f64>,
    /// When the last epoch was cut.
    pub last_cut: Option<std::time::Instant>,
    /// Bytes of dirty (or, for snapshots, changed) pages.
    pub dirty_bytes: u64,
    /// Bytes of pages shipped in resync prefixes.
    pub resync_bytes: u64,
    /// Page bytes and chunk body bytes over all chunks encoded.
    pub raw_bytes: u64,
    pub body_bytes: u64,
    pub overflow_epochs: u64,
    pub discards: u64,
    pub precopy_rounds: u64,
    /// Dirty bytes of the last pause (or pre-copy round).
    pub last_dirty_bytes: u64,
    pub run_started: std::time::Instant,
    /// Contribution rounds that asked a remote service, from the ask to the last answer, ms.
    pub contribution_ms: Vec<f64>,
    /// Contributions that were late, failed or out of bounds.
    pub service_failures: u64,
    /// Cuts abandoned (or snapshots put off) because a service failed under the `fail` policy.
    pub abandoned_cuts: u64,
    /// `endophyte_epoch_pause_seconds`, observed with each cut.
    pause_histogram: prometheus_client::metrics::histogram::Histogram,
}

impl Stats {
    pub fn new(pause_histogram: prometheus_client::metrics::histogram::Histogram) -> Self {
        Self {
            pause_histogram,
            epochs: 0,
            pauses_ms: Vec::new(),
            periods_ms: Vec::new(),
            last_cut: None,
            dirty_bytes: 0,
            resync_bytes: 0,
            raw_bytes: 0,
            body_bytes: 0,
            overflow_epochs: 0,
            discards: 0,
            precopy_rounds: 0,
            contribution_ms: Vec::new(),
            service_failures: 0,
            abandoned_cuts: 0,
            last_dirty_bytes: 0,
            run_started: std::time::Instant::now(),
        }
    }

    /// Records an epoch cut now whose guest pause was `pause`.
    pub fn cut(&mut self, pause: std::time::Duration) {
        let now = std::time::Instant::now();
        self.pause_histogram.observe(pause.as_secs_f64());
        self.pauses_ms.push(pause.as_secs_f64() * 1e3);
        if let Some(t) = self.last_cut.replace(now) {
            self.periods_ms.push((now - t).as_secs_f64() * 1e3);
        }
    }
}

/// The `q` quantile of `v` (sorted in place); 0 when empty.
pub(super) fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
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
    /// Time from one epoch's cut to the next's, ms (`epoch_ms` when epochs keep up; longer when cutting,
    /// or for a snapshot VMM streaming a whole snapshot, takes longer).
    pub epoch_period_ms_p50: f64,
    /// 99th percentile of the same.
    pub epoch_period_ms_p99: f64,
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
    /// The VMM, as its adapter names it.
    pub vmm: String,
    /// How changed pages were found: `dirty_log` or `full_snapshot`.
    pub tracking: String,
    /// Whether the VMM could throttle its vCPUs (without, the emergency policy alone handled pressure).
    pub throttle_supported: bool,
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
    /// Page bytes (pages x page size, as the dirty rate) the slowest backup that committed anything
    /// acknowledged per second, over the run; the same unit as the control API's `drain_bytes_per_s`.
    pub drain_bytes_per_s: f64,
    /// Chunk body bytes (what went on the wire, compressed) the same backup acknowledged per second.
    pub wire_drain_bytes_per_s: f64,
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
    /// Contribution rounds that asked a remote service: ask to last answer, ms (inside the pause).
    pub service_contribution_ms_p50: f64,
    /// 99th percentile of the same.
    pub service_contribution_ms_p99: f64,
    /// Contributions that were late, failed or out of bounds.
    pub service_failures: u64,
    /// Cuts abandoned because a service failed under `service_policy = "fail"`.
    pub service_abandoned_cuts: u64,
}

impl EpochLoop {
    /// The run's report.
    pub(super) fn report(&mut self, cfg: &SidecarConfig, paths: &[usize]) -> SidecarReport {
        let mut g = self.shared.lock();
        let durable = g.sender.durable_epoch();
        let first = g.durability.first_epoch.unwrap_or(1);
        let last = self.next_epoch.saturating_sub(1);
        let mut rpo = std::mem::take(&mut g.durability.rpo_samples);
        let mut pauses = self.stats.pauses_ms.clone();
        let mut contribution_ms = self.stats.contribution_ms.clone();
        let mut periods = self.stats.periods_ms.clone();
        let st = &self.stats;
        let secs = st.run_started.elapsed().as_secs_f64();
        // The slowest backup that committed anything: its drain in both units.
        let slowest = (0..g.sender.backups())
            .filter(|&b| g.sender.committed(b) > 0)
            .min_by_key(|&b| g.sender.acked_pages(b));
        let caps = self.vmm.capabilities();
        SidecarReport {
            vm_id: cfg.vm_id.clone(),
            mem_bytes: self.vmm.geometry().mem_bytes(),
            epochs: st.epochs,
            epochs_committed: if durable >= first {
                durable - first + 1
            } else {
                0
            }
            .min(st.epochs),
            durable_epoch: durable,
            last_epoch: last,
            epoch_ms: self.cfg.epoch_ms,
            staging_bytes: self.cfg.staging,
            paths: paths.first().copied().unwrap_or(0),
            paths_total: paths.iter().sum(),
            backups: paths.len(),
            dirty_bytes: st.dirty_bytes,
            resync_bytes: st.resync_bytes,
            wire_bytes: g.counters.wire_bytes,
            compression_ratio: if st.body_bytes > 0 {
                st.raw_bytes as f64 / st.body_bytes as f64
            } else {
                0.0
            },
            epoch_pause_ms_p50: percentile(&mut pauses, 0.5),
            epoch_pause_ms_p99: percentile(&mut pauses, 0.99),
            epoch_pause_ms_max: pauses.iter().copied().fold(0.0, f64::max),
            epoch_period_ms_p50: percentile(&mut periods, 0.5),
            epoch_period_ms_p99: percentile(&mut periods, 0.99),
            rpo_ms_p50: percentile(&mut rpo, 0.5),
            rpo_ms_p99: percentile(&mut rpo, 0.99),
            initial_sync_ms: g
                .durability
                .initial_sync
                .map_or(0.0, |d| d.as_secs_f64() * 1e3),
            overflow_epochs: st.overflow_epochs,
            precopy_rounds: st.precopy_rounds,
            resyncs: g.counters.resyncs,
            path_failures: g.counters.path_failures,
            peer_errors: g.counters.peer_errors.clone(),
            backup_committed: (0..g.sender.backups())
                .map(|b| g.sender.committed(b))
                .collect(),
            vmm: self.vmm.name().to_string(),
            tracking: match caps.tracking {
                endophyte_vmm::Tracking::DirtyLog => "dirty_log".into(),
                endophyte_vmm::Tracking::FullSnapshot => "full_snapshot".into(),
            },
            throttle_supported: self.pacing.supported,
            curve: self.pacing.controller.curve().to_string(),
            throttle_pct_p50: percentile(&mut self.pacing.throttles.clone(), 0.5) * 100.0,
            throttle_pct_max: self.pacing.throttles.iter().copied().fold(0.0, f64::max) * 100.0,
            pressure_p50: percentile(&mut self.pacing.pressures.clone(), 0.5),
            pressure_max: self.pacing.pressures.iter().copied().fold(0.0, f64::max),
            emergency_events: st.overflow_epochs + st.discards,
            discarded_pauses: st.discards,
            dirty_bytes_per_s: st.dirty_bytes as f64 / secs,
            drain_bytes_per_s: slowest.map_or(0.0, |b| {
                (g.sender.acked_pages(b) * self.page_size as u64) as f64 / secs
            }),
            wire_drain_bytes_per_s: slowest.map_or(0.0, |b| g.sender.acked_bytes(b) as f64 / secs),
            backup_rtt_ms: (0..g.sender.backups())
                .map(|b| g.sender.rtt(b).map_or(0.0, |d| d.as_secs_f64() * 1e3))
                .collect(),
            final_epoch_durable: durable >= last && last > 0,
            output_commit: self.output_commit,
            console_bytes_released: self.shared.console.lock().released,
            console_bytes_released_at_exit: self.output_at_exit,
            migration: g.migration.as_ref().and_then(|m| m.report.clone()),
            service_contribution_ms_p50: percentile(&mut contribution_ms.clone(), 0.5),
            service_contribution_ms_p99: percentile(&mut contribution_ms, 0.99),
            service_failures: st.service_failures,
            service_abandoned_cuts: st.abandoned_cuts,
        }
    }
}
