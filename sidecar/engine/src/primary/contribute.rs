//! The services' part of an epoch's cut: their contributions, asked while the guest stands still
//! (docs/services.md), and what the `service_policy` does with a late or failing one.

use std::time::{Duration, Instant};

use anyhow::Context;
use endophyte_vmm::DirtyLog;

use super::epoch::{Cut, EpochLoop};
use crate::services::ServicePolicy;

impl EpochLoop {
    /// Asks the services for epoch `e`'s contributions with the guest paused and keeps them for the
    /// end marker. Returns `false` when the cut must be abandoned (the `fail` policy and a service that
    /// gave nothing usable). Under `pause`, and for any policy but `skip` in a switchover's final epoch,
    /// the services are asked again until they answer; in a switchover, for the hold bound at most,
    /// after which the switchover is vetoed ([`EpochLoop::switch_veto`]).
    pub(super) fn contribute_at_pause(&mut self, e: u64, switching: bool) -> bool {
        let policy = self.cfg.service_policy;
        let t0 = Instant::now();
        loop {
            let round = self.shared.services.contribute(
                e,
                self.cfg.service_deadline(),
                self.cfg.service_max_bytes as usize,
            );
            if round.remote > 0 {
                self.stats.contribution_ms.push(round.took_ms);
            }
            let took = Duration::from_secs_f64(round.took_ms / 1e3);
            let failed = round.failures.len() as u64;
            self.stats.service_failures += failed;
            self.contributions = round.contributions;
            let Some((service, why)) = round.failures.into_iter().next() else {
                return true;
            };
            if policy == ServicePolicy::Skip || self.stopping() {
                return true;
            }
            if switching {
                if t0.elapsed() >= self.cfg.service_hold() {
                    self.switch_veto = Some(format!(
                        "service {service:?} gave no contribution to the final epoch within {} ms: {why}",
                        self.cfg.service_hold_ms
                    ));
                    return true;
                }
            } else if policy == ServicePolicy::Fail {
                tracing::warn!(epoch = e, %service, "service_policy fail: the cut is abandoned: {why}");
                return false;
            }
            // Asked again; a service that answers at once with an error is not asked in a busy loop.
            let wait = self.cfg.service_deadline().saturating_sub(took);
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
    }

    /// Gives up a cut the services failed under the `fail` policy: its pages go back to the dirty log,
    /// the guest resumes, and the next pause comes after an epoch length (the replica does not
    /// advance meanwhile).
    pub(super) fn abandon(&mut self, log: &dyn DirtyLog, e: u64, cut: Cut) -> anyhow::Result<()> {
        log.release(cut.harvest.seq, false)?;
        self.vmm.resume().context("resuming the guest")?;
        self.stats.dirty_bytes -= cut.bytes;
        self.stats.abandoned_cuts += 1;
        let shared = self.shared.clone();
        let wait = Duration::from_millis(self.cfg.epoch_ms);
        shared.wait_until(wait, |_| shared.stopping());
        tracing::debug!(epoch = e, "cut abandoned for a service; trying again");
        Ok(())
    }

    /// For a VMM that hands over running snapshots: the contributions are asked just before the
    /// snapshot starts (there is no pause to ask them in). Under `fail` and `pause` the snapshot waits
    /// until the services answer (the guest runs meanwhile).
    pub(super) fn contribute_before_snapshot(&mut self, e: u64, switching: bool) {
        while !self.contribute_at_pause(e, switching) {
            let shared = self.shared.clone();
            let wait = Duration::from_millis(self.cfg.epoch_ms);
            self.stats.abandoned_cuts += 1;
            shared.wait_until(wait, |_| shared.stopping());
        }
    }
}
