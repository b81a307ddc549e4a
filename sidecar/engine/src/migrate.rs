//! Two-phase live migration: the control API's request and status shapes, and the CLI's client.
//!
//! The sidecar runs the migration inside its epoch loop (see [`crate::primary`]):
//!
//! 1. **Converge.** Epochs shorten to half the downtime budget (at least 10 ms). After each epoch the
//!    sidecar predicts the switchover's downtime as the last epoch's dirty bytes over the measured drain
//!    rate, plus one RTT to the target. While the prediction exceeds the budget, a throttle floor rises
//!    by 5 points per epoch (up to 99 %), as QEMU's auto-converge does. The target must also hold the
//!    epoch before last, so that its replica is current. A target with no replica gets the full pre-copy
//!    first, over the same paths, as any backup that joins does.
//! 2. **Switch over.** The guest is paused. Its last dirty pages are staged and its vCPU and device state is
//!    saved. The final epoch goes to every backup, and the sidecar waits until the target commits it. Then
//!    it sends `Switchover` with a generation one above the VM's current one. The target records a
//!    `"prepared"` fence, starts a VMM on the replica file and restores the VM there, paused, and answers
//!    `SwitchoverReady` ([`endophyte_wire::switchover`]). The source then commits (`SwitchoverCommit`). The target
//!    records `"running"`, resumes the guest and answers `SwitchedOver`. The source VMM is then shut down
//!    and the sidecar exits.
//!
//! The target resumes a guest only on the commit. So any failure before the commit (a refusal, no
//! `SwitchoverReady` within 10 s, every path to the target down, the target killed) is safe to undo:
//! the source sends `SwitchoverAbort` if it can and resumes. The target drops what it prepared; it would
//! also drop it after a minute without a commit, or on restart. After the commit the source never
//! resumes. If `SwitchedOver` does not come, the guest stays paused and the error says so. The guest
//! then runs nowhere, which is safe; two copies of it running would not be.

use serde::{Deserialize, Serialize};

/// Body of `POST /v1/migrate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The target backup's node name (one of the sidecar's backups).
    pub to: String,
    /// Downtime budget, ms: converge until the predicted switchover fits it.
    pub downtime_ms: u64,
    /// Give up converging after this long, ms.
    pub deadline_ms: u64,
    /// At the deadline, switch over anyway (downtime above budget) instead of failing.
    pub force: bool,
    /// Have the target hash guest RAM before it resumes the guest (for tests and the demo; the hash is
    /// reported as its own step and is inside the guest's pause).
    pub verify: bool,
}

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Shortening epochs and throttling until the predicted downtime fits.
    Converging,
    /// The guest is paused; the final epoch and the switchover are in flight.
    Switching,
    /// The VM runs on the target; the source is gone.
    Done,
    /// The migration failed; the VM runs on the source (see `error`).
    Failed,
}

/// Where the guest's pause went, ms, measured by the source (the target's steps by the target).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Stopping the vCPUs.
    pub pause_ms: f64,
    /// Harvesting the last dirty pages.
    pub harvest_ms: f64,
    /// Copying them to staging and saving vCPU and device state.
    pub stage_ms: f64,
    /// Sending the final epoch until the target committed it (journal fsync included).
    pub final_transfer_ms: f64,
    /// Target: recording the fence and starting its VMM.
    pub target_start_ms: f64,
    /// Target: restoring state onto the replica mapped as guest RAM.
    pub restore_ms: f64,
    /// Target: hashing guest RAM (only with `verify`).
    pub verify_ms: f64,
    /// The commit: its round trip, and the target recording its fence as running (durably).
    pub commit_ms: f64,
    /// Target: resuming the vCPUs.
    pub resume_ms: f64,
    /// What is left: messages between source and target.
    pub network_ms: f64,
}

impl DowntimeBreakdown {
    /// The steps on one line, ms: `pause 0.16 | harvest 0.31 | ...` (verify apart).
    pub fn steps(&self) -> String {
        format!(
            "pause {:.2} | harvest {:.2} | stage {:.2} | final transfer {:.2} | target start {:.2} | restore {:.2} | commit {:.2} | resume {:.2} | network {:.2} ms",
            self.pause_ms,
            self.harvest_ms,
            self.stage_ms,
            self.final_transfer_ms,
            self.target_start_ms,
            self.restore_ms,
            self.commit_ms,
            self.resume_ms,
            self.network_ms
        )
    }
}

/// A finished migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Target node.
    pub to: String,
    /// Generation the VM runs under on the target.
    pub generation: u64,
    /// The final epoch.
    pub epoch: u64,
    /// Guest downtime without the verification hash, ms: from the source's pause until the target's
    /// answer arrived (an upper bound: the guest resumed before the answer left the target).
    pub downtime_ms: f64,
    /// The same with the verification hash (equal to `downtime_ms` without `verify`).
    pub downtime_with_verify_ms: f64,
    /// Steps of the downtime.
    pub breakdown: DowntimeBreakdown,
    /// From the request until the pause, ms.
    pub converge_ms: f64,
    /// From the request until the target's answer, ms.
    pub total_ms: f64,
    /// Frame bytes sent to all backups during the migration.
    pub bytes_sent: u64,
    /// Page bytes of the final epoch (pages dirtied since the one before, times the page size): the
    /// delta the switchover itself carries.
    #[serde(default)]
    pub final_epoch_bytes: u64,
    /// Bytes of the vCPU and device state sent with the switchover.
    #[serde(default)]
    pub state_bytes: u64,
    /// Predicted downtime when the switchover started, ms.
    pub predicted_downtime_ms: f64,
    /// Whether the budget was met by prediction (false: `force` at the deadline).
    pub converged: bool,
    /// Whether the target's standby VMM had loaded the replica before the switchover (so the restore
    /// carried only the final epoch); false also when it never answered the warm-up.
    #[serde(default)]
    pub target_preloaded: bool,
    /// Target's BLAKE3 of guest RAM before it resumed the guest (empty without `verify`).
    pub target_ram_hash: String,
    /// Source VMM's BLAKE3 of guest RAM at the final pause, taken after the target answered (the source
    /// stays paused, so this costs no downtime).
    pub source_ram_hash: String,
}

/// `GET /v1/migration`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// The request.
    pub request: MigrateRequest,
    /// Phase.
    pub phase: Phase,
    /// Since the request, ms.
    pub elapsed_ms: f64,
    /// Downtime predicted after the last epoch, ms (`null` before the first).
    pub predicted_downtime_ms: Option<f64>,
    /// Frame bytes sent to all backups since the request.
    pub bytes_sent: u64,
    /// Their rate over the last second, bytes/s.
    pub rate_bytes_per_s: f64,
    /// vCPU throttle in force.
    pub throttle: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// The result, once done.
    pub report: Option<MigrationReport>,
}

/// Starts a migration through the sidecar's control socket and follows it until it ends, showing a
/// progress line (indicatif) when `progress`. Returns the final status.
///
/// # Errors
/// The sidecar cannot be reached or refused the request (its message says why).
pub fn run_cli(
    socket: &std::path::Path,
    req: &MigrateRequest,
    progress: bool,
) -> anyhow::Result<MigrationStatus> {
    use anyhow::Context;
    let body = serde_json::to_value(req)?;
    crate::control::request(socket, "POST", "/v1/migrate", Some(&body))?;
    let bar = if progress {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .expect("a valid template"),
        );
        b.enable_steady_tick(std::time::Duration::from_millis(100));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    loop {
        let v = crate::control::request(socket, "GET", "/v1/migration", None)
            .context("following the migration")?;
        let st: MigrationStatus = serde_json::from_value(v)?;
        bar.set_message(format!(
            "{:?} to {} | sent {:.1} MB at {:.1} MB/s | predicted downtime {} (budget {} ms) | throttle {:.0} %",
            st.phase,
            st.request.to,
            st.bytes_sent as f64 / 1e6,
            st.rate_bytes_per_s / 1e6,
            st.predicted_downtime_ms
                .map_or_else(|| "-".to_string(), |p| format!("{p:.1} ms")),
            st.request.downtime_ms,
            st.throttle * 100.0
        ));
        if matches!(st.phase, Phase::Done | Phase::Failed) {
            bar.finish_and_clear();
            return Ok(st);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A finished migration for a terminal.
pub fn summary(st: &MigrationStatus) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    match (&st.report, &st.error) {
        (Some(r), _) => {
            let b = &r.breakdown;
            let _ = writeln!(
                t,
                "migrated to {} (generation {}, epoch {}): downtime {:.1} ms, converge {:.0} ms, total {:.0} ms, {:.1} MB sent",
                r.to,
                r.generation,
                r.epoch,
                r.downtime_ms,
                r.converge_ms,
                r.total_ms,
                r.bytes_sent as f64 / 1e6
            );
            let _ = writeln!(t, "  {}", b.steps());
            if b.verify_ms > 0.0 {
                let _ = writeln!(
                    t,
                    "  verification: the target hashed guest RAM in {:.1} ms before resuming (not in the downtime above); hashes {}",
                    b.verify_ms,
                    if r.target_ram_hash == r.source_ram_hash {
                        "match"
                    } else {
                        "DIFFER"
                    }
                );
            }
        }
        (None, Some(e)) => {
            let _ = writeln!(t, "migration to {} failed: {e}", st.request.to);
        }
        (None, None) => {
            let _ = writeln!(t, "migration to {}: {:?}", st.request.to, st.phase);
        }
    }
    t
}
