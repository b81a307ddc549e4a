//! The link emulator's core: what one direction of an emulated link does to each packet, without I/O.
//!
//! The kernel here has no netem, so the bench emulates links in user space. The plumbing (TUN devices
//! between network namespaces) feeds every packet of one direction through a [`Link`] and sends it on when
//! [`Link::poll_deliver`] hands it back. The model, per direction, in this order:
//!
//! 1. **loss**: each packet is dropped with probability `loss` (independent; seeded PRNG);
//! 2. **queue**: a packet that would find more than `queue_bytes` waiting to be serialized is dropped
//!    (tail drop), as at a router's output queue;
//! 3. **rate**: packets are serialized one after another at `rate_bits_per_s` (`len × 8 / rate` each);
//! 4. **delay**: each then takes `one_way_delay` plus a jitter drawn uniformly from `±jitter`. Packets keep
//!    their order (a later packet never departs before an earlier one), as on one physical path.
//!
//! This is netem's `delay`, `loss`, `rate` and `limit`, without reordering or correlation.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One direction of an emulated link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    /// Name (`lan`, `wan`, ...).
    pub name: String,
    /// Propagation delay, one way.
    pub one_way_delay: Duration,
    /// Uniform jitter added to the delay, `±jitter`.
    pub jitter: Duration,
    /// Packet loss probability, `0..=1`.
    pub loss: f64,
    /// Serialization rate, bits/s; `None` for unlimited.
    pub rate_bits_per_s: Option<u64>,
    /// Bytes that may wait for serialization before packets are dropped.
    pub queue_bytes: usize,
}

impl LinkProfile {
    /// The round trip the propagation delay makes, without jitter or queueing, ms.
    pub fn rtt_ms(&self) -> f64 {
        2.0 * self.one_way_delay.as_secs_f64() * 1e3
    }

    /// The issue's `lan`: 10 Gbit/s, 0.2 ms RTT, no loss.
    pub fn lan() -> Self {
        Self {
            name: "lan".into(),
            one_way_delay: Duration::from_micros(100),
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bits_per_s: Some(10_000_000_000),
            queue_bytes: 4 << 20,
        }
    }

    /// The issue's `wan`: 1 Gbit/s, 50 ms RTT, 0.1 % loss.
    pub fn wan() -> Self {
        Self {
            name: "wan".into(),
            one_way_delay: Duration::from_millis(25),
            jitter: Duration::from_millis(1),
            loss: 0.001,
            rate_bits_per_s: Some(1_000_000_000),
            // About one bandwidth-delay product.
            queue_bytes: 6 << 20,
        }
    }

    /// The issue's `thin-wan`: 100 Mbit/s, 100 ms RTT, 0.5 % loss.
    pub fn thin_wan() -> Self {
        Self {
            name: "thin-wan".into(),
            one_way_delay: Duration::from_millis(50),
            jitter: Duration::from_millis(2),
            loss: 0.005,
            rate_bits_per_s: Some(100_000_000),
            queue_bytes: 1250 << 10,
        }
    }

    /// A profile by name: `lan`, `wan` or `thin-wan`.
    ///
    /// # Errors
    /// The name is none of those.
    pub fn named(name: &str) -> Result<Self, String> {
        match name {
            "lan" => Ok(Self::lan()),
            "wan" => Ok(Self::wan()),
            "thin-wan" => Ok(Self::thin_wan()),
            other => Err(format!(
                "unknown link profile {other:?} (lan, wan, thin-wan)"
            )),
        }
    }
}

/// What happened to an offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// It will be delivered at this time.
    Queued(Instant),
    /// Dropped by the loss model.
    Lost,
    /// Dropped because the queue was full.
    QueueFull,
}

/// Counters of a [`Link`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Packets offered.
    pub offered: u64,
    /// Packets delivered so far.
    pub delivered: u64,
    /// Bytes delivered so far.
    pub delivered_bytes: u64,
    /// Packets dropped by the loss model.
    pub lost: u64,
    /// Packets dropped at a full queue.
    pub queue_drops: u64,
}

/// One direction of an emulated link; see the module docs.
#[derive(Debug)]
pub struct Link {
    profile: LinkProfile,
    rng: u64,
    /// When the serializer is free again.
    busy_until: Option<Instant>,
    last_departure: Option<Instant>,
    in_flight: VecDeque<(Instant, Vec<u8>)>,
    stats: LinkStats,
}

impl Link {
    /// A link following `profile`, its loss and jitter drawn from a PRNG seeded with `seed`.
    pub fn new(profile: LinkProfile, seed: u64) -> Self {
        Self {
            profile,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            busy_until: None,
            last_departure: None,
            in_flight: VecDeque::new(),
            stats: LinkStats::default(),
        }
    }

    /// The profile.
    pub fn profile(&self) -> &LinkProfile {
        &self.profile
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// A uniform draw in `[0, 1)` (splitmix64).
    fn uniform(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Bytes waiting for serialization at `now`.
    pub fn backlog_bytes(&self, now: Instant) -> usize {
        match (self.busy_until, self.profile.rate_bits_per_s) {
            (Some(t), Some(rate)) if t > now => {
                ((t - now).as_secs_f64() * rate as f64 / 8.0) as usize
            }
            _ => 0,
        }
    }

    /// A packet arrives at the link at `now`.
    pub fn offer(&mut self, now: Instant, packet: Vec<u8>) -> Offer {
        self.stats.offered += 1;
        if self.profile.loss > 0.0 && self.uniform() < self.profile.loss {
            self.stats.lost += 1;
            return Offer::Lost;
        }
        if self.backlog_bytes(now) + packet.len() > self.profile.queue_bytes {
            self.stats.queue_drops += 1;
            return Offer::QueueFull;
        }
        let start = self.busy_until.map_or(now, |t| t.max(now));
        let serialized = match self.profile.rate_bits_per_s {
            Some(rate) => start + Duration::from_secs_f64(packet.len() as f64 * 8.0 / rate as f64),
            None => start,
        };
        self.busy_until = Some(serialized);
        let j = self.profile.jitter.as_secs_f64();
        let delay =
            (self.profile.one_way_delay.as_secs_f64() + (self.uniform() * 2.0 - 1.0) * j).max(0.0);
        let mut departure = serialized + Duration::from_secs_f64(delay);
        if let Some(last) = self.last_departure {
            departure = departure.max(last);
        }
        self.last_departure = Some(departure);
        self.in_flight.push_back((departure, packet));
        Offer::Queued(departure)
    }

    /// The next packet whose time has come at `now`, if any.
    pub fn poll_deliver(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.in_flight.front().is_some_and(|(t, _)| *t <= now) {
            let (_, p) = self.in_flight.pop_front().expect("non-empty");
            self.stats.delivered += 1;
            self.stats.delivered_bytes += p.len() as u64;
            Some(p)
        } else {
            None
        }
    }

    /// When the next packet is due (`None`: nothing in flight).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.in_flight.front().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(
        rate: Option<u64>,
        delay_ms: u64,
        jitter_ms: u64,
        loss: f64,
        queue: usize,
    ) -> LinkProfile {
        LinkProfile {
            name: "t".into(),
            one_way_delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            loss,
            rate_bits_per_s: rate,
            queue_bytes: queue,
        }
    }

    #[test]
    fn a_backlog_drains_at_the_rate_then_arrives_after_the_delay() {
        // 8 Mbit/s = 1 MB/s: 1000 packets of 1000 bytes take 1 s to serialize, then 30 ms to arrive.
        let mut l = Link::new(profile(Some(8_000_000), 30, 0, 0.0, usize::MAX), 1);
        let t0 = Instant::now();
        let mut last = t0;
        for _ in 0..1000 {
            match l.offer(t0, vec![0; 1000]) {
                Offer::Queued(t) => last = t,
                other => panic!("{other:?}"),
            }
        }
        let took = (last - t0).as_secs_f64();
        assert!((took - 1.030).abs() < 1e-6, "{took}");
        // Nothing arrives before its time; everything arrives by then, in order.
        assert!(l.poll_deliver(t0 + Duration::from_millis(30)).is_none());
        let mut n = 0;
        while l.poll_deliver(last).is_some() {
            n += 1;
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn losses_follow_the_probability() {
        let mut l = Link::new(profile(None, 0, 0, 0.01, usize::MAX), 7);
        let t0 = Instant::now();
        for _ in 0..200_000 {
            l.offer(t0, vec![0; 64]);
        }
        let lost = l.stats().lost as f64 / 200_000.0;
        // 1 % with a standard deviation of 0.022 %: 5 sigma either side.
        assert!((lost - 0.01).abs() < 0.0011, "{lost}");
    }

    #[test]
    fn a_full_queue_drops_at_the_tail() {
        // 1 Mbit/s with 64 KiB of queue: a burst of 1 MB mostly drops.
        let mut l = Link::new(profile(Some(1_000_000), 0, 0, 0.0, 64 << 10), 3);
        let t0 = Instant::now();
        let accepted = (0..1000)
            .filter(|_| matches!(l.offer(t0, vec![0; 1000]), Offer::Queued(_)))
            .count();
        assert!((65..=66).contains(&accepted), "{accepted}");
        assert_eq!(l.stats().queue_drops, 1000 - accepted as u64);
        // Once the queue drained, packets are accepted again.
        assert!(matches!(
            l.offer(t0 + Duration::from_secs(1), vec![0; 1000]),
            Offer::Queued(_)
        ));
    }

    #[test]
    fn jitter_never_reorders_and_stays_in_bounds() {
        let mut l = Link::new(profile(None, 20, 5, 0.0, usize::MAX), 11);
        let t0 = Instant::now();
        let mut prev = t0;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            let Offer::Queued(t) = l.offer(now, vec![0; 100]) else {
                panic!()
            };
            assert!(t >= prev, "reordered");
            assert!(t >= now + Duration::from_millis(15));
            prev = t;
        }
    }
}
