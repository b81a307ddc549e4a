//! The self-fence's thread: every 50 ms it feeds [`endophyte_wire::lease::SelfFence`] with when each
//! backup last answered a ping ([`endophyte_wire::Sender::answered_at`]) and carries out what it
//! decides on the [`GatedVmm`]: fence (pause, or stop by policy), unfence, or, when a backup runs the
//! VM under a newer generation, fence for good and end the run with that reason.
//!
//! A thread of its own, not the epoch loop: the loop can block for long (waiting for room while the
//! backups are silent is exactly when fencing matters), and not the path driver, whose task must not
//! block on the VMM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use endophyte_wire::lease::{FenceAction, SelfFence};

use super::gate::GatedVmm;
use super::shared::Shared;
use crate::config::SelfFencePolicy;

/// How often the fence looks (part of [`endophyte_wire::lease::FENCE_ACTION_BOUND`]).
const TICK: Duration = Duration::from_millis(50);

/// Starts the thread; it ends with the run (`shared.stopping()`), or after a supersession.
///
/// # Errors
/// The thread could not be spawned.
pub(super) fn spawn(
    shared: Arc<Shared>,
    gate: Arc<GatedVmm>,
    policy: SelfFencePolicy,
    quorum: usize,
    after: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("self-fence".into())
        .spawn(move || run(&shared, &gate, policy, quorum, after))
}

fn run(shared: &Shared, gate: &GatedVmm, policy: SelfFencePolicy, quorum: usize, after: Duration) {
    let backups = shared.meta.backups.len();
    let mut fence = SelfFence::new(backups, quorum, after, Instant::now());
    while !shared.stopping() {
        std::thread::sleep(TICK);
        let now = Instant::now();
        {
            let mut g = shared.lock();
            for b in 0..backups {
                if let Some(at) = g.sender.answered_at(b) {
                    fence.handle_answered(b, at);
                }
            }
            if let Some(why) = g.superseded.take() {
                fence.handle_superseded(why);
            }
        }
        fence.handle_timeout(now);
        let answering = fence.answering(now);
        while let Some(a) = fence.poll_action() {
            act(shared, gate, policy, a, quorum, after);
        }
        let mut g = shared.lock();
        g.fence.answering = answering;
        g.fence.fenced = gate.is_fenced();
    }
}

fn act(
    shared: &Shared,
    gate: &GatedVmm,
    policy: SelfFencePolicy,
    a: FenceAction,
    quorum: usize,
    after: Duration,
) {
    let stop = policy == SelfFencePolicy::Stop;
    match a {
        FenceAction::Fence { answering } => {
            let r = gate.fence(stop);
            shared.lock().fence.fences += 1;
            match r {
                Ok(()) => tracing::error!(answering, quorum, after_ms = after.as_millis() as u64,
                    action = if stop { "stopped" } else { "paused" },
                    "self-fenced: fewer backups than the quorum answered within the bound, and one may promote once its lease ends"),
                Err(e) => shared.fail(format!(
                    "self-fencing failed: the VMM did not {}: {e}; the guest may still run while a backup can promote",
                    if stop { "stop" } else { "pause" }
                )),
            }
            if stop {
                shared.fail(format!(
                    "self-fenced with policy stop: only {answering} of the {quorum} backups needed answered within {after:?}; the VM was stopped"
                ));
            }
        }
        FenceAction::Unfence => match gate.unfence() {
            Ok(()) => tracing::warn!(
                quorum,
                "the backups answer again: self-fence lifted, the guest runs"
            ),
            Err(e) => shared.fail(format!(
                "lifting the self-fence: the VMM did not resume: {e}"
            )),
        },
        FenceAction::Superseded { why } => {
            let r = gate.fence(stop);
            let kept = match r {
                Ok(()) if stop => "it was stopped".to_owned(),
                Ok(()) => "this copy stays paused".to_owned(),
                Err(e) => format!("fencing it failed: {e}"),
            };
            shared.fail(format!(
                "the VM runs elsewhere under a newer generation ({why}); {kept} and will not resume"
            ));
        }
    }
}
