//! Simulation of the fencing authority: a model of etcd's semantics (one revision counter, compare-and-set
//! transactions, leases that expire on the server's clock), a primary keeping its hold through
//! [`HoldKeeper`] on a clock that drifts, partitions between it and the authority, and backups that race
//! to promote the moment they may. Asserts that at no instant of real time two guests run, that exactly
//! one promote wins, and that a primary nobody replaced gets its hold back.

use std::collections::HashMap;
use std::time::Duration;

use endophyte_wire::authority::{
    self, BootInstant, HoldAction, HoldKeeper, HoldTiming, LeaseKeyOp, LeaseView, Observed, Record,
    TxnPlan,
};

const MS: Duration = Duration::from_millis(1);

/// The model of etcd: real time is its clock.
#[derive(Default)]
struct SimEtcd {
    rev: i64,
    record: Option<(Record, i64)>,
    /// `(node, generation, lease id)`.
    lease_key: Option<(String, u64, i64)>,
    leases: HashMap<i64, Duration>,
    next_lease: i64,
}

impl SimEtcd {
    fn expire(&mut self, now: Duration) {
        self.leases.retain(|_, exp| *exp > now);
        if let Some((_, _, id)) = &self.lease_key {
            if !self.leases.contains_key(id) {
                self.lease_key = None;
                self.rev += 1;
            }
        }
    }
    fn grant(&mut self, ttl: Duration, now: Duration) -> i64 {
        self.next_lease += 1;
        self.leases.insert(self.next_lease, now + ttl);
        self.next_lease
    }
    fn keepalive(&mut self, id: i64, ttl: Duration, now: Duration) -> Duration {
        match self.leases.get_mut(&id) {
            Some(exp) => {
                *exp = now + ttl;
                ttl
            }
            None => Duration::ZERO,
        }
    }
    fn read(&self) -> Observed {
        Observed {
            record: self.record.clone(),
            lease: self
                .lease_key
                .as_ref()
                .map(|(node, generation, id)| LeaseView {
                    node: node.clone(),
                    generation: *generation,
                    lease_id: *id,
                    remaining: None,
                }),
        }
    }
    /// Applies `plan` for `node` (whose own lease is `own`) if its compares hold.
    fn txn(&mut self, plan: &TxnPlan, node: &str, own: i64) -> bool {
        let rev_now = self.record.as_ref().map_or(0, |r| r.1);
        if rev_now != plan.expect_revision
            || (plan.require_lease_absent && self.lease_key.is_some())
            || plan
                .require_lease
                .is_some_and(|l| self.lease_key.as_ref().map(|k| k.2) != Some(l))
        {
            return false;
        }
        self.rev += 1;
        self.record = Some((plan.record.clone(), self.rev));
        if plan.lease_key == LeaseKeyOp::OwnLease {
            self.lease_key = Some((node.to_owned(), plan.record.generation, own));
        }
        true
    }
}

struct Primary {
    keeper: HoldKeeper,
    /// This node's clock rate against real time (1.01: runs 1 % fast).
    rate: f64,
    lease: i64,
    /// Keep-alives in flight: `(seq, arrives at the server)`.
    in_flight: Vec<(u64, Duration)>,
    /// Answers in flight: `(seq, ttl, arrives here)`.
    answers: Vec<(u64, Duration, Duration)>,
    /// The guest runs (real time it stops, once a fence was decided).
    running: bool,
    stops_at: Option<Duration>,
}

impl Primary {
    fn clock(&self, real: Duration) -> BootInstant {
        BootInstant::from_since_boot(real.mul_f64(self.rate))
    }
}

struct Scenario {
    rate: f64,
    /// The primary is cut from the authority over `[from, to)`.
    cut: (Duration, Duration),
    /// Backups try to promote from this time on (every 50 ms each, both at the same instant).
    promote_from: Option<Duration>,
    end: Duration,
}

struct Outcome {
    winners: Vec<String>,
    primary_superseded: bool,
    primary_running_at_end: bool,
    overlap: Option<Duration>,
}

fn run(s: Scenario) -> Outcome {
    let timing = HoldTiming::new(Duration::from_secs(5), 500 * MS);
    timing.check().unwrap();
    let one_way = 3 * MS;
    let mut etcd = SimEtcd::default();
    let mut p = Primary {
        keeper: HoldKeeper::new(timing),
        rate: s.rate,
        lease: 0,
        in_flight: vec![],
        answers: vec![],
        running: false,
        stops_at: None,
    };
    // The primary's start: claim a new VM.
    p.lease = etcd.grant(timing.ttl, Duration::ZERO);
    let plan = match authority::claim("a", &etcd.read(), None) {
        authority::ClaimPlan::Txn(t) => t,
        other => panic!("{other:?}"),
    };
    assert!(etcd.txn(&plan, "a", p.lease));
    p.keeper
        .handle_claimed(plan.record.generation, p.clock(Duration::ZERO));
    let mut promoted: Vec<(String, Duration)> = vec![];
    let mut overlap = None;
    let mut real = Duration::ZERO;
    while real < s.end {
        real += MS;
        etcd.expire(real);
        let connected = !(real >= s.cut.0 && real < s.cut.1);
        // Keep-alives reaching the server, answers reaching the primary.
        let (arrived, rest): (Vec<_>, Vec<_>) =
            p.in_flight.drain(..).partition(|&(_, at)| at <= real);
        p.in_flight = rest;
        for (seq, _) in arrived {
            if connected {
                let ttl = etcd.keepalive(p.lease, timing.ttl, real);
                p.answers.push((seq, ttl, real + one_way));
            }
        }
        let (arrived, rest): (Vec<_>, Vec<_>) =
            p.answers.drain(..).partition(|&(_, _, at)| at <= real);
        p.answers = rest;
        let now = p.clock(real);
        for (seq, ttl, _) in arrived {
            if connected {
                p.keeper.handle_keepalive(seq, ttl, now);
            }
        }
        p.keeper.handle_timeout(now);
        while let Some(a) = p.keeper.poll_action() {
            match a {
                HoldAction::KeepAlive { seq } => {
                    if connected {
                        p.in_flight.push((seq, real + one_way));
                    }
                }
                // Worst case: the fence takes its whole action bound to act.
                HoldAction::Fence { .. } | HoldAction::Superseded { .. } => {
                    p.stops_at.get_or_insert(real + timing.action_bound);
                }
                HoldAction::Unfence => {
                    p.stops_at = None;
                    p.running = true;
                }
                HoldAction::Reclaim => {
                    if !connected {
                        p.keeper.handle_reclaim_failed(now);
                        continue;
                    }
                    let lease = etcd.grant(timing.ttl, real);
                    match authority::claim("a", &etcd.read(), Some(p.keeper.generation())) {
                        authority::ClaimPlan::Txn(t) if etcd.txn(&t, "a", lease) => {
                            p.lease = lease;
                            p.keeper.handle_claimed(t.record.generation, now);
                        }
                        authority::ClaimPlan::Refused(r) => {
                            p.keeper.handle_superseded(r.to_string())
                        }
                        _ => p.keeper.handle_reclaim_failed(now),
                    }
                }
            }
        }
        if p.stops_at.is_some_and(|t| real >= t) {
            p.running = false;
        }
        // Backups race: both read the same state, then both send their transactions.
        if s.promote_from
            .is_some_and(|t| real >= t && (real - t).as_millis() % 50 == 0)
            && promoted.is_empty()
        {
            let seen = etcd.read();
            let plans: Vec<_> = ["b1", "b2"]
                .iter()
                .map(|b| (b, authority::promote(b, &seen)))
                .collect();
            for (b, plan) in plans {
                let Ok(plan) = plan else { continue };
                let lease = etcd.grant(timing.ttl, real);
                let landed = etcd.txn(&plan, b, lease);
                match authority::settle_promote(&plan, landed, &etcd.read()) {
                    Ok(g) => {
                        assert_eq!(g, 2);
                        promoted.push((b.to_string(), real));
                    }
                    Err(e) => assert!(e.to_string().contains("won"), "{e}"),
                }
            }
        }
        if p.running && !promoted.is_empty() && overlap.is_none() {
            overlap = Some(real);
        }
    }
    Outcome {
        winners: promoted.into_iter().map(|w| w.0).collect(),
        primary_superseded: p.keeper.is_superseded(),
        primary_running_at_end: p.running,
        overlap,
    }
}

#[test]
fn a_cut_primary_stops_before_any_promote_and_exactly_one_backup_wins() {
    for rate in [0.99, 1.0, 1.01] {
        let o = run(Scenario {
            rate,
            cut: (Duration::from_secs(5), Duration::from_secs(60)),
            // The backups try from the cut on: they promote the moment the server lets them.
            promote_from: Some(Duration::from_secs(5)),
            end: Duration::from_secs(40),
        });
        assert_eq!(
            o.overlap, None,
            "two guests ran at once (clock rate {rate})"
        );
        assert_eq!(o.winners.len(), 1, "winners: {:?}", o.winners);
        assert!(!o.primary_running_at_end);
    }
}

#[test]
fn a_healed_primary_that_was_replaced_never_runs_again() {
    let o = run(Scenario {
        rate: 1.0,
        cut: (Duration::from_secs(5), Duration::from_secs(20)),
        promote_from: Some(Duration::from_secs(5)),
        end: Duration::from_secs(40),
    });
    assert_eq!(o.overlap, None);
    assert_eq!(o.winners.len(), 1);
    assert!(
        o.primary_superseded,
        "the primary should learn it was replaced"
    );
    assert!(!o.primary_running_at_end);
}

#[test]
fn a_healed_primary_nobody_replaced_gets_its_hold_back() {
    let o = run(Scenario {
        rate: 1.0,
        cut: (Duration::from_secs(5), Duration::from_secs(20)),
        promote_from: None,
        end: Duration::from_secs(40),
    });
    assert!(o.winners.is_empty());
    assert!(!o.primary_superseded);
    assert!(o.primary_running_at_end, "the reclaim should unfence it");
}

#[test]
fn a_connected_primary_is_never_promoted_over() {
    let o = run(Scenario {
        rate: 0.99,
        cut: (Duration::from_secs(100), Duration::from_secs(100)),
        promote_from: Some(Duration::from_secs(1)),
        end: Duration::from_secs(30),
    });
    assert!(o.winners.is_empty(), "{:?}", o.winners);
    assert!(o.primary_running_at_end);
}

#[test]
fn a_hand_over_keeps_promotes_out_until_the_target_claims() {
    let mut etcd = SimEtcd::default();
    let ttl = Duration::from_secs(5);
    let a = etcd.grant(ttl, Duration::ZERO);
    let authority::ClaimPlan::Txn(c) = authority::claim("a", &etcd.read(), None) else {
        panic!()
    };
    assert!(etcd.txn(&c, "a", a));
    // The switchover's commit point: a hands generation 2 to b1.
    let h = authority::hand_over("a", 1, a, &etcd.read(), "b1").unwrap();
    assert!(etcd.txn(&h, "a", a));
    // b2 cannot promote: a's lease still guards the record.
    let e = authority::promote("b2", &etcd.read()).unwrap_err();
    assert!(e.to_string().contains("\"a\""), "{e}");
    // b1 claims generation 2 onto its own lease; a may then let its lease go.
    let b1 = etcd.grant(ttl, Duration::ZERO);
    let authority::ClaimPlan::Txn(t) = authority::claim("b1", &etcd.read(), Some(2)) else {
        panic!()
    };
    assert!(etcd.txn(&t, "b1", b1));
    etcd.leases.remove(&a);
    etcd.expire(Duration::from_secs(1));
    assert!(authority::promote("b2", &etcd.read()).is_err());
    // a claiming again is refused, naming b1.
    let authority::ClaimPlan::Refused(r) = authority::claim("a", &etcd.read(), Some(1)) else {
        panic!()
    };
    assert!(r.to_string().contains("b1"), "{r}");
}
