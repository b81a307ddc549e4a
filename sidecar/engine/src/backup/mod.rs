//! `endophyte backup`: a backup node. It accepts paths from sidecars (mutual TLS, network CA), and keeps one
//! replica per VM: each VM has a thread that owns its [`Receiver`] state machine and its [`ReplicaStore`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use endophyte_wire::{Action, EncodedFrame, ErrorCode, Hello, Message, Receiver};
use tokio::sync::mpsc;

use crate::store::{CrashPoint, ReplicaStore};
use crate::tls::Identity;
use crate::transport::{read_message, write_frame, PathError};

/// Settings of a backup node.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// UDP address to accept paths on.
    pub listen: SocketAddr,
    /// Directory holding one subdirectory per VM.
    pub data_dir: PathBuf,
    /// Epochs staged per VM at once.
    pub max_staged_epochs: usize,
    /// Test hook, see [`CrashPoint`].
    pub crash: CrashPoint,
    /// Control API socket (`GET /v1/status`, `POST /v1/promote`); none by default.
    pub control_socket: Option<PathBuf>,
}

/// How long a VM's primary may stay silent (no frame on any path; sidecars ping every second) before
/// this backup presumes it dead: until then its lease is live and promote refuses without `force`.
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(3);

/// Body of `POST /v1/promote` on a backup.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PromoteRequest {
    /// The VM.
    pub vm: String,
    /// Promote even though the primary's lease is live (it may still run: two copies would).
    pub force: bool,
    /// Hash guest RAM before resuming it, and report the hash.
    pub verify: bool,
}

enum VmIn {
    PathUp {
        key: u64,
        tx: mpsc::UnboundedSender<EncodedFrame>,
    },
    Msg {
        key: u64,
        msg: Message,
    },
    PathDown {
        key: u64,
    },
    Status {
        reply: tokio::sync::oneshot::Sender<serde_json::Value>,
    },
    Promote {
        req: PromoteRequest,
        reply: tokio::sync::oneshot::Sender<Result<serde_json::Value, String>>,
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
}

fn valid_vm_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

/// A random u64 from the OS (through std's hash seed).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

impl BackupNode {
    /// A backup node with this identity and configuration.
    pub fn new(identity: Identity, cfg: BackupConfig) -> Arc<Self> {
        Arc::new(Self {
            identity: Arc::new(identity),
            cfg,
            instance: random_u64(),
            vms: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
        })
    }

    /// Opens every replica under the data directory, which redoes any commit a crash interrupted, and returns
    /// each VM's committed epoch. Called at start, so that replicas are consistent before any sidecar
    /// connects.
    ///
    /// # Errors
    /// If the data directory cannot be listed or a replica cannot be opened (the error names it).
    pub fn recover_all(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = vec![];
        let entries = match std::fs::read_dir(&self.cfg.data_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let dir = entry?.path();
            match crate::switchover::Fence::load(&dir)? {
                Some(f) if f.running() => {
                    // Its replica file is a running VM's RAM now: no journal may be redone over it.
                    tracing::info!(dir = %dir.display(), generation = f.generation, epoch = f.epoch,
                        "the VM runs on this node; not a replica any more");
                    continue;
                }
                Some(mut f) if f.prepared() => f.abort_leftover(&dir)?,
                _ => {}
            }
            let state = dir.join("state.json");
            let Ok(bytes) = std::fs::read(&state) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", state.display()))?;
            let (Some(vm_id), Some(mem_bytes), Some(page_size)) = (
                v["vm_id"].as_str(),
                v["mem_bytes"].as_u64(),
                v["page_size"].as_u64(),
            ) else {
                anyhow::bail!("{}: missing vm_id, mem_bytes or page_size", state.display());
            };
            let hello = Hello {
                session: 0,
                path: 0,
                page_size: page_size as u32,
                mem_bytes,
                vm_id: vm_id.to_string(),
            };
            let committed = self
                .open_vm(&hello)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            out.push((vm_id.to_string(), committed));
        }
        Ok(out)
    }

    fn open_vm(&self, h: &Hello) -> Result<u64, String> {
        let vm = self.vm_for(h).map_err(|(_, m)| m)?;
        Ok(vm.committed_at_open)
    }

    /// Serves paths until the process ends.
    ///
    /// # Errors
    /// If the endpoint cannot be set up.
    pub async fn serve(self: Arc<Self>) -> anyhow::Result<()> {
        let server = self.identity.server_config()?;
        let endpoint = quinn::Endpoint::server(server, self.cfg.listen)?;
        if let Some(path) = &self.cfg.control_socket {
            let listener = crate::control::bind_unix(path)?;
            tokio::spawn(crate::control::serve_unix(
                listener,
                path.clone(),
                control_router(self.clone()),
                std::future::pending(),
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

    fn vm_for(&self, h: &Hello) -> Result<Arc<VmHandle>, (ErrorCode, String)> {
        let bad = |m: String| (ErrorCode::BadHello, m);
        if !valid_vm_id(&h.vm_id) {
            return Err(bad(format!(
                "VM id {:?} must be 1-128 letters, digits, '-', '_' or '.'",
                h.vm_id
            )));
        }
        let mut vms = self.vms.lock().expect("vm table");
        if let Some(v) = vms.get(&h.vm_id) {
            return Ok(v.clone());
        }
        let page_size = u64::from(h.page_size);
        if page_size == 0
            || !page_size.is_power_of_two()
            || h.mem_bytes == 0
            || h.mem_bytes % page_size != 0
        {
            return Err(bad(format!(
                "geometry {} bytes in {}-byte pages is not whole pages",
                h.mem_bytes, h.page_size
            )));
        }
        let dir = self.cfg.data_dir.join(&h.vm_id);
        let mut fence = crate::switchover::Fence::load(&dir)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        if let Some(f) = fence.as_ref().filter(|f| f.running()) {
            return Err((ErrorCode::Fenced, fenced_message(&h.vm_id, f)));
        }
        if let Some(f) = fence.as_mut().filter(|f| f.prepared()) {
            f.abort_leftover(&dir)
                .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        }
        let store = ReplicaStore::open(&dir, &h.vm_id, h.mem_bytes, page_size, self.cfg.crash)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        tracing::info!(vm = %h.vm_id, committed = store.committed_epoch(), io_uring = store.uses_io_uring(), "replica opened");
        let committed_at_open = store.committed_epoch();
        let rx = Receiver::new(
            h.vm_id.clone(),
            page_size,
            h.mem_bytes,
            store.committed_epoch(),
            store.committed_session(),
            self.instance,
            self.identity.node.clone(),
            self.cfg.max_staged_epochs,
        );
        let (tx, inbox) = std::sync::mpsc::channel();
        let vm_id = h.vm_id.clone();
        let fence = fence.unwrap_or_default();
        let crash = self.cfg.crash;
        std::thread::Builder::new()
            .name(format!("replica-{vm_id}"))
            .spawn(move || {
                VmThread {
                    vm_id,
                    dir,
                    fence,
                    crash_during_switchover: crash.during_switchover,
                    prepared: None,
                    running: None,
                    // A backup that just started cannot tell whether the primary lives: it gives it a
                    // lease's time to show up before a promote goes through unforced.
                    last_heard: Some(std::time::Instant::now()),
                    silence_reported: false,
                    standby: None,
                }
                .run(rx, store, inbox)
            })
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let handle = Arc::new(VmHandle {
            tx,
            committed_at_open,
            page_size: h.page_size,
            mem_bytes: h.mem_bytes,
        });
        vms.insert(h.vm_id.clone(), handle.clone());
        Ok(handle)
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
        let vm = match self.vm_for(&hello) {
            Ok(vm) if vm.page_size == hello.page_size && vm.mem_bytes == hello.mem_bytes => vm,
            Ok(vm) => {
                let m = format!(
                    "VM {:?} is replicated here as {} bytes in {}-byte pages, not {} in {}",
                    hello.vm_id, vm.mem_bytes, vm.page_size, hello.mem_bytes, hello.page_size
                );
                return refuse(&conn, &mut send, ErrorCode::BadHello, m).await;
            }
            Err((code, m)) => return refuse(&conn, &mut send, code, m).await,
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (tx, mut out) = mpsc::unbounded_channel::<EncodedFrame>();
        let _ = vm.tx.send(VmIn::PathUp { key, tx });
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
    Err(PathError::Refused(message))
}

fn fenced_message(vm_id: &str, f: &crate::switchover::Fence) -> String {
    format!(
        "VM {vm_id:?} runs on this node since epoch {} (generation {}): refusing replication into its RAM",
        f.epoch, f.generation
    )
}

/// One VM's thread: its replica, and once a switchover started it here, the running VM's fence.
struct VmThread {
    vm_id: String,
    dir: PathBuf,
    fence: crate::switchover::Fence,
    crash_during_switchover: bool,
    /// A switchover prepared here, waiting for the source's commit (since when).
    prepared: Option<(crate::switchover::Prepared, std::time::Instant)>,
    /// The VM running here after a committed switchover: its generation, resume time and VMM.
    running: Option<(u64, u64, std::process::Child)>,
    /// When a frame from the VM's primary last arrived (its lease).
    last_heard: Option<std::time::Instant>,
    /// A VMM started ahead of a switchover (see [`crate::switchover::Standby`]). While there is one,
    /// background checkpoints wait.
    standby: Option<crate::switchover::Standby>,
    /// The primary's silence past [`LEASE`] was logged.
    silence_reported: bool,
}

/// How long a standby VMM started by a warm-up waits for its switchover.
const STANDBY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a prepared switchover waits for the source's commit before it is abandoned.
const PREPARED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl VmThread {
    fn run(
        mut self,
        mut rx: Receiver,
        mut store: ReplicaStore,
        inbox: std::sync::mpsc::Receiver<VmIn>,
    ) {
        let vm_id = self.vm_id.clone();
        let mut paths: HashMap<u64, mpsc::UnboundedSender<EncodedFrame>> = HashMap::new();
        loop {
            let received = inbox.recv_timeout(std::time::Duration::from_millis(300));
            self.reap_departed();
            let input = match received {
                Ok(i) => i,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self
                        .prepared
                        .as_ref()
                        .is_some_and(|(_, at)| at.elapsed() > PREPARED_TIMEOUT)
                    {
                        let g = self.fence.generation;
                        tracing::warn!(vm = %vm_id, generation = g, "no commit for the prepared switchover in {PREPARED_TIMEOUT:?}: abandoning it");
                        self.abort(g);
                    }
                    if self.running.is_none() && self.prepared.is_none() && self.standby.is_none() {
                        store.maybe_checkpoint(true);
                    }
                    self.check_lease();
                    if self
                        .standby
                        .as_ref()
                        .is_some_and(|s| s.since.elapsed() > STANDBY_TIMEOUT)
                    {
                        tracing::info!(vm = %vm_id, "no switchover followed the warm-up: stopping the standby VMM");
                        self.standby.take().expect("checked").stop();
                    }
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if matches!(input, VmIn::Msg { .. } | VmIn::PathUp { .. }) {
                self.last_heard = Some(std::time::Instant::now());
                self.silence_reported = false;
            }
            self.check_lease();
            match input {
                VmIn::Status { reply } => {
                    let _ = reply.send(self.status(&store));
                    continue;
                }
                VmIn::Promote { req, reply } => {
                    let _ = reply.send(self.promote(&store, &req));
                    continue;
                }
                VmIn::PathUp { key, tx } => {
                    paths.insert(key, tx);
                }
                VmIn::PathDown { key } => {
                    paths.remove(&key);
                }
                VmIn::Msg {
                    key,
                    msg: Message::Switchover(sw),
                } => {
                    let reply = self.switchover(&rx, &mut store, sw);
                    if let Some(tx) = paths.get(&key) {
                        let _ = tx.send(reply.encode());
                    }
                }
                VmIn::Msg {
                    key,
                    msg: Message::SwitchoverCommit { generation },
                } => {
                    let reply = self.commit(generation);
                    if let Some(tx) = paths.get(&key) {
                        let _ = tx.send(reply.encode());
                    }
                }
                VmIn::Msg {
                    msg: Message::SwitchoverAbort { generation },
                    ..
                } => self.abort(generation),
                VmIn::Msg {
                    msg: Message::SwitchoverWarmup { generation },
                    ..
                } => self.warm_up(generation),
                VmIn::Msg { key, msg } if self.running.is_some() || self.prepared.is_some() => {
                    // Fenced: nothing goes into the running VM's RAM.
                    if !matches!(msg, Message::Ping { .. } | Message::Pong { .. }) {
                        if let Some(tx) = paths.remove(&key) {
                            let _ = tx.send(
                                Message::Error {
                                    code: ErrorCode::Fenced,
                                    message: fenced_message(&vm_id, &self.fence),
                                }
                                .encode(),
                            );
                        }
                    }
                }
                VmIn::Msg { key, msg } => {
                    if let Err(e) = rx.handle_message(key, msg) {
                        tracing::warn!(vm = %vm_id, "refused: {e}");
                        flush(&mut rx, &mut paths);
                        paths.remove(&key);
                    }
                }
            }
            if self.running.is_some() || self.prepared.is_some() {
                continue;
            }
            // Do what the state machine asks until it is quiet.
            loop {
                let Some(action) = rx.poll_action() else {
                    break;
                };
                match action {
                    Action::Store { epoch, seq, chunk } => {
                        match store.store_chunk(seq, &chunk, rx.session().unwrap_or(0)) {
                            Ok(()) => {
                                if let Err(e) = rx.chunk_stored(epoch, seq) {
                                    tracing::warn!(vm = %vm_id, "refused: {e}");
                                }
                            }
                            Err(e) => {
                                // The epoch is dropped and the sender told; it starts over from our committed epoch.
                                tracing::error!(vm = %vm_id, epoch, "journal write failed: {e}");
                                rx.store_failed(epoch, seq, &e.to_string());
                            }
                        }
                    }
                    Action::Commit { end } => {
                        let epoch = end.epoch;
                        match store.commit(&end, rx.session().unwrap_or(0)) {
                            Ok(()) => {
                                tracing::debug!(vm = %vm_id, epoch, "committed");
                                // A migration coming here: no checkpoint writeback (hundreds of MB of
                                // fdatasync) competes with the switchover's own writes for the disk.
                                if self.standby.is_none() {
                                    store.maybe_checkpoint(false);
                                }
                                if let Err(e) = rx.epoch_committed(epoch) {
                                    tracing::warn!(vm = %vm_id, "refused: {e}");
                                }
                            }
                            Err(e) => {
                                tracing::error!(vm = %vm_id, epoch, "commit failed, replica keeps epoch {}: {e}", store.committed_epoch());
                                rx.commit_failed(epoch, &e.to_string());
                            }
                        }
                    }
                    Action::Discard { epoch } => store.discard(epoch),
                }
            }
            flush(&mut rx, &mut paths);
        }
    }

    /// Handles a switchover request; see [`crate::switchover`].
    fn switchover(
        &mut self,
        rx: &Receiver,
        store: &mut ReplicaStore,
        sw: endophyte_wire::Switchover,
    ) -> Message {
        let vm_id = self.vm_id.clone();
        let refuse = |code, message: String| {
            tracing::warn!(vm = %vm_id, generation = sw.generation, "switchover refused: {message}");
            Message::Error { code, message }
        };
        if let Some((p, _)) = &self.prepared {
            if p.ready.generation == sw.generation {
                return Message::SwitchoverReady(p.ready.clone());
            }
        }
        if sw.generation <= self.fence.generation {
            return refuse(
                ErrorCode::Fenced,
                format!(
                    "generation {} is stale: this node has seen generation {} ({}) of VM {:?}",
                    sw.generation, self.fence.generation, self.fence.state, self.vm_id
                ),
            );
        }
        if rx.committed_epoch() != sw.epoch || rx.committed_session() != sw.session {
            return refuse(
                ErrorCode::SwitchoverFailed,
                format!(
                    "the replica holds epoch {} of session {:x}, not the final epoch {} of session {:x}",
                    rx.committed_epoch(),
                    rx.committed_session(),
                    sw.epoch,
                    sw.session
                ),
            );
        }
        let mut fence = crate::switchover::Fence {
            generation: sw.generation,
            state: "prepared".into(),
            epoch: sw.epoch,
            session: sw.session,
            vmm_socket: self.dir.join("vmm.sock"),
            vmm_pid: 0,
        };
        let dir = self.dir.clone();
        let r = crate::switchover::prepare_from_replica(
            &self.dir,
            &store.image_path(),
            &sw,
            self.crash_during_switchover,
            self.standby.take(),
            |pid| {
                // Before the VM exists: after a crash this node knows which VMM may map the file.
                fence.vmm_pid = pid;
                crate::switchover::Fence::ensure_file(&dir)?;
                fence.record(&dir, false)
            },
        );
        match r {
            Ok(prepared) => {
                self.fence = fence;
                tracing::info!(vm = %self.vm_id, generation = sw.generation, epoch = sw.epoch,
                    settle_us = prepared.ready.settle_us, spawn_us = prepared.ready.spawn_us,
                    restore_us = prepared.ready.restore_us, "switchover prepared; waiting for the commit");
                let ready = prepared.ready.clone();
                self.prepared = Some((prepared, std::time::Instant::now()));
                Message::SwitchoverReady(ready)
            }
            Err(e) => {
                if fence.vmm_pid != 0 {
                    fence.state = "aborted".into();
                    fence.vmm_pid = 0;
                    if let Err(e2) = fence.store(&self.dir) {
                        tracing::error!(vm = %self.vm_id, "rewriting the fence after a failed switchover: {e2}");
                    }
                    self.fence = fence;
                }
                refuse(
                    ErrorCode::SwitchoverFailed,
                    format!("preparing the VM on this node's replica failed: {e:#}"),
                )
            }
        }
    }

    /// The source's commit: the fence says "running" on disk, then the guest resumes here.
    fn commit(&mut self, generation: u64) -> Message {
        if let Some((g, resume_us, _)) = &self.running {
            if *g == generation {
                return Message::SwitchedOver {
                    generation,
                    resume_us: *resume_us,
                };
            }
        }
        let Some((p, _)) = self
            .prepared
            .take_if(|(p, _)| p.ready.generation == generation)
        else {
            return Message::Error {
                code: ErrorCode::Fenced,
                message: format!(
                    "no switchover of generation {generation} is prepared here (fence: generation {}, {})",
                    self.fence.generation, self.fence.state
                ),
            };
        };
        self.fence.state = "running".into();
        if let Err(e) = self.fence.record(&self.dir, true) {
            // Not resumed: the source stays paused without an answer and the operator decides.
            tracing::error!(vm = %self.vm_id, generation, "recording the commit failed, the guest stays paused: {e}");
            self.fence.state = "prepared".into();
            self.prepared = Some((p, std::time::Instant::now()));
            return Message::Error {
                code: ErrorCode::Internal,
                message: format!("recording the commit failed, the guest stays paused: {e}"),
            };
        }
        let t = std::time::Instant::now();
        if let Err(e) = p.client.resume() {
            tracing::error!(vm = %self.vm_id, generation, "resuming the committed guest failed: {e}");
            return Message::Error {
                code: ErrorCode::Internal,
                message: format!("resuming the committed guest failed: {e}"),
            };
        }
        let resume_us = t.elapsed().as_micros() as u64;
        tracing::info!(vm = %self.vm_id, generation, resume_us, "switchover committed: the VM runs on this node");
        self.running = Some((generation, resume_us, p.vmm));
        Message::SwitchedOver {
            generation,
            resume_us,
        }
    }

    /// The VM ran here and its VMM exited: it migrated away (a source VMM exits once the target runs the
    /// guest) or it stopped. Either way nothing runs here any more, so the fence records `"departed"` and
    /// the replica takes replication again; its contents are those of the epoch the VM started from here,
    /// and the next sidecar's new session resyncs it whole.
    fn reap_departed(&mut self) {
        let Some((generation, _, child)) = self.running.as_mut() else {
            return;
        };
        let status = match child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(vm = %self.vm_id, "checking the VMM process: {e}");
                return;
            }
        };
        let generation = *generation;
        self.running = None;
        self.fence.state = "departed".into();
        if let Err(e) = self.fence.record(&self.dir, true) {
            tracing::error!(vm = %self.vm_id, generation, "recording that the VM left failed: {e:#}");
        }
        tracing::info!(vm = %self.vm_id, generation, %status,
            "the VM's VMM here exited (it migrated away or stopped): this node is a backup for it again");
    }

    /// A migration to this node started converging: start a standby VMM now.
    fn warm_up(&mut self, generation: u64) {
        if self.running.is_some()
            || self.prepared.is_some()
            || self.standby.is_some()
            || generation <= self.fence.generation
        {
            return;
        }
        // The fence file at full size now, so that the switchover's records are single in-place writes.
        if let Err(e) = crate::switchover::Fence::ensure_file(&self.dir) {
            tracing::warn!(vm = %self.vm_id, "preparing the fence file: {e:#}");
        }
        match crate::switchover::Standby::start(&self.dir) {
            Ok(s) => {
                tracing::info!(vm = %self.vm_id, generation, "migration coming: standby VMM started");
                self.standby = Some(s);
            }
            Err(e) => {
                tracing::warn!(vm = %self.vm_id, "starting a standby VMM ahead of a switchover failed (the switchover will try again): {e:#}")
            }
        }
    }

    fn lease_live(&self) -> bool {
        self.last_heard.is_some_and(|t| t.elapsed() < LEASE)
    }

    /// Reports, once, a primary silent for longer than its lease.
    fn check_lease(&mut self) {
        if let Some(t) = self.last_heard {
            if !self.silence_reported && t.elapsed() >= LEASE && self.running.is_none() {
                self.silence_reported = true;
                tracing::warn!(vm = %self.vm_id, silent_ms = t.elapsed().as_millis() as u64,
                    "the primary is silent past its lease: presumed dead; `endophyte promote` can start the VM here");
            }
        }
    }

    fn status(&self, store: &ReplicaStore) -> serde_json::Value {
        serde_json::json!({
            "vm_id": self.vm_id,
            "committed_epoch": store.committed_epoch(),
            "primary_heard_ms_ago": self.last_heard.map(|t| t.elapsed().as_secs_f64() * 1e3),
            "lease_live": self.lease_live(),
            "fence": { "generation": self.fence.generation, "state": self.fence.state },
            "runs_here": self.running.is_some(),
            "promotable": self.running.is_none() && self.prepared.is_none() && store.vm_state().is_some(),
        })
    }

    /// Failover: starts the VM here from the committed epoch (replica file as RAM, the vCPU state its
    /// end marker carried), under the next generation. Refused while the primary's lease is live unless
    /// forced, and when the VM already runs or a switchover is in progress here.
    fn promote(
        &mut self,
        store: &ReplicaStore,
        req: &PromoteRequest,
    ) -> Result<serde_json::Value, String> {
        let t = std::time::Instant::now();
        if self.running.is_some() || self.fence.running() {
            return Err(format!(
                "VM {:?} already runs on this node (generation {})",
                self.vm_id, self.fence.generation
            ));
        }
        if self.prepared.is_some() {
            return Err(format!(
                "a switchover of VM {:?} is in progress here",
                self.vm_id
            ));
        }
        if self.lease_live() && !req.force {
            return Err(format!(
                "the primary of VM {:?} was heard {:.1} s ago: its lease ({} s) is live, so it may still run; promote after the lease expires, or with force",
                self.vm_id,
                self.last_heard.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                LEASE.as_secs()
            ));
        }
        let epoch = store.committed_epoch();
        let Some(state) = store.vm_state().cloned() else {
            return Err(format!(
                "the committed epoch {epoch} of VM {:?} carries no vCPU state: it cannot be started here",
                self.vm_id
            ));
        };
        let sw = endophyte_wire::Switchover {
            generation: self.fence.generation + 1,
            session: store.committed_session(),
            epoch,
            verify: req.verify,
            state,
        };
        let mut fence = crate::switchover::Fence {
            generation: sw.generation,
            state: "prepared".into(),
            epoch,
            session: sw.session,
            vmm_socket: self.dir.join("vmm.sock"),
            vmm_pid: 0,
        };
        let dir = self.dir.clone();
        let p = crate::switchover::prepare_from_replica(
            &self.dir,
            &store.image_path(),
            &sw,
            false,
            self.standby.take(),
            |pid| {
                fence.vmm_pid = pid;
                crate::switchover::Fence::ensure_file(&dir)?;
                fence.record(&dir, false)
            },
        )
        .map_err(|e| format!("starting VM {:?} from epoch {epoch}: {e:#}", self.vm_id))?;
        self.fence = fence;
        let ram_hash = p.ready.ram_hash.clone();
        let generation = sw.generation;
        self.prepared = Some((p, std::time::Instant::now()));
        match self.commit(generation) {
            Message::SwitchedOver { .. } => {}
            Message::Error { message, .. } => return Err(message),
            other => return Err(format!("unexpected {}", other.name())),
        }
        tracing::warn!(vm = %self.vm_id, epoch, generation, forced = req.force, "promoted: the VM runs on this node from its last committed epoch");
        Ok(serde_json::json!({
            "vm": self.vm_id,
            "epoch": epoch,
            "generation": generation,
            "vmm_socket": self.fence.vmm_socket,
            "ram_hash": ram_hash,
            "forced": req.force,
            "elapsed_ms": t.elapsed().as_secs_f64() * 1e3,
        }))
    }

    /// The source abandoned `generation` (or it timed out here): its prepared VM goes, never to run.
    fn abort(&mut self, generation: u64) {
        if self
            .running
            .as_ref()
            .is_some_and(|(g, _, _)| *g == generation)
        {
            tracing::error!(vm = %self.vm_id, generation, "abort for a switchover already committed: ignored, the VM runs here");
            return;
        }
        if let Some((mut p, _)) = self
            .prepared
            .take_if(|(p, _)| p.ready.generation == generation)
        {
            let _ = p.vmm.kill();
            let _ = p.vmm.wait();
        }
        if generation >= self.fence.generation {
            self.fence.generation = generation;
            self.fence.state = "aborted".into();
            self.fence.vmm_pid = 0;
            if let Err(e) = self.fence.store(&self.dir) {
                tracing::error!(vm = %self.vm_id, "recording the aborted generation: {e}");
            }
        }
        tracing::info!(vm = %self.vm_id, generation, "switchover aborted; the replica is unchanged");
    }
}

fn flush(rx: &mut Receiver, paths: &mut HashMap<u64, mpsc::UnboundedSender<EncodedFrame>>) {
    while let Some((key, msg)) = rx.poll_transmit() {
        if let Some(tx) = paths.get(&key) {
            let _ = tx.send(msg.encode());
        }
    }
}

/// A backup's control API: `GET /v1/status` (each VM's committed epoch, its primary's lease, its fence)
/// and `POST /v1/promote` ([`PromoteRequest`]).
fn control_router(node: Arc<BackupNode>) -> axum::Router {
    use crate::control::ApiError;
    use axum::extract::State;
    use axum::Json;
    axum::Router::new()
        .route(
            "/v1/status",
            axum::routing::get(|State(n): State<Arc<BackupNode>>| async move {
                let handles: Vec<Arc<VmHandle>> =
                    n.vms.lock().expect("vm table").values().cloned().collect();
                let mut vms = vec![];
                for h in handles {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    if h.tx.send(VmIn::Status { reply: tx }).is_ok() {
                        if let Ok(v) = rx.await {
                            vms.push(v);
                        }
                    }
                }
                Json(serde_json::json!({
                    "node": n.identity.node,
                    "lease_ms": LEASE.as_millis() as u64,
                    "vms": vms,
                }))
            }),
        )
        .route(
            "/v1/promote",
            axum::routing::post(
                |State(n): State<Arc<BackupNode>>, Json(req): Json<PromoteRequest>| async move {
                    let h = n
                        .vms
                        .lock()
                        .expect("vm table")
                        .get(&req.vm)
                        .cloned()
                        .ok_or_else(|| {
                            ApiError::not_found(format!(
                                "no replica of VM {:?} on this node",
                                req.vm
                            ))
                        })?;
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    h.tx.send(VmIn::Promote { req, reply: tx })
                        .map_err(|_| ApiError::conflict("the VM's replica thread is gone"))?;
                    match rx.await {
                        Ok(Ok(v)) => Ok(Json(v)),
                        Ok(Err(m)) => Err(ApiError::conflict(m)),
                        Err(_) => Err(ApiError::conflict("the VM's replica thread is gone")),
                    }
                },
            ),
        )
        .with_state(node)
}
