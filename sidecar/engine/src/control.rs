//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, served by the daemons and used by the CLI.
//!
//! The socket is created with mode 0600: whoever can open it controls the VM's replication. Errors come
//! back as a non-2xx status with `{"error": "<what was wrong>"}`; [`request`] turns them into an error
//! carrying that message.
//!
//! The sidecar serves (see [`crate::primary::api`]):
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | [`SidecarStatus`] |
//! | `PUT /v1/max-bandwidth` | [`MaxBandwidth`] | the [`MaxBandwidth`] now in force |
//! | `POST /v1/migrate` | [`crate::migrate::MigrateRequest`] | [`crate::migrate::MigrationStatus`] (202) |
//! | `GET /v1/migration` | | [`crate::migrate::MigrationStatus`] |
//!
//! A backup serves (see [`crate::backup::api`]):
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | [`BackupNodeStatus`] |
//! | `POST /v1/promote` | [`PromoteRequest`] | [`PromoteReply`] |

use std::path::{Path, PathBuf};

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

/// A control request's failure, answered as `{"error": message}` with its status code.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What was wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// A 400: the request itself was wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// A 404: nothing there.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    /// A 409: the request is valid but the daemon's state does not allow it now.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Body of `PUT /v1/max-bandwidth`, and its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxBandwidth {
    /// Cap on what the sidecar sends, all paths and backups together, bytes/s; `null` lifts the cap.
    pub bytes_per_s: Option<u64>,
}

/// One backup as the sidecar sees it, in [`SidecarStatus::backups`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    /// Node name.
    pub name: String,
    /// Paths with a live connection.
    pub paths_up: usize,
    /// Paths configured.
    pub paths: usize,
    /// Whether epochs stream to it (it has a path and is not waiting for a resync to start).
    pub streaming: bool,
    /// Newest epoch it committed.
    pub committed_epoch: u64,
    /// Smoothed round-trip time of its fastest path, ms; `null` before the first Pong.
    pub rtt_ms: Option<f64>,
    /// Encoded bytes sent to it and not yet acknowledged.
    pub unacked_bytes: u64,
    /// The last error its paths met (a refusal, a failed connection), `null` when none yet. It stays
    /// after the path recovers, as the latest thing that went wrong.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The self-fence ([`endophyte_wire::lease`]) as `GET /v1/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FenceStatusView {
    /// Self-fencing is on (`self_fence` is not `off`).
    pub enabled: bool,
    /// The guest is fenced (paused) now because too few backups answer.
    pub fenced: bool,
    /// Times it was fenced in this run.
    pub fences: u64,
    /// Backups that answered a ping within the bound at the last check.
    pub answering: usize,
    /// The bound, ms.
    pub after_ms: u64,
}

/// `GET /v1/status` on a sidecar: where replication of its VM stands now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SidecarStatus {
    /// VM name.
    pub vm_id: String,
    /// This node's name.
    pub node: String,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// Newest epoch cut (its pause happened).
    pub epoch: u64,
    /// Newest epoch the quorum of backups committed.
    pub durable_epoch: u64,
    /// Age of the durable epoch's pause, ms (the recovery point a failover would give now); `null` before
    /// the first epoch is durable.
    pub rpo_ms: Option<f64>,
    /// Epoch length in force, ms.
    pub epoch_ms: u64,
    /// vCPU throttle in force, `0..=1`.
    pub throttle: f64,
    /// Pressure the controller last computed, `0..=1`.
    pub pressure: f64,
    /// Guest dirty rate the controller last measured (EWMA), bytes/s.
    pub dirty_bytes_per_s: f64,
    /// Drain rate the controller last measured (slowest backup, EWMA), in page bytes (pages x page size,
    /// as the dirty rate) per second.
    pub drain_bytes_per_s: f64,
    /// Emergencies so far (overflowing pauses under either policy).
    pub emergency_events: u64,
    /// Bandwidth cap in force, bytes/s; `null` when uncapped.
    pub max_bandwidth: Option<u64>,
    /// Why epochs wait, when they do (the VMM cannot take one now: another migration of the VM runs).
    #[serde(default)]
    pub waiting: Option<String>,
    /// The self-fence.
    #[serde(default)]
    pub fence: FenceStatusView,
    /// The hold at the fencing authority (`null`: no authority; promotes are then not fenced).
    #[serde(default)]
    pub authority: Option<endophyte_authority::HoldStatus>,
    /// Services registered on its services socket.
    #[serde(default)]
    pub services: Vec<crate::services::ServiceStatus>,
    /// Backups in configuration order.
    pub backups: Vec<BackupStatus>,
}

/// Renders a status for a terminal: one header line for the VM, one line per backup.
pub fn status_table(s: &SidecarStatus) -> String {
    use std::fmt::Write;
    let mb = |b: f64| b / 1e6;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "VM {} on {} ({} MiB): epoch {}, durable {}, RPO {}, epoch {} ms",
        s.vm_id,
        s.node,
        s.mem_bytes >> 20,
        s.epoch,
        s.durable_epoch,
        s.rpo_ms
            .map_or_else(|| "-".to_string(), |r| format!("{r:.0} ms")),
        s.epoch_ms
    );
    let _ = writeln!(
        t,
        "throttle {:.0} %, pressure {:.2}, dirty {:.1} MB/s, drain {:.1} MB/s, cap {}, emergencies {}",
        s.throttle * 100.0,
        s.pressure,
        mb(s.dirty_bytes_per_s),
        mb(s.drain_bytes_per_s),
        s.max_bandwidth
            .map_or_else(|| "none".to_string(), |c| format!("{:.1} MB/s", mb(c as f64))),
        s.emergency_events
    );
    if let Some(w) = &s.waiting {
        let _ = writeln!(t, "epochs wait: {w}");
    }
    match &s.authority {
        Some(a) => {
            let _ = writeln!(
                t,
                "authority {}: generation {} {} by {}, lease {} ({:.1} s of {:.0} s left)",
                a.authority,
                a.generation,
                a.state,
                a.node,
                a.lease_id,
                a.remaining_ms / 1e3,
                a.ttl_ms as f64 / 1e3
            );
        }
        None => {
            let _ = writeln!(
                t,
                "authority: NONE: no fencing authority; a promote elsewhere is not fenced against this copy"
            );
        }
    }
    if s.fence.fenced {
        let _ = writeln!(
            t,
            "SELF-FENCED: the guest is paused; {} backups answered within {} ms",
            s.fence.answering, s.fence.after_ms
        );
    }
    let _ = writeln!(
        t,
        "{:<20} {:>7} {:>10} {:>10} {:>9} {:>12}",
        "BACKUP", "PATHS", "STREAMING", "COMMITTED", "RTT ms", "UNACKED MB"
    );
    for b in &s.backups {
        let _ = writeln!(
            t,
            "{:<20} {:>7} {:>10} {:>10} {:>9} {:>12.1}",
            b.name,
            format!("{}/{}", b.paths_up, b.paths),
            if b.streaming { "yes" } else { "no" },
            b.committed_epoch,
            b.rtt_ms
                .map_or_else(|| "-".to_string(), |r| format!("{r:.2}")),
            mb(b.unacked_bytes as f64)
        );
        if let Some(e) = &b.last_error {
            let _ = writeln!(t, "  last error: {e}");
        }
    }
    t.push_str(&crate::services::services_table(&s.services));
    t
}

/// Body of `POST /v1/promote` on a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteRequest {
    /// The VM.
    pub vm: String,
    /// Promote even though the primary's lease is live (it may still run: two copies would).
    pub force: bool,
    /// Hash guest RAM before resuming it, and report the hash.
    pub verify: bool,
}

/// The answer to `POST /v1/promote`: the VM runs on the backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromoteReply {
    /// The VM.
    pub vm: String,
    /// The epoch it started from.
    pub epoch: u64,
    /// The generation it runs under.
    pub generation: u64,
    /// Where its VMM is reached (its control socket).
    pub vmm_socket: String,
    /// BLAKE3 of guest RAM before the resume, hex; empty unless `verify`.
    pub ram_hash: String,
    /// Whether the lease was overridden.
    pub forced: bool,
    /// From the request to the VM running, ms.
    pub elapsed_ms: f64,
}

/// A VM's fence on a backup, in [`ReplicaStatus`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceStatus {
    /// Highest generation seen here.
    pub generation: u64,
    /// `none`, `prepared`, `running`, `aborted` or `departed` (see [`endophyte_wire::FenceState`]).
    pub state: String,
}

/// One replica on a backup, in [`BackupNodeStatus::vms`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The VM.
    pub vm_id: String,
    /// Newest epoch the replica holds committed.
    pub committed_epoch: u64,
    /// Since a frame from the VM's primary last arrived, ms; `null` when never.
    pub primary_heard_ms_ago: Option<f64>,
    /// Whether the primary's lease is live (heard within the lease).
    pub lease_live: bool,
    /// The VM's fence here.
    pub fence: FenceStatus,
    /// Whether the VM runs on this node.
    pub runs_here: bool,
    /// Whether `POST /v1/promote` could start it here (the committed epoch carries its state).
    pub promotable: bool,
    /// Where the VMM holding the VM here is reached, when one does.
    pub vmm_endpoint: Option<String>,
    /// This node's hold at the fencing authority on the VM it runs (after a promote or a switchover).
    #[serde(default)]
    pub authority: Option<endophyte_authority::HoldStatus>,
}

/// `GET /v1/status` on a backup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupNodeStatus {
    /// This node's name.
    pub node: String,
    /// The primaries' lease, ms.
    pub lease_ms: u64,
    /// When an epoch counts as committed here.
    #[serde(default)]
    pub durability: crate::store::Durability,
    /// Its replicas.
    pub vms: Vec<ReplicaStatus>,
    /// Services registered on its services socket.
    #[serde(default)]
    pub services: Vec<crate::services::ServiceStatus>,
}

/// Renders a backup's `GET /v1/status` for a terminal: one line per VM.
pub fn backup_table(v: &BackupNodeStatus) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "backup {} (lease {} ms, durability {:?})",
        v.node, v.lease_ms, v.durability
    );
    let _ = writeln!(
        t,
        "{:<20} {:>10} {:>14} {:>6} {:>18} {:>11}",
        "VM", "COMMITTED", "PRIMARY HEARD", "LEASE", "FENCE", "PROMOTABLE"
    );
    for vm in &v.vms {
        let _ = writeln!(
            t,
            "{:<20} {:>10} {:>14} {:>6} {:>18} {:>11}",
            vm.vm_id,
            vm.committed_epoch,
            vm.primary_heard_ms_ago.map_or_else(
                || "never".to_string(),
                |ms| format!("{:.1} s ago", ms / 1e3)
            ),
            if vm.lease_live { "live" } else { "gone" },
            format!("{} (gen {})", vm.fence.state, vm.fence.generation),
            if vm.promotable { "yes" } else { "no" }
        );
    }
    t.push_str(&crate::services::services_table(&v.services));
    t
}

/// Binds the control socket at `path` with mode 0600. A stale socket file (nobody listening) is replaced;
/// a live one is an error, so two daemons never share a socket. Call inside a tokio runtime.
///
/// # Errors
/// The socket is in use or cannot be created.
pub fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("creating the control socket's directory {}", dir.display())
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "control socket {} is in use by another process",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    // Appears only once it accepts, and only for this user (`endophyte_attach::socket`).
    let listener = endophyte_attach::socket::bind_in_place(path, Some(0o600))
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .with_context(|| format!("binding control socket {}", path.display()))?;
    Ok(listener)
}

/// Serves `router` on `listener` (bound at `path` by [`bind_unix`]) until `shutdown` resolves, then
/// removes the socket file.
///
/// # Errors
/// Accepting failed for good.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let r = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    r.with_context(|| format!("serving control socket {}", path.display()))
}

/// Sends one request to the control socket at `socket` and returns the JSON answer. Blocking (it runs its
/// own small runtime), for the CLI and tests.
///
/// # Errors
/// The socket cannot be reached (the message says whether the daemon runs), the answer is not JSON, or the
/// daemon refused: then the error is the daemon's own message with the status code.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(request_async(socket, method, path, body))
}

async fn request_async(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to control socket {} (is the daemon running?)",
                socket.display()
            )
        })?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "endophyte")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(bytes)))?;
    let resp = send
        .send_request(req)
        .await
        .with_context(|| format!("{method} {path} on {}", socket.display()))?;
    let status = resp.status();
    let raw = resp.into_body().collect().await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&raw).with_context(|| {
        format!(
            "{method} {path}: the answer ({status}) is not JSON: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })?;
    if !status.is_success() {
        let msg = v["error"].as_str().unwrap_or("no message");
        anyhow::bail!("{method} {path}: {status}: {msg}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_request_round_trips_and_refusals_carry_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let router = axum::Router::new()
            .route(
                "/v1/echo",
                axum::routing::put(|axum::Json(v): axum::Json<serde_json::Value>| async move {
                    axum::Json(v)
                }),
            )
            .route(
                "/v1/no",
                get(|| async { Err::<(), _>(ApiError::conflict("not now: migrating")) }),
            );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = {
            let _rt = rt.enter();
            bind_unix(&sock).unwrap()
        };
        let server = rt.spawn(serve_unix(listener, sock.clone(), router, async {
            let _ = rx.await;
        }));
        while !sock.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let v = request(&sock, "PUT", "/v1/echo", Some(&serde_json::json!({"a": 1}))).unwrap();
        assert_eq!(v["a"], 1);
        let e = request(&sock, "GET", "/v1/no", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("409") && e.contains("not now: migrating"), "{e}");
        // A second server on a live socket is refused.
        let again = {
            let _rt = rt.enter();
            bind_unix(&sock)
        };
        assert!(again.unwrap_err().to_string().contains("in use"));
        let _ = tx.send(());
        rt.block_on(server).unwrap().unwrap();
        assert!(!sock.exists());
        let e = request(&sock, "GET", "/v1/status", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the daemon running"), "{e}");
    }
}
