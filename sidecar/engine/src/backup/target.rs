//! One VM's migration target and promote on a backup: the driver of its
//! [`TargetSwitchover`](endophyte_wire::switchover::TargetSwitchover). The state machine decides; this
//! module does what it asks against the VMM kind's [`Launcher`] and [`TargetVm`], and against the fence
//! file, and reports each result back with the time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use endophyte_vmm::{Launcher, TargetVm, VmState};
use endophyte_wire::receiver::PathKey;
use endophyte_wire::switchover::{TargetAction, TargetEvent, TargetSwitchover};
use endophyte_wire::{FenceState, Message};

use super::{BackupAuthority, VmIn};
use crate::fence::{self, FenceRecord};
use crate::store::ServiceStates;

/// The VM's target side: the state machine, the VMM processes it started and where they are reached.
pub(super) struct Target {
    vm_id: String,
    dir: PathBuf,
    machine: TargetSwitchover,
    launcher: Option<Arc<dyn Launcher>>,
    /// A VMM started ahead of a switchover (warm-up), holding no VM yet.
    standby: Option<Box<dyn TargetVm>>,
    /// The VMM holding the VM (launched for a switchover, prepared, or running).
    vm: Option<Box<dyn TargetVm>>,
    /// Where the VMM holding the VM is reached (from the fence after a restart).
    endpoint: String,
    /// Whether the standby (or the VM launched from it) loads the replica ahead of the restore
    /// ([`TargetVm::preload`]).
    preloaded: bool,
    /// The standby's preload was tried (it is tried once per standby).
    preload_tried: bool,
    /// The source has not yet been told that the standby is ready.
    announce: bool,
    crash_during_switchover: bool,
    /// The node's services and how long they have to restore before the VM resumes.
    services: (crate::services::ServiceRegistry, std::time::Duration),
    /// The committed epoch the VM is restored from and the services' contributions as of it.
    restore_point: Option<(u64, ServiceStates)>,
    /// The fencing authority, when one is configured.
    authority: Option<TargetAuthority>,
    /// The hold at the authority on the VM running here (promoted or switched over to this node).
    hold: Option<endophyte_authority::Hold>,
}

/// What the target needs of the fencing authority: the client (set once the node serves), this node's
/// name, and the VM thread's inbox, where a lost hold stops the VM.
pub(super) struct TargetAuthority {
    pub cell: Arc<std::sync::OnceLock<BackupAuthority>>,
    pub node: String,
    pub inbox: std::sync::mpsc::Sender<VmIn>,
}

impl Target {
    /// The target for the VM in `dir`, whose fence on disk is `record`. After a restart, a VMM recorded as
    /// holding the VM is checked for life (see [`TargetSwitchover::new`]).
    pub(super) fn new(
        vm_id: &str,
        dir: &Path,
        record: Option<FenceRecord>,
        launcher: Option<Arc<dyn Launcher>>,
        crash_during_switchover: bool,
        services: (crate::services::ServiceRegistry, std::time::Duration),
        authority: Option<TargetAuthority>,
    ) -> Self {
        let record = record.unwrap_or_default();
        let alive = fence::process_alive(record.fence.vmm_pid);
        let mut machine = TargetSwitchover::new(vm_id.to_string(), record.fence, alive);
        if authority.is_some() {
            machine = machine.with_authority();
        }
        Self {
            vm_id: vm_id.to_string(),
            dir: dir.to_owned(),
            endpoint: if machine.runs_here() {
                record.vmm_endpoint
            } else {
                String::new()
            },
            machine,
            launcher,
            standby: None,
            vm: None,
            preloaded: false,
            preload_tried: false,
            announce: false,
            crash_during_switchover,
            services,
            restore_point: None,
            authority,
            hold: None,
        }
    }

    /// The authority's client, once the node serves.
    pub(super) fn authority(&self) -> Option<(BackupAuthority, String)> {
        let a = self.authority.as_ref()?;
        Some((a.cell.get()?.clone(), a.node.clone()))
    }

    /// The VM runs here under `claimed`: this node keeps the hold alive, and a lost hold stops the VM
    /// (fails closed; a [`TargetVm`] cannot be paused from here).
    pub(super) fn keep_hold(&mut self, a: &BackupAuthority, claimed: endophyte_authority::Claimed) {
        let Some(t) = &self.authority else {
            return;
        };
        let fencer = Arc::new(StopOnFence(std::sync::Mutex::new(t.inbox.clone())));
        self.hold = Some(endophyte_authority::Hold::spawn(
            &a.rt,
            a.auth.clone(),
            (self.vm_id.clone(), t.node.clone()),
            a.cfg.timing(),
            claimed,
            fencer,
        ));
    }

    /// This node's hold at the authority on the VM it runs, as status shows it.
    pub(super) fn hold_status(&self) -> Option<endophyte_authority::HoldStatus> {
        self.hold.as_ref().map(|h| h.status())
    }

    /// The hold is lost (or another node holds the VM): stop the VM running here.
    pub(super) fn hold_lost(&mut self, why: &str) {
        if self.runs_here() {
            tracing::error!(vm = %self.vm_id, "stopping the VM that runs here, failing closed: {why}");
            self.stop_running();
        }
        self.hold = None;
    }

    fn claim_hold(&mut self, generation: u64) -> Result<(), String> {
        let Some((a, node)) = self.authority() else {
            return Err("the fencing authority is not connected".into());
        };
        let claimed =
            a.rt.block_on(endophyte_authority::claim(
                &*a.auth,
                &self.vm_id,
                &node,
                a.cfg.ttl(),
                Some(generation),
                std::time::Duration::from_secs(2),
            ))
            .map_err(|e| e.to_string())?;
        self.keep_hold(&a, claimed);
        Ok(())
    }

    /// The replica holds committed epoch `epoch` with the services' contributions `states`: what a
    /// switchover or promote restores them to before the VM resumes.
    pub(super) fn set_restore_point(&mut self, epoch: u64, states: ServiceStates) {
        self.restore_point = Some((epoch, states));
    }

    /// Whether the VM is prepared or runs here (replication into its replica is refused).
    pub(super) fn holds_vm(&self) -> bool {
        self.machine.holds_vm()
    }

    /// Whether the VM runs here.
    pub(super) fn runs_here(&self) -> bool {
        self.machine.runs_here()
    }

    /// Whether a warm-up's standby VMM waits (checkpoint writeback waits with it, so that it does not
    /// compete with the switchover's writes for the disk).
    pub(super) fn warming(&self) -> bool {
        self.machine.has_standby() || self.standby.is_some()
    }

    /// The fence in force.
    pub(super) fn fence(&self) -> &endophyte_wire::Fence {
        self.machine.fence()
    }

    /// Stops the VM running here: its hold at the fencing authority could not be kept (fail closed). The
    /// next tick sees its VMM gone and records the departure.
    pub(super) fn stop_running(&mut self) {
        if let Some(vm) = self.vm.as_mut() {
            vm.stop();
        }
    }

    /// Where the VMM holding the VM is reached; empty when none does.
    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A switchover message from the source on `path`; `false` if `msg` is not one. `replica` is the
    /// replica file and what it holds committed, when it is open.
    pub(super) fn handle_message(
        &mut self,
        path: PathKey,
        msg: &Message,
        replica: Option<(&Path, u64, u64)>,
        now: Instant,
    ) -> (bool, Vec<TargetEvent>) {
        let point = replica.map_or((0, 0), |(_, e, s)| (e, s));
        if !self.machine.handle_message(path, msg, point, now) {
            return (false, vec![]);
        }
        (true, self.run(replica.map(|r| r.0)))
    }

    /// Promote: start the VM here from the committed epoch (`epoch`, `session`) with `state`, and resume
    /// it, under the generation the fencing authority `granted` (the fence's next without one). Returns
    /// its generation and the machine's report, or why it did not start.
    pub(super) fn promote(
        &mut self,
        replica: &Path,
        (epoch, session): (u64, u64),
        state: VmState,
        verify: bool,
        granted: Option<u64>,
    ) -> (Result<u64, String>, Vec<TargetEvent>) {
        let now = Instant::now();
        let r = match granted {
            Some(g) => self
                .machine
                .handle_promote_at((epoch, session), state, verify, g, now),
            None => self
                .machine
                .handle_promote((epoch, session), state, verify, now),
        };
        let generation = match r {
            Ok(g) => g,
            Err(e) => return (Err(e), vec![]),
        };
        (Ok(generation), self.run(Some(replica)))
    }

    /// A committed epoch rewrote `pages` of the replica `img`, whose VM state is now `state`: a VMM that
    /// preloads the replica gets them (see [`Target::sync_standby`]).
    pub(super) fn replica_committed(&mut self, img: &Path, state: Option<&VmState>, pages: &[u64]) {
        if self.preloaded {
            let r = match self.vm.as_mut().or(self.standby.as_mut()) {
                Some(vm) => vm.replica_changed(pages),
                None => Ok(()),
            };
            if let Err(e) = r {
                self.preload_failed(&e.to_string());
            }
        }
        self.sync_standby(img, state);
    }

    /// A standby VMM waiting for a switchover loads the replica `img` (VM state `state`) once, then
    /// what each committed epoch rewrites ([`Target::replica_committed`]), so that the switchover's
    /// restore carries only the final epoch; once it is as ready as it gets, the source is told. A VMM
    /// that fails at it is stopped: the switchover launches another and restores it whole.
    pub(super) fn sync_standby(&mut self, img: &Path, state: Option<&VmState>) {
        let Some(s) = self.standby.as_mut() else {
            if self.announce {
                self.announce = false;
                self.machine.handle_standby_loaded(false);
            }
            return;
        };
        if !self.preload_tried {
            if let Some(st) = state {
                self.preload_tried = true;
                match s.preload(img, st) {
                    Ok(yes) => self.preloaded = yes,
                    Err(e) => return self.preload_failed(&e.to_string()),
                }
            }
        }
        if self.announce {
            let Some(s) = self.standby.as_mut() else {
                return;
            };
            match s.loading() {
                Ok(true) => {}
                Ok(false) => {
                    self.announce = false;
                    tracing::info!(vm = %self.vm_id, preloaded = self.preloaded, "the standby VMM is ready");
                    self.machine.handle_standby_loaded(self.preloaded);
                }
                Err(e) => self.preload_failed(&e.to_string()),
            }
        }
    }

    fn preload_failed(&mut self, why: &str) {
        tracing::warn!(vm = %self.vm_id, "loading the replica into the standby VMM failed; the switchover starts another and restores it whole: {why}");
        self.preloaded = false;
        if let Some(mut s) = self.standby.take() {
            s.stop();
        }
        if self.announce {
            self.announce = false;
            self.machine.handle_standby_loaded(false);
        }
    }

    /// Time passed: timeouts of the machine, and the VMM processes' lives.
    pub(super) fn tick(&mut self, replica: Option<&Path>, now: Instant) -> Vec<TargetEvent> {
        if self.standby.as_mut().is_some_and(|s| s.exited()) {
            tracing::warn!(vm = %self.vm_id, "the standby VMM started ahead of a switchover exited");
            self.standby = None;
            self.preloaded = false;
        }
        let vm_gone = match self.vm.as_mut() {
            Some(vm) => vm.exited(),
            // A VM that ran here before this backup restarted is not its child: watch its pid.
            None => self.machine.runs_here() && !fence::process_alive(self.machine.fence().vmm_pid),
        };
        if vm_gone && self.machine.holds_vm() {
            self.vm = None;
            self.preloaded = false;
            self.endpoint.clear();
            self.machine.handle_vmm_exited(now);
        }
        if self.machine.poll_timeout().is_some_and(|t| t <= now) {
            self.machine.handle_timeout(now);
        }
        self.run(replica)
    }

    /// The next reply for a source.
    pub(super) fn poll_transmit(&mut self) -> Option<(PathKey, Message)> {
        self.machine.poll_transmit()
    }

    fn no_launcher(&self) -> String {
        "this backup has no VMM to start VMs with (see `endophyte backup --target-vmm`)".into()
    }

    /// Does what the machine asks until it asks nothing more; returns what happened.
    fn run(&mut self, replica: Option<&Path>) -> Vec<TargetEvent> {
        while let Some(action) = self.machine.poll_action() {
            self.execute(action, replica);
        }
        let events: Vec<TargetEvent> = std::iter::from_fn(|| self.machine.poll_event()).collect();
        for e in &events {
            self.log(e);
        }
        events
    }

    fn execute(&mut self, action: TargetAction, replica: Option<&Path>) {
        let vm_id = self.vm_id.clone();
        match action {
            TargetAction::StartStandby => {
                let r = match &self.launcher {
                    Some(l) => l.launch(&self.dir).map_err(|e| e.to_string()),
                    None => Err(self.no_launcher()),
                };
                match r {
                    Ok(vm) => {
                        tracing::info!(vm = %vm_id, "migration coming: standby VMM started");
                        self.standby = Some(vm);
                        self.preloaded = false;
                        self.preload_tried = false;
                        self.announce = true;
                        self.machine.handle_standby(Ok(()));
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm_id, "starting a standby VMM ahead of a switchover failed (the switchover will try again): {e}");
                        self.machine.handle_standby(Err(e));
                    }
                }
            }
            TargetAction::StopStandby => {
                tracing::info!(vm = %vm_id, "no switchover followed the warm-up: stopping the standby VMM");
                if let Some(mut s) = self.standby.take() {
                    s.stop();
                }
                self.preloaded = false;
            }
            TargetAction::Launch => {
                let r = match (self.standby.take(), &self.launcher) {
                    (Some(s), _) => Ok(s),
                    (None, Some(l)) => {
                        self.preloaded = false;
                        l.launch(&self.dir).map_err(|e| e.to_string())
                    }
                    (None, None) => Err(self.no_launcher()),
                };
                let r = r.map(|vm| {
                    let pid = vm.pid();
                    self.endpoint = vm.endpoint();
                    self.vm = Some(vm);
                    pid
                });
                self.machine.handle_launched(r, Instant::now());
            }
            TargetAction::RecordFence { fence: f, durable } => {
                let record = FenceRecord {
                    vmm_endpoint: if f.holds_vm() {
                        self.endpoint.clone()
                    } else {
                        String::new()
                    },
                    fence: f,
                };
                let t0 = Instant::now();
                let r = fence::record(&self.dir, &record, durable).map_err(|e| e.to_string());
                tracing::debug!(vm = %self.vm_id, state = ?record.fence.state, durable, took = ?t0.elapsed(), "fence recorded");
                self.machine.handle_fence_recorded(r, Instant::now());
            }
            TargetAction::Restore { state } => {
                // What was preloaded is consumed by the restore, whatever its outcome.
                self.preloaded = false;
                let r = match (self.vm.as_mut(), replica) {
                    (Some(vm), Some(img)) => vm.restore(img, &state).map_err(|e| e.to_string()),
                    (None, _) => Err("no VMM was launched".to_string()),
                    (_, None) => Err("the replica is not open".to_string()),
                };
                if r.is_ok() && self.crash_during_switchover {
                    tracing::error!("test hook: crashing with a switchover prepared");
                    std::process::abort();
                }
                self.machine.handle_restored(r, Instant::now());
            }
            TargetAction::HashRam => {
                let r = match self.vm.as_mut() {
                    Some(vm) => vm.ram_hash().map_err(|e| e.to_string()),
                    None => Err("no VM to hash".to_string()),
                };
                self.machine.handle_hashed(r, Instant::now());
            }
            TargetAction::Resume => {
                // The services' twins take the committed epoch's state before the guest runs.
                if let Some((epoch, states)) = &self.restore_point {
                    let (services, deadline) = &self.services;
                    services.restore(&self.vm_id, *epoch, states, *deadline);
                }
                let t0 = Instant::now();
                let r = match self.vm.as_mut() {
                    Some(vm) => vm.resume().map_err(|e| e.to_string()),
                    None => Err("no VM to resume".to_string()),
                };
                tracing::debug!(vm = %self.vm_id, took = ?t0.elapsed(), "resumed");
                self.machine.handle_resumed(r, Instant::now());
            }
            TargetAction::StopVm => {
                if let Some(mut vm) = self.vm.take() {
                    vm.stop();
                }
                self.preloaded = false;
                self.endpoint.clear();
            }
            TargetAction::ClaimHold { generation } => {
                let t0 = Instant::now();
                let r = self.claim_hold(generation);
                tracing::info!(vm = %self.vm_id, generation, ok = r.is_ok(), took = ?t0.elapsed(),
                    "claimed the handed-over generation at the fencing authority");
                self.machine.handle_hold_claimed(r, Instant::now());
            }
            TargetAction::KillLeftover { pid } => fence::kill(pid),
        }
    }

    fn log(&self, e: &TargetEvent) {
        let vm = &self.vm_id;
        match e {
            TargetEvent::Prepared { ready } => tracing::info!(%vm, generation = ready.generation,
                epoch = ready.epoch, settle_us = ready.settle_us, spawn_us = ready.spawn_us,
                restore_us = ready.restore_us, "switchover prepared; waiting for the commit"),
            TargetEvent::Running {
                ready, resume_us, ..
            } => tracing::info!(%vm,
                generation = ready.generation, epoch = ready.epoch, resume_us,
                "the VM runs on this node"),
            TargetEvent::Failed {
                generation, why, ..
            } => {
                tracing::warn!(%vm, generation, "switchover or promote did not happen: {why}")
            }
            TargetEvent::Departed { generation } => tracing::info!(%vm, generation,
                "the VM's VMM here exited (it migrated away or stopped): this node is a backup for it again"),
            TargetEvent::FenceNotRecorded { fence, why } => tracing::error!(%vm,
                generation = fence.generation, state = %fence.state, "recording the fence failed: {why}"),
        }
    }

    /// Whether the fence allows starting the VM here: for promote's status line.
    pub(super) fn idle(&self) -> bool {
        !self.machine.holds_vm()
            && !self.machine.in_progress()
            && self.fence().state != FenceState::Running
    }
}

/// The fencer of a VM this backup runs: it has no pause through [`TargetVm`], so a fence stops it (fail
/// closed); it never comes back by itself.
struct StopOnFence(std::sync::Mutex<std::sync::mpsc::Sender<VmIn>>);

impl endophyte_authority::Fencer for StopOnFence {
    fn fence(&self, why: &str) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(VmIn::AuthorityFence {
                why: format!("its hold at the fencing authority could not be kept: {why}"),
            });
    }
    fn unfence(&self) {}
    fn superseded(&self, why: &str) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(VmIn::AuthorityFence {
                why: format!("another node holds it at the fencing authority: {why}"),
            });
    }
}
