//! The migration source (see [`crate::migrate`] for the phases): converging inside the epoch loop, and
//! the switchover, which the [`endophyte_wire::Sender`] runs through its
//! [`SourceSwitchover`](endophyte_wire::switchover::SourceSwitchover) while the guest stays paused here.

use std::time::{Duration, Instant};

use anyhow::Context;
use endophyte_wire::switchover::{SwitchoverOutcome, Timeouts};
use endophyte_wire::{Message, Switchover};

use super::epoch::EpochLoop;
use super::shared::{Inner, Shared};
use crate::control::ApiError;
use crate::migrate::{DowntimeBreakdown, MigrateRequest, MigrationReport, MigrationStatus, Phase};
use crate::services::{pb, SwitchoverVerdict};

/// A migration's state, shared by the epoch loop (which runs it) and the control API (which reports it).
pub(super) struct MigrationCtl {
    pub request: MigrateRequest,
    pub target: usize,
    pub started: Instant,
    pub phase: Phase,
    pub predicted_ms: Option<f64>,
    /// When `SwitchoverWarmup` was queued for the target.
    pub warmed: Option<Instant>,
    /// The target's answer: its standby VMM for this generation is ready (and preloaded the replica).
    pub standby: Option<(u64, bool)>,
    pub wire_at_start: u64,
    pub error: Option<String>,
    pub report: Option<MigrationReport>,
    /// When the services were asked whether the switchover may go ahead, and which were.
    pub services_asked: Option<(Instant, Vec<String>)>,
}

impl MigrationCtl {
    /// Converging past the request's deadline.
    pub(super) fn overdue(&self) -> bool {
        self.phase == Phase::Converging
            && self.started.elapsed() >= Duration::from_millis(self.request.deadline_ms)
    }
}

/// How long a converged migration waits for the target's standby VMM to be ready before it switches
/// over anyway.
const STANDBY_WAIT: Duration = Duration::from_secs(30);

/// The least downtime a switchover over a path with round trip `rtt_ms` can be predicted at, ms: three
/// round trips (the final epoch to the target and its `Committed` back, `Switchover`/`Ready`,
/// `Commit`/`SwitchedOver`; see docs/migration.md). A downtime budget below it is refused.
pub(super) fn downtime_floor_ms(rtt_ms: f64) -> f64 {
    3.0 * rtt_ms
}

/// Timings of a switchover's pause at the source, from its start.
#[derive(Clone, Copy, Debug)]
pub(super) struct SwitchTimes {
    pub t0: Instant,
    pub paused: Duration,
    pub harvested: Duration,
    pub staged: Duration,
}

impl EpochLoop {
    /// The backup a migration converges to, if one does.
    pub(super) fn converging_target(&self) -> Option<usize> {
        let g = self.shared.lock();
        g.migration
            .as_ref()
            .filter(|m| m.phase == Phase::Converging)
            .map(|m| m.target)
    }

    /// Epoch length now: the configured (or tuned) one, or, while a migration converges, half its downtime
    /// budget (at least 10 ms) when that is shorter.
    pub(super) fn epoch_ms_now(&self) -> u64 {
        let g = self.shared.lock();
        match g
            .migration
            .as_ref()
            .filter(|m| m.phase == Phase::Converging)
        {
            Some(m) => self.cfg.epoch_ms.min((m.request.downtime_ms / 2).max(10)),
            None => self.cfg.epoch_ms,
        }
    }

    /// Before each epoch, while a migration converges: switch over now (returns the target), go on
    /// converging (raising the throttle floor), or give up at the deadline.
    pub(super) fn converge(&mut self) -> anyhow::Result<Option<usize>> {
        let mut g = self.shared.lock();
        let Some(m) = g
            .migration
            .as_ref()
            .filter(|m| m.phase == Phase::Converging)
        else {
            return Ok(None);
        };
        let (req, target, started) = (m.request.clone(), m.target, m.started);
        let generation = self.cfg.generation + 1;
        let warmed = match m.warmed {
            Some(at) => at,
            None => {
                self.shared
                    .services
                    .phase(pb::Phase::Converge, &req.to, generation, "");
                // Let the target start what the switchover will need while the guest still runs here.
                g.sender
                    .queue_message(target, Message::SwitchoverWarmup { generation });
                let now = Instant::now();
                g.migration.as_mut().expect("checked above").warmed = Some(now);
                self.shared.wake.notify_one();
                now
            }
        };
        // The switchover waits for the target's standby (a QEMU loading the replica takes seconds per
        // GiB, which would otherwise be downtime), but not for ever: a lost answer costs STANDBY_WAIT.
        let standby_ready = g
            .migration
            .as_ref()
            .and_then(|m| m.standby)
            .is_some_and(|(gen, _)| gen == generation)
            || warmed.elapsed() >= STANDBY_WAIT;
        let committed = g.sender.committed(target);
        let current =
            g.sender.is_streaming(target) && committed + 2 >= self.next_epoch && committed > 0;
        // The lowest RTT sample: the smoothed one includes queueing behind this sidecar's own chunks, which
        // the switchover's few messages do not wait for.
        let rtt_ms = g
            .sender
            .min_rtt(target)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        // The final transfer takes what recent epochs took from their pause to the target's commit
        // (measured at the converged epoch length); before there is such a measure, the last epoch's dirty
        // bytes at the best drain rate seen. Then Switchover/Ready and Commit/SwitchedOver: two round
        // trips. Not predicted: the target's VMM start and restore (see docs/migration.md).
        let peak = self.pacing.peak_drain;
        let transfer_ms = g.commit_lag_ms[target].unwrap_or_else(|| {
            let capacity = match g.max_bandwidth {
                Some(cap) => peak.min(cap as f64),
                None => peak,
            }
            .max(1.0);
            self.stats.last_dirty_bytes as f64 / capacity * 1e3
        });
        let predicted = transfer_ms + 2.0 * rtt_ms;
        let streaming = g.sender.is_streaming(target);
        tracing::debug!(
            predicted_ms = predicted,
            transfer_ms,
            rtt_ms,
            current,
            standby_ready,
            "converging"
        );
        let m = g.migration.as_mut().expect("checked above");
        m.predicted_ms = Some(predicted);
        let budget = req.downtime_ms as f64;
        // The prediction is never below three round trips (the final epoch's commit needs one), so a
        // budget under that can never be met: a permanent error, not one to throttle the guest for until
        // the deadline (a 50 ms budget over a 50 ms RTT did that for 300 s at a 99 % throttle).
        let floor = downtime_floor_ms(rtt_ms);
        if budget < floor {
            let why = format!(
                "the downtime budget of {budget} ms is below what the path to {} allows: {floor:.1} ms, three round trips of {rtt_ms:.1} ms (the final epoch and its commit, Switchover and Ready, Commit and SwitchedOver); --downtime must exceed it",
                req.to
            );
            drop(g);
            self.migration_failed(why);
            return Ok(None);
        }
        if current && predicted <= budget && standby_ready {
            drop(g);
            return Ok(self.services_agree(generation, &req.to).then_some(target));
        }
        if started.elapsed() < Duration::from_millis(req.deadline_ms) {
            // As QEMU's auto-converge: slow the guest a step more each epoch it does not fit, but only
            // while the data itself is the problem (at the best drain rate seen, the last epoch's pages
            // take over half the budget); the fixed part of the lag (journal fsync, round trips) does
            // not shrink with the throttle.
            let data_ms = self.stats.last_dirty_bytes as f64 / peak.max(1.0) * 1e3;
            if current && data_ms > budget / 2.0 {
                self.pacing.floor = (self.pacing.floor + 0.05).min(0.99);
            }
            return Ok(None);
        }
        if req.force && streaming && committed > 0 {
            tracing::warn!(
                predicted_ms = predicted,
                budget_ms = budget,
                "migration deadline: switching over anyway (--force)"
            );
            drop(g);
            return Ok(self.services_agree(generation, &req.to).then_some(target));
        }
        let why = if current {
            format!(
                "did not converge within {} ms: the predicted downtime is {predicted:.1} ms against a budget of {budget} ms (the throttle reached {:.0} %); --force switches over anyway",
                req.deadline_ms,
                self.pacing.throttle_now * 100.0
            )
        } else {
            format!(
                "did not converge within {} ms: the target's replica is not current (it committed epoch {committed}; this sidecar is at {})",
                req.deadline_ms,
                self.next_epoch.saturating_sub(1)
            )
        };
        drop(g);
        self.migration_failed(why);
        Ok(None)
    }

    /// The migration converged: whether the services let the switchover go ahead now. The first call
    /// asks them (the guest runs on meanwhile); a veto, or a hold past `service_hold_ms`, fails the
    /// migration with the service's name and reason. Sets the phase to switching when they agree.
    fn services_agree(&mut self, generation: u64, to: &str) -> bool {
        let services = self.shared.services.clone();
        let hold = self.cfg.service_hold();
        let asked = {
            let mut g = self.shared.lock();
            let m = g.migration.as_mut().expect("a migration converges");
            m.services_asked
                .get_or_insert_with(|| {
                    (
                        Instant::now(),
                        services.ask_switchover(generation, to, hold),
                    )
                })
                .clone()
        };
        match services.switchover_verdict(generation, &asked.1, asked.0, hold) {
            SwitchoverVerdict::Pending => false,
            SwitchoverVerdict::Veto { service, reason } => {
                self.migration_failed(format!(
                    "service {service:?} vetoed the switchover: {reason}"
                ));
                false
            }
            SwitchoverVerdict::Ready => {
                services.phase(pb::Phase::Prepared, to, generation, "");
                let mut g = self.shared.lock();
                g.migration.as_mut().expect("a migration converges").phase = Phase::Switching;
                true
            }
        }
    }

    fn migration_failed(&mut self, why: String) {
        tracing::warn!("migration failed: {why}");
        self.pacing.floor = 0.0;
        let mut g = self.shared.lock();
        g.sender.set_priority(None);
        if let Some(m) = g.migration.as_mut() {
            m.phase = Phase::Failed;
            self.shared.services.phase(
                pb::Phase::Aborted,
                &m.request.to,
                self.cfg.generation + 1,
                &why,
            );
            m.error = Some(why);
        }
    }

    /// During a switchover's pause: the times so far, if the state saved at this pause can go to the
    /// target. Without one the guest resumes, the migration fails and the epoch goes on as an ordinary one.
    pub(super) fn save_for_switch(&mut self, cut: &super::epoch::Cut) -> Option<SwitchTimes> {
        self.save_for_switch_at(SwitchTimes {
            t0: cut.t0,
            paused: cut.paused,
            harvested: cut.harvested,
            staged: cut.t0.elapsed(),
        })
    }

    /// As [`EpochLoop::save_for_switch`], with the times given.
    pub(super) fn save_for_switch_at(&mut self, times: SwitchTimes) -> Option<SwitchTimes> {
        if let Some(why) = self.switch_veto.take() {
            let _ = self.vmm.resume();
            self.migration_failed(why);
            return None;
        }
        if self.pause_state.is_none() {
            let _ = self.vmm.resume();
            self.migration_failed(
                "saving vCPU and device state at the source failed (see the log)".into(),
            );
            return None;
        }
        Some(times)
    }

    /// After the final epoch `e` was ended with the guest paused: the sender runs the switchover to
    /// `target`; its outcome ends this sidecar (the VM runs there), resumes the guest here (nothing runs
    /// there), or leaves it paused (in doubt), which is an error.
    pub(super) fn switchover(
        &mut self,
        e: u64,
        target: usize,
        times: SwitchTimes,
    ) -> anyhow::Result<()> {
        let name = self.shared.meta.backups[target].clone();
        let generation = self.cfg.generation + 1;
        let verify = {
            let mut g = self.shared.lock();
            let verify = g.migration.as_ref().is_some_and(|m| m.request.verify);
            let request = Switchover {
                generation,
                session: self.session,
                epoch: e,
                verify,
                state: self
                    .pause_state
                    .clone()
                    .expect("checked by save_for_switch"),
            };
            g.switch_outcome = None;
            // Under a fencing authority the commit point is its hand-over of the next generation.
            let authority = self.shared.hold.get().is_some();
            g.sender.begin_switchover_with(
                target,
                name.clone(),
                request,
                Timeouts::default(),
                authority,
                times.t0,
            );
            verify
        };
        self.shared.wake.notify_one();
        // Every step of the switchover has its own deadline in the sender; this wait only guards against
        // a driver that died.
        self.shared
            .wait_until(Duration::from_secs(120), |g| g.switch_outcome.is_some());
        let outcome = self.shared.lock().switch_outcome.take();
        match outcome {
            Some(SwitchoverOutcome::SwitchedOver {
                ready,
                resume_us,
                timeline,
                ..
            }) => {
                // The source stays paused for good: what it holds can be checked now at no cost to downtime.
                let source_ram_hash = if verify {
                    self.vmm.ram_hash().unwrap_or_default()
                } else {
                    String::new()
                };
                if let Err(e) = self.vmm.shutdown() {
                    tracing::warn!("shutting the source VMM down: {e}");
                }
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let us = |u: u64| u as f64 / 1e3;
                let since = |t: Option<Instant>| t.map_or(Duration::ZERO, |t| t - times.t0);
                let (t_committed, t_ready, t_ack) = (
                    since(timeline.final_committed),
                    since(timeline.ready),
                    since(timeline.switched),
                );
                let mut b = DowntimeBreakdown {
                    pause_ms: ms(times.paused),
                    harvest_ms: ms(times.harvested - times.paused),
                    stage_ms: ms(times.staged - times.harvested),
                    final_transfer_ms: ms(t_committed.saturating_sub(times.staged)),
                    target_start_ms: us(ready.settle_us + ready.spawn_us),
                    restore_ms: us(ready.restore_us),
                    verify_ms: us(ready.verify_us),
                    commit_ms: ms(t_ack - t_ready) - us(resume_us),
                    resume_ms: us(resume_us),
                    network_ms: 0.0,
                };
                let accounted = b.pause_ms
                    + b.harvest_ms
                    + b.stage_ms
                    + b.final_transfer_ms
                    + b.target_start_ms
                    + b.restore_ms
                    + b.verify_ms
                    + b.commit_ms
                    + b.resume_ms;
                b.network_ms = (ms(t_ack) - accounted).max(0.0);
                let mut g = self.shared.lock();
                let wire = g.counters.wire_bytes;
                let m = g.migration.as_mut().expect("a migration is running");
                let report = MigrationReport {
                    to: name.clone(),
                    generation,
                    epoch: e,
                    downtime_ms: ms(t_ack) - b.verify_ms,
                    downtime_with_verify_ms: ms(t_ack),
                    breakdown: b,
                    converge_ms: ms(times.t0 - m.started),
                    total_ms: ms(m.started.elapsed()),
                    bytes_sent: wire - m.wire_at_start,
                    final_epoch_bytes: self.stats.last_dirty_bytes,
                    state_bytes: self.pause_state.as_ref().map_or(0, |s| s.data.len() as u64),
                    predicted_downtime_ms: m.predicted_ms.unwrap_or(0.0),
                    converged: m
                        .predicted_ms
                        .is_some_and(|p| p <= m.request.downtime_ms as f64),
                    target_preloaded: m.standby.is_some_and(|(gen, pre)| gen == generation && pre),
                    target_ram_hash: ready.ram_hash,
                    source_ram_hash,
                };
                tracing::info!(target = %name, generation, epoch = e, downtime_ms = report.downtime_ms, "migrated: the VM runs on the target");
                m.phase = Phase::Done;
                m.report = Some(report);
                drop(g);
                self.shared
                    .services
                    .phase(pb::Phase::Committed, &name, generation, "");
                self.cfg.generation = generation;
                self.migrated = true;
                Ok(())
            }
            Some(SwitchoverOutcome::Abandoned { why, .. }) => {
                self.vmm
                    .resume()
                    .context("resuming the guest after a failed switchover")?;
                self.migration_failed(why);
                Ok(())
            }
            Some(SwitchoverOutcome::InDoubt { why, .. }) => {
                self.migration_failed(why.clone());
                anyhow::bail!(why)
            }
            None => {
                let why = format!(
                    "the switchover to {name} had no outcome within 120 s (the path driver stopped?): the guest stays paused here, since it may run there"
                );
                self.migration_failed(why.clone());
                anyhow::bail!(why)
            }
        }
    }
}

/// `POST /v1/migrate`: validates the request and starts converging.
pub(super) fn start_migration(
    s: &Shared,
    req: MigrateRequest,
) -> Result<MigrationStatus, ApiError> {
    let names = &s.meta.backups;
    let target = names.iter().position(|n| *n == req.to).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{:?} is not one of this sidecar's backups ({})",
            req.to,
            names.join(", ")
        ))
    })?;
    if req.downtime_ms == 0 || req.deadline_ms == 0 {
        return Err(ApiError::bad_request(
            "downtime_ms and deadline_ms must be above 0",
        ));
    }
    let mut g = s.lock();
    if let Some(m) = &g.migration {
        match m.phase {
            Phase::Converging | Phase::Switching => {
                return Err(ApiError::conflict(format!(
                    "a migration to {} is already running ({:?})",
                    m.request.to, m.phase
                )))
            }
            Phase::Done => {
                return Err(ApiError::conflict(format!(
                    "this VM already migrated to {}; this sidecar is exiting",
                    m.request.to
                )))
            }
            Phase::Failed => {}
        }
    }
    tracing::info!(to = %req.to, downtime_ms = req.downtime_ms, deadline_ms = req.deadline_ms, force = req.force, "migration requested");
    g.final_fetched = false;
    // Measured afresh at the converging epoch length.
    g.commit_lag_ms[target] = None;
    g.sender.set_priority(Some(target));
    let wire_at_start = g.counters.wire_bytes;
    g.migration = Some(MigrationCtl {
        request: req,
        target,
        started: Instant::now(),
        phase: Phase::Converging,
        predicted_ms: None,
        warmed: None,
        standby: None,
        wire_at_start,
        error: None,
        report: None,
        services_asked: None,
    });
    let st = migration_status(&g).expect("just set");
    drop(g);
    s.cv.notify_all();
    Ok(st)
}

/// `GET /v1/migration`.
pub(super) fn migration_status(g: &Inner) -> Option<MigrationStatus> {
    let m = g.migration.as_ref()?;
    let elapsed = m.started.elapsed().as_secs_f64();
    let sent = g.counters.wire_bytes - m.wire_at_start;
    Some(MigrationStatus {
        request: m.request.clone(),
        phase: m.phase,
        elapsed_ms: elapsed * 1e3,
        predicted_downtime_ms: m.predicted_ms,
        bytes_sent: sent,
        rate_bytes_per_s: if elapsed > 0.0 {
            sent as f64 / elapsed
        } else {
            0.0
        },
        throttle: g.live.throttle,
        error: m.error.clone(),
        report: m.report.clone(),
    })
}
