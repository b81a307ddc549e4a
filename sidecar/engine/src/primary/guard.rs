//! The VMM's run guard, from the sidecar's side (fail closed; docs/fencing.md): armed once the sidecar
//! knows its generation, kept alive by a thread of its own, so that a sidecar that dies or hangs leaves its
//! guest paused by the VMM itself. When the guard tripped while this sidecar was only slow (stopped for
//! less than its hold at the authority covers), it is armed again and the guest resumed; without an
//! authority nothing can vouch for that, and the run ends.

use std::sync::Arc;
use std::time::Duration;

use endophyte_vmm::{SourceVmm, VmmError};

use super::gate::GatedVmm;
use super::shared::Shared;

/// Starts the keep-alive thread of a guard armed with `timeout`; it ends with the run.
///
/// # Errors
/// The thread could not be spawned.
pub(super) fn spawn(
    shared: Arc<Shared>,
    gate: Arc<GatedVmm>,
    timeout: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("run-guard".into())
        .spawn(move || run(&shared, &gate, timeout))
}

/// The guard's watchdog tick and the pause it takes, on top of its timeout: how long after this sidecar's
/// last word the guest may still run ([`endophyte_wire::lease::FENCE_ACTION_BOUND`] for the pause).
const TRIP_SLACK: Duration = Duration::from_millis(550);

fn run(shared: &Shared, gate: &GatedVmm, timeout: Duration) {
    let period = timeout / 5;
    let mut reported = false;
    while !shared.stopping() {
        std::thread::sleep(period);
        // Under an authority, a keep-alive vouches for the guest for the guard's whole timeout: it is sent
        // only while the hold covers that long, so a sidecar that hangs now leaves its guest paused before
        // its lease can end.
        if shared
            .hold
            .get()
            .is_some_and(|h| !h.may_run_for(timeout + TRIP_SLACK))
        {
            continue;
        }
        if gate.is_stopped() {
            // Shut down (it migrated away) or stopped by the fence: nothing left to guard.
            return;
        }
        let e = match gate.keep_alive() {
            Ok(()) => {
                reported = false;
                continue;
            }
            Err(e @ VmmError::GuardTripped(_)) => e,
            Err(e) => {
                // The connection itself failed (the VMM died, or was shut down as this sidecar ends): the
                // epoch loop meets the same and ends the run; a trip is what this thread is for.
                if !gate.is_stopped() && !reported {
                    reported = true;
                    tracing::warn!("keeping the run guard alive: {e}");
                }
                continue;
            }
        };
        match shared.hold.get() {
            // The hold still covers this instant: nobody can have promoted, so the guest may run again.
            Some(hold) if hold.may_run_for(timeout + TRIP_SLACK) => {
                let r = gate
                    .arm_guard(timeout, hold.generation())
                    .and_then(|_| gate.resume_after_guard());
                match r {
                    Ok(()) => tracing::warn!(
                        "the VMM's run guard had paused the guest ({e}); the authority hold still covers \
                         it: guard armed again, guest resumed"
                    ),
                    Err(e) => tracing::error!("arming the run guard again: {e}"),
                }
            }
            // The hold lapsed: its own fence and reclaim decide (the guard is armed again on unfence).
            Some(_) => {
                if !reported {
                    reported = true;
                    tracing::error!("the VMM's run guard paused the guest ({e}); waiting for the authority hold");
                }
            }
            None => {
                shared.fail(format!(
                    "the VMM's run guard paused the guest ({e}): this sidecar was silent past the guard's \
                     {timeout:?}, and without a fencing authority nothing shows it still owns the VM"
                ));
                return;
            }
        }
    }
}
