//! The throttle controller: per epoch, turn what was measured into a pressure in `[0, 1]` and, through a
//! [`throttle_curves::Curve`], into the vCPU throttle fraction to set.
//!
//! Pressure is the larger of two signals:
//! - **fill**: how much of the staging buffer the epoch's dirty pages took, `0..=1` (1: the epoch
//!   overflowed, and the guest had to stay paused while it was sent);
//! - **rate**: how fast the guest dirties memory against how fast the paths drain it. Dirtying at half the
//!   drain rate or less gives 0, dirtying at 1.5 times the drain rate or more gives 1, linear in between.
//!   Rates are smoothed over epochs (EWMA, weight 1/4 for the newest).
//!
//! The controller is pure (time comes in with the samples), so it is tested without a VM.

use std::time::Duration;

use throttle_curves::Curve;

/// What one epoch measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct EpochSample {
    /// Time since the previous sample.
    pub elapsed: Duration,
    /// Bytes of pages the guest dirtied in that time (harvested).
    pub dirty_bytes: u64,
    /// Chunk bytes the slowest streaming backup acknowledged in that time.
    pub drained_bytes: u64,
    /// Bytes of dirty pages the epoch's pause had to stage.
    pub staged_bytes: u64,
    /// The staging buffer's size.
    pub staging_capacity_bytes: u64,
}

/// The controller's view after a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Decision {
    /// Smoothed guest dirty rate, bytes/s.
    pub dirty_rate: f64,
    /// Smoothed drain rate, bytes/s.
    pub drain_rate: f64,
    /// Staging fill, `0..=1`.
    pub fill: f64,
    /// Pressure, `0..=1`.
    pub pressure: f64,
    /// Throttle fraction to set, `0..=0.99`.
    pub throttle: f64,
}

/// Throttle controller; see the module docs.
#[derive(Clone, Debug)]
pub struct Controller {
    curve: Curve,
    dirty_rate: Option<f64>,
    drain_rate: Option<f64>,
    last: Decision,
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        None => sample,
        Some(o) => o * 0.75 + sample * 0.25,
    }
}

impl Controller {
    /// A controller following `curve`.
    pub fn new(curve: Curve) -> Self {
        Self {
            curve,
            dirty_rate: None,
            drain_rate: None,
            last: Decision::default(),
        }
    }

    /// The curve in use.
    pub fn curve(&self) -> &Curve {
        &self.curve
    }

    /// The latest decision.
    pub fn last(&self) -> Decision {
        self.last
    }

    /// Takes one epoch's measurements and decides the throttle.
    pub fn sample(&mut self, s: EpochSample) -> Decision {
        let secs = s.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.dirty_rate = Some(ewma(self.dirty_rate, s.dirty_bytes as f64 / secs));
            self.drain_rate = Some(ewma(self.drain_rate, s.drained_bytes as f64 / secs));
        }
        let fill = if s.staging_capacity_bytes == 0 {
            0.0
        } else {
            (s.staged_bytes as f64 / s.staging_capacity_bytes as f64).clamp(0.0, 1.0)
        };
        let (dirty, drain) = (
            self.dirty_rate.unwrap_or(0.0),
            self.drain_rate.unwrap_or(0.0),
        );
        let rate = if dirty <= 0.0 {
            0.0
        } else if drain <= 0.0 {
            // Nothing drained while the guest dirtied: only the staging fill tells how bad it is.
            fill
        } else {
            ((dirty / drain - 0.5) / 1.0).clamp(0.0, 1.0)
        };
        let pressure = fill.max(rate);
        self.last = Decision {
            dirty_rate: dirty,
            drain_rate: drain,
            fill,
            pressure,
            throttle: self.curve.throttle(pressure),
        };
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dirty_mb: u64, drained_mb: u64, staged_mb: u64) -> EpochSample {
        EpochSample {
            elapsed: Duration::from_millis(100),
            dirty_bytes: dirty_mb << 20,
            drained_bytes: drained_mb << 20,
            staged_bytes: staged_mb << 20,
            staging_capacity_bytes: 48 << 20,
        }
    }

    #[test]
    fn no_pressure_with_headroom() {
        let mut c = Controller::new(Curve::parse("linear:start=0,max=0.9").unwrap());
        let d = c.sample(sample(1, 4, 1));
        assert!(d.pressure < 0.05, "{d:?}");
        assert!(d.throttle < 0.05, "{d:?}");
    }

    #[test]
    fn dirtying_faster_than_draining_raises_the_throttle_along_the_curve() {
        let curve = Curve::parse("linear:start=0,max=0.9").unwrap();
        let mut c = Controller::new(curve.clone());
        let mut d = Decision::default();
        for _ in 0..20 {
            d = c.sample(sample(4, 4, 2));
        }
        // Dirty = drain: rate pressure 0.5.
        assert!((d.pressure - 0.5).abs() < 1e-6, "{d:?}");
        assert!((d.throttle - curve.throttle(0.5)).abs() < 1e-9);
        for _ in 0..20 {
            d = c.sample(sample(8, 4, 2));
        }
        assert!((d.pressure - 1.0).abs() < 1e-6, "{d:?}");
        assert!((d.throttle - 0.9).abs() < 1e-9);
    }

    #[test]
    fn a_full_staging_buffer_is_full_pressure_even_if_rates_look_fine() {
        let mut c =
            Controller::new(Curve::parse("exponential:start=0.2,max=0.8,steepness=3").unwrap());
        let d = c.sample(sample(1, 4, 48));
        assert_eq!(d.fill, 1.0);
        assert!((d.throttle - 0.8).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn nothing_drained_falls_back_to_the_staging_fill() {
        let mut c = Controller::new(Curve::parse("linear:start=0,max=0.9").unwrap());
        let d = c.sample(sample(4, 0, 12));
        assert!((d.pressure - 0.25).abs() < 1e-9, "{d:?}");
    }
}
