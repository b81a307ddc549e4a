//! `endophyte backup`: a backup node. It accepts paths from sidecars (mutual TLS, network CA) and keeps
//! one replica per VM, each owned by a thread of its own ([`replica`]) with the VM's
//! [`endophyte_wire::Receiver`], its [`crate::store::ReplicaStore`] and its switchover target
//! ([`target`]), which starts VMs through the configured [`endophyte_vmm::Launcher`].
//!
//! - this module: the node, its configuration, accepting paths and routing their frames to replicas;
//! - [`replica`]: one VM's thread: replication in, commits, the primary's lease;
//! - [`target`]: one VM's migration target and promote, driving the VMM;
//! - [`api`]: the control API (`GET /v1/status`, `POST /v1/promote`); [`metrics`]: its `GET /metrics`;
//! - [`error`]: why a path or a replica was refused.

pub mod api;
pub mod error;
mod metrics;
mod replica;
mod target;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use endophyte_vmm::Launcher;
use endophyte_wire::{EncodedFrame, ErrorCode, Hello, Message};
use tokio::sync::mpsc;

pub use endophyte_wire::lease::DEFAULT_LEASE;
pub use error::BackupError;

use crate::store::{CrashPoint, Durability};
use crate::tls::Identity;
use crate::transport::{read_message, write_frame, PathError};

/// Settings of a backup node.
#[derive(Clone)]
pub struct BackupConfig {
    /// UDP address to accept paths on.
    pub listen: SocketAddr,
    /// Directory holding one subdirectory per VM.
    pub data_dir: PathBuf,
    /// Epochs staged per VM at once.
    pub max_staged_epochs: usize,
    /// Test hooks, see [`CrashPoint`].
    pub crash: CrashPoint,
    /// When an epoch counts as committed here ([`Durability`]).
    pub durability: Durability,
    /// Control API socket (`GET /v1/status`, `POST /v1/promote`); none by default.
    pub control_socket: Option<PathBuf>,
    /// Services API socket ([`crate::services`], gRPC, `proto/services_v1.proto`); none by default.
    pub services_socket: Option<PathBuf>,
    /// TCP address serving `GET /metrics` alone ([`crate::metrics`]); none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a VM's primary may stay silent (no frame on any path; sidecars ping several times
    /// within their fence bound) before this backup presumes it dead: until then its lease is live and
    /// promote refuses without `force`. Announced to sidecars in every Welcome, which check their
    /// self-fence bound against it ([`endophyte_wire::lease`]).
    pub lease: std::time::Duration,
    /// How VMs are started here for a switchover or a promote; `None` refuses both, saying why.
    pub launcher: Option<Arc<dyn Launcher>>,
    /// How long services with `HOOK_RESTORE` have to restore their state before a VM started here
    /// resumes (docs/services.md); one that takes longer is reported and the VM resumes.
    pub service_restore: std::time::Duration,
    /// The fencing authority (docs/fencing.md): with one, a promote happens only once the VM's holder has
    /// lost its lease there, by a compare-and-set of its generation that names this node; without one,
    /// promotes are fenced by this backup's own lease alone.
    pub authority: Option<endophyte_authority::AuthorityConfig>,
}

/// The authority as a replica thread uses it: the client, its settings, and the runtime its calls run on.
#[derive(Clone)]
pub(super) struct BackupAuthority {
    pub auth: Arc<dyn endophyte_authority::Authority>,
    pub cfg: endophyte_authority::AuthorityConfig,
    pub rt: tokio::runtime::Handle,
}

/// What a replica thread is asked.
enum VmIn {
    PathUp {
        key: u64,
        tx: mpsc::UnboundedSender<EncodedFrame>,
        /// The peer's node name (its certificate's).
        node: String,
        /// The generation its Hello carried.
        generation: u64,
    },
    Msg {
        key: u64,
        msg: Message,
    },
    PathDown {
        key: u64,
    },
    Status {
        reply: tokio::sync::oneshot::Sender<crate::control::ReplicaStatus>,
    },
    Promote {
        req: crate::control::PromoteRequest,
        reply: tokio::sync::oneshot::Sender<Result<crate::control::PromoteReply, String>>,
    },
    /// The hold on a VM running here could not be kept, or another node holds it now: stop it.
    AuthorityFence {
        why: String,
    },
}

struct VmHandle {
    tx: std::sync::mpsc::Sender<VmIn>,
    committed_at_open: u64,
    page_size: u32,
    mem_bytes: u64,
}

/// A running backup node.
pub struct BackupNode {
    identity: Arc<Identity>,
    cfg: BackupConfig,
    instance: u64,
    vms: Mutex<HashMap<String, Arc<VmHandle>>>,
    next_key: AtomicU64,
    /// Services registered on `services_socket` ([`crate::services`]).
    services: crate::services::ServiceRegistry,
    /// The fencing authority's client, made once the node serves (inside its runtime).
    authority: Arc<std::sync::OnceLock<BackupAuthority>>,
}

fn valid_vm_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

impl BackupNode {
    /// A backup node with this identity and configuration.
    pub fn new(identity: Identity, cfg: BackupConfig) -> Arc<Self> {
        Arc::new(Self {
            identity: Arc::new(identity),
            cfg,
            instance: crate::random_u64(),
            vms: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            services: crate::services::ServiceRegistry::new(),
            authority: Arc::new(std::sync::OnceLock::new()),
        })
    }

    /// Opens every replica under the data directory, which redoes any commit a crash interrupted (and
    /// settles any switchover a crash interrupted), and returns each VM's committed epoch. Called at
    /// start, so that replicas are consistent before any sidecar connects.
    ///
    /// # Errors
    /// If the data directory cannot be listed or a replica cannot be opened (the error names it).
    pub fn recover_all(&self) -> Result<Vec<(String, u64)>, BackupError> {
        let mut out = vec![];
        let list = |source| BackupError::DataDir {
            path: self.cfg.data_dir.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&self.cfg.data_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(list(e)),
        };
        for entry in entries {
            let dir = entry.map_err(list)?.path();
            let Some(geometry) = replica::geometry_on_disk(&dir)? else {
                continue;
            };
            let hello = Hello {
                session: 0,
                path: 0,
                page_size: geometry.1,
                mem_bytes: geometry.2,
                vm_id: geometry.0.clone(),
                generation: 0,
            };
            let vm = self.vm_for(&hello)?;
            out.push((geometry.0, vm.committed_at_open));
        }
        Ok(out)
    }

    /// Serves paths until the process ends.
    ///
    /// # Errors
    /// If the endpoint cannot be set up.
    pub async fn serve(self: Arc<Self>) -> anyhow::Result<()> {
        if let Some(a) = &self.cfg.authority {
            let auth = endophyte_authority::EtcdAuthority::connect(a)?;
            tracing::info!(authority = %endophyte_authority::Authority::describe(&auth), "promotes go through the fencing authority");
            let _ = self.authority.set(BackupAuthority {
                auth: Arc::new(auth),
                cfg: a.clone(),
                rt: tokio::runtime::Handle::current(),
            });
        } else {
            tracing::warn!("no fencing authority (--etcd): promotes are fenced by this backup's own lease only; see docs/fencing.md");
        }
        let server = self.identity.server_config()?;
        let endpoint = quinn::Endpoint::server(server, self.cfg.listen)?;
        if let Some(path) = &self.cfg.control_socket {
            let listener = crate::control::bind_unix(path)?;
            tokio::spawn(crate::control::serve_unix(
                listener,
                path.clone(),
                api::router(self.clone()),
                std::future::pending(),
            ));
        }
        if let Some(path) = &self.cfg.services_socket {
            let listener = crate::control::bind_unix(path)?;
            let me = Arc::downgrade(&self);
            let vms: crate::services::grpc::VmList = Arc::new(move || {
                let Some(n) = me.upgrade() else {
                    return vec![];
                };
                let mut v: Vec<String> = n.vms.lock().expect("vm table").keys().cloned().collect();
                v.sort();
                v
            });
            tokio::spawn(crate::services::grpc::serve(
                listener,
                path.clone(),
                crate::services::grpc::ServicesServer::new(
                    self.services.clone(),
                    self.identity.node.clone(),
                    vms,
                    crate::services::grpc::NodeRole::Backup,
                ),
            ));
        }
        if let Some(addr) = self.cfg.metrics_listen {
            let listener = crate::metrics::bind_tcp(addr)?;
            tokio::spawn(crate::metrics::serve_tcp(
                listener,
                metrics::router(self.clone()),
            ));
        }
        tracing::info!(listen = %endpoint.local_addr()?, node = %self.identity.node,
            network = %self.identity.network, data_dir = %self.cfg.data_dir.display(), "backup node up");
        while let Some(incoming) = endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => {
                        if let Err(e) = me.handle_conn(conn).await {
                            tracing::info!(%remote, "path ended: {}", e.explain());
                        }
                    }
                    Err(e) => tracing::warn!(%remote, "refused a path: {e}"),
                }
            });
        }
        Ok(())
    }

    /// The replica thread of the VM the Hello names, started (and its replica opened) on first use.
    fn vm_for(&self, h: &Hello) -> Result<Arc<VmHandle>, BackupError> {
        if !valid_vm_id(&h.vm_id) {
            return Err(BackupError::BadVmId {
                vm_id: h.vm_id.clone(),
            });
        }
        let mut vms = self.vms.lock().expect("vm table");
        if let Some(v) = vms.get(&h.vm_id) {
            if v.page_size != h.page_size || v.mem_bytes != h.mem_bytes {
                return Err(BackupError::GeometryMismatch {
                    vm_id: h.vm_id.clone(),
                    have_bytes: v.mem_bytes,
                    have_page: v.page_size,
                    mem_bytes: h.mem_bytes,
                    page_size: h.page_size,
                });
            }
            return Ok(v.clone());
        }
        let page_size = u64::from(h.page_size);
        if page_size == 0
            || !page_size.is_power_of_two()
            || h.mem_bytes == 0
            || h.mem_bytes % page_size != 0
        {
            return Err(BackupError::BadGeometry {
                mem_bytes: h.mem_bytes,
                page_size: h.page_size,
            });
        }
        let (tx, committed_at_open) = replica::start(replica::Opening {
            vm_id: h.vm_id.clone(),
            dir: self.cfg.data_dir.join(&h.vm_id),
            page_size,
            mem_bytes: h.mem_bytes,
            instance: self.instance,
            node: self.identity.node.clone(),
            max_staged: self.cfg.max_staged_epochs,
            crash: self.cfg.crash,
            durability: self.cfg.durability,
            launcher: self.cfg.launcher.clone(),
            lease: self.cfg.lease,
            services: self.services.clone(),
            service_restore: self.cfg.service_restore,
            authority: self.authority.clone(),
            authority_required: self.cfg.authority.is_some(),
        })?;
        let handle = Arc::new(VmHandle {
            tx,
            committed_at_open,
            page_size: h.page_size,
            mem_bytes: h.mem_bytes,
        });
        vms.insert(h.vm_id.clone(), handle.clone());
        Ok(handle)
    }

    fn replica_handles(&self) -> Vec<Arc<VmHandle>> {
        self.vms
            .lock()
            .expect("vm table")
            .values()
            .cloned()
            .collect()
    }

    fn replica_handle(&self, vm: &str) -> Option<Arc<VmHandle>> {
        self.vms.lock().expect("vm table").get(vm).cloned()
    }

    async fn handle_conn(self: Arc<Self>, conn: quinn::Connection) -> Result<(), PathError> {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let hello = match read_message(&mut recv).await? {
            Message::Hello(h) => h,
            other => {
                return Err(PathError::Protocol(format!(
                    "expected Hello, got {}",
                    other.name()
                )))
            }
        };
        let node = crate::tls::peer_node(&conn).unwrap_or_default();
        // Per-VM authorization, before anything on disk is touched: under an authority only the VM's
        // holder, at exactly its generation, may replicate into its replica or switch it over.
        if let Some(a) = self.authority.get() {
            if let Err(why) = authorize(a, &hello, &node).await {
                return refuse(&conn, &mut send, ErrorCode::PermissionDenied, why).await;
            }
        }
        let vm = match self.vm_for(&hello) {
            Ok(vm) => vm,
            Err(e) => return refuse(&conn, &mut send, e.code(), e.to_string()).await,
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (tx, mut out) = mpsc::unbounded_channel::<EncodedFrame>();
        let _ = vm.tx.send(VmIn::PathUp {
            key,
            tx: tx.clone(),
            node,
            generation: hello.generation,
        });
        // Pings are answered here, before anything is stored: a journal write or an fsync in the VM's
        // thread never delays the primary's proof that this backup hears it. Datagram pings are answered
        // as datagrams.
        let datagrams = async {
            loop {
                let d = match conn.read_datagram().await {
                    Ok(d) => d,
                    Err(_) => return Ok::<(), PathError>(()),
                };
                if let Some(Message::Ping { token }) = crate::transport::decode_datagram(&d) {
                    let pong = Message::Pong { token }.encode().to_vec();
                    if conn.send_datagram(bytes::Bytes::from(pong)).is_err() {
                        let _ = tx.send(Message::Pong { token }.encode());
                    }
                }
            }
        };
        let _ = vm.tx.send(VmIn::Msg {
            key,
            msg: Message::Hello(hello),
        });
        let writer = async {
            while let Some(f) = out.recv().await {
                write_frame(&mut send, f).await?;
            }
            // The replica closed this path (after an Error reply): flush and say goodbye.
            let _ = send.finish();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            Ok::<(), PathError>(())
        };
        let reader = async {
            loop {
                match read_message(&mut recv).await {
                    Ok(Message::Ping { token }) => {
                        let _ = tx.send(Message::Pong { token }.encode());
                    }
                    Ok(msg) => {
                        if vm.tx.send(VmIn::Msg { key, msg }).is_err() {
                            return Ok(());
                        }
                    }
                    Err(PathError::Frame(e)) => {
                        // A frame we refuse (bad CRC, oversized, malformed): tell the sender why, then close.
                        let code = match &e {
                            endophyte_wire::MessageError::Frame(
                                endophyte_wire::FrameError::TooLarge { .. },
                            ) => ErrorCode::TooLarge,
                            _ => ErrorCode::Corrupt,
                        };
                        tracing::warn!(remote = %conn.remote_address(), "refused frame: {e}");
                        return Err((code, e.to_string()));
                    }
                    Err(e) => {
                        tracing::info!(remote = %conn.remote_address(), "path closed: {}", e.explain());
                        return Ok(());
                    }
                }
            }
        };
        let r = tokio::select! {
            r = writer => r.map_err(|e| e.explain()),
            r = datagrams => r.map_err(|e| e.explain()),
            r = reader => match r {
                Ok(()) => Ok(()),
                Err((code, m)) => {
                    let _ = vm.tx.send(VmIn::PathDown { key });
                    return refuse(&conn, &mut send, code, m).await;
                }
            },
        };
        let _ = vm.tx.send(VmIn::PathDown { key });
        conn.close(0u32.into(), b"bye");
        r.map_err(PathError::Protocol)
    }
}

/// Whether node `node` may act for the VM `hello` names: the authority must name it as the holder of
/// exactly `hello.generation`, running. The reason otherwise, naming node and VM.
async fn authorize(a: &BackupAuthority, hello: &Hello, node: &str) -> Result<(), String> {
    let vm = &hello.vm_id;
    let seen = a.auth.observe(vm).await.map_err(|e| {
        format!(
            "cannot check with the fencing authority whether node {node:?} holds VM {vm:?}: {e}"
        )
    })?;
    match seen.record {
        Some((r, _))
            if r.holder == node
                && r.generation == hello.generation
                && r.state == endophyte_authority::RecordState::Running =>
        {
            Ok(())
        }
        Some((r, _)) => Err(format!(
            "node {node:?} may not act for VM {vm:?} at generation {}: the authority says {r}",
            hello.generation
        )),
        None => Err(format!(
            "node {node:?} may not act for VM {vm:?}: the authority has no record of it (its primary claims it first)"
        )),
    }
}

async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: String,
) -> Result<(), PathError> {
    tracing::warn!(remote = %conn.remote_address(), "refusing: {message}");
    let _ = write_frame(
        send,
        Message::Error {
            code,
            message: message.clone(),
        }
        .encode(),
    )
    .await;
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
    conn.close(1u32.into(), b"refused");
    Err(PathError::Refused { code, message })
}
