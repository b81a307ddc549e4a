//! The authority's transactions, planned from what a read saw: claim (a primary's start, a migration
//! target's take-over, a reclaim after an expiry), promote, and a migration's hand-over. Each plan is a
//! compare-and-set on the record's revision; the client sends it and reports back, and of two concurrent
//! plans on the same revision exactly one lands.

use std::time::Duration;

use super::{LeaseView, Record, RecordState};

/// What one read of the authority saw for a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The record and its modification revision; `None` when the VM has no record yet.
    pub record: Option<(Record, i64)>,
    /// The lease key, when present (its holder's lease has not expired at the server).
    pub lease: Option<LeaseView>,
}

/// What the lease key becomes when a [`TxnPlan`] lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseKeyOp {
    /// Put it on the acting node's own lease, naming that node and the plan's generation.
    OwnLease,
    /// Leave it as it is (a hand-over: the source's lease guards the record until the target takes it).
    Keep,
}

/// A compare-and-set to send to the authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnPlan {
    /// The record's modification revision it must still have (0: it must not exist).
    pub expect_revision: i64,
    /// The lease key must be absent (its holder's lease expired at the server).
    pub require_lease_absent: bool,
    /// The lease key must still be attached to this lease (the acting node's own).
    pub require_lease: Option<i64>,
    /// The record to write.
    pub record: Record,
    /// What happens to the lease key.
    pub lease_key: LeaseKeyOp,
}

/// Why the authority refuses an act; the message names the holder and generation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Another node holds the VM.
    #[error("the authority says node {:?} holds it under generation {} ({})", .record.holder, .record.generation, .record.state)]
    NotHolder {
        /// The record.
        record: Record,
    },
    /// The holder's lease has not expired at the authority: it may still run the VM.
    #[error(
        "node {:?}'s lease on generation {} is live at the authority{}: it may still run the VM; promote \
         after it expires",
        .lease.node, .lease.generation,
        .lease.remaining.map(|r| format!(" ({:.1} s left)", r.as_secs_f64())).unwrap_or_default()
    )]
    HolderLive {
        /// The lease key.
        lease: LeaseView,
    },
    /// The VM was never claimed at the authority: there is no generation to promote from.
    #[error("the authority has no record of it (no primary ever claimed it)")]
    NoRecord,
    /// The record moved on from the generation expected.
    #[error("expected generation {expected}, but the authority says {record}")]
    GenerationMoved {
        /// The generation expected.
        expected: u64,
        /// The record now.
        record: Record,
    },
    /// Another node's transaction landed first (a concurrent promote won).
    #[error("another node won: the authority now says {record}")]
    LostRace {
        /// The record now.
        record: Record,
    },
}

/// What a claim should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimPlan {
    /// Send this transaction.
    Txn(TxnPlan),
    /// A lease of this same node guards the record (an earlier process that has not expired yet): read
    /// again after about `remaining`.
    Wait {
        /// What the server says is left of that lease.
        remaining: Option<Duration>,
    },
    /// The claim cannot succeed.
    Refused(Refusal),
}

/// Plans `node`'s claim of a VM: a new VM's record at generation 1; a record naming `node` (this node's
/// earlier session, or a migration's hand-over to it) taken onto `node`'s own lease. With
/// `expect_generation`, the record must be at exactly that generation.
pub fn claim(node: &str, seen: &Observed, expect_generation: Option<u64>) -> ClaimPlan {
    let Some((record, revision)) = &seen.record else {
        if let Some(g) = expect_generation.filter(|&g| g != 1) {
            return ClaimPlan::Refused(Refusal::GenerationMoved {
                expected: g,
                record: Record {
                    generation: 0,
                    holder: String::new(),
                    state: RecordState::Running,
                },
            });
        }
        return ClaimPlan::Txn(TxnPlan {
            expect_revision: 0,
            require_lease_absent: true,
            require_lease: None,
            record: Record {
                generation: 1,
                holder: node.to_owned(),
                state: RecordState::Running,
            },
            lease_key: LeaseKeyOp::OwnLease,
        });
    };
    if record.holder != node {
        return ClaimPlan::Refused(Refusal::NotHolder {
            record: record.clone(),
        });
    }
    if let Some(g) = expect_generation.filter(|&g| g != record.generation) {
        return ClaimPlan::Refused(Refusal::GenerationMoved {
            expected: g,
            record: record.clone(),
        });
    }
    match &seen.lease {
        // Our own earlier lease on this very generation: only its expiry frees it.
        Some(l) if l.node == node && record.state == RecordState::Running => ClaimPlan::Wait {
            remaining: l.remaining,
        },
        // The source's lease guarding a hand-over to us: taken over by overwriting the key.
        Some(_) | None => ClaimPlan::Txn(TxnPlan {
            expect_revision: *revision,
            require_lease_absent: seen.lease.is_none(),
            require_lease: None,
            record: Record {
                generation: record.generation,
                holder: node.to_owned(),
                state: RecordState::Running,
            },
            lease_key: LeaseKeyOp::OwnLease,
        }),
    }
}

/// Plans `node`'s promote of a VM: allowed only once the holder's lease expired at the authority; the
/// record goes to the next generation, naming `node`, guarded by `node`'s own lease.
///
/// # Errors
/// [`Refusal::HolderLive`] while the lease key exists; [`Refusal::NoRecord`] for a VM never claimed.
pub fn promote(node: &str, seen: &Observed) -> Result<TxnPlan, Refusal> {
    let Some((record, revision)) = &seen.record else {
        return Err(Refusal::NoRecord);
    };
    if let Some(lease) = &seen.lease {
        return Err(Refusal::HolderLive {
            lease: lease.clone(),
        });
    }
    Ok(TxnPlan {
        expect_revision: *revision,
        require_lease_absent: true,
        require_lease: None,
        record: Record {
            generation: record.generation + 1,
            holder: node.to_owned(),
            state: RecordState::Running,
        },
        lease_key: LeaseKeyOp::OwnLease,
    })
}

/// What a promote's transaction came to: the generation won, or who won instead (from a read after a
/// failed compare).
///
/// # Errors
/// [`Refusal::LostRace`] or [`Refusal::HolderLive`], naming the winner.
pub fn settle_promote(plan: &TxnPlan, landed: bool, after: &Observed) -> Result<u64, Refusal> {
    if landed {
        return Ok(plan.record.generation);
    }
    match (&after.record, &after.lease) {
        (Some((r, _)), _) if r.generation >= plan.record.generation => {
            Err(Refusal::LostRace { record: r.clone() })
        }
        (_, Some(l)) => Err(Refusal::HolderLive { lease: l.clone() }),
        (Some((r, _)), None) => Err(Refusal::LostRace { record: r.clone() }),
        (None, None) => Err(Refusal::NoRecord),
    }
}

/// Plans a migration's commit point: the holder `node`, whose lease `lease_id` guards the record, hands
/// the next generation to `to`. The lease key stays on `node`'s lease until `to` claims it, so no
/// promote can slip in between.
///
/// # Errors
/// [`Refusal::NotHolder`] when the record names someone else; [`Refusal::GenerationMoved`] when it moved
/// past `generation`.
pub fn hand_over(
    node: &str,
    generation: u64,
    lease_id: i64,
    seen: &Observed,
    to: &str,
) -> Result<TxnPlan, Refusal> {
    let Some((record, revision)) = &seen.record else {
        return Err(Refusal::NoRecord);
    };
    if record.holder != node || record.state != RecordState::Running {
        return Err(Refusal::NotHolder {
            record: record.clone(),
        });
    }
    if record.generation != generation {
        return Err(Refusal::GenerationMoved {
            expected: generation,
            record: record.clone(),
        });
    }
    Ok(TxnPlan {
        expect_revision: *revision,
        require_lease_absent: false,
        require_lease: Some(lease_id),
        record: Record {
            generation: generation + 1,
            holder: to.to_owned(),
            state: RecordState::Handover,
        },
        lease_key: LeaseKeyOp::Keep,
    })
}
