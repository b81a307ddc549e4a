//! The target's half of a switchover, and promote (see the [parent module](super) for the sequence).
//!
//! One machine per VM on a backup. It owns the VM's [`Fence`] and decides; the backup's driver does what
//! [`TargetSwitchover::poll_action`] asks (start a VMM, record the fence, restore, hash, resume, stop) and
//! reports each result back with the matching `handle_*` call and the time, from which the machine
//! measures every step. Replies for the source come out of [`TargetSwitchover::poll_transmit`], addressed
//! to the path its request came on.
//!
//! Rules it keeps:
//! - a generation at or below the fence's is refused ([`ErrorCode::Fenced`]);
//! - the replica must hold exactly the final epoch of the right session;
//! - the `prepared` fence (with the VMM's pid) is recorded before the VM in that VMM gets its vCPU state
//!   (a standby may have built the VM on the replica at warm-up, but nothing can run in it before the
//!   restore), and the `running` fence is recorded durably before the guest resumes;
//! - a prepared VM never resumes without the commit: an abort, a failure, a minute without a commit, or the
//!   VMM dying stop it and record the generation as aborted;
//! - while a VM is prepared or runs here, replication into its replica is refused
//!   ([`TargetSwitchover::holds_vm`]).
//!
//! Here: the request, preparing and promote; in `commit`: the commit phase; in `standby`: the warm-up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Fence, FenceState};
use crate::msg::{ErrorCode, Message, Switchover, SwitchoverReady};
use crate::receiver::PathKey;
use crate::vmstate::VmState;

mod commit;
mod standby;

/// How long a prepared VM waits for the source's commit before it is given up.
pub const PREPARED_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a standby VMM started by a warm-up waits for its switchover.
pub const STANDBY_TIMEOUT: Duration = Duration::from_secs(600);

/// What the driver must do. Each but [`TargetAction::StopVm`], [`TargetAction::StopStandby`] and
/// [`TargetAction::KillLeftover`] is answered by its `handle_*` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetAction {
    /// A migration is coming: start a VMM with no VM yet (a standby), so that the switchover does not wait
    /// for a process to start. Answer with [`TargetSwitchover::handle_standby`].
    StartStandby,
    /// No switchover followed the warm-up: stop the standby VMM.
    StopStandby,
    /// Have a VMM process ready to take the VM: the standby if it still runs, else a new one. Answer with
    /// [`TargetSwitchover::handle_launched`] and its process id.
    Launch,
    /// Write the fence record; when `durable`, on stable storage before answering. Answer with
    /// [`TargetSwitchover::handle_fence_recorded`].
    RecordFence {
        /// The record.
        fence: Fence,
        /// Whether it must be durable before the answer.
        durable: bool,
    },
    /// Restore the VM in the launched VMM from the replica (holding the fence's epoch) as guest RAM, with
    /// this vCPU and device state, paused. Answer with [`TargetSwitchover::handle_restored`].
    Restore {
        /// The state from the source (or from the committed epoch, on promote).
        state: VmState,
    },
    /// Hash guest RAM of the prepared VM (verification). Answer with [`TargetSwitchover::handle_hashed`].
    HashRam,
    /// Resume the prepared VM. Answer with [`TargetSwitchover::handle_resumed`].
    Resume,
    /// Stop the VMM of a prepared VM that never ran, and forget it.
    StopVm,
    /// Under a fencing authority, the source's commit arrived: claim `generation` there (the source
    /// handed it to this node) before anything records or resumes it. Answer with
    /// [`TargetSwitchover::handle_hold_claimed`].
    ClaimHold {
        /// The generation handed over.
        generation: u64,
    },
    /// After a restart: a VMM a crash left behind with a prepared VM (pid from the fence) must die.
    KillLeftover {
        /// Its process id.
        pid: u32,
    },
}

/// Who asked for the VM to start here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A migration source, on this path.
    Switchover(PathKey),
    /// An operator: promote (failover) from the committed epoch.
    Promote,
}

/// What happened, for logs and for answering a promote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetEvent {
    /// The VM is prepared here, paused, waiting for the commit.
    Prepared {
        /// The preparation's report.
        ready: SwitchoverReady,
    },
    /// The VM runs here now.
    Running {
        /// Who asked.
        origin: Origin,
        /// The preparation's report (its `ram_hash` when verification was asked).
        ready: SwitchoverReady,
        /// The resume, microseconds.
        resume_us: u64,
    },
    /// A switchover or promote of `generation` failed or was given up; the VM does not run here.
    Failed {
        /// Who asked.
        origin: Origin,
        /// The generation.
        generation: u64,
        /// Why.
        why: String,
    },
    /// The VM that ran here under `generation` stopped (its VMM exited): the node is a backup again, and
    /// its replica file no longer holds any epoch (it is the RAM the VM left).
    Departed {
        /// The generation that ran.
        generation: u64,
    },
    /// A fence record could not be written; what it would have said is in force in memory.
    FenceNotRecorded {
        /// The record.
        fence: Fence,
        /// The error.
        why: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrepStep {
    Launching,
    RecordingPrepared,
    Restoring,
    Hashing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommitStep {
    Claiming,
    RecordingRunning,
    Resuming,
}

#[derive(Debug)]
struct Job {
    request: Switchover,
    origin: Origin,
    ready: SwitchoverReady,
    /// When the current step's action went out.
    step_at: Instant,
    launched: bool,
}

#[derive(Debug)]
enum Phase {
    Idle,
    Standby {
        since: Instant,
        generation: u64,
        path: PathKey,
        /// What the source was told once the standby was ready (`Some(preloaded)`).
        loaded: Option<bool>,
    },
    Preparing {
        job: Job,
        step: PrepStep,
    },
    Prepared {
        job: Job,
        since: Instant,
    },
    Committing {
        job: Job,
        step: CommitStep,
    },
    Running {
        generation: u64,
        resume_us: u64,
    },
}

/// The target's switchover (and promote) state machine for one VM. See the module docs.
#[derive(Debug)]
pub struct TargetSwitchover {
    vm_id: String,
    fence: Fence,
    phase: Phase,
    actions: VecDeque<TargetAction>,
    out: VecDeque<(PathKey, Message)>,
    events: VecDeque<TargetEvent>,
    /// Fence writes asked and not yet answered, oldest first, to know what each answer is about.
    recording: VecDeque<FenceState>,
    /// A switchover's commit claims the generation at a fencing authority first.
    authority: bool,
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl TargetSwitchover {
    /// The machine for VM `vm_id` whose fence on disk is `fence` (default when there is none). After a
    /// restart, `vmm_alive` says whether the process in `fence.vmm_pid` still runs: a prepared VM left by a
    /// crash is killed and aborted (it never ran, because `running` is recorded before the resume); a
    /// running VM whose VMM is gone has departed; one whose VMM lives still runs here.
    pub fn new(vm_id: String, fence: Fence, vmm_alive: bool) -> Self {
        let mut m = Self {
            vm_id,
            fence,
            phase: Phase::Idle,
            actions: VecDeque::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            recording: VecDeque::new(),
            authority: false,
        };
        match m.fence.state {
            FenceState::Prepared => {
                if m.fence.vmm_pid != 0 {
                    m.actions.push_back(TargetAction::KillLeftover {
                        pid: m.fence.vmm_pid,
                    });
                }
                let generation = m.fence.generation;
                m.record(FenceState::Aborted, 0, true);
                m.events.push_back(TargetEvent::Failed {
                    origin: Origin::Promote,
                    generation,
                    why: "a switchover was left prepared by a crash: its VM never ran; aborted"
                        .into(),
                });
            }
            FenceState::Running if vmm_alive => {
                m.phase = Phase::Running {
                    generation: m.fence.generation,
                    resume_us: 0,
                };
            }
            FenceState::Running => {
                let generation = m.fence.generation;
                m.record(FenceState::Departed, 0, true);
                m.events.push_back(TargetEvent::Departed { generation });
            }
            _ => {}
        }
        m
    }

    /// Under a fencing authority: a switchover's commit claims the handed-over generation there
    /// ([`TargetAction::ClaimHold`]) before the `running` fence is recorded and the VM resumed.
    pub fn with_authority(mut self) -> Self {
        self.authority = true;
        self
    }

    /// The fence in force.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Whether a VM is prepared, being prepared or running here: replication into its replica is refused.
    pub fn holds_vm(&self) -> bool {
        matches!(
            self.phase,
            Phase::Preparing { .. }
                | Phase::Prepared { .. }
                | Phase::Committing { .. }
                | Phase::Running { .. }
        )
    }

    /// Whether the VM runs here.
    pub fn runs_here(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    /// Whether a switchover or promote is under way here (neither idle nor running).
    pub fn in_progress(&self) -> bool {
        matches!(
            self.phase,
            Phase::Preparing { .. } | Phase::Prepared { .. } | Phase::Committing { .. }
        )
    }

    /// Whether a warm-up's standby VMM is waiting.
    pub fn has_standby(&self) -> bool {
        matches!(self.phase, Phase::Standby { .. })
    }

    /// A switchover message from the source on `path`: `Switchover`, `SwitchoverCommit`,
    /// `SwitchoverAbort` or `SwitchoverWarmup`. `replica` is what the replica holds committed:
    /// `(epoch, session)`. Returns `false` (and does nothing) for any other message.
    pub fn handle_message(
        &mut self,
        path: PathKey,
        msg: &Message,
        replica: (u64, u64),
        now: Instant,
    ) -> bool {
        match msg {
            Message::Switchover(sw) => {
                self.switchover(Origin::Switchover(path), sw.clone(), replica, now)
            }
            Message::SwitchoverCommit { generation } => self.commit(path, *generation, now),
            Message::SwitchoverAbort { generation } => {
                self.abort(*generation, "the source abandoned it")
            }
            Message::SwitchoverWarmup { generation } => self.warm_up(path, *generation, now),
            _ => return false,
        }
        true
    }

    /// Promote (failover): start the VM here from the committed epoch `replica` with its saved `state`,
    /// under the next generation, and resume it at once when prepared. The outcome comes as a
    /// [`TargetEvent::Running`] or [`TargetEvent::Failed`] with [`Origin::Promote`].
    ///
    /// # Errors
    /// At once, when the VM already runs here or a switchover is in progress; nothing changed.
    pub fn handle_promote(
        &mut self,
        replica: (u64, u64),
        state: VmState,
        verify: bool,
        now: Instant,
    ) -> Result<u64, String> {
        let generation = self.fence.generation + 1;
        self.handle_promote_at(replica, state, verify, generation, now)
    }

    /// Promote under `generation`, which a fencing authority granted this node
    /// ([`crate::authority::promote`]): as [`TargetSwitchover::handle_promote`], but the generation is the
    /// authority's, and must be above every generation this node has seen.
    ///
    /// # Errors
    /// As [`TargetSwitchover::handle_promote`]; a generation at or below the fence's.
    pub fn handle_promote_at(
        &mut self,
        replica: (u64, u64),
        state: VmState,
        verify: bool,
        generation: u64,
        now: Instant,
    ) -> Result<u64, String> {
        if generation <= self.fence.generation {
            return Err(format!(
                "generation {generation} is stale: this node has seen generation {} ({}) of VM {:?}",
                self.fence.generation, self.fence.state, self.vm_id
            ));
        }
        if self.runs_here() || self.fence.state == FenceState::Running {
            return Err(format!(
                "VM {:?} already runs on this node (generation {})",
                self.vm_id, self.fence.generation
            ));
        }
        if self.in_progress() {
            return Err(format!(
                "a switchover of VM {:?} is in progress here",
                self.vm_id
            ));
        }
        let request = Switchover {
            generation,
            session: replica.1,
            epoch: replica.0,
            verify,
            state,
        };
        self.switchover(Origin::Promote, request, replica, now);
        Ok(generation)
    }

    fn refuse(&mut self, origin: Origin, generation: u64, code: ErrorCode, why: String) {
        if let Origin::Switchover(path) = origin {
            self.out.push_back((
                path,
                Message::Error {
                    code,
                    message: why.clone(),
                },
            ));
        }
        self.events.push_back(TargetEvent::Failed {
            origin,
            generation,
            why,
        });
    }

    fn switchover(
        &mut self,
        origin: Origin,
        request: Switchover,
        replica: (u64, u64),
        now: Instant,
    ) {
        let generation = request.generation;
        match &self.phase {
            Phase::Prepared { job, .. } if job.request.generation == generation => {
                // A repeat (its first answer may have been lost with a path): answer it again.
                if let Origin::Switchover(path) = origin {
                    self.out
                        .push_back((path, Message::SwitchoverReady(job.ready.clone())));
                }
                return;
            }
            Phase::Preparing { job, .. } | Phase::Committing { job, .. }
                if job.request.generation == generation =>
            {
                return;
            }
            Phase::Running { generation: g, .. } if *g == generation => return,
            Phase::Running { generation: g, .. } => {
                let why = format!("VM {:?} runs on this node (generation {g})", self.vm_id);
                return self.refuse(origin, generation, ErrorCode::Fenced, why);
            }
            Phase::Preparing { job, .. }
            | Phase::Prepared { job, .. }
            | Phase::Committing { job, .. } => {
                let why = format!(
                    "a switchover of generation {} is in progress here",
                    job.request.generation
                );
                return self.refuse(origin, generation, ErrorCode::SwitchoverFailed, why);
            }
            Phase::Idle | Phase::Standby { .. } => {}
        }
        if generation <= self.fence.generation {
            let why = format!(
                "generation {generation} is stale: this node has seen generation {} ({}) of VM {:?}",
                self.fence.generation, self.fence.state, self.vm_id
            );
            return self.refuse(origin, generation, ErrorCode::Fenced, why);
        }
        if replica != (request.epoch, request.session) {
            let why = format!(
                "the replica holds epoch {} of session {:x}, not the final epoch {} of session {:x}",
                replica.0, replica.1, request.epoch, request.session
            );
            return self.refuse(origin, generation, ErrorCode::SwitchoverFailed, why);
        }
        let ready = SwitchoverReady {
            generation,
            epoch: request.epoch,
            ..SwitchoverReady::default()
        };
        self.phase = Phase::Preparing {
            job: Job {
                request,
                origin,
                ready,
                step_at: now,
                launched: false,
            },
            step: PrepStep::Launching,
        };
        self.actions.push_back(TargetAction::Launch);
    }

    /// The VMM for the VM is up ([`TargetAction::Launch`]), with process id `pid`; or it failed.
    pub fn handle_launched(&mut self, result: Result<u32, String>, now: Instant) {
        let Phase::Preparing { job, step } = &mut self.phase else {
            return;
        };
        if *step != PrepStep::Launching {
            return;
        }
        let pid = match result {
            Ok(pid) => pid,
            Err(e) => return self.fail_preparing(format!("starting the VMM: {e}")),
        };
        job.ready.spawn_us = us(now - job.step_at);
        job.step_at = now;
        job.launched = true;
        *step = PrepStep::RecordingPrepared;
        let (epoch, session, generation) = (
            job.request.epoch,
            job.request.session,
            job.request.generation,
        );
        // Before any VM exists in that VMM: after a crash, this node knows which process may map the
        // replica, and that the generation never ran.
        self.fence = Fence {
            generation,
            state: FenceState::Prepared,
            epoch,
            session,
            vmm_pid: pid,
        };
        self.recording.push_back(FenceState::Prepared);
        self.actions.push_back(TargetAction::RecordFence {
            fence: self.fence.clone(),
            durable: false,
        });
    }

    /// The fence record asked by [`TargetAction::RecordFence`] was written, or not.
    pub fn handle_fence_recorded(&mut self, result: Result<(), String>, now: Instant) {
        let what = self.recording.pop_front();
        if let Err(e) = &result {
            self.events.push_back(TargetEvent::FenceNotRecorded {
                fence: self.fence.clone(),
                why: e.clone(),
            });
        }
        match (&mut self.phase, what) {
            (Phase::Preparing { job, step }, Some(FenceState::Prepared))
                if *step == PrepStep::RecordingPrepared =>
            {
                if let Err(e) = result {
                    return self.fail_preparing(format!("recording the prepared fence: {e}"));
                }
                job.ready.settle_us = us(now - job.step_at);
                job.step_at = now;
                *step = PrepStep::Restoring;
                let state = job.request.state.clone();
                self.actions.push_back(TargetAction::Restore { state });
            }
            (Phase::Committing { job, step }, Some(FenceState::Running))
                if *step == CommitStep::RecordingRunning =>
            {
                if let Err(e) = result {
                    // Not resumed, and never will be: give the generation up so the source may resume.
                    let why = format!(
                        "recording the commit failed, so generation {} was given up here without running: {e}",
                        job.request.generation
                    );
                    return self.fail_committing(why);
                }
                job.step_at = now;
                *step = CommitStep::Resuming;
                self.actions.push_back(TargetAction::Resume);
            }
            _ => {}
        }
    }

    /// The VM was restored, paused ([`TargetAction::Restore`]), or not.
    pub fn handle_restored(&mut self, result: Result<(), String>, now: Instant) {
        let Phase::Preparing { job, step } = &mut self.phase else {
            return;
        };
        if *step != PrepStep::Restoring {
            return;
        }
        if let Err(e) = result {
            return self.fail_preparing(format!("restoring the VM: {e}"));
        }
        job.ready.restore_us = us(now - job.step_at);
        job.step_at = now;
        if job.request.verify {
            *step = PrepStep::Hashing;
            self.actions.push_back(TargetAction::HashRam);
        } else {
            self.prepared(now);
        }
    }

    /// Guest RAM was hashed ([`TargetAction::HashRam`]): BLAKE3, hex; or not.
    pub fn handle_hashed(&mut self, result: Result<String, String>, now: Instant) {
        let Phase::Preparing { job, step } = &mut self.phase else {
            return;
        };
        if *step != PrepStep::Hashing {
            return;
        }
        match result {
            Ok(h) => job.ready.ram_hash = h,
            Err(e) => return self.fail_preparing(format!("hashing guest RAM: {e}")),
        }
        job.ready.verify_us = us(now - job.step_at);
        job.step_at = now;
        self.prepared(now);
    }

    fn prepared(&mut self, now: Instant) {
        let Phase::Preparing { job, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("prepared outside preparing");
        };
        let ready = job.ready.clone();
        self.events.push_back(TargetEvent::Prepared {
            ready: ready.clone(),
        });
        let origin = job.origin;
        let generation = job.request.generation;
        self.phase = Phase::Prepared { job, since: now };
        match origin {
            Origin::Switchover(path) => self.out.push_back((path, Message::SwitchoverReady(ready))),
            // Promote commits itself: there is no source to wait for.
            Origin::Promote => self.begin_commit(generation, now),
        }
    }

    fn fail_preparing(&mut self, why: String) {
        let Phase::Preparing { job, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!();
        };
        if job.launched {
            self.actions.push_back(TargetAction::StopVm);
        }
        let generation = job.request.generation;
        if self.fence.generation == generation {
            self.record(FenceState::Aborted, 0, false);
        }
        let why = format!("preparing the VM on this node's replica failed: {why}");
        self.refuse(job.origin, generation, ErrorCode::SwitchoverFailed, why);
    }

    fn abort(&mut self, generation: u64, why: &str) {
        match &self.phase {
            Phase::Preparing { job, .. } | Phase::Prepared { job, .. }
                if job.request.generation == generation =>
            {
                let launched = match &self.phase {
                    Phase::Preparing { job, .. } => job.launched,
                    _ => true,
                };
                let origin = job.origin;
                self.phase = Phase::Idle;
                if launched {
                    self.actions.push_back(TargetAction::StopVm);
                }
                self.fence.generation = generation;
                self.record(FenceState::Aborted, 0, true);
                self.events.push_back(TargetEvent::Failed {
                    origin,
                    generation,
                    why: why.to_string(),
                });
            }
            // Too late: the commit came first (the source never aborts after committing).
            Phase::Committing { .. } | Phase::Running { .. } => {}
            _ if generation > self.fence.generation => {
                // An abort that overtook its switchover (on another path): that generation never starts.
                self.fence.generation = generation;
                self.record(FenceState::Aborted, 0, true);
            }
            _ => {}
        }
    }

    /// The VMM holding this VM exited (the driver watches it).
    pub fn handle_vmm_exited(&mut self, now: Instant) {
        let _ = now;
        match &self.phase {
            Phase::Running { generation, .. } => {
                let generation = *generation;
                self.phase = Phase::Idle;
                self.record(FenceState::Departed, 0, true);
                self.events.push_back(TargetEvent::Departed { generation });
            }
            Phase::Preparing { job, .. } | Phase::Prepared { job, .. } => {
                let generation = job.request.generation;
                self.abort(generation, "the VMM holding the prepared VM exited");
            }
            Phase::Standby { .. } => self.phase = Phase::Idle,
            Phase::Committing { .. } | Phase::Idle => {}
        }
    }

    /// Time passed: a prepared VM without a commit for [`PREPARED_TIMEOUT`] is given up; an unused standby
    /// VMM stops after [`STANDBY_TIMEOUT`].
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Prepared { job, since } if now >= *since + PREPARED_TIMEOUT => {
                let generation = job.request.generation;
                self.abort(
                    generation,
                    &format!("no commit for the prepared switchover within {PREPARED_TIMEOUT:?}"),
                );
            }
            Phase::Standby { since, .. } if now >= *since + STANDBY_TIMEOUT => {
                self.phase = Phase::Idle;
                self.actions.push_back(TargetAction::StopStandby);
            }
            _ => {}
        }
    }

    /// When [`TargetSwitchover::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Prepared { since, .. } => Some(*since + PREPARED_TIMEOUT),
            Phase::Standby { since, .. } => Some(*since + STANDBY_TIMEOUT),
            _ => None,
        }
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<TargetAction> {
        self.actions.pop_front()
    }

    /// The next reply for a source, with the path to send it on.
    pub fn poll_transmit(&mut self) -> Option<(PathKey, Message)> {
        self.out.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<TargetEvent> {
        self.events.pop_front()
    }

    fn record(&mut self, state: FenceState, vmm_pid: u32, durable: bool) {
        self.fence.state = state;
        self.fence.vmm_pid = vmm_pid;
        self.recording.push_back(state);
        self.actions.push_back(TargetAction::RecordFence {
            fence: self.fence.clone(),
            durable,
        });
    }
}

#[cfg(test)]
mod tests;
