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

/// What one epoch (or one pre-copy round) measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct EpochSample {
    /// Time since the previous epoch sample: the span of `dirty_bytes`.
    pub elapsed: Duration,
    /// Bytes of pages the guest dirtied in that time (harvested).
    pub dirty_bytes: u64,
    /// Time since the previous drain measurement (this kind of sample or
    /// [`Controller::sample_drain`]): the span of `drained_bytes`.
    pub drain_elapsed: Duration,
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
        }
        self.drain(s.drain_elapsed, s.drained_bytes);
        let fill = if s.staging_capacity_bytes == 0 {
            0.0
        } else {
            (s.staged_bytes as f64 / s.staging_capacity_bytes as f64).clamp(0.0, 1.0)
        };
        self.decide(fill)
    }

    /// Takes a drain measurement alone, made while a long send (a pre-copy round or a resync prefix) is in
    /// progress and no harvest says what the guest dirtied: the drain rate moves, the dirty rate and the
    /// staging fill keep their last values. A path that slows down mid-send thus raises the throttle
    /// before the send ends, not after.
    pub fn sample_drain(&mut self, elapsed: Duration, drained_bytes: u64) -> Decision {
        self.drain(elapsed, drained_bytes);
        self.decide(self.last.fill)
    }

    fn drain(&mut self, elapsed: Duration, drained_bytes: u64) {
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 {
            self.drain_rate = Some(ewma(self.drain_rate, drained_bytes as f64 / secs));
        }
    }

    fn decide(&mut self, fill: f64) -> Decision {
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

/// Epoch length and buffer sizes for a path of round-trip time `rtt` draining `drain_bytes_per_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Epoch length, ms: 100 on a LAN, 4 RTTs on a longer path (an epoch should take several round
    /// trips, or acknowledgements dominate it), at most 2 s.
    pub epoch_ms: u64,
    /// Staging buffer, bytes: twice what the paths drain in an epoch plus a round trip, 32 MiB to 512 MiB.
    pub staging_bytes: u64,
    /// Unacknowledged bytes allowed in flight per backup: twice the bandwidth-delay product, 16 MiB to
    /// 256 MiB, so that a long fat path stays full.
    pub in_flight_bytes: u64,
}

/// LAN/WAN tuning from the measured bandwidth-delay product: a high-RTT path gets longer epochs and larger
/// buffers. Pure; see [`Tuning`] for the rules.
pub fn tune(rtt: Duration, drain_bytes_per_s: f64) -> Tuning {
    let rtt_s = rtt.as_secs_f64();
    let epoch_ms = ((rtt_s * 4.0 * 1e3).round() as u64).clamp(100, 2000);
    let drain = drain_bytes_per_s.max(0.0);
    let staging = (2.0 * drain * (epoch_ms as f64 / 1e3 + rtt_s)) as u64;
    let in_flight = (2.0 * drain * rtt_s) as u64;
    Tuning {
        epoch_ms,
        staging_bytes: staging.clamp(32 << 20, 512 << 20),
        in_flight_bytes: in_flight.clamp(16 << 20, 256 << 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dirty_mb: u64, drained_mb: u64, staged_mb: u64) -> EpochSample {
        EpochSample {
            elapsed: Duration::from_millis(100),
            drain_elapsed: Duration::from_millis(100),
            dirty_bytes: dirty_mb << 20,
            drained_bytes: drained_mb << 20,
            staged_bytes: staged_mb << 20,
            staging_capacity_bytes: 48 << 20,
        }
    }

    #[test]
    fn a_drain_collapse_mid_send_raises_the_throttle_before_the_next_harvest() {
        let mut c = Controller::new(Curve::parse("linear:start=0.5,max=0.9").unwrap());
        // Balanced: the guest dirties 20 MB per 100 ms, the paths drain 40.
        for _ in 0..10 {
            c.sample(sample(20, 40, 4));
        }
        assert_eq!(c.last().throttle, 0.0);
        // A long pre-copy round: no harvest, but the paths now drain 2 MB per 100 ms.
        let mut d = c.last();
        for _ in 0..10 {
            d = c.sample_drain(Duration::from_millis(100), 2 << 20);
        }
        // 400 MB/s before, 21 MB/s now: the EWMA has come most of the way down.
        assert!(d.drain_rate < 60e6, "{d:?}");
        assert!(
            d.pressure > 0.99 && d.throttle > 0.89,
            "the drain collapse did not raise the throttle: {d:?}"
        );
        // No harvest happened: the dirty rate is the last one measured.
        assert!((d.dirty_rate - 20.0 * 1048576.0 / 0.1).abs() < 1.0, "{d:?}");
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
    fn longer_paths_get_longer_epochs_and_larger_buffers() {
        let lan = tune(Duration::from_micros(200), 1.25e9);
        let wan = tune(Duration::from_millis(50), 125e6);
        let thin = tune(Duration::from_millis(100), 12.5e6);
        assert_eq!(lan.epoch_ms, 100);
        assert_eq!(wan.epoch_ms, 200);
        assert_eq!(thin.epoch_ms, 400);
        // 1 Gbit/s at 50 ms: BDP 6.25 MB -> in flight at the 16 MiB floor; staging 2 x 125 MB/s x 250 ms.
        assert_eq!(wan.in_flight_bytes, 16 << 20);
        assert_eq!(wan.staging_bytes, 62_500_000);
        // A fast LAN needs a big staging buffer too: 2 x 1.25 GB/s x 100 ms.
        assert_eq!(lan.staging_bytes, 250_500_000);
        assert_eq!(thin.staging_bytes, 32 << 20);
        for (rtt_ms, drain) in [(0.1, 1e6), (10.0, 1e8), (300.0, 1e9)] {
            let a = tune(Duration::from_secs_f64(rtt_ms / 1e3), drain);
            let b = tune(Duration::from_secs_f64(rtt_ms * 2.0 / 1e3), drain);
            assert!(
                b.epoch_ms >= a.epoch_ms
                    && b.staging_bytes >= a.staging_bytes
                    && b.in_flight_bytes >= a.in_flight_bytes
            );
        }
    }

    #[test]
    fn nothing_drained_falls_back_to_the_staging_fill() {
        let mut c = Controller::new(Curve::parse("linear:start=0,max=0.9").unwrap());
        let d = c.sample(sample(4, 0, 12));
        assert!((d.pressure - 0.25).abs() < 1e-9, "{d:?}");
    }
}
