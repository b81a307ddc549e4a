//! The sidecar's hold on its VM at the fencing authority (docs/fencing.md): claimed before the first
//! epoch, kept alive by [`endophyte_authority::Hold`], and acted on through the [`GatedVmm`]: the guest is
//! paused once the hold cannot be shown alive, resumed once it is, and stays fenced for good once another
//! node holds the VM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use endophyte_authority::{Authority, AuthorityConfig, EtcdAuthority, Fencer, Hold};
use endophyte_vmm::SourceVmm;

use super::gate::GatedVmm;
use super::shared::Shared;
use crate::config::SelfFencePolicy;

/// Acts on the guest for the hold.
struct GateFencer {
    gate: Arc<GatedVmm>,
    shared: Arc<Shared>,
    stop: bool,
    /// The run guard's timeout (armed again on unfence).
    guard: Duration,
}

impl Fencer for GateFencer {
    fn fence(&self, why: &str) {
        let r = self.gate.fence(self.stop);
        {
            let mut g = self.shared.lock();
            g.fence.fences += 1;
            g.fence.fenced = self.gate.is_fenced();
        }
        match r {
            Ok(()) => tracing::error!(
                action = if self.stop { "stopped" } else { "paused" },
                "self-fenced by the authority: {why}"
            ),
            Err(e) => self.shared.fail(format!(
                "self-fencing failed: the VMM did not pause: {e}; the guest may still run while another node can promote ({why})"
            )),
        }
        if self.stop {
            self.shared
                .fail(format!("self-fenced with policy stop: {why}"));
        }
    }

    fn unfence(&self) {
        // The VMM's run guard may have tripped meanwhile: armed again first, under the generation held.
        if let Some(h) = self.shared.hold.get() {
            if let Err(e) = self.gate.arm_guard(self.guard, h.generation()) {
                tracing::error!("arming the run guard again: {e}");
            }
        }
        let r = self.gate.unfence();
        self.shared.lock().fence.fenced = self.gate.is_fenced();
        match r {
            Ok(()) => tracing::warn!("the authority hold is alive again: self-fence lifted"),
            Err(e) => self.shared.fail(format!(
                "lifting the self-fence: the VMM did not resume: {e}"
            )),
        }
    }

    fn superseded(&self, why: &str) {
        let kept = match self.gate.fence(self.stop) {
            Ok(()) => "this copy stays paused",
            Err(_) => "fencing it failed",
        };
        self.shared.lock().fence.fenced = self.gate.is_fenced();
        self.shared.fail(format!(
            "another node holds the VM at the authority ({why}); {kept} and will not resume"
        ));
    }
}

/// Claims VM `vm` for `node` at the authority in `cfg` and starts keeping the hold; returns the
/// generation claimed. An earlier lease of this node (a sidecar that just stopped) is waited out for up to
/// two TTLs.
///
/// # Errors
/// The authority refuses (another node holds the VM, naming it and its generation) or cannot be reached.
pub(super) fn start(
    rt: &tokio::runtime::Runtime,
    cfg: &AuthorityConfig,
    (vm, node): (&str, &str),
    gate: Arc<GatedVmm>,
    shared: Arc<Shared>,
    (policy, guard): (SelfFencePolicy, Duration),
) -> anyhow::Result<u64> {
    let auth: Arc<dyn Authority> = {
        let _in = rt.enter();
        Arc::new(EtcdAuthority::connect(cfg)?)
    };
    let wait = cfg.ttl() * 2 + Duration::from_secs(1);
    let claimed = rt
        .block_on(endophyte_authority::claim(
            &*auth,
            vm,
            node,
            cfg.ttl(),
            None,
            wait,
        ))
        .with_context(|| format!("claiming VM {vm:?} at {}", auth.describe()))?;
    tracing::info!(%vm, generation = claimed.generation, authority = %auth.describe(),
        ttl_ms = cfg.ttl().as_millis() as u64, "claimed the VM at the fencing authority");
    let fencer = Arc::new(GateFencer {
        gate: gate.clone(),
        shared: shared.clone(),
        stop: policy == SelfFencePolicy::Stop,
        guard,
    });
    let hold = Hold::spawn(
        rt.handle(),
        auth,
        (vm.to_owned(), node.to_owned()),
        cfg.timing(),
        claimed,
        fencer,
    );
    let hold = Arc::new(hold);
    let _ = shared.hold.set(hold.clone());
    gate.set_may_run(move || hold.may_run_now());
    Ok(claimed.generation)
}

/// The VM migrated away: the target claimed its generation before resuming it, so this node's lease
/// guards nothing now and goes.
pub(super) fn migrated(rt: &tokio::runtime::Runtime, shared: &Shared) {
    if let Some(hold) = shared.hold.get() {
        rt.block_on(hold.release());
    }
}

/// The run ends with the VM still here: the guest is paused (it fails closed: no replication and no hold
/// guard it any more), then the hold is released so that a backup may promote at once.
pub(super) fn end(rt: &tokio::runtime::Runtime, shared: &Shared, gate: &GatedVmm) {
    let Some(hold) = shared.hold.get() else {
        return;
    };
    match gate.fence(false) {
        Ok(()) => {
            tracing::warn!("the sidecar stops: the guest stays paused (its hold at the authority ends with this run)");
            rt.block_on(hold.release());
        }
        Err(e) => tracing::error!(
            "pausing the guest as the sidecar stops failed: {e}; the authority lease is left to expire, so a promote waits for its TTL"
        ),
    }
}
