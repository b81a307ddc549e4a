//! The sidecar's Prometheus series (`GET /metrics` on its control socket and, with `metrics_listen`, on
//! TCP): one scrape is one snapshot of [`Shared`] taken under its lock ([`crate::metrics`]).
//!
//! Every series carries `vm`. Per backup (label `backup`, its configured name): paths up, RTT,
//! committed epoch, acknowledged and unacknowledged bytes. The histograms of epoch pauses and RPO are
//! observed where they are measured (the epoch loop's cut, the driver's 10 ms RPO sample).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::migration::migration_status;
use super::shared::Shared;
use crate::metrics::{self, Labels, Scrape};
use crate::migrate::Phase;

/// What a snapshot cannot give back: histograms and counters of events, observed as they happen.
/// Clones share their values.
#[derive(Clone)]
pub(super) struct PrimaryMetrics {
    /// Guest pause of each epoch's cut, seconds.
    pub epoch_pause: Histogram,
    /// Age of the durable epoch, seconds, sampled every 10 ms once the initial copy is durable.
    pub rpo: Histogram,
    /// Epochs that became durable (every backup, or the configured quorum, committed them).
    pub epochs_committed: Counter,
    /// Bytes of pages the guest dirtied (page count times the host page size).
    pub dirty_bytes: Counter,
}

impl PrimaryMetrics {
    pub fn new() -> Self {
        Self {
            epoch_pause: Histogram::new(metrics::pause_buckets()),
            rpo: Histogram::new(metrics::rpo_buckets()),
            epochs_committed: Counter::default(),
            dirty_bytes: Counter::default(),
        }
    }
}

/// `GET /metrics`.
pub(super) async fn get_metrics(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    scrape(&s).respond(&headers)
}

/// The router of the TCP metrics listener: `/metrics` only.
pub(super) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(get_metrics))
        .with_state(shared)
}

fn secs_ms(ms: f64) -> f64 {
    ms / 1e3
}

fn scrape(s: &Shared) -> Scrape {
    let mut out = Scrape::new(vec![("vm", s.meta.vm_id.clone())]);
    let m = s.metrics.clone();
    let g = s.lock();
    let durable = g.sender.durable_epoch();
    let per_backup = |f: &dyn Fn(usize) -> Option<f64>| -> Vec<(Labels, f64)> {
        s.meta
            .backups
            .iter()
            .enumerate()
            .filter_map(|(b, name)| f(b).map(|v| (vec![("backup", name.clone())], v)))
            .collect()
    };

    out.gauge(
        "endophyte_epoch",
        "Newest epoch cut (its number)",
        g.live.epoch as f64,
    );
    out.gauge(
        "endophyte_durable_epoch",
        "Newest epoch committed by the backups the durability rule requires",
        durable as f64,
    );
    out.metric(
        "endophyte_epochs_committed",
        "Epochs that became durable in this run",
        m.epochs_committed,
    );
    out.metric(
        "endophyte_epoch_pause_seconds",
        "Guest pause at each epoch's cut",
        m.epoch_pause,
    );
    out.metric(
        "endophyte_rpo_seconds",
        "Age of the durable epoch's cut, sampled every 10 ms in steady state",
        m.rpo,
    );
    if let Some(ms) = g.durability.rpo_now(durable) {
        out.gauge(
            "endophyte_durable_epoch_age_seconds",
            "Age of the durable epoch's cut now: what a failover would lose",
            secs_ms(ms),
        );
    }
    out.gauge(
        "endophyte_epoch_length_seconds",
        "Epoch length in force",
        secs_ms(g.live.epoch_ms as f64),
    );
    out.metric(
        "endophyte_dirty_bytes",
        "Bytes of guest pages dirtied (pages times the page size)",
        m.dirty_bytes,
    );
    out.gauge(
        "endophyte_dirty_rate_bytes_per_second",
        "Dirty rate the throttle controller measured last",
        g.live.dirty_rate,
    );
    out.gauge(
        "endophyte_drain_rate_bytes_per_second",
        "Rate the backups acknowledged at, as the throttle controller measured it last",
        g.live.drain_rate,
    );
    out.counter(
        "endophyte_sent_bytes",
        "Frame bytes written to paths, all backups, retransmissions included",
        g.counters.wire_bytes,
    );
    out.gauge(
        "endophyte_throttle_ratio",
        "vCPU throttle in force, 0 (none) to 1",
        g.live.throttle,
    );
    out.gauge(
        "endophyte_throttle_pressure_ratio",
        "Pressure the throttle curve is read at, 0 to 1",
        g.live.pressure,
    );
    out.counter(
        "endophyte_emergency_epochs",
        "Epochs whose dirty pages overflowed the staging buffer (sent paused, or discarded)",
        g.live.emergencies,
    );
    if let Some(b) = g.max_bandwidth {
        out.gauge(
            "endophyte_max_bandwidth_bytes_per_second",
            "Bandwidth cap in force",
            b as f64,
        );
    }
    if s.meta.fence_after.is_some() {
        out.gauge(
            "endophyte_self_fenced",
            "1 while the guest is paused because too few backups answer (self-fence)",
            f64::from(u8::from(g.fence.fenced)),
        );
        out.counter(
            "endophyte_self_fences",
            "Times the guest was self-fenced",
            g.fence.fences,
        );
        out.gauge(
            "endophyte_backups_answering",
            "Backups that answered a ping within the self-fence bound",
            g.fence.answering as f64,
        );
    }
    out.counter(
        "endophyte_path_failures",
        "Paths that failed",
        g.counters.path_failures,
    );
    out.counter(
        "endophyte_resyncs",
        "Backups resynced (first contact included)",
        g.counters.resyncs,
    );
    out.counter(
        "endophyte_output_released_bytes",
        "Guest console bytes released once their epoch was durable",
        s.console.lock().released,
    );

    out.gauges(
        "endophyte_backup_paths_up",
        "Paths up to each backup",
        per_backup(&|b| Some(g.paths[b].iter().filter(|t| t.is_some()).count() as f64)),
    );
    out.gauges(
        "endophyte_backup_paths",
        "Paths configured to each backup",
        per_backup(&|b| Some(g.paths[b].len() as f64)),
    );
    out.gauges(
        "endophyte_backup_streaming",
        "1 when the backup receives epochs as they are cut (resynced, paths up)",
        per_backup(&|b| Some(f64::from(u8::from(g.sender.is_streaming(b))))),
    );
    out.gauges(
        "endophyte_backup_committed_epoch",
        "Newest epoch each backup committed",
        per_backup(&|b| Some(g.sender.committed(b) as f64)),
    );
    out.gauges(
        "endophyte_backup_rtt_seconds",
        "Smoothed round-trip time to each backup, over its paths",
        per_backup(&|b| g.sender.rtt(b).map(|d| d.as_secs_f64())),
    );
    out.counters(
        "endophyte_backup_acknowledged_bytes",
        "Chunk bytes each backup acknowledged",
        s.meta
            .backups
            .iter()
            .enumerate()
            .map(|(b, n)| (vec![("backup", n.clone())], g.sender.acked_bytes(b))),
    );
    out.gauges(
        "endophyte_backup_unacknowledged_bytes",
        "Chunk bytes sent to each backup and not yet acknowledged",
        per_backup(&|b| Some(g.sender.unacked_bytes(b) as f64)),
    );

    let mig = migration_status(&g);
    let phase = mig.as_ref().map(|m| m.phase);
    out.gauges(
        "endophyte_migration_phase",
        "1 for the phase the last migration requested is in (none: no migration asked)",
        [
            ("none", None),
            ("converging", Some(Phase::Converging)),
            ("switching", Some(Phase::Switching)),
            ("done", Some(Phase::Done)),
            ("failed", Some(Phase::Failed)),
        ]
        .map(|(l, p)| {
            (
                vec![("phase", l.to_owned())],
                f64::from(u8::from(phase == p)),
            )
        }),
    );
    if let Some(ms) = mig.as_ref().and_then(|m| m.predicted_downtime_ms) {
        out.gauge(
            "endophyte_migration_predicted_downtime_seconds",
            "Downtime the migration's switchover is predicted to take",
            secs_ms(ms),
        );
    }
    if let Some(r) = mig.as_ref().and_then(|m| m.report.as_ref()) {
        out.gauge(
            "endophyte_migration_downtime_seconds",
            "Guest downtime of the finished migration's switchover",
            secs_ms(r.downtime_ms),
        );
    }
    crate::services::scrape_into(&mut out, &s.services.status());
    out
}
