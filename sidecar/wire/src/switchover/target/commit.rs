//! The commit phase of the target's switchover: the source's commit (or a promote's own) records the
//! `running` fence durably, then resumes the prepared VM and answers `SwitchedOver`.

use std::time::Instant;

use super::{us, CommitStep, Origin, Phase, TargetAction, TargetEvent, TargetSwitchover};
use crate::msg::{ErrorCode, Message};
use crate::receiver::PathKey;
use crate::switchover::FenceState;

impl TargetSwitchover {
    pub(super) fn commit(&mut self, path: PathKey, generation: u64, now: Instant) {
        match &mut self.phase {
            Phase::Running {
                generation: g,
                resume_us,
            } if *g == generation => {
                let resume_us = *resume_us;
                self.out.push_back((
                    path,
                    Message::SwitchedOver {
                        generation,
                        resume_us,
                    },
                ));
            }
            Phase::Committing { job, .. } if job.request.generation == generation => {
                // The answer goes to the latest path the source used.
                job.origin = Origin::Switchover(path);
            }
            Phase::Prepared { job, .. } if job.request.generation == generation => {
                job.origin = Origin::Switchover(path);
                self.begin_commit(generation, now);
            }
            _ => {
                let message = format!(
                    "generation {generation} is not prepared here (fence: generation {}, {}): it will not run here",
                    self.fence.generation, self.fence.state
                );
                self.out.push_back((
                    path,
                    Message::Error {
                        code: ErrorCode::SwitchoverFailed,
                        message,
                    },
                ));
            }
        }
    }

    pub(super) fn begin_commit(&mut self, generation: u64, now: Instant) {
        let Phase::Prepared { mut job, .. } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!("commit of a VM not prepared");
        };
        debug_assert_eq!(job.request.generation, generation);
        job.step_at = now;
        if self.authority && matches!(job.origin, Origin::Switchover(_)) {
            self.actions
                .push_back(TargetAction::ClaimHold { generation });
            self.phase = Phase::Committing {
                job,
                step: CommitStep::Claiming,
            };
            return;
        }
        self.record_running(job);
    }

    fn record_running(&mut self, job: super::Job) {
        self.fence.state = FenceState::Running;
        self.recording.push_back(FenceState::Running);
        self.actions.push_back(TargetAction::RecordFence {
            fence: self.fence.clone(),
            durable: true,
        });
        self.phase = Phase::Committing {
            job,
            step: CommitStep::RecordingRunning,
        };
    }

    /// The fencing authority's claim of the handed-over generation ([`TargetAction::ClaimHold`]) landed,
    /// or not (then the generation is given up here and the VM never resumes).
    pub fn handle_hold_claimed(&mut self, result: Result<(), String>, now: Instant) {
        let Phase::Committing { job, step } = &self.phase else {
            return;
        };
        if *step != CommitStep::Claiming {
            return;
        }
        if let Err(e) = result {
            let why = format!(
                "claiming generation {} at the fencing authority failed, so it was given up here without running: {e}",
                job.request.generation
            );
            return self.fail_committing(why);
        }
        let Phase::Committing { mut job, .. } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            unreachable!();
        };
        job.step_at = now;
        self.record_running(job);
    }

    /// The prepared VM was resumed ([`TargetAction::Resume`]), or not.
    pub fn handle_resumed(&mut self, result: Result<(), String>, now: Instant) {
        let Phase::Committing { job, step } = &self.phase else {
            return;
        };
        if *step != CommitStep::Resuming {
            return;
        }
        if let Err(e) = result {
            let why = format!(
                "resuming the VM failed, so generation {} was stopped here: {e}",
                job.request.generation
            );
            return self.fail_committing(why);
        }
        let resume_us = us(now - job.step_at);
        let Phase::Committing { job, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!();
        };
        let generation = job.request.generation;
        if let Origin::Switchover(path) = job.origin {
            self.out.push_back((
                path,
                Message::SwitchedOver {
                    generation,
                    resume_us,
                },
            ));
        }
        self.events.push_back(TargetEvent::Running {
            origin: job.origin,
            ready: job.ready,
            resume_us,
        });
        self.phase = Phase::Running {
            generation,
            resume_us,
        };
    }

    pub(super) fn fail_committing(&mut self, why: String) {
        let Phase::Committing { job, .. } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!();
        };
        self.actions.push_back(TargetAction::StopVm);
        self.record(FenceState::Aborted, 0, true);
        self.refuse(
            job.origin,
            job.request.generation,
            ErrorCode::SwitchoverFailed,
            why,
        );
    }
}
