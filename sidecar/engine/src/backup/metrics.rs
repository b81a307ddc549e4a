//! A backup's Prometheus series (`GET /metrics` on its control socket and, with `--metrics-listen`, on
//! TCP): one scrape is one [`super::api::node_status`], each replica thread answering for its VM.
//!
//! Series per VM (label `vm`): committed epoch, the primary's lease and silence, the fence's generation
//! and state, whether the VM runs here and could be promoted. The node's lease length is one series.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use endophyte_wire::FenceState;

use super::BackupNode;
use crate::control::BackupNodeStatus;
use crate::metrics::{Labels, Scrape};

/// Every fence state, for the state set `endophyte_replica_fence_state`.
const FENCE_STATES: [FenceState; 5] = [
    FenceState::None,
    FenceState::Prepared,
    FenceState::Running,
    FenceState::Aborted,
    FenceState::Departed,
];

/// `GET /metrics`.
pub(super) async fn get_metrics(State(n): State<Arc<BackupNode>>, headers: HeaderMap) -> Response {
    scrape(&super::api::node_status(&n).await).respond(&headers)
}

/// The router of the TCP metrics listener: `/metrics` only.
pub(super) fn router(node: Arc<BackupNode>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(get_metrics))
        .with_state(node)
}

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

fn scrape(st: &BackupNodeStatus) -> Scrape {
    let mut out = Scrape::new(vec![("node", st.node.clone())]);
    let vm = |v: &crate::control::ReplicaStatus| -> Labels { vec![("vm", v.vm_id.clone())] };
    out.gauge(
        "endophyte_backup_lease_seconds",
        "How long a primary may stay silent before this backup presumes it dead",
        st.lease_ms as f64 / 1e3,
    );
    out.gauge(
        "endophyte_replicas",
        "Replicas this node keeps",
        st.vms.len() as f64,
    );
    out.gauges(
        "endophyte_replica_committed_epoch",
        "Newest epoch each replica holds committed",
        st.vms.iter().map(|v| (vm(v), v.committed_epoch as f64)),
    );
    out.gauges(
        "endophyte_replica_lease_live",
        "1 while the VM's primary was heard within the lease (promote then refuses without force)",
        st.vms.iter().map(|v| (vm(v), flag(v.lease_live))),
    );
    out.gauges(
        "endophyte_replica_primary_silence_seconds",
        "Since a frame from the VM's primary last arrived (absent when never)",
        st.vms
            .iter()
            .filter_map(|v| v.primary_heard_ms_ago.map(|ms| (vm(v), ms / 1e3))),
    );
    out.gauges(
        "endophyte_replica_fence_generation",
        "Highest generation of the VM seen here (its fencing token)",
        st.vms.iter().map(|v| (vm(v), v.fence.generation as f64)),
    );
    out.gauges(
        "endophyte_replica_fence_state",
        "1 for the state of the VM's fence here",
        st.vms.iter().flat_map(|v| {
            FENCE_STATES.iter().map(move |s| {
                (
                    vec![("vm", v.vm_id.clone()), ("state", s.as_str().to_owned())],
                    flag(v.fence.state == s.as_str()),
                )
            })
        }),
    );
    out.gauges(
        "endophyte_replica_runs_here",
        "1 when the VM runs on this node (after a switchover or promote)",
        st.vms.iter().map(|v| (vm(v), flag(v.runs_here))),
    );
    out.gauges(
        "endophyte_replica_promotable",
        "1 when the committed epoch carries the VM state a promote needs",
        st.vms.iter().map(|v| (vm(v), flag(v.promotable))),
    );
    crate::services::scrape_into(&mut out, &st.services);
    out
}
