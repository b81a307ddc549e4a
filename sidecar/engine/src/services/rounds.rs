//! What a node asks of its services and waits for (bounded), and what it only tells them.
//!
//! | call | to services with | answer | bound |
//! |---|---|---|---|
//! | [`ServiceRegistry::contribute`] | `HOOK_EPOCH` | `Contribution` | the deadline, inside the epoch's pause |
//! | [`ServiceRegistry::durable`] | `HOOK_EPOCH` | none | - |
//! | [`ServiceRegistry::phase`] | `HOOK_MIGRATION` | none | - |
//! | [`ServiceRegistry::ask_switchover`], [`ServiceRegistry::switchover_verdict`] | `HOOK_MIGRATION` | `SwitchoverVerdict` | the hold bound, while the guest runs |
//! | [`ServiceRegistry::restore`] | `HOOK_RESTORE` | `Restored` | the deadline, before the VM resumes |
//!
//! A service whose session ends while it is waited for stops being waited for at once.

use std::time::{Duration, Instant};

use endophyte_wire::contrib::{MAX_CONTRIBUTION_BYTES, MAX_TOTAL_BYTES};
use endophyte_wire::Contribution;

use super::pb::node_message::Msg;
use super::{pb, Entry, Inner, Link, ServiceRegistry};
use crate::store::ServiceStates;

/// The outcome of one epoch's contribution round.
#[derive(Debug, Default)]
pub struct ContributeRound {
    /// What goes into the epoch, by service.
    pub contributions: Vec<Contribution>,
    /// Services asked that gave nothing usable, and why (late, failed, too large, gone).
    pub failures: Vec<(String, String)>,
    /// From the ask until the last answer (or the deadline), ms.
    pub took_ms: f64,
    /// Remote services asked (in-process ones answer at once).
    pub remote: usize,
}

/// How the services answered a switchover request so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchoverVerdict {
    /// Every service asked answered ready (or none was asked).
    Ready,
    /// Some have not answered yet.
    Pending,
    /// A service vetoed: its name and reason.
    Veto {
        /// The service.
        service: String,
        /// Its reason, or why it counts as a veto (it held past the bound, its session ended).
        reason: String,
    },
}

impl ServiceRegistry {
    fn wait_while(
        &self,
        deadline: Instant,
        mut pending: impl FnMut(&mut Inner) -> bool,
    ) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = self.lock();
        while pending(&mut g) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .inner
                .1
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g
    }

    /// At epoch `epoch`'s pause: asks every service with `HOOK_EPOCH` for its contribution (at most
    /// `max_bytes`, capped at [`MAX_CONTRIBUTION_BYTES`]) and waits until each answered or `deadline`
    /// passed. In-process services answer at once. The epoch's total is held within
    /// [`MAX_TOTAL_BYTES`]: contributions past it are failures.
    pub fn contribute(&self, epoch: u64, deadline: Duration, max_bytes: usize) -> ContributeRound {
        let max_bytes = max_bytes.min(MAX_CONTRIBUTION_BYTES);
        let t0 = Instant::now();
        let mut asked = vec![];
        let mut remote = 0;
        {
            let mut g = self.lock();
            for (name, e) in g.entries.iter_mut().filter(|(_, e)| e.has(pb::Hook::Epoch)) {
                e.contribution = None;
                let sent = match &mut e.link {
                    Link::Local(s) => {
                        e.contribution = Some(super::Answer {
                            key: epoch,
                            value: s.contribute(epoch).map(Into::into),
                            at: Instant::now(),
                        });
                        Ok(())
                    }
                    Link::Remote(_) => {
                        remote += 1;
                        e.send(Msg::Contribute(pb::ContributeRequest {
                            epoch,
                            deadline_ms: deadline.as_millis() as u32,
                            max_bytes: max_bytes as u32,
                        }))
                    }
                };
                asked.push((name.clone(), sent.err()));
            }
        }
        let answered = |e: &Entry| e.contribution.as_ref().is_some_and(|a| a.key == epoch);
        let mut g = self.wait_while(t0 + deadline, |g| {
            asked
                .iter()
                .any(|(n, err)| err.is_none() && g.entries.get(n).is_some_and(|e| !answered(e)))
        });
        let mut round = ContributeRound {
            took_ms: t0.elapsed().as_secs_f64() * 1e3,
            remote,
            ..ContributeRound::default()
        };
        let mut total = 0usize;
        for (name, send_err) in asked {
            let Some(e) = g.entries.get_mut(&name) else {
                round
                    .failures
                    .push((name, "its session ended before it answered".into()));
                continue;
            };
            let got = match (send_err, e.contribution.take().filter(|a| a.key == epoch)) {
                (Some(why), _) => Err(why),
                (None, None) => Err(format!(
                    "no contribution to epoch {epoch} within its deadline of {} ms",
                    deadline.as_millis()
                )),
                (None, Some(a)) => {
                    e.status.last_contribution_ms = (a.at - t0).as_secs_f64() * 1e3;
                    match a.value {
                        Err(why) => Err(format!("it failed epoch {epoch}: {why}")),
                        Ok(d) if d.len() > max_bytes => Err(format!(
                            "its contribution of {} bytes exceeds the bound of {max_bytes}",
                            d.len()
                        )),
                        Ok(d) if total + d.len() > MAX_TOTAL_BYTES => Err(format!(
                            "the epoch's contributions would exceed {MAX_TOTAL_BYTES} bytes with its {}",
                            d.len()
                        )),
                        Ok(d) => Ok(d),
                    }
                }
            };
            match got {
                Ok(data) => {
                    total += data.len();
                    e.status.contributions += 1;
                    e.status.last_contribution_bytes = data.len() as u64;
                    if matches!(e.link, Link::Remote(_)) || !data.is_empty() {
                        round.contributions.push(Contribution {
                            service: name,
                            data,
                        });
                    }
                }
                Err(why) => {
                    tracing::warn!(service = %name, epoch, "service contribution: {why}");
                    e.failed(why.clone());
                    round.failures.push((name, why));
                }
            }
        }
        round
    }

    /// Epochs up to `epoch` are durable: in-process services are called, remote ones told (a notice
    /// that does not fit a session's queue is dropped; the next one covers it).
    pub fn durable(&self, epoch: u64) {
        let mut g = self.lock();
        for e in g.entries.values_mut().filter(|e| e.has(pb::Hook::Epoch)) {
            match &mut e.link {
                Link::Local(s) => s.durable(epoch),
                Link::Remote(_) => {
                    let _ = e.send(Msg::Durable(pb::Durable { epoch }));
                }
            }
        }
    }

    /// Tells services with `HOOK_MIGRATION` of a migration's phase.
    pub fn phase(&self, phase: pb::Phase, target: &str, generation: u64, reason: &str) {
        let g = self.lock();
        for (name, e) in g.entries.iter().filter(|(_, e)| e.has(pb::Hook::Migration)) {
            let m = Msg::Phase(pb::MigrationPhase {
                phase: phase as i32,
                target: target.to_owned(),
                generation,
                reason: reason.to_owned(),
            });
            if let Err(why) = e.send(m) {
                tracing::warn!(service = %name, "telling it the migration phase: {why}");
            }
        }
    }

    /// Asks services with `HOOK_MIGRATION` whether the switchover to `target` (generation
    /// `generation`) may go ahead, within `hold`. Returns the names asked, for
    /// [`ServiceRegistry::switchover_verdict`].
    pub fn ask_switchover(&self, generation: u64, target: &str, hold: Duration) -> Vec<String> {
        let mut g = self.lock();
        let mut asked = vec![];
        for (name, e) in g
            .entries
            .iter_mut()
            .filter(|(_, e)| e.has(pb::Hook::Migration))
        {
            e.verdict = None;
            if let Link::Local(_) = e.link {
                continue;
            }
            let r = e.send(Msg::Switchover(pb::SwitchoverRequest {
                generation,
                target: target.to_owned(),
                hold_ms: hold.as_millis() as u32,
            }));
            if let Err(why) = r {
                e.verdict = Some(super::Answer {
                    key: generation,
                    value: format!("it could not be asked: {why}"),
                    at: Instant::now(),
                });
            }
            asked.push(name.clone());
        }
        asked
    }

    /// The verdict on the switchover request of `generation` that `asked` got `since`, with `hold` as
    /// its bound. A service that has not answered within `hold`, or whose session ended, vetoes.
    pub fn switchover_verdict(
        &self,
        generation: u64,
        asked: &[String],
        since: Instant,
        hold: Duration,
    ) -> SwitchoverVerdict {
        let mut g = self.lock();
        let mut pending = false;
        for name in asked {
            let Some(e) = g.entries.get_mut(name) else {
                return SwitchoverVerdict::Veto {
                    service: name.clone(),
                    reason: "its session ended before it answered the switchover request".into(),
                };
            };
            match e.verdict.as_ref().filter(|a| a.key == generation) {
                Some(a) if a.value.is_empty() => {}
                Some(a) => {
                    let reason = a.value.clone();
                    e.failed(format!("vetoed the switchover: {reason}"));
                    return SwitchoverVerdict::Veto {
                        service: name.clone(),
                        reason,
                    };
                }
                None if since.elapsed() >= hold => {
                    let reason = format!(
                        "it held the switchover past its bound of {} ms",
                        hold.as_millis()
                    );
                    e.failed(reason.clone());
                    return SwitchoverVerdict::Veto {
                        service: name.clone(),
                        reason,
                    };
                }
                None => pending = true,
            }
        }
        if pending {
            SwitchoverVerdict::Pending
        } else {
            SwitchoverVerdict::Ready
        }
    }

    /// On a migration target or a promoted backup, before VM `vm` resumes from committed epoch
    /// `epoch`: gives each service with `HOOK_RESTORE` its contribution in `states` and waits until
    /// each answered or `deadline` passed. Returns the services that did not restore, and why.
    pub fn restore(
        &self,
        vm: &str,
        epoch: u64,
        states: &ServiceStates,
        deadline: Duration,
    ) -> Vec<(String, String)> {
        let t0 = Instant::now();
        let mut asked = vec![];
        {
            let mut g = self.lock();
            for (name, e) in g
                .entries
                .iter_mut()
                .filter(|(_, e)| e.has(pb::Hook::Restore))
            {
                e.restored = None;
                let st = states.get(name);
                let r = e.send(Msg::Restore(pb::Restore {
                    vm: vm.to_owned(),
                    epoch,
                    contributed_epoch: st.map_or(0, |s| s.epoch),
                    data: st.map(|s| s.data.to_vec()).unwrap_or_default(),
                    deadline_ms: deadline.as_millis() as u32,
                }));
                asked.push((name.clone(), r.err()));
            }
        }
        let done = |e: &Entry| e.restored.as_ref().is_some_and(|a| a.key == epoch);
        let mut g = self.wait_while(t0 + deadline, |g| {
            asked
                .iter()
                .any(|(n, err)| err.is_none() && g.entries.get(n).is_some_and(|e| !done(e)))
        });
        let mut failed = vec![];
        for (name, send_err) in asked {
            let why = match (send_err, g.entries.get_mut(&name)) {
                (Some(why), _) => why,
                (None, None) => "its session ended before it restored".into(),
                (None, Some(e)) => match e.restored.take().filter(|a| a.key == epoch) {
                    Some(a) if a.value.is_empty() => continue,
                    Some(a) => format!("restoring epoch {epoch} failed: {}", a.value),
                    None => format!(
                        "it did not restore epoch {epoch} within {} ms",
                        deadline.as_millis()
                    ),
                },
            };
            if let Some(e) = g.entries.get_mut(&name) {
                e.failed(why.clone());
            }
            tracing::warn!(service = %name, vm, epoch, "service restore: {why}");
            failed.push((name, why));
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::pb::service_message::Msg as SMsg;

    type Rx = tokio::sync::mpsc::Receiver<Result<pb::NodeMessage, tonic::Status>>;

    fn remote(r: &ServiceRegistry, name: &str, hooks: &[pb::Hook]) -> (u64, Rx) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        (r.register(name, hooks.to_vec(), 1, tx).unwrap(), rx)
    }

    fn contribution(epoch: u64, data: &[u8], error: &str) -> SMsg {
        SMsg::Contribution(pb::Contribution {
            epoch,
            data: data.to_vec(),
            error: error.into(),
        })
    }

    /// Answers the next request on `rx` with `answer(epoch)` after `delay`, from another thread.
    fn answer_later(
        r: &ServiceRegistry,
        name: &'static str,
        session: u64,
        mut rx: Rx,
        delay: Duration,
        answer: impl FnOnce(u64) -> SMsg + Send + 'static,
    ) -> std::thread::JoinHandle<Rx> {
        let r = r.clone();
        std::thread::spawn(move || {
            let m = rx.blocking_recv().unwrap().unwrap();
            let Some(Msg::Contribute(req)) = m.msg else {
                panic!("{m:?}")
            };
            std::thread::sleep(delay);
            r.on_message(name, session, answer(req.epoch));
            rx
        })
    }

    #[test]
    fn a_round_takes_timely_answers_and_names_late_failed_and_oversized_ones() {
        let r = ServiceRegistry::new();
        let services = [
            ("fast", 0, b"f".as_slice(), ""),
            ("late", 2000, b"l", ""),
            ("broken", 0, b"", "disk gone"),
            ("big", 0, &[0u8; 64][..], ""),
        ];
        let mut threads = vec![];
        for (name, ms, data, err) in services {
            let (s, rx) = remote(&r, name, &[pb::Hook::Epoch]);
            let data = data.to_vec();
            threads.push(answer_later(
                &r,
                name,
                s,
                rx,
                Duration::from_millis(ms),
                move |e| contribution(e, &data, err),
            ));
        }
        let t0 = Instant::now();
        let round = r.contribute(7, Duration::from_millis(100), 16);
        assert!(
            t0.elapsed() < Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        let names: Vec<&str> = round
            .contributions
            .iter()
            .map(|c| c.service.as_str())
            .collect();
        assert_eq!(names, ["fast"]);
        let why = |n: &str| {
            round
                .failures
                .iter()
                .find(|(s, _)| s == n)
                .unwrap()
                .1
                .clone()
        };
        assert!(
            why("late").contains("deadline of 100 ms"),
            "{}",
            why("late")
        );
        assert!(why("broken").contains("disk gone"), "{}", why("broken"));
        assert!(
            why("big").contains("64 bytes exceeds the bound of 16"),
            "{}",
            why("big")
        );
        assert_eq!(round.remote, 4);
        for t in threads {
            t.join().unwrap();
        }
        // The late answer for epoch 7 does not count for epoch 8.
        let st = r.status();
        let late = st.iter().find(|s| s.name == "late").unwrap();
        assert_eq!((late.failures, late.contributions), (1, 0));
        let round = r.contribute(8, Duration::from_millis(20), 16);
        assert!(round.contributions.is_empty());
        assert_eq!(round.failures.len(), 4);
    }

    #[test]
    fn a_service_whose_session_ends_is_not_waited_for() {
        let r = ServiceRegistry::new();
        let (s, _rx) = remote(&r, "dies", &[pb::Hook::Epoch]);
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            r2.unregister("dies", s);
        });
        let t0 = Instant::now();
        let round = r.contribute(1, Duration::from_secs(10), 1024);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(round.failures[0].1.contains("session ended"), "{round:?}");
        t.join().unwrap();
    }

    #[test]
    fn the_switchover_waits_for_every_verdict_and_a_veto_or_a_hold_past_the_bound_fails_it() {
        let r = ServiceRegistry::new();
        let (a, _ra) = remote(&r, "a", &[pb::Hook::Migration]);
        let (_b, _rb) = remote(&r, "b", &[pb::Hook::Migration]);
        let (_c, _rc) = remote(&r, "c", &[pb::Hook::Epoch]);
        let hold = Duration::from_secs(5);
        let asked = r.ask_switchover(3, "t", hold);
        assert_eq!(asked, ["a", "b"]);
        let since = Instant::now();
        assert_eq!(
            r.switchover_verdict(3, &asked, since, hold),
            SwitchoverVerdict::Pending
        );
        let verdict = |g: u64, veto: &str| {
            SMsg::Verdict(pb::SwitchoverVerdict {
                generation: g,
                veto: veto.into(),
            })
        };
        r.on_message("a", a, verdict(3, ""));
        assert_eq!(
            r.switchover_verdict(3, &asked, since, hold),
            SwitchoverVerdict::Pending
        );
        // b has not answered within the bound: that is a veto, naming it.
        let long_ago = since - Duration::from_secs(6);
        let v = r.switchover_verdict(3, &asked, long_ago, hold);
        assert!(
            matches!(&v, SwitchoverVerdict::Veto { service, reason } if service == "b" && reason.contains("past its bound")),
            "{v:?}"
        );
        // A new request: a's answer to the old one does not count; a veto does.
        let asked = r.ask_switchover(4, "t", hold);
        r.on_message("a", a, verdict(3, ""));
        r.on_message("a", a, verdict(4, "journal not flushed"));
        let v = r.switchover_verdict(4, &asked, Instant::now(), hold);
        assert_eq!(
            v,
            SwitchoverVerdict::Veto {
                service: "a".into(),
                reason: "journal not flushed".into()
            }
        );
    }
}
