//! The holder's side of the authority: keep the lease alive, and fence the guest before the lease can
//! have expired at the server.
//!
//! The argument: a keep-alive sent at `s` (on this node's boot clock) reaches the server at or after `s`,
//! and the server then renews the lease to `ttl` from its own now. So the lease cannot expire at the
//! server before `s + ttl` of real time has passed; on a clock whose rate is off by at most
//! [`crate::lease::CLOCK_DRIFT`], before `s + ttl * (1 - drift)` on ours. The keeper fences at
//! `s + ttl * (1 - drift) - action_bound`, where `action_bound` is the time the fence takes to take effect
//! (noticing it and the VMM's pause). No clock is compared across nodes; the server's expiry check only
//! ever comes later than this bound (etcd also extends leases across leader changes, never shortens them).

use std::collections::VecDeque;
use std::time::Duration;

use super::BootInstant;
use crate::lease::CLOCK_DRIFT;

/// How the hold is kept: the lease's TTL, how often it is renewed, and how long a fence takes to act.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldTiming {
    /// The etcd lease's TTL (whole seconds at the server).
    pub ttl: Duration,
    /// How often a keep-alive goes out.
    pub keepalive_every: Duration,
    /// How long a fence may take to take effect once decided.
    pub action_bound: Duration,
}

/// Why a [`HoldTiming`] cannot keep a hold safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// Two keep-alives and the fence action do not fit in the TTL (less drift): a healthy holder would
    /// fence itself between two renewals.
    #[error(
        "authority lease TTL {ttl:?} is too short: two keep-alives ({keepalive_every:?} apart) plus the fence \
         action bound {action_bound:?} must fit in ttl * {lo}; raise the TTL",
        lo = 1.0 - CLOCK_DRIFT
    )]
    TtlTooShort {
        /// The TTL.
        ttl: Duration,
        /// The renewal period.
        keepalive_every: Duration,
        /// The fence action bound.
        action_bound: Duration,
    },
}

impl HoldTiming {
    /// A timing with `ttl`, a keep-alive every fifth of it, and a fence that acts within `action_bound`.
    pub fn new(ttl: Duration, action_bound: Duration) -> Self {
        Self {
            ttl,
            keepalive_every: ttl / 5,
            action_bound,
        }
    }

    /// How long after sending a keep-alive (or the grant) the hold is still safe to run on.
    pub fn safe_for(&self) -> Duration {
        self.ttl
            .mul_f64(1.0 - CLOCK_DRIFT)
            .saturating_sub(self.action_bound)
    }

    /// Checks that a healthy holder never fences.
    ///
    /// # Errors
    /// [`TimingError::TtlTooShort`].
    pub fn check(&self) -> Result<(), TimingError> {
        if self.keepalive_every * 2 + self.action_bound < self.ttl.mul_f64(1.0 - CLOCK_DRIFT) {
            Ok(())
        } else {
            Err(TimingError::TtlTooShort {
                ttl: self.ttl,
                keepalive_every: self.keepalive_every,
                action_bound: self.action_bound,
            })
        }
    }
}

/// What [`HoldKeeper`] asks of its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldAction {
    /// Send a keep-alive for the lease now; answer with [`HoldKeeper::handle_keepalive`] and this `seq`.
    KeepAlive {
        /// The request's number.
        seq: u64,
    },
    /// The hold may have expired at the server: pause (or stop) the guest now.
    Fence {
        /// Why, for the operator.
        why: String,
    },
    /// The hold is renewed and nothing superseded it: the guest may run.
    Unfence,
    /// The server said the lease is gone: claim the VM again (it succeeds only if nobody promoted it);
    /// answer with [`HoldKeeper::handle_claimed`] or [`HoldKeeper::handle_superseded`].
    Reclaim,
    /// Another node holds the VM now, or this one handed it over: this copy must never run again.
    Superseded {
        /// Why, for the operator.
        why: String,
    },
}

/// The holder's keeper of its hold on a VM. See the module docs; time is passed in.
#[derive(Debug)]
pub struct HoldKeeper {
    timing: HoldTiming,
    generation: u64,
    /// Until when (boot clock) running the guest is safe; `None` before the first claim.
    safe_until: Option<BootInstant>,
    /// Keep-alives sent and not yet answered: `(seq, sent)`.
    sent: VecDeque<(u64, BootInstant)>,
    next_seq: u64,
    next_keepalive: Option<BootInstant>,
    fenced: bool,
    reclaiming: bool,
    done: bool,
    actions: VecDeque<HoldAction>,
}

impl HoldKeeper {
    /// A keeper that holds nothing yet: the guest counts as fenced until [`HoldKeeper::handle_claimed`].
    pub fn new(timing: HoldTiming) -> Self {
        Self {
            timing,
            generation: 0,
            safe_until: None,
            sent: VecDeque::new(),
            next_seq: 1,
            next_keepalive: None,
            fenced: true,
            reclaiming: false,
            done: false,
            actions: VecDeque::new(),
        }
    }

    /// The claim (or reclaim) of `generation` succeeded with a lease whose grant was requested at `asked`.
    /// The guest may run (an [`HoldAction::Unfence`] if it was fenced).
    pub fn handle_claimed(&mut self, generation: u64, asked: BootInstant) {
        if self.done {
            return;
        }
        self.generation = generation;
        self.reclaiming = false;
        self.sent.clear();
        self.safe_until = Some(asked + self.timing.safe_for());
        self.next_keepalive = Some(asked + self.timing.keepalive_every);
        if self.fenced {
            self.fenced = false;
            self.actions.push_back(HoldAction::Unfence);
        }
    }

    /// The server answered keep-alive `seq`: the lease has `ttl` left from the server's now (zero: the
    /// lease is gone).
    pub fn handle_keepalive(&mut self, seq: u64, ttl: Duration, now: BootInstant) {
        if self.done {
            return;
        }
        let Some(pos) = self.sent.iter().position(|&(s, _)| s == seq) else {
            return;
        };
        let (_, sent) = self.sent[pos];
        // Older unanswered keep-alives are superseded by this answer.
        self.sent.drain(..=pos);
        if ttl.is_zero() {
            self.lost(
                "the authority says the lease is gone (expired at the server)",
                now,
            );
            return;
        }
        let until = sent
            + ttl
                .mul_f64(1.0 - CLOCK_DRIFT)
                .saturating_sub(self.timing.action_bound);
        if self.safe_until.is_none_or(|u| until > u) {
            self.safe_until = Some(until);
        }
        self.handle_timeout(now);
    }

    /// Another node holds the VM (a reclaim found the record changed, or a peer said so), or this node
    /// handed it over: fence for good.
    pub fn handle_superseded(&mut self, why: String) {
        if self.done {
            return;
        }
        self.done = true;
        self.fenced = true;
        self.actions.push_back(HoldAction::Superseded { why });
    }

    /// A reclaim failed for a reason that may pass (the authority unreachable): try again later.
    pub fn handle_reclaim_failed(&mut self, now: BootInstant) {
        if self.reclaiming {
            self.reclaiming = false;
            self.next_keepalive = Some(now + self.timing.keepalive_every);
        }
    }

    fn lost(&mut self, why: &str, now: BootInstant) {
        self.safe_until = Some(now);
        self.fence(why.to_owned());
        if !self.reclaiming {
            self.reclaiming = true;
            self.actions.push_back(HoldAction::Reclaim);
        }
    }

    fn fence(&mut self, why: String) {
        if !self.fenced {
            self.fenced = true;
            self.actions.push_back(HoldAction::Fence { why });
        }
    }

    /// Time passed: keep-alives fall due, and the hold runs out without answers.
    pub fn handle_timeout(&mut self, now: BootInstant) {
        if self.done {
            return;
        }
        if let Some(until) = self.safe_until {
            if now >= until {
                let why = format!(
                    "no keep-alive of the authority lease was acknowledged within {:?} (TTL {:?}): the \
                     lease may expire at the server and another node may promote",
                    self.timing.safe_for(),
                    self.timing.ttl
                );
                self.fence(why);
                if now >= until + self.timing.action_bound && !self.reclaiming {
                    // Past even the fence's own margin: the lease is as good as gone; claim again once
                    // the authority answers (it only succeeds if nobody promoted).
                    self.reclaiming = true;
                    self.actions.push_back(HoldAction::Reclaim);
                }
            } else if self.fenced && !self.reclaiming {
                self.fenced = false;
                self.actions.push_back(HoldAction::Unfence);
            }
        }
        if !self.reclaiming && self.next_keepalive.is_some_and(|t| now >= t) {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.sent.push_back((seq, now));
            // Bounded: answers that never come are forgotten after a few.
            while self.sent.len() > 16 {
                self.sent.pop_front();
            }
            self.next_keepalive = Some(now + self.timing.keepalive_every);
            self.actions.push_back(HoldAction::KeepAlive { seq });
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<HoldAction> {
        self.actions.pop_front()
    }

    /// When [`HoldKeeper::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<BootInstant> {
        if self.done {
            return None;
        }
        let fence_at = self.safe_until.filter(|_| !self.fenced);
        match (fence_at, self.next_keepalive.filter(|_| !self.reclaiming)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the guest must not run now.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether the hold is gone for good (superseded or handed over).
    pub fn is_superseded(&self) -> bool {
        self.done
    }

    /// The generation held (0 before the first claim).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How long the guest may still run at `now` without another acknowledged keep-alive.
    pub fn remaining(&self, now: BootInstant) -> Duration {
        self.safe_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }

    /// Until when (boot clock) the guest may run without another acknowledged keep-alive; `None` before
    /// the first claim.
    pub fn safe_until(&self) -> Option<BootInstant> {
        self.safe_until
    }

    /// The timing in force.
    pub fn timing(&self) -> HoldTiming {
        self.timing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> BootInstant {
        BootInstant::from_since_boot(Duration::from_millis(ms))
    }

    fn timing() -> HoldTiming {
        HoldTiming::new(Duration::from_secs(5), Duration::from_millis(500))
    }

    fn drain(k: &mut HoldKeeper) -> Vec<HoldAction> {
        std::iter::from_fn(|| k.poll_action()).collect()
    }

    #[test]
    fn the_default_timing_passes_and_a_short_ttl_is_refused() {
        timing().check().unwrap();
        let e = HoldTiming::new(Duration::from_secs(1), Duration::from_millis(700))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("raise the TTL"), "{e}");
    }

    #[test]
    fn a_renewed_hold_never_fences_and_an_unanswered_one_fences_before_the_ttl() {
        let mut k = HoldKeeper::new(timing());
        assert!(k.is_fenced());
        k.handle_claimed(3, t(0));
        assert_eq!(drain(&mut k), vec![HoldAction::Unfence]);
        // Healthy: every keep-alive answered 5 ms later with the full TTL.
        let mut now = 0;
        while now < 20_000 {
            now += 10;
            k.handle_timeout(t(now));
            for a in drain(&mut k) {
                match a {
                    HoldAction::KeepAlive { seq } => {
                        k.handle_keepalive(seq, Duration::from_secs(5), t(now + 5))
                    }
                    other => panic!("a healthy hold did {other:?}"),
                }
            }
        }
        // Cut from the authority at 20 s: keep-alives go out, none is answered.
        // The keep-alive sent at 20 s was the last one answered.
        let last_ack_sent = 20_000;
        let mut fenced_at = None;
        while now < 40_000 {
            now += 10;
            k.handle_timeout(t(now));
            for a in drain(&mut k) {
                if let HoldAction::Fence { why } = a {
                    assert!(why.contains("keep-alive"), "{why}");
                    fenced_at.get_or_insert(now);
                }
            }
        }
        let fenced_at = fenced_at.expect("never fenced");
        // The server's lease ends no sooner than 5 s after the last acknowledged keep-alive was sent.
        assert!(
            fenced_at + 500 <= last_ack_sent + 5000 * 99 / 100,
            "{fenced_at}"
        );
        assert!(
            fenced_at >= last_ack_sent + 4000,
            "fenced early: {fenced_at}"
        );
    }

    #[test]
    fn a_lost_lease_fences_and_reclaims_and_a_reclaim_unfences() {
        let mut k = HoldKeeper::new(timing());
        k.handle_claimed(1, t(0));
        drain(&mut k);
        k.handle_timeout(t(1000));
        let Some(HoldAction::KeepAlive { seq }) = k.poll_action() else {
            panic!()
        };
        k.handle_keepalive(seq, Duration::ZERO, t(1001));
        let a = drain(&mut k);
        assert!(matches!(a[0], HoldAction::Fence { .. }), "{a:?}");
        assert_eq!(a[1], HoldAction::Reclaim);
        // While reclaiming, no keep-alives.
        k.handle_timeout(t(3000));
        assert!(drain(&mut k).is_empty());
        k.handle_claimed(1, t(3100));
        assert_eq!(drain(&mut k), vec![HoldAction::Unfence]);
        assert!(!k.is_fenced());
    }

    #[test]
    fn a_superseded_hold_never_runs_again() {
        let mut k = HoldKeeper::new(timing());
        k.handle_claimed(1, t(0));
        drain(&mut k);
        k.handle_superseded("promoted on b2 under generation 2".into());
        assert!(matches!(drain(&mut k)[..], [HoldAction::Superseded { .. }]));
        k.handle_claimed(1, t(10));
        k.handle_timeout(t(2000));
        assert!(drain(&mut k).is_empty());
        assert!(k.is_fenced() && k.is_superseded());
        assert_eq!(k.poll_timeout(), None);
    }
}
