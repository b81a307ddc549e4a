//! The sidecar's control API ([`crate::control`]): `GET /v1/status`, `PUT /v1/max-bandwidth`,
//! `POST /v1/migrate`, `GET /v1/migration`, and `GET /metrics` ([`super::metrics`]).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::migration::{migration_status, start_migration};
use super::shared::Shared;
use crate::control::{ApiError, BackupStatus, MaxBandwidth, SidecarStatus};
use crate::migrate::{MigrateRequest, MigrationStatus, Phase};

/// The router, served on the sidecar's `--control-socket`.
pub(super) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/v1/status", axum::routing::get(get_status))
        .route("/v1/max-bandwidth", axum::routing::put(put_max_bandwidth))
        .route("/v1/migrate", axum::routing::post(post_migrate))
        .route("/v1/migration", axum::routing::get(get_migration))
        .route("/metrics", axum::routing::get(super::metrics::get_metrics))
        .with_state(shared)
}

async fn get_status(State(s): State<Arc<Shared>>) -> Json<SidecarStatus> {
    Json(status(&s))
}

async fn put_max_bandwidth(
    State(s): State<Arc<Shared>>,
    Json(m): Json<MaxBandwidth>,
) -> Result<Json<MaxBandwidth>, ApiError> {
    if m.bytes_per_s == Some(0) {
        return Err(ApiError::bad_request(
            "bytes_per_s must be above 0 (null lifts the cap)",
        ));
    }
    s.lock().max_bandwidth = m.bytes_per_s;
    s.wake.notify_one();
    tracing::info!(bytes_per_s = ?m.bytes_per_s, "bandwidth cap changed");
    Ok(Json(m))
}

async fn post_migrate(
    State(s): State<Arc<Shared>>,
    Json(req): Json<MigrateRequest>,
) -> Result<(axum::http::StatusCode, Json<MigrationStatus>), ApiError> {
    start_migration(&s, req).map(|st| (axum::http::StatusCode::ACCEPTED, Json(st)))
}

async fn get_migration(State(s): State<Arc<Shared>>) -> Result<Json<MigrationStatus>, ApiError> {
    let mut g = s.lock();
    let st =
        migration_status(&g).ok_or_else(|| ApiError::not_found("no migration was requested"))?;
    if matches!(st.phase, Phase::Done | Phase::Failed) {
        g.final_fetched = true;
        s.cv.notify_all();
    }
    Ok(Json(st))
}

fn status(s: &Shared) -> SidecarStatus {
    let g = s.lock();
    let m = &s.meta;
    let durable = g.sender.durable_epoch();
    SidecarStatus {
        vm_id: m.vm_id.clone(),
        node: m.node.clone(),
        mem_bytes: m.mem_bytes,
        epoch: g.live.epoch,
        durable_epoch: durable,
        rpo_ms: g.durability.rpo_now(durable),
        epoch_ms: g.live.epoch_ms,
        throttle: g.live.throttle,
        pressure: g.live.pressure,
        dirty_bytes_per_s: g.live.dirty_rate,
        drain_bytes_per_s: g.live.drain_rate,
        emergency_events: g.live.emergencies,
        max_bandwidth: g.max_bandwidth,
        waiting: g.waiting.clone(),
        services: s.services.status(),
        authority: s.hold.get().map(|h| h.status()),
        fence: crate::control::FenceStatusView {
            enabled: m.fence_after.is_some(),
            fenced: g.fence.fenced,
            fences: g.fence.fences,
            answering: g.fence.answering,
            after_ms: m.fence_after.map_or(0, |d| d.as_millis() as u64),
        },
        backups: m
            .backups
            .iter()
            .enumerate()
            .map(|(b, name)| BackupStatus {
                name: name.clone(),
                paths_up: g.paths[b].iter().filter(|t| t.is_some()).count(),
                paths: g.paths[b].len(),
                streaming: g.sender.is_streaming(b),
                committed_epoch: g.sender.committed(b),
                rtt_ms: g.sender.rtt(b).map(|d| d.as_secs_f64() * 1e3),
                unacked_bytes: g.sender.unacked_bytes(b) as u64,
                last_error: g.counters.last_error[b].clone(),
            })
            .collect(),
    }
}
