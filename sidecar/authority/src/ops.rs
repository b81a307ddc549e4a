//! One act each at the authority: claim, promote, hand over. Transient errors are retried within a
//! bound; a refusal comes back at once, naming the holder and generation.

use std::time::{Duration, Instant};

use endophyte_wire::authority::{self, BootInstant, ClaimPlan, RecordState};

use crate::clock::boot_now;
use crate::{Authority, AuthorityError};

/// How often a compare that lost to a concurrent write is planned again before giving up.
const CAS_ROUNDS: usize = 8;

/// A hold just taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// The generation held.
    pub generation: u64,
    /// The node's lease guarding it.
    pub lease: i64,
    /// When (boot clock) the lease's grant was asked: the hold is safe from there.
    pub asked: BootInstant,
}

/// Claims VM `vm` for `node`: a new VM's record at generation 1, or a record naming `node` (its earlier
/// session, a migration handed to it) taken onto a new lease of `node`'s. With `expect_generation`, the
/// record must be at exactly that generation. An earlier lease of `node` on the record is waited out
/// for up to `wait` (a restarted sidecar's predecessor).
///
/// # Errors
/// [`AuthorityError::Refused`] (another holder, a moved generation), [`AuthorityError::StillHeld`], or
/// the last transient error once `wait` has passed.
pub async fn claim(
    auth: &dyn Authority,
    vm: &str,
    node: &str,
    ttl: Duration,
    expect_generation: Option<u64>,
    wait: Duration,
) -> Result<Claimed, AuthorityError> {
    let t0 = Instant::now();
    let mut rounds = 0;
    loop {
        let seen = match auth.observe(vm).await {
            Ok(s) => s,
            Err(e) if !e.is_permanent() && t0.elapsed() < wait => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                tracing::debug!(%vm, "claim: {e}; retrying");
                continue;
            }
            Err(e) => return Err(e),
        };
        match authority::claim(node, &seen, expect_generation) {
            ClaimPlan::Refused(refusal) => {
                return Err(AuthorityError::Refused {
                    vm: vm.into(),
                    refusal,
                })
            }
            ClaimPlan::Wait { remaining } => {
                if t0.elapsed() >= wait {
                    return Err(AuthorityError::StillHeld {
                        vm: vm.into(),
                        node: node.into(),
                        generation: seen.record.map_or(0, |r| r.0.generation),
                        waited: t0.elapsed(),
                    });
                }
                tracing::info!(%vm, ?remaining, "an earlier lease of this node guards the VM; waiting for it to expire");
                tokio::time::sleep(
                    remaining
                        .unwrap_or(Duration::from_secs(1))
                        .clamp(Duration::from_millis(200), Duration::from_secs(1)),
                )
                .await;
            }
            ClaimPlan::Txn(plan) => {
                let asked = boot_now();
                let lease = auth.grant(ttl).await?;
                match auth.apply(vm, node, &plan, lease).await {
                    Ok(true) => {
                        return Ok(Claimed {
                            generation: plan.record.generation,
                            lease,
                            asked,
                        })
                    }
                    Ok(false) => {
                        let _ = auth.revoke(lease).await;
                        rounds += 1;
                        if rounds >= CAS_ROUNDS {
                            let seen = auth.observe(vm).await?;
                            return Err(AuthorityError::Refused {
                                vm: vm.into(),
                                refusal: match seen.record {
                                    Some((record, _)) => authority::Refusal::LostRace { record },
                                    None => authority::Refusal::NoRecord,
                                },
                            });
                        }
                    }
                    Err(e) => {
                        let _ = auth.revoke(lease).await;
                        if e.is_permanent() || t0.elapsed() >= wait {
                            return Err(e);
                        }
                    }
                }
            }
        }
    }
}

/// Promotes VM `vm` on `node`: allowed only once the holder's lease expired at the authority; the record
/// goes to the next generation naming `node`, on a new lease of `node`'s. Of concurrent promotes exactly
/// one lands; the others are refused naming the winner.
///
/// # Errors
/// [`AuthorityError::Refused`]: the holder's lease is live, another promote won, the VM was never
/// claimed; transient errors as they come (a promote is an operator's act: they retry it).
pub async fn promote(
    auth: &dyn Authority,
    vm: &str,
    node: &str,
    ttl: Duration,
) -> Result<Claimed, AuthorityError> {
    let seen = auth.observe(vm).await?;
    let plan = authority::promote(node, &seen).map_err(|refusal| AuthorityError::Refused {
        vm: vm.into(),
        refusal,
    })?;
    let asked = boot_now();
    let lease = auth.grant(ttl).await?;
    let landed = match auth.apply(vm, node, &plan, lease).await {
        Ok(l) => l,
        Err(e) => {
            // Unknown outcome: the record says whether it landed.
            let after = auth.observe(vm).await.map_err(|_| e)?;
            after
                .record
                .as_ref()
                .is_some_and(|(r, _)| r == &plan.record)
                && after.lease.as_ref().is_some_and(|l| l.lease_id == lease)
        }
    };
    let after = if landed {
        seen
    } else {
        let _ = auth.revoke(lease).await;
        auth.observe(vm).await?
    };
    authority::settle_promote(&plan, landed, &after)
        .map(|generation| Claimed {
            generation,
            lease,
            asked,
        })
        .map_err(|refusal| AuthorityError::Refused {
            vm: vm.into(),
            refusal,
        })
}

/// A migration's commit point: `node`, holding `generation` on lease `lease`, hands generation + 1 to
/// `to`. Returns the new generation. Once this returns `Ok`, `node` must never run the VM again.
///
/// # Errors
/// [`AuthorityError::Refused`] when `node` no longer holds `generation`; transient errors when the
/// outcome could not be learnt (then it may have landed: the caller treats the switchover as in doubt).
pub async fn hand_over(
    auth: &dyn Authority,
    vm: &str,
    node: &str,
    generation: u64,
    lease: i64,
    to: &str,
) -> Result<u64, AuthorityError> {
    let seen = auth.observe(vm).await?;
    let plan = authority::hand_over(node, generation, lease, &seen, to).map_err(|refusal| {
        AuthorityError::Refused {
            vm: vm.into(),
            refusal,
        }
    })?;
    let applied = auth.apply(vm, node, &plan, lease).await;
    if let Ok(true) = applied {
        return Ok(plan.record.generation);
    }
    // A lost answer or a lost compare: the record says which.
    let after = auth.observe(vm).await?;
    let why = match &applied {
        Ok(_) => "its compare failed (the lease key is no longer this node's)".to_string(),
        Err(e) => e.to_string(),
    };
    match after.record {
        Some((r, _))
            if r.generation == generation
                && r.holder == node
                && r.state == RecordState::Running =>
        {
            Err(AuthorityError::NotLanded {
                vm: vm.into(),
                generation,
                why,
            })
        }
        Some((r, _))
            if r.generation == plan.record.generation
                && r.holder == to
                && matches!(r.state, RecordState::Handover | RecordState::Running) =>
        {
            Ok(r.generation)
        }
        Some((record, _)) => Err(AuthorityError::Refused {
            vm: vm.into(),
            refusal: authority::Refusal::GenerationMoved {
                expected: generation,
                record,
            },
        }),
        None => Err(AuthorityError::Refused {
            vm: vm.into(),
            refusal: authority::Refusal::NoRecord,
        }),
    }
}
