//! A backup's control API ([`crate::control`]): `GET /v1/status` (each VM's committed epoch, its
//! primary's lease, its fence), `POST /v1/promote` ([`PromoteRequest`]) and `GET /metrics`
//! ([`super::metrics`]).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::{BackupNode, VmIn};
use crate::control::{ApiError, BackupNodeStatus, PromoteReply, PromoteRequest};

/// The router, served on the backup's `--control-socket`.
pub fn router(node: Arc<BackupNode>) -> axum::Router {
    axum::Router::new()
        .route("/v1/status", axum::routing::get(status))
        .route("/v1/promote", axum::routing::post(promote))
        .route("/metrics", axum::routing::get(super::metrics::get_metrics))
        .with_state(node)
}

async fn status(State(n): State<Arc<BackupNode>>) -> Json<BackupNodeStatus> {
    Json(node_status(&n).await)
}

/// The node's status: each replica thread's answer (a thread that is gone is left out).
pub(super) async fn node_status(n: &BackupNode) -> BackupNodeStatus {
    let mut vms = vec![];
    for h in n.replica_handles() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if h.tx.send(VmIn::Status { reply: tx }).is_ok() {
            if let Ok(v) = rx.await {
                vms.push(v);
            }
        }
    }
    vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    BackupNodeStatus {
        node: n.identity.node.clone(),
        lease_ms: n.cfg.lease.as_millis() as u64,
        durability: n.cfg.durability,
        vms,
        services: n.services.status(),
    }
}

async fn promote(
    State(n): State<Arc<BackupNode>>,
    Json(req): Json<PromoteRequest>,
) -> Result<Json<PromoteReply>, ApiError> {
    let h = n.replica_handle(&req.vm).ok_or_else(|| {
        ApiError::not_found(format!("no replica of VM {:?} on this node", req.vm))
    })?;
    let gone = || ApiError::conflict("the VM's replica thread is gone");
    let (tx, rx) = tokio::sync::oneshot::channel();
    h.tx.send(VmIn::Promote { req, reply: tx })
        .map_err(|_| gone())?;
    match rx.await {
        Ok(Ok(v)) => Ok(Json(v)),
        Ok(Err(m)) => Err(ApiError::conflict(m)),
        Err(_) => Err(gone()),
    }
}
