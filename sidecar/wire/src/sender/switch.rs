//! The sender's side of a migration: the switchover it runs (with its commit point at a fencing
//! authority, when there is one) and the priority it gives the target's chunks meanwhile.

use std::time::Instant;

use super::{BackupId, Sender};
use crate::msg::Switchover;
use crate::switchover::{AuthorityVerdict, SourcePhase, SourceSwitchover, Timeouts};

impl Sender {
    /// Starts the switchover of a migration to backup `target` (named `target_name` in messages): the
    /// final epoch `request.epoch` has been ended for every backup with the guest paused. The sender asks
    /// the target to prepare the VM once it committed that epoch, then commits; the outcome comes as
    /// [`Event::Switchover`]. See [`crate::switchover`].
    pub fn begin_switchover(
        &mut self,
        target: BackupId,
        target_name: String,
        request: Switchover,
        timeouts: Timeouts,
        now: Instant,
    ) {
        self.begin_switchover_with(target, target_name, request, timeouts, false, now);
    }

    /// As [`Sender::begin_switchover`]; with `authority`, the commit waits for the fencing authority's
    /// hand-over ([`Event::HandOver`], answered by [`Sender::handle_switchover_authority`]).
    pub fn begin_switchover_with(
        &mut self,
        target: BackupId,
        target_name: String,
        request: Switchover,
        timeouts: Timeouts,
        authority: bool,
        now: Instant,
    ) {
        let mut m = SourceSwitchover::new(request, target_name, timeouts, now);
        if authority {
            m = m.with_authority();
        }
        let b = &self.backups[target];
        if !b.streaming {
            m.handle_target_lost(now);
        } else {
            m.handle_committed(b.committed, now);
        }
        self.switchover = Some((target, m));
    }

    /// Serves backup `b`'s chunks before every other backup's while it is set (`None`: in index order).
    /// A migration sets its target while it converges and switches over: the final epoch's lag to the
    /// target is the downtime, and the other backups are not on that path.
    pub fn set_priority(&mut self, b: Option<BackupId>) {
        self.priority = b;
        if b.is_none() {
            self.alone = None;
        }
    }

    /// Sends chunks to backup `b` alone until it has committed `epoch` (or stops streaming); the other
    /// backups' chunks wait, their messages and pings do not. A switchover sets it for the final epoch,
    /// with the guest paused: the target's commit of that epoch is the downtime, and on a shared link
    /// or CPU the others' copies of it would only slow it down. `set_priority(None)` lifts it.
    pub fn serve_alone_until(&mut self, b: BackupId, epoch: u64) {
        self.alone = Some((b, epoch));
    }

    /// The fencing authority's verdict on the hand-over an [`Event::HandOver`] asked for.
    pub fn handle_switchover_authority(&mut self, verdict: AuthorityVerdict, now: Instant) {
        if let Some((_, m)) = &mut self.switchover {
            m.handle_authority(verdict, now);
        }
    }

    /// The phase of the switchover in progress, if one was begun.
    pub fn switchover_phase(&self) -> Option<SourcePhase> {
        self.switchover.as_ref().map(|(_, m)| m.phase())
    }
}
