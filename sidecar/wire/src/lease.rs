//! Leases and self-fencing: why a backup may promote once its lease on the primary ran out, and the
//! primary's side of that bargain, a sans-IO state machine ([`SelfFence`]) that tells the sidecar to
//! fence (pause or stop) its guest before any backup's lease can run out.
//!
//! The argument (docs/migration.md, "Self-fencing", has it in full):
//!
//! - A backup's lease runs from the last frame it received from the primary; it may promote only after
//!   `lease` of silence, measured on its own monotonic clock.
//! - The primary counts a backup as *answering* by the send time `s` of the newest ping that backup
//!   answered ([`crate::Sender::answered_at`]): the backup received that ping at or after `s`, so its
//!   lease cannot run out before `s + lease` (real time, up to clock-rate drift).
//! - The primary fences once fewer than `quorum` backups answered pings sent within `fence_after`,
//!   i.e. at the latest `s + fence_after` for the quorum's newest `s`, on its own clock.
//! - With clock rates off by at most [`CLOCK_DRIFT`] and fencing taking effect within
//!   [`FENCE_ACTION_BOUND`], `fence_after * (1 + drift) + action < lease * (1 - drift)` guarantees the
//!   guest stopped before the lease of a backup outside the answering quorum ends.
//!   [`check_timing`] refuses configurations that break it. No clock synchronisation is assumed: only
//!   durations on each node's own monotonic clock.
//!
//! A backup that runs the VM now (after a promote or a switchover) refuses the old primary with
//! [`crate::ErrorCode::Fenced`]: that is [`SelfFence::handle_superseded`], and a superseded primary
//! never resumes.

use std::time::{Duration, Instant};

/// The backups' lease by default (`endophyte backup --lease`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);

/// The primary's self-fence bound by default (`fence_after` in the sidecar's configuration).
pub const DEFAULT_FENCE_AFTER: Duration = Duration::from_secs(2);

/// Relative error allowed between the clock rates of two nodes: 1 %, fifty times what NTP lets a
/// clock slew (500 ppm) and far above a crystal's drift (tens of ppm).
pub const CLOCK_DRIFT: f64 = 0.01;

/// How long fencing may take to take effect once decided: noticing (the sidecar checks every 50 ms)
/// and the VMM's pause or stop (a QMP `stop` or a testvm pause: milliseconds).
pub const FENCE_ACTION_BOUND: Duration = Duration::from_millis(500);

/// Why a pair of bounds cannot fence safely.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LeaseError {
    /// The fence bound does not end, with drift and the action's time, before the lease does.
    #[error(
        "self-fence bound {fence_after:?} is not safely below backup {backup:?}'s lease {lease:?}: \
         need fence_after * {hi} + {action:?} < lease * {lo} (clock drift {drift}); lower fence_after \
         or raise the backup's --lease",
        hi = 1.0 + CLOCK_DRIFT,
        lo = 1.0 - CLOCK_DRIFT,
        action = FENCE_ACTION_BOUND,
        drift = CLOCK_DRIFT
    )]
    FenceNotBelowLease {
        /// The sidecar's bound.
        fence_after: Duration,
        /// The backup's lease.
        lease: Duration,
        /// The backup announcing it.
        backup: String,
    },
    /// Pings are not frequent enough to keep a healthy backup answering within the bound.
    #[error(
        "self-fence bound {fence_after:?} leaves no room for pings every {ping_interval:?}: it must be at \
         least twice the ping interval"
    )]
    FenceBelowPings {
        /// The sidecar's bound.
        fence_after: Duration,
        /// How often each path is pinged.
        ping_interval: Duration,
    },
}

/// Checks the sidecar's `fence_after` against the `lease` backup `backup` announced in its Welcome.
///
/// # Errors
/// [`LeaseError::FenceNotBelowLease`] when the bound is not safely below the lease.
pub fn check_timing(
    fence_after: Duration,
    lease: Duration,
    backup: &str,
) -> Result<(), LeaseError> {
    let worst_fence =
        fence_after.as_secs_f64() * (1.0 + CLOCK_DRIFT) + FENCE_ACTION_BOUND.as_secs_f64();
    let soonest_promote = lease.as_secs_f64() * (1.0 - CLOCK_DRIFT);
    if worst_fence < soonest_promote {
        Ok(())
    } else {
        Err(LeaseError::FenceNotBelowLease {
            fence_after,
            lease,
            backup: backup.to_owned(),
        })
    }
}

/// Checks that pings every `ping_interval` can keep a healthy backup within `fence_after`.
///
/// # Errors
/// [`LeaseError::FenceBelowPings`].
pub fn check_pings(fence_after: Duration, ping_interval: Duration) -> Result<(), LeaseError> {
    if fence_after >= ping_interval * 2 {
        Ok(())
    } else {
        Err(LeaseError::FenceBelowPings {
            fence_after,
            ping_interval,
        })
    }
}

/// What [`SelfFence`] asks of the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceAction {
    /// Fewer than the quorum answered within the bound: pause (or stop) the guest now.
    Fence {
        /// Backups that did answer within the bound.
        answering: usize,
    },
    /// A quorum answers again and nothing superseded this primary: the guest may run.
    Unfence,
    /// A backup runs the VM now: this copy must never run again.
    Superseded {
        /// The backup's own words.
        why: String,
    },
}

/// The primary's self-fence: fed with when each backup last answered, it says when to fence and when
/// the guest may run again. Time is passed in; nothing here touches a clock or a VMM.
#[derive(Debug)]
pub struct SelfFence {
    after: Duration,
    quorum: usize,
    /// Per backup: the send time of the newest ping it answered, or the machine's start.
    answered: Vec<Instant>,
    fenced: bool,
    superseded: bool,
    actions: std::collections::VecDeque<FenceAction>,
}

impl SelfFence {
    /// A self-fence over `backups` backups of which `quorum` (at least 1, at most `backups`) must keep
    /// answering within `after`. Each backup counts as answered at `now`: a starting primary has one
    /// bound to reach its quorum.
    pub fn new(backups: usize, quorum: usize, after: Duration, now: Instant) -> Self {
        Self {
            after,
            quorum: quorum.clamp(1, backups.max(1)),
            answered: vec![now; backups],
            fenced: false,
            superseded: false,
            actions: Default::default(),
        }
    }

    /// Backup `b` answered a ping sent at `sent`.
    pub fn handle_answered(&mut self, b: usize, sent: Instant) {
        if let Some(a) = self.answered.get_mut(b) {
            *a = (*a).max(sent);
        }
    }

    /// A backup runs the VM under a newer generation (it said so with [`crate::ErrorCode::Fenced`]).
    pub fn handle_superseded(&mut self, why: String) {
        if !self.superseded {
            self.superseded = true;
            self.fenced = true;
            self.actions.push_back(FenceAction::Superseded { why });
        }
    }

    /// Backups whose answers are within the bound at `now`.
    pub fn answering(&self, now: Instant) -> usize {
        self.answered
            .iter()
            .filter(|&&a| now.saturating_duration_since(a) < self.after)
            .count()
    }

    /// Time passed: fences when the quorum went stale, unfences when it is back.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.superseded {
            return;
        }
        let answering = self.answering(now);
        if !self.fenced && answering < self.quorum {
            self.fenced = true;
            self.actions.push_back(FenceAction::Fence { answering });
        } else if self.fenced && answering >= self.quorum {
            self.fenced = false;
            self.actions.push_back(FenceAction::Unfence);
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<FenceAction> {
        self.actions.pop_front()
    }

    /// When [`SelfFence::handle_timeout`] would next fence, absent new answers (`None` when fenced).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.fenced {
            return None;
        }
        // The quorum-th newest answer goes stale first.
        let mut a = self.answered.clone();
        a.sort_unstable_by(|x, y| y.cmp(x));
        a.get(self.quorum - 1).map(|&t| t + self.after)
    }

    /// Whether the guest must not run now.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether a newer generation superseded this primary for good.
    pub fn is_superseded(&self) -> bool {
        self.superseded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_default_bounds_pass_and_a_bound_near_the_lease_is_refused() {
        check_timing(DEFAULT_FENCE_AFTER, DEFAULT_LEASE, "b1").unwrap();
        let e = check_timing(Duration::from_millis(2600), DEFAULT_LEASE, "b1").unwrap_err();
        assert!(
            e.to_string().contains("b1") && e.to_string().contains("--lease"),
            "{e}"
        );
        check_pings(DEFAULT_FENCE_AFTER, Duration::from_millis(500)).unwrap();
        assert!(check_pings(Duration::from_millis(900), Duration::from_millis(500)).is_err());
    }

    /// Simulated partition: backups answer a ping every 500 ms (sent at `t`, answered 10 ms later)
    /// until `cut`; the fence comes once the quorum's newest answer is `after` old, the unfence when
    /// answers come back, and the fence always precedes the end of any cut-off backup's lease.
    #[test]
    fn a_partition_fences_before_the_lease_ends_and_the_return_unfences() {
        let t0 = Instant::now();
        let after = DEFAULT_FENCE_AFTER;
        let mut f = SelfFence::new(2, 2, after, t0);
        let cut = t0 + 10 * S;
        let heal = t0 + 20 * S;
        let mut fenced_at = None;
        let mut unfenced_at = None;
        // When backup 1 last heard the primary before the cut: its lease runs from there.
        let mut b1_heard_before_cut = t0;
        let mut now = t0;
        while now < t0 + 30 * S {
            let ping_due = (now - t0).as_millis() % 500 == 0;
            let connected = now < cut || now >= heal;
            // Backup 1 loses the primary at the cut; backup 0 stays connected all along.
            for b in 0..2 {
                if ping_due && (b == 0 || connected) {
                    if b == 1 && now < cut {
                        b1_heard_before_cut = now;
                    }
                    f.handle_answered(b, now);
                }
            }
            f.handle_timeout(now + Duration::from_millis(10));
            while let Some(a) = f.poll_action() {
                match a {
                    FenceAction::Fence { answering } => {
                        assert_eq!(answering, 1);
                        fenced_at.get_or_insert(now);
                    }
                    FenceAction::Unfence => {
                        unfenced_at.get_or_insert(now);
                    }
                    FenceAction::Superseded { .. } => unreachable!(),
                }
            }
            now += Duration::from_millis(10);
        }
        let fenced_at = fenced_at.expect("never fenced");
        assert!(
            fenced_at > cut && fenced_at <= cut + after,
            "{:?}",
            fenced_at - cut
        );
        // Backup 1 may promote once its lease, counted from its last hearing, ends: by then the fence
        // has taken effect, even allowing it the whole action bound.
        assert!(
            fenced_at + FENCE_ACTION_BOUND < b1_heard_before_cut + DEFAULT_LEASE,
            "fenced {:?} after backup 1 last heard the primary",
            fenced_at - b1_heard_before_cut
        );
        let unfenced_at = unfenced_at.expect("never unfenced");
        assert!(
            unfenced_at >= heal && unfenced_at < heal + S,
            "{unfenced_at:?}"
        );
        assert!(!f.is_fenced());
    }

    #[test]
    fn a_superseded_primary_stays_fenced_whatever_answers() {
        let t0 = Instant::now();
        let mut f = SelfFence::new(1, 1, DEFAULT_FENCE_AFTER, t0);
        f.handle_superseded("VM runs on b1 under generation 2".into());
        assert!(matches!(
            f.poll_action(),
            Some(FenceAction::Superseded { .. })
        ));
        f.handle_answered(0, t0 + S);
        f.handle_timeout(t0 + S);
        assert_eq!(f.poll_action(), None);
        assert!(f.is_fenced() && f.is_superseded());
    }

    #[test]
    fn a_starting_primary_has_one_bound_to_reach_its_quorum() {
        let t0 = Instant::now();
        let mut f = SelfFence::new(1, 1, DEFAULT_FENCE_AFTER, t0);
        assert_eq!(f.poll_timeout(), Some(t0 + DEFAULT_FENCE_AFTER));
        f.handle_timeout(t0 + DEFAULT_FENCE_AFTER - Duration::from_millis(1));
        assert_eq!(f.poll_action(), None);
        f.handle_timeout(t0 + DEFAULT_FENCE_AFTER);
        assert_eq!(f.poll_action(), Some(FenceAction::Fence { answering: 0 }));
    }
}
