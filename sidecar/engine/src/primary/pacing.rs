//! The throttle glue: what the epoch loop measures goes into the [`Controller`], its decision becomes the
//! VMM's vCPU throttle (when the VMM has one), and LAN/WAN tuning follows the measured path. A VMM without a
//! throttle gets decisions recorded but not applied: the emergency policy alone deals with a guest that
//! outruns the paths, and the report and status say the throttle is unsupported.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::epoch::EpochLoop;
use super::shared::Live;
use crate::throttle::{Controller, Decision, EpochSample};

/// The controller and what it last decided.
pub(super) struct Pacing {
    pub controller: Controller,
    /// Whether the VMM can throttle its vCPUs.
    pub supported: bool,
    /// The throttle in force.
    pub throttle_now: f64,
    /// When the controller last saw a harvest, and the dirty byte count then.
    last_sample: (Instant, u64),
    /// When the controller last saw the drain, and each backup's acknowledged page bytes then.
    last_drain: (Instant, Vec<u64>),
    /// Converging: the throttle does not go below this.
    pub floor: f64,
    /// Highest drain rate measured: the paths' capacity, for predicting a switchover.
    pub peak_drain: f64,
    /// Throttle in force after each sample (report).
    pub throttles: Vec<f64>,
    /// Pressure of each sample (report).
    pub pressures: Vec<f64>,
}

impl Pacing {
    pub fn new(controller: Controller, supported: bool, backups: usize) -> Self {
        Self {
            controller,
            supported,
            throttle_now: 0.0,
            last_sample: (Instant::now(), 0),
            last_drain: (Instant::now(), vec![0; backups]),
            floor: 0.0,
            peak_drain: 0.0,
            throttles: Vec::new(),
            pressures: Vec::new(),
        }
    }

    /// Whether raising the throttle cannot slow the guest more: it is at the curve's top, or the VMM has
    /// none.
    pub fn spent(&self) -> bool {
        !self.supported || self.throttle_now >= self.controller.curve().max_throttle() - 0.005
    }
}

impl EpochLoop {
    /// Page bytes (pages x page size) the slowest streaming backup acknowledged since the last drain
    /// measurement, and the time that took; starts the next measurement.
    fn drained(&mut self) -> (Duration, u64) {
        let now = Instant::now();
        let g = self.shared.lock();
        // In page bytes, as the dirty rate it is compared with: chunk bodies would make a compressible
        // guest (or one with many zero pages) look like a slow path and throttle it for nothing.
        let acked: Vec<u64> = (0..g.sender.backups())
            .map(|b| g.sender.acked_pages(b) * self.page_size as u64)
            .collect();
        let (then, acked_then) = &self.pacing.last_drain;
        let drained = (0..acked.len())
            .filter(|&b| g.sender.is_streaming(b))
            .map(|b| acked[b] - acked_then[b])
            .min()
            .unwrap_or(0);
        let elapsed = now - *then;
        drop(g);
        self.pacing.last_drain = (now, acked);
        (elapsed, drained)
    }

    /// Feeds this epoch's (or pre-copy round's) measurements to the throttle controller and sets the
    /// throttle it decides.
    pub(super) fn control(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let (then, dirty_then) = self.pacing.last_sample;
        // Acknowledgements come in bursts: a drain window much shorter than an epoch (right after a
        // mid-send sample) says more about the burst than the path, and is left to the next sample.
        let half_epoch = Duration::from_millis(self.cfg.epoch_ms / 2);
        let (drain_elapsed, drained_bytes) = if self.pacing.last_drain.0.elapsed() >= half_epoch {
            self.drained()
        } else {
            (Duration::ZERO, 0)
        };
        self.shared
            .metrics
            .dirty_bytes
            .inc_by(self.stats.dirty_bytes - dirty_then);
        let d = self.pacing.controller.sample(EpochSample {
            elapsed: now - then,
            dirty_bytes: self.stats.dirty_bytes - dirty_then,
            drain_elapsed,
            drained_bytes,
            staged_bytes: self.stats.last_dirty_bytes,
            staging_capacity_bytes: self.cfg.staging,
        });
        self.pacing.last_sample = (now, self.stats.dirty_bytes);
        self.pacing.pressures.push(d.pressure);
        self.tune(d.drain_rate);
        self.apply(d)?;
        self.pacing.throttles.push(self.pacing.throttle_now);
        Ok(())
    }

    /// During a long send (pre-copy round, resync prefix, overflow): at most once per epoch length, a
    /// drain-only sample, so that a path slowing down raises the throttle now rather than when the send
    /// ends ([`Controller::sample_drain`]).
    pub(super) fn control_mid_send(&mut self) -> anyhow::Result<()> {
        if self.pacing.last_drain.0.elapsed() < Duration::from_millis(self.cfg.epoch_ms) {
            return Ok(());
        }
        let (elapsed, drained) = self.drained();
        let d = self.pacing.controller.sample_drain(elapsed, drained);
        self.apply(d)
    }

    /// Publishes a decision for the control API and, when the VMM can throttle, sets its throttle when
    /// it moved by a point or more.
    fn apply(&mut self, mut d: Decision) -> anyhow::Result<()> {
        d.throttle = d.throttle.max(self.pacing.floor);
        self.pacing.peak_drain = self.pacing.peak_drain.max(d.drain_rate);
        self.shared.lock().live = Live {
            epoch: self.next_epoch.saturating_sub(1),
            epoch_ms: self.cfg.epoch_ms,
            throttle: if self.pacing.supported {
                d.throttle
            } else {
                0.0
            },
            pressure: d.pressure,
            dirty_rate: d.dirty_rate,
            drain_rate: d.drain_rate,
            emergencies: self.stats.overflow_epochs + self.stats.discards,
        };
        if !self.pacing.supported {
            return Ok(());
        }
        if (d.throttle - self.pacing.throttle_now).abs() >= 0.01 {
            self.vmm
                .set_throttle(d.throttle)
                .context("setting the vCPU throttle")?;
            tracing::debug!(
                pressure = d.pressure,
                throttle = d.throttle,
                dirty_rate = d.dirty_rate,
                drain_rate = d.drain_rate,
                "throttle"
            );
            self.pacing.throttle_now = d.throttle;
        }
        Ok(())
    }

    /// LAN/WAN tuning: the settings the operator left alone follow the bandwidth-delay product of the slowest
    /// backup's path ([`crate::throttle::tune`]). Staging only grows (the buffer is touched here, outside
    /// any pause).
    fn tune(&mut self, drain_rate: f64) {
        let rtt = {
            let g = self.shared.lock();
            (0..g.sender.backups())
                .filter(|&b| g.sender.is_streaming(b))
                .filter_map(|b| g.sender.rtt(b))
                .max()
        };
        let (Some(rtt), true) = (rtt, drain_rate > 0.0) else {
            return;
        };
        let t = crate::throttle::tune(rtt, drain_rate);
        let explicit = self.cfg.explicit;
        if !explicit.epoch_ms && t.epoch_ms != self.cfg.epoch_ms {
            tracing::info!(
                epoch_ms = t.epoch_ms,
                ?rtt,
                "epoch length follows the path's RTT"
            );
            self.cfg.epoch_ms = t.epoch_ms;
        }
        if !explicit.staging && t.staging_bytes > self.cfg.staging {
            tracing::info!(
                staging = t.staging_bytes,
                drain_rate,
                "staging grows with the bandwidth-delay product"
            );
            self.cfg.staging = t.staging_bytes;
            self.staging.resize(t.staging_bytes as usize, 0xa5);
        }
        if !explicit.max_unacked && t.in_flight_bytes != self.cfg.max_unacked {
            self.cfg.max_unacked = t.in_flight_bytes;
        }
    }

    /// Clears the throttle at the end of replication: the guest must not stay slowed down for it.
    pub(super) fn clear_throttle(&mut self) -> anyhow::Result<()> {
        if self.pacing.supported && self.pacing.throttle_now > 0.0 {
            self.vmm
                .set_throttle(0.0)
                .context("clearing the vCPU throttle")?;
            self.pacing.throttle_now = 0.0;
        }
        Ok(())
    }
}
