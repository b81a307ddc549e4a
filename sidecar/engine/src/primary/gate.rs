//! The run gate: the VMM as the epoch loop sees it, with one more rule, that a fenced guest stays
//! paused. The epoch loop pauses and resumes the guest at every cut; the self-fence
//! ([`super::fencing`]) pauses it from another thread. Both go through one lock here, so an epoch's
//! resume can never undo a fence, and an unfence never resumes a guest paused for a cut.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use endophyte_vmm::{Capabilities, DirtyLog, Geometry, Snapshots, SourceVmm, VmState, VmmError};

#[derive(Debug, Default)]
struct Gate {
    /// The epoch loop holds the guest paused (a cut, a switchover).
    paused_by_loop: bool,
    /// The self-fence holds it paused.
    fenced: bool,
    /// The guest was stopped for good (fence policy `stop`, or superseded).
    stopped: bool,
}

/// Whether the guest may run at this instant (the hold at the fencing authority covers it).
type MayRun = Box<dyn Fn() -> bool + Send + Sync>;

/// A [`SourceVmm`] whose guest runs only when neither the epoch loop nor the self-fence holds it, and,
/// under a fencing authority, only while the hold covers the instant of the resume.
pub(super) struct GatedVmm {
    inner: Arc<dyn SourceVmm>,
    gate: Mutex<Gate>,
    may_run: std::sync::OnceLock<MayRun>,
}

impl GatedVmm {
    pub fn new(inner: Arc<dyn SourceVmm>) -> Self {
        Self {
            inner,
            gate: Mutex::new(Gate::default()),
            may_run: std::sync::OnceLock::new(),
        }
    }

    /// Under a fencing authority: every resume first asks `f` whether the hold covers this instant. One
    /// that does not leaves the guest paused and the gate fenced, which the hold's own fence and unfence
    /// then take over; a sidecar woken from a stop cannot resume its guest in the moment before its
    /// keeper notices the hold lapsed.
    pub fn set_may_run(&self, f: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.may_run.set(Box::new(f));
    }

    /// Whether the hold (if any) covers now; when not, the gate fences itself.
    fn hold_covers(&self, g: &mut Gate) -> bool {
        if self.may_run.get().is_some_and(|f| !f()) {
            if !g.fenced {
                tracing::warn!(
                    "the authority hold does not cover this instant: the guest stays paused"
                );
            }
            g.fenced = true;
            return false;
        }
        true
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fences: pauses the guest (unless a cut holds it paused already; it then stays paused), or with
    /// `stop` stops the VM for good. Idempotent.
    ///
    /// # Errors
    /// The VMM failed to pause or stop.
    pub fn fence(&self, stop: bool) -> Result<(), VmmError> {
        let mut g = self.lock();
        if stop && !g.stopped {
            g.fenced = true;
            g.stopped = true;
            return self.inner.shutdown();
        }
        if g.fenced {
            return Ok(());
        }
        if !g.paused_by_loop {
            self.inner.pause()?;
        }
        g.fenced = true;
        Ok(())
    }

    /// Lifts the fence: the guest runs again unless a cut holds it. A stopped VM stays stopped.
    ///
    /// # Errors
    /// The VMM failed to resume.
    pub fn unfence(&self) -> Result<(), VmmError> {
        let mut g = self.lock();
        if !g.fenced || g.stopped {
            return Ok(());
        }
        g.fenced = false;
        if !g.paused_by_loop && self.hold_covers(&mut g) {
            self.inner.resume()?;
        }
        Ok(())
    }

    /// The VMM's run guard paused the guest behind our back (this sidecar was silent) and was armed again:
    /// the guest runs again if neither the fence nor a cut holds it.
    ///
    /// # Errors
    /// The VMM failed to resume.
    pub fn resume_after_guard(&self) -> Result<(), VmmError> {
        let mut g = self.lock();
        if g.fenced || g.stopped || g.paused_by_loop || !self.hold_covers(&mut g) {
            return Ok(());
        }
        self.inner.resume()
    }

    /// Whether the VM was stopped for good (shut down after a migration, or fence policy `stop`).
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Whether the fence holds the guest.
    pub fn is_fenced(&self) -> bool {
        self.lock().fenced
    }
}

impl SourceVmm for GatedVmm {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        self.inner.dirty_log()
    }
    fn snapshots(&self) -> Option<&dyn Snapshots> {
        self.inner.snapshots()
    }
    /// Pauses for a cut; a fenced guest is paused already (zero time).
    fn pause(&self) -> Result<Duration, VmmError> {
        let mut g = self.lock();
        let took = if g.fenced {
            Duration::ZERO
        } else {
            self.inner.pause()?
        };
        g.paused_by_loop = true;
        Ok(took)
    }
    /// Ends a cut's pause; a fenced guest stays paused.
    fn resume(&self) -> Result<(), VmmError> {
        let mut g = self.lock();
        if !g.fenced && self.hold_covers(&mut g) {
            self.inner.resume()?;
        }
        g.paused_by_loop = false;
        Ok(())
    }
    fn save_state(&self) -> Result<VmState, VmmError> {
        self.inner.save_state()
    }
    fn set_throttle(&self, fraction: f64) -> Result<(), VmmError> {
        self.inner.set_throttle(fraction)
    }
    fn hold_output(&self, hold: bool) -> Result<(), VmmError> {
        self.inner.hold_output(hold)
    }
    fn ram_hash(&self) -> Result<String, VmmError> {
        self.inner.ram_hash()
    }
    fn arm_guard(&self, timeout: Duration, generation: u64) -> Result<bool, VmmError> {
        self.inner.arm_guard(timeout, generation)
    }

    fn keep_alive(&self) -> Result<(), VmmError> {
        self.inner.keep_alive()
    }

    fn disarm_guard(&self) -> Result<(), VmmError> {
        self.inner.disarm_guard()
    }

    fn shutdown(&self) -> Result<(), VmmError> {
        self.lock().stopped = true;
        self.inner.shutdown()
    }
}
