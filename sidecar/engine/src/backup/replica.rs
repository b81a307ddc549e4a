//! One VM's thread on a backup: frames from the VM's paths go to its [`Receiver`] (replication) or its
//! [`Target`] (switchover), the receiver's actions go to the [`ReplicaStore`], and the primary's lease is
//! watched. While the VM is prepared or runs here, replication into its replica is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use endophyte_vmm::Launcher;
use endophyte_wire::switchover::{Origin, TargetEvent};
use endophyte_wire::{Action, EncodedFrame, ErrorCode, Message, Receiver};
use tokio::sync::mpsc;

use super::target::Target;
use super::{BackupError, VmIn};
use crate::control::{FenceStatus, PromoteReply, PromoteRequest, ReplicaStatus};
use crate::fence;
use crate::store::{CrashPoint, DirLock, Durability, ReplicaStore};

/// How often the thread wakes with nothing to do (lease, timeouts, idle checkpoints, VMM exits).
const TICK: Duration = Duration::from_millis(300);

/// What a replica thread needs to open its VM.
pub(super) struct Opening {
    pub vm_id: String,
    pub dir: PathBuf,
    pub page_size: u64,
    pub mem_bytes: u64,
    pub instance: u64,
    pub node: String,
    pub max_staged: usize,
    pub crash: CrashPoint,
    pub durability: Durability,
    pub launcher: Option<Arc<dyn Launcher>>,
    /// The primary's lease ([`BackupConfig::lease`](super::BackupConfig::lease)).
    pub lease: std::time::Duration,
    /// The node's services, restored before a VM started here resumes.
    pub services: crate::services::ServiceRegistry,
    /// How long they have for it.
    pub service_restore: std::time::Duration,
    /// The fencing authority, once the node serves (none configured: never set).
    pub authority: Arc<std::sync::OnceLock<super::BackupAuthority>>,
    /// Whether one is configured (switchovers then claim their generation there before resuming).
    pub authority_required: bool,
}

/// The VM a directory holds a replica of, from its `state.json`: `(vm_id, page_size, mem_bytes)`;
/// `None` for a directory without one.
pub(super) fn geometry_on_disk(dir: &Path) -> Result<Option<(String, u32, u64)>, BackupError> {
    Ok(crate::store::identify(dir)?.map(|s| (s.vm_id, s.page_size as u32, s.mem_bytes)))
}

/// Opens the VM's replica (unless the VM runs here), settles what a crash left, and starts its thread.
/// Returns the thread's inbox and the epoch the replica holds.
pub(super) fn start(o: Opening) -> Result<(std::sync::mpsc::Sender<VmIn>, u64), BackupError> {
    std::fs::create_dir_all(&o.dir).map_err(|source| {
        BackupError::Store(crate::store::StoreError::Io {
            op: "creating",
            path: o.dir.clone(),
            source,
        })
    })?;
    // One process per replica directory: a second backup on the same data directory, or an export, is
    // refused while this one serves the VM.
    let lock = DirLock::acquire(&o.dir)?;
    let record = fence::load(&o.dir)?;
    // The fence file at full size now, so that a switchover's records are single in-place writes: creating
    // it (write, fsync, rename, fsync) inside a switchover would add tens of ms to the guest's downtime.
    fence::ensure_file(&o.dir)?;
    let (tx, inbox) = std::sync::mpsc::channel();
    let mut target = Target::new(
        &o.vm_id,
        &o.dir,
        record,
        o.launcher.clone(),
        o.crash.during_switchover,
        (o.services.clone(), o.service_restore),
        o.authority_required
            .then(|| super::target::TargetAuthority {
                cell: o.authority.clone(),
                node: o.node.clone(),
                inbox: tx.clone(),
            }),
    );
    // A VM running here (its VMM outlived an earlier run of this backup) owns the replica file: no journal
    // may be redone over its RAM, so the store stays closed until it leaves.
    let store = if target.runs_here() {
        tracing::info!(vm = %o.vm_id, generation = target.fence().generation,
            "the VM runs on this node; its replica file is its RAM");
        None
    } else {
        let mut s = ReplicaStore::open(&o.dir, &o.vm_id, o.mem_bytes, o.page_size, o.crash)?;
        s.set_durability(o.durability);
        tracing::info!(vm = %o.vm_id, committed = s.committed_epoch(), "replica opened");
        Some(s)
    };
    // What a crash left (a prepared VM to stop, a departed VM to record).
    let events = target.tick(store.as_ref().map(ReplicaStore::image_path), Instant::now());
    let mut thread = VmThread {
        rx: receiver(&o, store.as_ref()),
        o,
        store,
        target,
        paths: HashMap::new(),
        // A backup that just started cannot tell whether the primary lives: it gives it a lease's time to
        // show up before a promote goes through unforced.
        last_heard: Some(Instant::now()),
        silence_reported: false,
        path_gens: HashMap::new(),
        newest_generation: 0,
        _lock: lock,
    };
    thread.handle_events(events);
    let committed = thread.store.as_ref().map_or(0, |s| s.committed_epoch());

    let name = format!("replica-{}", thread.o.vm_id);
    let vm_id = thread.o.vm_id.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || thread.run(inbox))
        .map_err(|source| BackupError::Thread { vm_id, source })?;
    Ok((tx, committed))
}

fn receiver(o: &Opening, store: Option<&ReplicaStore>) -> Receiver {
    let (committed, session) =
        store.map_or((0, 0), |s| (s.committed_epoch(), s.committed_session()));
    Receiver::new(
        o.vm_id.clone(),
        o.page_size,
        o.mem_bytes,
        committed,
        session,
        o.instance,
        o.node.clone(),
        o.max_staged,
    )
    .with_lease(o.lease)
}

struct VmThread {
    o: Opening,
    rx: Receiver,
    /// The replica; `None` while the VM runs here since before this backup started.
    store: Option<ReplicaStore>,
    target: Target,
    paths: HashMap<u64, mpsc::UnboundedSender<EncodedFrame>>,
    /// When a frame from the VM's primary last arrived (its lease).
    last_heard: Option<Instant>,
    /// The primary's silence past its lease was logged.
    silence_reported: bool,
    /// Per path: the peer's node and the generation its Hello carried.
    path_gens: HashMap<u64, (String, u64)>,
    /// The newest generation a path's Hello carried for this VM (with the fence's, the floor below which
    /// paths are refused).
    newest_generation: u64,
    /// This process's hold on the VM's directory.
    _lock: DirLock,
}

impl VmThread {
    fn run(mut self, inbox: std::sync::mpsc::Receiver<VmIn>) {
        loop {
            let received = inbox.recv_timeout(TICK);
            let events = self.target.tick(
                self.store.as_ref().map(ReplicaStore::image_path),
                Instant::now(),
            );
            self.handle_events(events);
            self.sync_standby();
            let input = match received {
                Ok(i) => i,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if !self.target.holds_vm() && !self.target.warming() {
                        if let Some(s) = &mut self.store {
                            s.maybe_checkpoint(true);
                        }
                    }
                    self.check_lease();
                    self.flush_target();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if matches!(input, VmIn::Msg { .. } | VmIn::PathUp { .. }) {
                self.last_heard = Some(Instant::now());
                self.silence_reported = false;
            }
            self.check_lease();
            match input {
                VmIn::Status { reply } => {
                    let _ = reply.send(self.status());
                    continue;
                }
                VmIn::Promote { req, reply } => {
                    let _ = reply.send(self.promote(&req));
                    continue;
                }
                VmIn::AuthorityFence { why } => {
                    self.target.hold_lost(&why);
                    continue;
                }
                VmIn::PathUp {
                    key,
                    tx,
                    node,
                    generation,
                } => {
                    if self.admit(key, &tx, node, generation) {
                        self.paths.insert(key, tx);
                    }
                }
                VmIn::PathDown { key } => {
                    self.paths.remove(&key);
                    self.path_gens.remove(&key);
                }
                VmIn::Msg { key, msg } => self.message(key, msg),
            }
            self.flush_target();
            if self.target.holds_vm() {
                continue;
            }
            self.do_actions();
            self.flush_rx();
        }
    }

    /// A path of node `node` holding `generation` (its Hello's fencing token) comes up: refused below the
    /// newest generation seen for this VM (a stale primary never writes its old timeline here), and a newer
    /// one closes the paths of older generations.
    fn admit(
        &mut self,
        key: u64,
        tx: &mpsc::UnboundedSender<EncodedFrame>,
        node: String,
        generation: u64,
    ) -> bool {
        // A generation recorded here as aborted or only prepared never ran: its source, one below, still
        // holds the VM.
        let f = self.target.fence();
        let ran = match f.state {
            endophyte_wire::FenceState::Aborted | endophyte_wire::FenceState::Prepared => {
                f.generation.saturating_sub(1)
            }
            _ => f.generation,
        };
        let newest = self.newest_generation.max(ran);
        if generation < newest {
            let message = format!(
                "node {node:?} holds generation {generation} of VM {:?}, but this node has seen generation {newest}: refusing a stale primary",
                self.o.vm_id
            );
            tracing::warn!(vm = %self.o.vm_id, "{message}");
            let _ = tx.send(
                Message::Error {
                    code: ErrorCode::Fenced,
                    message,
                }
                .encode(),
            );
            return false;
        }
        if generation > self.newest_generation {
            self.newest_generation = generation;
            let stale: Vec<u64> = self
                .path_gens
                .iter()
                .filter(|(_, (_, g))| *g < generation)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let (Some(tx), Some((n, g))) = (self.paths.remove(&k), self.path_gens.remove(&k))
                {
                    let message = format!(
                        "node {n:?}'s generation {g} of VM {:?} is superseded by generation {generation}",
                        self.o.vm_id
                    );
                    let _ = tx.send(
                        Message::Error {
                            code: ErrorCode::Fenced,
                            message,
                        }
                        .encode(),
                    );
                }
            }
        }
        self.path_gens.insert(key, (node, generation));
        true
    }

    /// A switchover message must name the generation after its path's: a node acts only for the
    /// generation it holds (a `SwitchoverAbort{u64::MAX}` from anyone else poisons nothing).
    fn switchover_allowed(&mut self, key: u64, msg: &Message) -> bool {
        let g = match msg {
            Message::Switchover(sw) => sw.generation,
            Message::SwitchoverWarmup { generation }
            | Message::SwitchoverCommit { generation }
            | Message::SwitchoverAbort { generation } => *generation,
            _ => return true,
        };
        let Some((node, held)) = self.path_gens.get(&key).cloned() else {
            return false;
        };
        if g == held.saturating_add(1) {
            return true;
        }
        let message = format!(
            "node {node:?} holds generation {held} of VM {:?}: it may switch over to generation {} only, not {g}",
            self.o.vm_id,
            held.saturating_add(1)
        );
        tracing::warn!(vm = %self.o.vm_id, "refused: {message}");
        if let Some(tx) = self.paths.get(&key) {
            let _ = tx.send(
                Message::Error {
                    code: ErrorCode::PermissionDenied,
                    message,
                }
                .encode(),
            );
        }
        false
    }

    fn message(&mut self, key: u64, msg: Message) {
        if !self.switchover_allowed(key, &msg) {
            return;
        }
        let now = Instant::now();
        let replica = self
            .store
            .as_ref()
            .map(|s| (s.image_path(), s.committed_epoch(), s.committed_session()));
        // A switchover restores the committed epoch: the services' state as of it goes with it.
        if let (Message::Switchover(_), Some(s)) = (&msg, &self.store) {
            self.target
                .set_restore_point(s.committed_epoch(), s.service_states().clone());
        }
        let (taken, events) = self.target.handle_message(key, &msg, replica, now);
        self.handle_events(events);
        if taken {
            self.sync_standby();
            return;
        }
        if self.target.holds_vm() {
            // Fenced: nothing goes into the prepared or running VM's RAM.
            if !matches!(msg, Message::Ping { .. } | Message::Pong { .. }) {
                if let Some(tx) = self.paths.remove(&key) {
                    let f = self.target.fence();
                    let message = format!(
                        "VM {:?} runs on this node since epoch {} (generation {}, {}): refusing replication into its RAM",
                        self.o.vm_id, f.epoch, f.generation, f.state
                    );
                    let _ = tx.send(
                        Message::Error {
                            code: ErrorCode::Fenced,
                            message,
                        }
                        .encode(),
                    );
                }
            }
            return;
        }
        if let Err(e) = self.rx.handle_message(key, msg) {
            tracing::warn!(vm = %self.o.vm_id, "refused: {e}");
            self.flush_rx();
            self.paths.remove(&key);
        }
    }

    /// Does what the receiver asks until it is quiet.
    fn do_actions(&mut self) {
        let vm_id = &self.o.vm_id;
        let Some(store) = self.store.as_mut() else {
            return;
        };
        while let Some(action) = self.rx.poll_action() {
            match action {
                Action::Store { epoch, seq, chunk } => {
                    match store.store_chunk(seq, &chunk, self.rx.session().unwrap_or(0)) {
                        Ok(()) => {
                            if let Err(e) = self.rx.chunk_stored(epoch, seq) {
                                tracing::warn!(vm = %vm_id, "refused: {e}");
                            }
                        }
                        Err(e) => {
                            // The epoch is dropped and the sender told; it starts over from our committed epoch.
                            tracing::error!(vm = %vm_id, epoch, "journal write failed: {e}");
                            self.rx.store_failed(epoch, seq, &e.to_string());
                        }
                    }
                }
                Action::Commit { end } => {
                    let epoch = end.epoch;
                    match store.commit(&end, self.rx.session().unwrap_or(0)) {
                        Ok(pages) => {
                            tracing::debug!(vm = %vm_id, epoch, "committed");
                            self.target.replica_committed(
                                store.image_path(),
                                store.vm_state(),
                                &pages,
                            );
                            // A migration coming here: no checkpoint writeback (hundreds of MB of
                            // fdatasync) competes with the switchover's own writes for the disk.
                            if !self.target.warming() {
                                store.maybe_checkpoint(false);
                            }
                            if let Err(e) = self.rx.epoch_committed(epoch) {
                                tracing::warn!(vm = %vm_id, "refused: {e}");
                            }
                        }
                        Err(e) => {
                            tracing::error!(vm = %vm_id, epoch, "commit failed, replica keeps epoch {}: {e}", store.committed_epoch());
                            self.rx.commit_failed(epoch, &e.to_string());
                        }
                    }
                }
                Action::Discard { epoch } => store.discard(epoch),
            }
        }
    }

    /// Lets a standby VMM load the replica ahead of a switchover ([`Target::sync_standby`]).
    fn sync_standby(&mut self) {
        if let Some(s) = self.store.as_ref() {
            self.target.sync_standby(s.image_path(), s.vm_state());
        }
    }

    fn flush_rx(&mut self) {
        while let Some((key, msg)) = self.rx.poll_transmit() {
            if let Some(tx) = self.paths.get(&key) {
                let _ = tx.send(msg.encode());
            }
        }
    }

    fn flush_target(&mut self) {
        while let Some((key, msg)) = self.target.poll_transmit() {
            if let Some(tx) = self.paths.get(&key) {
                let _ = tx.send(msg.encode());
            }
        }
    }

    /// What the target reported that concerns the replica: a VM that left makes the file hold no epoch.
    fn handle_events(&mut self, events: Vec<TargetEvent>) {
        for e in events {
            if let TargetEvent::Departed { .. } = e {
                self.replica_left_by_vm();
            }
        }
    }

    /// The replica file was the running VM's RAM and the VM is gone: it holds no epoch now. The store
    /// records that (opened now if the VM ran since before this backup started), and replication starts
    /// over with a full resync.
    fn replica_left_by_vm(&mut self) {
        let o = &self.o;
        let r = match self.store.take() {
            Some(s) => Ok(s),
            None => ReplicaStore::open(&o.dir, &o.vm_id, o.mem_bytes, o.page_size, o.crash).map(
                |mut s| {
                    s.set_durability(o.durability);
                    s
                },
            ),
        }
        .and_then(|mut s| s.forget().map(|()| s));
        match r {
            Ok(s) => {
                self.store = Some(s);
                self.rx = receiver(&self.o, self.store.as_ref());
            }
            Err(e) => {
                tracing::error!(vm = %self.o.vm_id, "reopening the replica the VM left: {e}; replication into it is refused until the backup restarts")
            }
        }
    }

    fn lease_live(&self) -> bool {
        self.last_heard.is_some_and(|t| t.elapsed() < self.o.lease)
    }

    /// Reports, once, a primary silent for longer than its lease.
    fn check_lease(&mut self) {
        if let Some(t) = self.last_heard {
            if !self.silence_reported && t.elapsed() >= self.o.lease && !self.target.runs_here() {
                self.silence_reported = true;
                tracing::warn!(vm = %self.o.vm_id, silent_ms = t.elapsed().as_millis() as u64,
                    "the primary is silent past its lease: presumed dead; `endophyte promote` can start the VM here");
            }
        }
    }

    fn status(&self) -> ReplicaStatus {
        let f = self.target.fence();
        ReplicaStatus {
            vm_id: self.o.vm_id.clone(),
            committed_epoch: self.store.as_ref().map_or(0, |s| s.committed_epoch()),
            primary_heard_ms_ago: self.last_heard.map(|t| t.elapsed().as_secs_f64() * 1e3),
            lease_live: self.lease_live(),
            fence: FenceStatus {
                generation: f.generation,
                state: f.state.as_str().to_string(),
            },
            runs_here: self.target.runs_here(),
            promotable: self.target.idle()
                && self.store.as_ref().is_some_and(|s| s.vm_state().is_some()),
            vmm_endpoint: Some(self.target.endpoint().to_string()).filter(|e| !e.is_empty()),
            authority: self.target.hold_status(),
        }
    }

    /// Failover: starts the VM here from the committed epoch (replica file as RAM, the vCPU state its end
    /// marker carried), under the next generation. Refused while the primary's lease is live unless forced.
    fn promote(&mut self, req: &PromoteRequest) -> Result<PromoteReply, String> {
        let t = Instant::now();
        let vm = self.o.vm_id.clone();
        if self.target.runs_here() {
            return Err(format!(
                "VM {vm:?} already runs on this node (generation {})",
                self.target.fence().generation
            ));
        }
        let authority = self.target.authority().map(|(a, _)| a);
        if authority.is_some() && req.force {
            return Err(format!(
                "VM {vm:?}: force is refused under a fencing authority: only the authority's lease says the holder is gone"
            ));
        }
        if authority.is_none() && self.lease_live() && !req.force {
            return Err(format!(
                "the primary of VM {vm:?} was heard {:.1} s ago: its lease ({:.1} s) is live, so it may still run; promote after the lease expires, or with force",
                self.last_heard.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                self.o.lease.as_secs_f64()
            ));
        }
        let Some(store) = self.store.as_ref() else {
            return Err(format!("the replica of VM {vm:?} is not open here"));
        };
        let epoch = store.committed_epoch();
        let Some(state) = store.vm_state().cloned() else {
            return Err(format!(
                "the committed epoch {epoch} of VM {vm:?} carries no vCPU state: it cannot be started here"
            ));
        };
        let img = store.image_path().to_owned();
        let session = store.committed_session();
        // The commit point of a promote under an authority: the generation's compare-and-set, which of
        // two concurrent promotes only one wins. The VM starts only after it.
        let claimed = match &authority {
            Some(a) => Some(
                a.rt.block_on(endophyte_authority::promote(
                    &*a.auth,
                    &vm,
                    &self.o.node,
                    a.cfg.ttl(),
                ))
                .map_err(|e| {
                    format!("the fencing authority ({}) refused: {e}", a.auth.describe())
                })?,
            ),
            None => None,
        };
        self.target
            .set_restore_point(epoch, store.service_states().clone());
        let (r, events) = self.target.promote(
            &img,
            (epoch, session),
            state,
            req.verify,
            claimed.map(|c| c.generation),
        );
        let generation = match r {
            Ok(g) => g,
            Err(e) => {
                self.release_claim(authority.as_ref(), claimed);
                return Err(e);
            }
        };
        let mut outcome = Err(format!("VM {vm:?} did not start (no outcome)"));
        for e in &events {
            match e {
                TargetEvent::Running {
                    origin: Origin::Promote,
                    ready,
                    ..
                } => {
                    outcome = Ok(PromoteReply {
                        vm: vm.clone(),
                        epoch,
                        generation,
                        vmm_socket: self.target.endpoint().to_string(),
                        ram_hash: ready.ram_hash.clone(),
                        forced: req.force,
                        elapsed_ms: t.elapsed().as_secs_f64() * 1e3,
                    })
                }
                TargetEvent::Failed {
                    origin: Origin::Promote,
                    why,
                    ..
                } => outcome = Err(format!("starting VM {vm:?} from epoch {epoch}: {why}")),
                _ => {}
            }
        }
        self.handle_events(events);
        match (&outcome, authority, claimed) {
            (Ok(_), Some(a), Some(c)) => self.target.keep_hold(&a, c),
            (Err(_), a, c) => self.release_claim(a.as_ref(), c),
            _ => {}
        }
        if outcome.is_ok() {
            tracing::warn!(%vm, epoch, generation, forced = req.force, "promoted: the VM runs on this node from its last committed epoch");
        }
        outcome
    }

    /// A promote won at the authority but the VM did not start: the lease goes, so another node may try.
    fn release_claim(
        &self,
        a: Option<&super::BackupAuthority>,
        c: Option<endophyte_authority::Claimed>,
    ) {
        if let (Some(a), Some(c)) = (a, c) {
            if let Err(e) = a.rt.block_on(a.auth.revoke(c.lease)) {
                tracing::warn!(vm = %self.o.vm_id, "revoking the authority lease of a promote that did not start: {e}");
            }
        }
    }
}
