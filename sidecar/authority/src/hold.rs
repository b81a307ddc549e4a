//! A claimed hold, kept: a task drives the sans-IO [`HoldKeeper`] against the authority (keep-alives,
//! reclaims after an expiry, the hand-over of a migration) and tells a [`Fencer`] what the guest must do.
//! The fencer's calls run on a thread of their own, in order, so a VMM that is slow to pause never delays
//! the keeper's clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use endophyte_wire::authority::{HoldAction, HoldKeeper, HoldTiming};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::clock::boot_now;
use crate::ops::{self, Claimed};
use crate::{Authority, AuthorityError};

/// How often the keeper looks at its clock.
const TICK: Duration = Duration::from_millis(50);

/// What the guest must do, as the hold decides. Calls come in order from one thread.
pub trait Fencer: Send + Sync + 'static {
    /// The hold may have expired at the authority: pause (or stop) the guest now.
    fn fence(&self, why: &str);
    /// The hold is renewed: the guest may run (unless something else holds it).
    fn unfence(&self);
    /// Another node holds the VM now: this copy must never run again.
    fn superseded(&self, why: &str);
}

/// A hold as `endophyte status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HoldStatus {
    /// Where the authority is.
    pub authority: String,
    /// This node.
    pub node: String,
    /// The generation held.
    pub generation: u64,
    /// The etcd lease guarding it.
    pub lease_id: i64,
    /// `held`, `fenced` (no keep-alive acknowledged in time), `superseded` or `handed-over`.
    pub state: String,
    /// How long the guest may still run without another acknowledged keep-alive, milliseconds.
    pub remaining_ms: f64,
    /// The lease's TTL, milliseconds.
    pub ttl_ms: u64,
    /// Keep-alives the authority acknowledged.
    pub keepalives_acked: u64,
    /// The last error talking to the authority.
    pub last_error: Option<String>,
}

enum Cmd {
    HandOver {
        to: String,
        reply: oneshot::Sender<Result<u64, AuthorityError>>,
    },
    Release {
        reply: oneshot::Sender<()>,
    },
}

enum Done {
    KeepAlive(u64, Result<Duration, AuthorityError>),
    Reclaim(Result<Claimed, AuthorityError>),
}

enum FenceCall {
    Fence(String),
    Unfence,
    Superseded(String),
}

/// A hold on a VM kept alive at the authority. Dropping it stops the keep-alives (the lease then expires
/// at the server); [`Hold::release`] revokes it at once.
pub struct Hold {
    status: Arc<Mutex<HoldStatus>>,
    live: Arc<Mutex<Live>>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

/// What [`Hold::may_run_now`] reads: a bound that stays true until its instant, whatever the task is doing.
#[derive(Clone, Copy, Debug, Default)]
struct Live {
    safe_until: Option<endophyte_wire::authority::BootInstant>,
    blocked: bool,
}

impl Hold {
    /// Starts keeping `claimed` (VM `vm`, node `node`) on runtime `rt`; `fencer` hears what the guest
    /// must do.
    pub fn spawn(
        rt: &tokio::runtime::Handle,
        auth: Arc<dyn Authority>,
        (vm, node): (String, String),
        timing: HoldTiming,
        claimed: Claimed,
        fencer: Arc<dyn Fencer>,
    ) -> Hold {
        let status = Arc::new(Mutex::new(HoldStatus {
            authority: auth.describe(),
            node: node.clone(),
            generation: claimed.generation,
            lease_id: claimed.lease,
            state: "held".into(),
            ttl_ms: timing.ttl.as_millis() as u64,
            ..HoldStatus::default()
        }));
        let (fence_tx, fence_rx) = std::sync::mpsc::channel::<FenceCall>();
        std::thread::Builder::new()
            .name("hold-fencer".into())
            .spawn(move || {
                for c in fence_rx {
                    match c {
                        FenceCall::Fence(why) => fencer.fence(&why),
                        FenceCall::Unfence => fencer.unfence(),
                        FenceCall::Superseded(why) => fencer.superseded(&why),
                    }
                }
            })
            .expect("spawning the hold's fencer thread");
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let live = Arc::new(Mutex::new(Live::default()));
        let task = Keeper {
            live: live.clone(),
            auth,
            vm,
            node,
            timing,
            lease: claimed.lease,
            keeper: HoldKeeper::new(timing),
            status: status.clone(),
            fence_tx,
            handed_over: false,
        };
        rt.spawn(task.run(claimed, cmd_rx));
        Hold { status, live, cmd }
    }

    /// Whether the guest may run at this instant: the hold is neither fenced nor superseded, and the last
    /// acknowledged keep-alive still covers now (read against the boot clock now, not from a status the
    /// keeper wrote earlier).
    pub fn may_run_now(&self) -> bool {
        self.may_run_for(Duration::ZERO)
    }

    /// Whether the guest may run for `d` from now without another acknowledged keep-alive (what a VMM's
    /// run guard, which pauses the guest `d` after the sidecar's last word, may be told).
    pub fn may_run_for(&self, d: Duration) -> bool {
        let l = *self.live.lock().unwrap_or_else(|e| e.into_inner());
        !l.blocked && l.safe_until.is_some_and(|u| boot_now() + d < u)
    }

    /// The hold as it stands.
    pub fn status(&self) -> HoldStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The generation held.
    pub fn generation(&self) -> u64 {
        self.status().generation
    }

    /// A migration's commit point: hands the next generation to node `to` (see [`ops::hand_over`]).
    /// From `Ok` on, this hold is over and the guest must never run here again; the lease is kept alive
    /// until [`Hold::release`] so that no promote slips in before `to` claims.
    ///
    /// # Errors
    /// As [`ops::hand_over`]; a stopped keeper is an [`AuthorityError::Refused`] naming nothing new.
    pub async fn hand_over(&self, to: &str) -> Result<u64, AuthorityError> {
        let (reply, rx) = oneshot::channel();
        let _ = self.cmd.send(Cmd::HandOver {
            to: to.to_owned(),
            reply,
        });
        rx.await.unwrap_or_else(|_| {
            Err(AuthorityError::StillHeld {
                vm: String::new(),
                node: to.to_owned(),
                generation: 0,
                waited: Duration::ZERO,
            })
        })
    }

    /// Revokes the lease and stops keeping the hold. Call it only once the guest cannot run here (paused,
    /// stopped, or migrated away): from then on a backup may promote.
    pub async fn release(&self) {
        let (reply, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Release { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Gets the hold back after the keeper lost track of it: its own lease, if it still lives at the server
/// and still guards the record at `generation`, is simply renewed; otherwise the VM is claimed afresh
/// (which succeeds only if nobody promoted it meanwhile).
async fn reclaim(
    auth: &dyn Authority,
    (vm, node): (&str, &str),
    ttl: Duration,
    generation: u64,
    lease: i64,
) -> Result<Claimed, AuthorityError> {
    let asked = boot_now();
    if auth.keep_alive(lease).await.is_ok_and(|t| !t.is_zero()) {
        let seen = auth.observe(vm).await?;
        let ours = seen
            .record
            .as_ref()
            .is_some_and(|(r, _)| r.holder == node && r.generation == generation)
            && seen.lease.as_ref().is_some_and(|l| l.lease_id == lease);
        if ours {
            return Ok(Claimed {
                generation,
                lease,
                asked,
            });
        }
    }
    ops::claim(auth, vm, node, ttl, Some(generation), Duration::ZERO).await
}

struct Keeper {
    live: Arc<Mutex<Live>>,
    auth: Arc<dyn Authority>,
    vm: String,
    node: String,
    timing: HoldTiming,
    lease: i64,
    keeper: HoldKeeper,
    status: Arc<Mutex<HoldStatus>>,
    fence_tx: std::sync::mpsc::Sender<FenceCall>,
    handed_over: bool,
}

impl Keeper {
    async fn run(mut self, claimed: Claimed, mut cmd: mpsc::UnboundedReceiver<Cmd>) {
        let (done_tx, mut done) = mpsc::unbounded_channel();
        self.keeper
            .handle_claimed(claimed.generation, claimed.asked);
        // The claim's own unfence: whoever claimed runs the guest already.
        while self.keeper.poll_action().is_some() {}
        self.update_status();
        loop {
            tokio::select! {
                Some(d) = done.recv() => self.handle_done(d),
                c = cmd.recv() => match c {
                    Some(Cmd::HandOver { to, reply }) => {
                        let r = ops::hand_over(&*self.auth, &self.vm, &self.node,
                            self.keeper.generation(), self.lease, &to).await;
                        if let Ok(g) = &r {
                            self.handed_over = true;
                            self.keeper.handle_superseded(format!("generation {g} handed over to {to:?}"));
                        }
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Release { reply }) => {
                        if let Err(e) = self.auth.revoke(self.lease).await {
                            tracing::warn!(vm = %self.vm, "revoking the authority lease: {e}; it expires within its TTL");
                        }
                        self.set_state("released");
                        let _ = reply.send(());
                        return;
                    }
                    None => return,
                },
                _ = tokio::time::sleep(TICK) => {}
            }
            self.keeper.handle_timeout(boot_now());
            // The live view first: a fencer told to unfence asks it (`may_run_now`) before resuming.
            let actions: Vec<HoldAction> =
                std::iter::from_fn(|| self.keeper.poll_action()).collect();
            self.update_status();
            for a in actions {
                self.act(a, &done_tx);
            }
        }
    }

    fn handle_done(&mut self, d: Done) {
        match d {
            Done::KeepAlive(seq, Ok(ttl)) => {
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keepalives_acked += 1;
                self.keeper.handle_keepalive(seq, ttl, boot_now());
            }
            Done::KeepAlive(_, Err(e)) => self.error(&e),
            Done::Reclaim(Ok(c)) => {
                tracing::warn!(vm = %self.vm, generation = c.generation, "the authority hold is claimed again");
                self.lease = c.lease;
                self.keeper.handle_claimed(c.generation, c.asked);
            }
            // Only a refusal means another node holds the VM; anything else is tried again.
            Done::Reclaim(Err(e)) if e.refusal().is_some() => {
                self.error(&e);
                self.keeper.handle_superseded(e.to_string());
            }
            Done::Reclaim(Err(e)) => {
                self.error(&e);
                self.keeper.handle_reclaim_failed(boot_now());
            }
        }
    }

    fn error(&self, e: &AuthorityError) {
        tracing::debug!(vm = %self.vm, "authority: {e}");
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = Some(e.to_string());
    }

    fn act(&mut self, a: HoldAction, done: &mpsc::UnboundedSender<Done>) {
        match a {
            HoldAction::KeepAlive { seq } => {
                let (auth, lease, done) = (self.auth.clone(), self.lease, done.clone());
                tokio::spawn(async move {
                    let _ = done.send(Done::KeepAlive(seq, auth.keep_alive(lease).await));
                });
            }
            HoldAction::Reclaim => {
                tracing::info!(vm = %self.vm, "the authority lease may be gone: claiming the VM again");
                let (auth, done, vm, node) = (
                    self.auth.clone(),
                    done.clone(),
                    self.vm.clone(),
                    self.node.clone(),
                );
                let (ttl, g, lease) = (self.timing.ttl, self.keeper.generation(), self.lease);
                tokio::spawn(async move {
                    let r = reclaim(&*auth, (&vm, &node), ttl, g, lease).await;
                    let _ = done.send(Done::Reclaim(r));
                });
            }
            HoldAction::Fence { why } => {
                let _ = self.fence_tx.send(FenceCall::Fence(why));
            }
            HoldAction::Unfence => {
                let _ = self.fence_tx.send(FenceCall::Unfence);
            }
            HoldAction::Superseded { why } => {
                if !self.handed_over {
                    let _ = self.fence_tx.send(FenceCall::Superseded(why));
                }
            }
        }
    }

    fn set_state(&self, s: &str) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).state = s.into();
    }

    fn update_status(&self) {
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Live {
            safe_until: self.keeper.safe_until(),
            blocked: self.keeper.is_fenced() || self.keeper.is_superseded(),
        };
        let now = boot_now();
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.generation = self.keeper.generation();
        s.lease_id = self.lease;
        s.remaining_ms = self.keeper.remaining(now).as_secs_f64() * 1e3;
        s.state = if self.handed_over {
            "handed-over"
        } else if self.keeper.is_superseded() {
            "superseded"
        } else if self.keeper.is_fenced() {
            "fenced"
        } else {
            "held"
        }
        .into();
    }
}
