//! The source's half of a switchover (see the [parent module](super) for the sequence).
//!
//! Created when the final epoch is cut with the guest paused; owned and fed by the [`crate::Sender`], which
//! reports the target's commits, its messages and the loss of its paths, and sends what
//! [`SourceSwitchover::poll_transmit`] asks on one of the target's paths. It ends with exactly one
//! [`SwitchoverOutcome`], which tells the driver what to do with the paused guest.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::msg::{ErrorCode, Message, Switchover, SwitchoverReady};

/// How long the source waits at each step, and how often it repeats an unanswered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From the pause until the target committed the final epoch.
    pub final_commit: Duration,
    /// From sending `Switchover` until `SwitchoverReady`.
    pub ready: Duration,
    /// From sending `SwitchoverCommit` until `SwitchedOver`.
    pub switched: Duration,
    /// An unanswered `Switchover` or `SwitchoverCommit` goes out again this often (the target answers a
    /// repeat as it answered the first, so a request whose path died gets through on another).
    pub resend: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            final_commit: Duration::from_secs(10),
            ready: Duration::from_secs(10),
            switched: Duration::from_secs(10),
            resend: Duration::from_secs(1),
        }
    }
}

/// Where the source's switchover stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePhase {
    /// The final epoch is on its way; the target has not committed it yet.
    AwaitingFinalCommit,
    /// `Switchover` was sent; the target is preparing the VM.
    AwaitingReady,
    /// The target is ready; the fencing authority is handing the next generation to it (the commit point
    /// under an authority): nothing is sent and nothing ends the switchover until its verdict.
    AwaitingAuthority,
    /// `SwitchoverCommit` was sent: the source never resumes unless the target gives up the generation
    /// (and, under an authority, not even then: the generation was handed over).
    AwaitingSwitched,
    /// The outcome is out.
    Finished,
}

/// When each step completed, for the downtime breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceTimeline {
    /// The guest's pause (the machine's creation).
    pub paused: Instant,
    /// The target's `Committed` for the final epoch arrived.
    pub final_committed: Option<Instant>,
    /// `SwitchoverReady` arrived (the commit went out at once).
    pub ready: Option<Instant>,
    /// `SwitchedOver` arrived.
    pub switched: Option<Instant>,
}

/// How a switchover ended, and so what the driver does with the paused guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchoverOutcome {
    /// The guest runs on the target under `generation`: stop the source VM for good.
    SwitchedOver {
        /// The generation the VM runs under there.
        generation: u64,
        /// The target's preparation, with its step durations.
        ready: SwitchoverReady,
        /// The target's resume, microseconds.
        resume_us: u64,
        /// When each step completed here.
        timeline: SourceTimeline,
    },
    /// Nothing runs on the target (it never got the commit, or it gave the generation up): resume the
    /// guest here.
    Abandoned {
        /// The generation given up.
        generation: u64,
        /// Why, for the operator.
        why: String,
    },
    /// The commit went out and the target did not confirm: the guest may run there, so it stays paused
    /// here until an operator looks (the target's fence says what happened).
    InDoubt {
        /// The generation in doubt.
        generation: u64,
        /// Why, for the operator.
        why: String,
    },
}

/// What the fencing authority made of a switchover's hand-over ([`crate::authority::hand_over`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthorityVerdict {
    /// The next generation is the target's: commit.
    HandedOver,
    /// It did not land, and this node still holds its generation: the switchover is abandoned and the
    /// source may resume.
    NotHandedOver {
        /// Why.
        why: String,
    },
    /// Whether it landed is unknown, or someone else holds the VM now: the guest stays paused.
    Unknown {
        /// Why.
        why: String,
    },
}

/// The source's switchover state machine. See the module docs.
#[derive(Debug)]
pub struct SourceSwitchover {
    request: Switchover,
    target: String,
    timeouts: Timeouts,
    phase: SourcePhase,
    timeline: SourceTimeline,
    deadline: Instant,
    resend_at: Option<Instant>,
    ready: Option<SwitchoverReady>,
    out: VecDeque<Message>,
    outcome: Option<SwitchoverOutcome>,
    /// The commit point is the fencing authority's hand-over ([`SourceSwitchover::with_authority`]).
    authority: bool,
    /// The hand-over was asked for and not yet reported by [`SourceSwitchover::poll_authority`].
    ask_authority: bool,
    /// The authority handed the generation over: the source never resumes.
    handed_over: bool,
    /// A refusal or loss of the target that came while the authority decided.
    pending_failure: Option<String>,
}

impl SourceSwitchover {
    /// A switchover to the backup named `target` of `request` (final epoch, generation, state), begun at
    /// the guest's pause `now`.
    pub fn new(request: Switchover, target: String, timeouts: Timeouts, now: Instant) -> Self {
        Self {
            request,
            target,
            timeouts,
            phase: SourcePhase::AwaitingFinalCommit,
            timeline: SourceTimeline {
                paused: now,
                final_committed: None,
                ready: None,
                switched: None,
            },
            deadline: now + timeouts.final_commit,
            resend_at: None,
            ready: None,
            out: VecDeque::new(),
            outcome: None,
            authority: false,
            ask_authority: false,
            handed_over: false,
            pending_failure: None,
        }
    }

    /// Under a fencing authority: once the target is ready, the commit waits for the authority to hand
    /// the next generation to it ([`SourceSwitchover::poll_authority`], answered by
    /// [`SourceSwitchover::handle_authority`]); after that the source never resumes.
    pub fn with_authority(mut self) -> Self {
        self.authority = true;
        self
    }

    /// The hand-over to ask the authority for, once: `(generation, target)`.
    pub fn poll_authority(&mut self) -> Option<(u64, String)> {
        if std::mem::take(&mut self.ask_authority) {
            Some((self.request.generation, self.target.clone()))
        } else {
            None
        }
    }

    /// The authority's verdict on the hand-over.
    pub fn handle_authority(&mut self, verdict: AuthorityVerdict, now: Instant) {
        if self.phase != SourcePhase::AwaitingAuthority {
            return;
        }
        match verdict {
            AuthorityVerdict::HandedOver => {
                self.handed_over = true;
                if let Some(why) = self.pending_failure.take() {
                    // The target gave up while the authority handed it the generation: nobody may run it.
                    let why = self.in_doubt_why(&format!(
                        "the authority handed it the generation, but it had already failed: {why}"
                    ));
                    self.out.push_back(Message::SwitchoverAbort {
                        generation: self.request.generation,
                    });
                    return self.finish(SwitchoverOutcome::InDoubt {
                        generation: self.request.generation,
                        why,
                    });
                }
                self.phase = SourcePhase::AwaitingSwitched;
                self.deadline = now + self.timeouts.switched;
                self.send(
                    Message::SwitchoverCommit {
                        generation: self.request.generation,
                    },
                    now,
                );
            }
            AuthorityVerdict::NotHandedOver { why } => self.abandon(
                format!("the fencing authority did not hand the VM over: {why}"),
                true,
            ),
            AuthorityVerdict::Unknown { why } => {
                let why = self.in_doubt_why(&format!("the fencing authority's hand-over: {why}"));
                self.out.push_back(Message::SwitchoverAbort {
                    generation: self.request.generation,
                });
                self.finish(SwitchoverOutcome::InDoubt {
                    generation: self.request.generation,
                    why,
                });
            }
        }
    }

    /// The switchover's generation.
    pub fn generation(&self) -> u64 {
        self.request.generation
    }

    /// The final epoch.
    pub fn epoch(&self) -> u64 {
        self.request.epoch
    }

    /// Where it stands.
    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// The target committed `epoch`: if that is the final epoch, ask it to prepare the VM.
    pub fn handle_committed(&mut self, epoch: u64, now: Instant) {
        if self.phase != SourcePhase::AwaitingFinalCommit || epoch < self.request.epoch {
            return;
        }
        self.timeline.final_committed = Some(now);
        self.phase = SourcePhase::AwaitingReady;
        self.deadline = now + self.timeouts.ready;
        self.send(Message::Switchover(self.request.clone()), now);
    }

    /// The target answered `SwitchoverReady`: commit.
    pub fn handle_ready(&mut self, ready: SwitchoverReady, now: Instant) {
        if ready.generation != self.request.generation || self.phase != SourcePhase::AwaitingReady {
            // A repeat, or one that crossed our Abort: never commit outside AwaitingReady.
            return;
        }
        self.timeline.ready = Some(now);
        self.ready = Some(ready);
        if self.authority {
            self.phase = SourcePhase::AwaitingAuthority;
            self.ask_authority = true;
            self.deadline = now + self.timeouts.ready;
            self.resend_at = None;
            return;
        }
        self.phase = SourcePhase::AwaitingSwitched;
        self.deadline = now + self.timeouts.switched;
        self.send(
            Message::SwitchoverCommit {
                generation: self.request.generation,
            },
            now,
        );
    }

    /// The target answered `SwitchedOver`: done.
    pub fn handle_switched(&mut self, generation: u64, resume_us: u64, now: Instant) {
        if generation != self.request.generation || self.phase != SourcePhase::AwaitingSwitched {
            return;
        }
        self.timeline.switched = Some(now);
        let ready = self.ready.clone().expect("ready before the commit");
        self.finish(SwitchoverOutcome::SwitchedOver {
            generation,
            ready,
            resume_us,
            timeline: self.timeline,
        });
    }

    /// The target sent an `Error`. Before the commit it is a refusal (abandon); after it, only
    /// [`ErrorCode::SwitchoverFailed`] says the target gave the generation up.
    pub fn handle_error(&mut self, code: ErrorCode, message: &str, now: Instant) {
        let _ = now;
        let target = &self.target;
        match self.phase {
            SourcePhase::AwaitingFinalCommit => {
                let why = format!(
                    "target {target} refused the final epoch {}: {message}",
                    self.request.epoch
                );
                self.abandon(why, false);
            }
            SourcePhase::AwaitingReady => {
                let why = format!("target {target} refused the switchover: {message}");
                self.abandon(why, true);
            }
            SourcePhase::AwaitingAuthority => {
                self.pending_failure = Some(format!("target {target} said: {message}"));
            }
            SourcePhase::AwaitingSwitched if code == ErrorCode::SwitchoverFailed => {
                let why = format!(
                    "target {target} gave up generation {} after the commit, without running it: {message}",
                    self.request.generation
                );
                self.abandon(why, false);
            }
            SourcePhase::AwaitingSwitched => {
                let why =
                    self.in_doubt_why(&format!("it answered the commit with an error: {message}"));
                self.finish(SwitchoverOutcome::InDoubt {
                    generation: self.request.generation,
                    why,
                });
            }
            SourcePhase::Finished => {}
        }
    }

    /// Every path to the target went down. Before the commit the switchover is abandoned at once (the
    /// final epoch cannot commit, or the target is unreachable while the guest stands still); after it,
    /// the commit is repeated on any path that comes back, until the deadline.
    pub fn handle_target_lost(&mut self, now: Instant) {
        let _ = now;
        match self.phase {
            SourcePhase::AwaitingFinalCommit => {
                let why = format!(
                    "every path to target {} went down before it committed the final epoch {}",
                    self.target, self.request.epoch
                );
                self.abandon(why, false);
            }
            SourcePhase::AwaitingReady => {
                let why = format!(
                    "every path to target {} went down while it prepared the VM; it was never told to resume it",
                    self.target
                );
                self.abandon(why, true);
            }
            SourcePhase::AwaitingAuthority => {
                self.pending_failure =
                    Some(format!("every path to target {} went down", self.target));
            }
            SourcePhase::AwaitingSwitched | SourcePhase::Finished => {}
        }
    }

    /// Time passed: repeat an unanswered request, or give up at the step's deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == SourcePhase::Finished {
            return;
        }
        if now >= self.deadline {
            let target = &self.target;
            match self.phase {
                SourcePhase::AwaitingFinalCommit => {
                    let why = format!(
                        "target {target} did not commit the final epoch {} within {:?}",
                        self.request.epoch, self.timeouts.final_commit
                    );
                    self.abandon(why, false);
                }
                SourcePhase::AwaitingReady => {
                    let why = format!(
                        "target {target} did not get the VM ready within {:?}; it was never told to resume it",
                        self.timeouts.ready
                    );
                    self.abandon(why, true);
                }
                SourcePhase::AwaitingAuthority => {
                    let why = self.in_doubt_why(&format!(
                        "the fencing authority gave no verdict on the hand-over within {:?}",
                        self.timeouts.ready
                    ));
                    self.finish(SwitchoverOutcome::InDoubt {
                        generation: self.request.generation,
                        why,
                    });
                }
                SourcePhase::AwaitingSwitched => {
                    let why = self
                        .in_doubt_why(&format!("no answer within {:?}", self.timeouts.switched));
                    self.finish(SwitchoverOutcome::InDoubt {
                        generation: self.request.generation,
                        why,
                    });
                }
                SourcePhase::Finished => {}
            }
            return;
        }
        if self.resend_at.is_some_and(|t| now >= t) {
            let msg = match self.phase {
                SourcePhase::AwaitingReady => Message::Switchover(self.request.clone()),
                SourcePhase::AwaitingSwitched => Message::SwitchoverCommit {
                    generation: self.request.generation,
                },
                _ => return,
            };
            self.send(msg, now);
        }
    }

    /// The next message for the target, if any.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.out.pop_front()
    }

    /// The outcome, once (then `None`).
    pub fn poll_outcome(&mut self) -> Option<SwitchoverOutcome> {
        self.outcome.take()
    }

    /// When [`SourceSwitchover::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == SourcePhase::Finished {
            return None;
        }
        Some(
            self.resend_at
                .map_or(self.deadline, |r| r.min(self.deadline)),
        )
    }

    fn send(&mut self, msg: Message, now: Instant) {
        self.out.push_back(msg);
        self.resend_at = Some(now + self.timeouts.resend);
    }

    fn in_doubt_why(&self, detail: &str) -> String {
        format!(
            "target {} did not confirm resuming generation {} after the commit ({detail}): the guest stays paused here, since it may run there; check the target (its fence.json and VMM) before doing anything",
            self.target, self.request.generation
        )
    }

    fn abandon(&mut self, why: String, tell_target: bool) {
        if self.handed_over {
            // The generation is the target's at the authority: this copy must never run again.
            let why = self.in_doubt_why(&why);
            return self.finish(SwitchoverOutcome::InDoubt {
                generation: self.request.generation,
                why,
            });
        }
        if tell_target {
            self.out.push_back(Message::SwitchoverAbort {
                generation: self.request.generation,
            });
        }
        self.finish(SwitchoverOutcome::Abandoned {
            generation: self.request.generation,
            why,
        });
    }

    fn finish(&mut self, outcome: SwitchoverOutcome) {
        self.phase = SourcePhase::Finished;
        self.resend_at = None;
        self.outcome = Some(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmstate::VmState;

    fn machine(now: Instant) -> SourceSwitchover {
        let request = Switchover {
            generation: 4,
            session: 9,
            epoch: 20,
            verify: false,
            state: VmState::new("testvm", 1, vec![1, 2, 3]).unwrap(),
        };
        SourceSwitchover::new(request, "b2".into(), Timeouts::default(), now)
    }

    fn ready() -> SwitchoverReady {
        SwitchoverReady {
            generation: 4,
            epoch: 20,
            ..SwitchoverReady::default()
        }
    }

    #[test]
    fn the_happy_path_sends_switchover_then_commit_and_ends_switched_over() {
        let t = Instant::now();
        let mut m = machine(t);
        m.handle_committed(19, t);
        assert!(m.poll_transmit().is_none(), "not the final epoch");
        m.handle_committed(20, t + Duration::from_millis(5));
        assert!(matches!(m.poll_transmit(), Some(Message::Switchover(s)) if s.generation == 4));
        m.handle_ready(ready(), t + Duration::from_millis(9));
        assert_eq!(
            m.poll_transmit(),
            Some(Message::SwitchoverCommit { generation: 4 })
        );
        m.handle_switched(4, 50, t + Duration::from_millis(11));
        match m.poll_outcome() {
            Some(SwitchoverOutcome::SwitchedOver {
                resume_us,
                timeline,
                ..
            }) => {
                assert_eq!(resume_us, 50);
                assert_eq!(timeline.final_committed, Some(t + Duration::from_millis(5)));
                assert_eq!(timeline.switched, Some(t + Duration::from_millis(11)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_refusal_before_the_commit_abandons_at_once_and_tells_the_target() {
        let t = Instant::now();
        let mut m = machine(t);
        m.handle_committed(20, t);
        m.poll_transmit();
        m.handle_error(ErrorCode::Internal, "disk on fire", t);
        assert_eq!(
            m.poll_transmit(),
            Some(Message::SwitchoverAbort { generation: 4 })
        );
        assert!(matches!(
            m.poll_outcome(),
            Some(SwitchoverOutcome::Abandoned { why, .. }) if why.contains("disk on fire")
        ));
    }

    #[test]
    fn after_the_commit_only_a_given_up_generation_resumes_the_source() {
        let t = Instant::now();
        for (code, resumes) in [
            (ErrorCode::SwitchoverFailed, true),
            (ErrorCode::Internal, false),
            (ErrorCode::Fenced, false),
        ] {
            let mut m = machine(t);
            m.handle_committed(20, t);
            m.handle_ready(ready(), t);
            m.handle_error(code, "x", t);
            let o = m.poll_outcome().unwrap();
            assert_eq!(
                matches!(o, SwitchoverOutcome::Abandoned { .. }),
                resumes,
                "{code:?}: {o:?}"
            );
        }
    }

    #[test]
    fn requests_repeat_until_the_deadline() {
        let t = Instant::now();
        let mut m = machine(t);
        m.handle_committed(20, t);
        m.poll_transmit();
        let mut sent = 0;
        let mut now = t;
        while m.phase() != SourcePhase::Finished {
            now = m.poll_timeout().unwrap();
            m.handle_timeout(now);
            while let Some(msg) = m.poll_transmit() {
                if matches!(msg, Message::Switchover(_)) {
                    sent += 1;
                }
            }
        }
        assert_eq!(now, t + Duration::from_secs(10));
        assert_eq!(sent, 9, "once a second until the 10 s deadline");
        assert!(matches!(
            m.poll_outcome(),
            Some(SwitchoverOutcome::Abandoned { .. })
        ));
    }

    #[test]
    fn a_silent_target_after_the_commit_leaves_the_guest_in_doubt() {
        let t = Instant::now();
        let mut m = machine(t);
        m.handle_committed(20, t);
        m.handle_ready(ready(), t);
        m.handle_target_lost(t);
        assert_ne!(m.phase(), SourcePhase::Finished, "paths may come back");
        m.handle_timeout(t + Duration::from_secs(10));
        assert!(matches!(
            m.poll_outcome(),
            Some(SwitchoverOutcome::InDoubt { .. })
        ));
    }

    #[test]
    fn a_ready_after_giving_up_never_commits() {
        let t = Instant::now();
        let mut m = machine(t);
        m.handle_committed(20, t);
        m.handle_timeout(t + Duration::from_secs(10));
        assert!(matches!(
            m.poll_outcome(),
            Some(SwitchoverOutcome::Abandoned { .. })
        ));
        while m.poll_transmit().is_some() {}
        m.handle_ready(ready(), t + Duration::from_secs(11));
        assert_eq!(m.poll_transmit(), None);
        assert_eq!(m.poll_outcome(), None);
    }

    /// Under an authority the commit waits for the hand-over; once handed over, nothing resumes the
    /// source, not even a target that gives the generation up.
    #[test]
    fn under_an_authority_the_commit_waits_for_the_hand_over_and_never_resumes_after_it() {
        let t = Instant::now();
        let mut m = machine(t).with_authority();
        m.handle_committed(20, t);
        assert!(matches!(m.poll_transmit(), Some(Message::Switchover(_))));
        m.handle_ready(ready(), t);
        assert_eq!(m.poll_transmit(), None, "no commit before the authority");
        assert_eq!(m.poll_authority(), Some((4, "b2".to_string())));
        assert_eq!(m.poll_authority(), None);
        // A target error while the authority decides ends nothing yet.
        m.handle_target_lost(t);
        assert_eq!(m.poll_outcome(), None);
        m.handle_authority(AuthorityVerdict::HandedOver, t);
        // It failed meanwhile: in doubt, and the target is told to drop what it prepared.
        assert_eq!(
            m.poll_transmit(),
            Some(Message::SwitchoverAbort { generation: 4 })
        );
        assert!(matches!(
            m.poll_outcome(),
            Some(SwitchoverOutcome::InDoubt { .. })
        ));

        let mut m = machine(t).with_authority();
        m.handle_committed(20, t);
        m.handle_ready(ready(), t);
        m.poll_transmit();
        m.handle_authority(AuthorityVerdict::HandedOver, t);
        assert_eq!(
            m.poll_transmit(),
            Some(Message::SwitchoverCommit { generation: 4 })
        );
        m.handle_error(ErrorCode::SwitchoverFailed, "gave it up", t);
        assert!(
            matches!(m.poll_outcome(), Some(SwitchoverOutcome::InDoubt { .. })),
            "a handed-over source must not resume"
        );
    }

    #[test]
    fn a_hand_over_that_did_not_land_abandons_and_tells_the_target() {
        let t = Instant::now();
        let mut m = machine(t).with_authority();
        m.handle_committed(20, t);
        m.handle_ready(ready(), t);
        m.poll_transmit();
        m.handle_authority(
            AuthorityVerdict::NotHandedOver {
                why: "etcd unreachable".into(),
            },
            t,
        );
        assert_eq!(
            m.poll_transmit(),
            Some(Message::SwitchoverAbort { generation: 4 })
        );
        assert!(matches!(
            m.poll_outcome(),
            Some(SwitchoverOutcome::Abandoned { why, .. }) if why.contains("etcd unreachable")
        ));
    }
}
