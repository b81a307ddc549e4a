//! The epoch cycle: one epoch, top to bottom, and the loop that paces them.
//!
//! For a VMM with a dirty log, an epoch is:
//!
//! 1. **open**: number it, begin it on every streaming backup ([`EpochLoop::open`]);
//! 2. **resync**: backups that (re)joined first get every page changed since the epoch they hold, read
//!    from live RAM (all of RAM when the history cannot tell) ([`EpochLoop::resync`]);
//! 3. **pre-copy**: when the pages dirtied since the last pause would not fit the staging buffer, send
//!    them from live RAM and harvest again, up to 5 rounds ([`EpochLoop::precopy`]);
//! 4. **pause**: stop the vCPUs, harvest, save vCPU and device state ([`EpochLoop::pause`]); under the
//!    `discard` policy an overflowing pause is abandoned and the epoch goes back to pre-copy;
//! 5. **stage**: copy the dirty pages into staging while the guest stands still, then resume it
//!    ([`EpochLoop::stage`]); an overflow instead sends them with the guest paused (`pause` policy);
//! 6. **ship**: cut the staged pages into chunks for the sender ([`EpochLoop::ship`]);
//! 7. **close**: end the epoch on every backup with its state, hold its guest output until durable,
//!    record its changed pages ([`EpochLoop::close`]); a migration's switchover follows the final one.
//!
//! For a VMM that only hands over full snapshots, steps 2-6 are one snapshot whose pages are filtered by
//! their hashes ([`super::snapshot`]).

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use endophyte_vmm::{DirtyBitmap, DirtyLog, Harvest, SourceVmm, VmState};
use endophyte_wire::{Contribution, EpochStart};

use super::encode::{stage_dirty, Pages, StagedRange};
use super::history::{History, PageSet};
use super::migration::SwitchTimes;
use super::pacing::Pacing;
use super::report::Stats;
use super::shared::Shared;
use super::snapshot::PageHashes;
use super::RunOptions;
use crate::config::{Emergency, SidecarConfig};

/// Most live pre-copy rounds before an epoch's pause.
const MAX_PRECOPY_ROUNDS: usize = 5;

/// The epoch loop's state. See the module docs.
pub(super) struct EpochLoop {
    pub vmm: Arc<dyn SourceVmm>,
    pub shared: Arc<Shared>,
    /// Configuration; epoch length, staging and the in-flight budget follow tuning at run time.
    pub cfg: SidecarConfig,
    pub opts: RunOptions,
    pub page_size: usize,
    pub session: u64,
    pub next_epoch: u64,
    /// The bounded staging buffer for one pause's dirty pages, touched up front.
    pub staging: Vec<u8>,
    pub history: History,
    pub pacing: Pacing,
    pub stats: Stats,
    /// `--ram-hashes`: where the VMM's RAM hash at each pause goes.
    pub hashes_out: Option<File>,
    pub last_pause_at: Option<Instant>,
    /// Whether guest output is held until its epoch is durable (output commit).
    pub output_commit: bool,
    /// The services' contributions taken at the last pause, for its end marker.
    pub contributions: Vec<Contribution>,
    /// Why the switchover being cut cannot go ahead (a service gave no contribution to its final epoch
    /// within the hold bound): the guest resumes and the migration fails with it.
    pub switch_veto: Option<String>,
    /// Guest output released at exit without a durable epoch.
    pub output_at_exit: u64,
    /// The VM runs on the migration target now; this sidecar is done.
    pub migrated: bool,
    /// vCPU and device state saved at the last pause (`None` if saving failed).
    pub pause_state: Option<VmState>,
    /// Per-page hashes, for a VMM that hands over full snapshots.
    pub page_hashes: Option<PageHashes>,
}

/// A pause of the guest with its harvest: the epoch's cut.
pub(super) struct Cut {
    /// When the pause began.
    pub t0: Instant,
    /// Stopping the vCPUs, as the VMM measured it.
    pub vmm_pause: Duration,
    /// From `t0` until the vCPUs stood still.
    pub paused: Duration,
    /// From `t0` until the harvest and the state were in.
    pub harvested: Duration,
    pub harvest: Harvest,
    pub pages: u64,
    pub bytes: u64,
    /// Whether the pages fit the staging buffer.
    pub fits: bool,
    /// Whether the services' contributions are in (under the `fail` policy, a cut without them is
    /// abandoned).
    pub contributed: bool,
}

impl EpochLoop {
    /// Cuts epochs until a stop is asked (then a final one) or the VM migrated.
    pub(super) fn run(&mut self) -> anyhow::Result<()> {
        self.start()?;
        let mut last_pause = Instant::now();
        loop {
            if let Some(why) = self.shared.fatal() {
                anyhow::bail!(why);
            }
            // Read each time: the epoch length may follow the measured bandwidth-delay product, and a
            // migration converging shortens it.
            let switch_to = self.converge()?;
            let epoch_len = Duration::from_millis(self.epoch_ms_now());
            let stopping = self.stopping();
            // Pace epochs; also wait while the backups cannot take another one. The final epoch of a
            // switchover is cut as soon as the target holds the one before: the guest dirties pages all the
            // while, and every page dirtied before the cut is downtime.
            let due = last_pause + epoch_len;
            let shared = self.shared.clone();
            if !stopping && switch_to.is_none() {
                shared.wait_until(
                    due.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
                    |_| Instant::now() >= due || shared.stopping(),
                );
            }
            self.wait_for_room(switch_to);
            tracing::debug!(since_pause = ?last_pause.elapsed(), switch = switch_to.is_some(), "epoch due");
            if self.vmm_busy() {
                if stopping {
                    tracing::warn!("stopping while the VMM cannot take an epoch: no final epoch");
                    break;
                }
                continue;
            }
            if let Some(why) = self.shared.fatal() {
                anyhow::bail!(why);
            }
            last_pause = Instant::now();
            let last = stopping && switch_to.is_none();
            self.epoch(last, switch_to)?;
            if self.migrated {
                // The VM runs on the target; its VMM here is gone, and everything it held is durable.
                let d = self.shared.lock().sender.durable_epoch();
                let mut console = self.shared.console.lock();
                console.release_through(d);
                console.release_all();
                return Ok(());
            }
            if last {
                break;
            }
        }
        self.finish()
    }

    /// Before the first epoch: staging touched, output held, dirty logging on, backups heard.
    fn start(&mut self) -> anyhow::Result<()> {
        if let Some(p) = &self.opts.ram_hashes {
            self.hashes_out = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            );
        }
        // Allocate and touch the staging buffer now, so that no epoch pause pays for its page faults.
        if self.vmm.dirty_log().is_some() {
            self.staging = vec![0xa5u8; self.cfg.staging as usize];
        }
        if self.cfg.output_commit {
            match self.vmm.hold_output(true) {
                Ok(()) => {
                    self.output_commit = true;
                    // The console gate is a service on the epoch hook like any other.
                    self.shared
                        .services
                        .register_local(
                            "console",
                            vec![crate::services::pb::Hook::Epoch],
                            Box::new(self.shared.console.clone()),
                        )
                        .map_err(anyhow::Error::msg)?;
                }
                Err(e) => {
                    tracing::warn!("output commit unavailable, guest output is not held: {e}")
                }
            }
        }
        if let Some(log) = self.vmm.dirty_log() {
            log.start().context("starting dirty logging")?;
        }
        if !self.pacing.supported {
            tracing::warn!(vmm = %self.vmm.name(),
                "this VMM cannot throttle its vCPUs: a guest that outruns the paths meets the emergency policy ({:?}) at once",
                self.cfg.emergency);
        }
        // Wait for backups to say where they are (up to 30 s for the quorum).
        let quorum = self.cfg.quorum;
        self.shared.wait_until(Duration::from_secs(30), |g| {
            (0..g.sender.backups())
                .filter(|&b| g.sender.is_streaming(b))
                .count()
                >= quorum
        });
        Ok(())
    }

    /// After the final epoch: wait for it on every backup, release output, stop logging, clear the
    /// throttle.
    fn finish(&mut self) -> anyhow::Result<()> {
        let last = self.next_epoch - 1;
        let done = self.shared.wait_until(Duration::from_secs(30), |g| {
            g.sender.durable_epoch() >= last
                && (0..g.sender.backups())
                    .all(|b| !g.sender.is_streaming(b) || g.sender.committed(b) >= last)
        });
        if !done {
            tracing::warn!(epoch = last, "final epoch not on every backup after 30 s");
        }
        if self.output_commit {
            // Replication stops but the VM goes on: what is still held belongs to it and is released.
            let durable = self.shared.lock().sender.durable_epoch();
            let mut console = self.shared.console.lock();
            console.release_through(durable);
            let rest = console.release_all();
            if rest > 0 {
                tracing::warn!(
                    bytes = rest,
                    "released console output of epochs that never became durable"
                );
                self.output_at_exit = rest;
            }
            drop(console);
            let _ = self.vmm.hold_output(false);
        }
        if let Some(log) = self.vmm.dirty_log() {
            let _ = log.stop();
        }
        self.clear_throttle()
    }

    /// Waits while the backups cannot take another epoch: too many open, or too much unacknowledged.
    /// Converging, one epoch at a time goes to the target (up to 1 s), so that each epoch's lag from pause
    /// to commit is what the final epoch will see, not a queue behind earlier ones. The final epoch of a
    /// switchover to `switch_to` waits for that target alone: the other backups are not on the critical
    /// path.
    fn wait_for_room(&mut self, switch_to: Option<usize>) {
        let budget = self.cfg.max_unacked as usize;
        let shared = self.shared.clone();
        let converging_to = switch_to.or_else(|| self.converging_target());
        let last_cut = self.next_epoch - 1;
        if let Some(t) = converging_to {
            shared.wait_until(Duration::from_secs(1), |g| {
                g.sender.committed(t) >= last_cut || !g.sender.is_streaming(t) || shared.stopping()
            });
        }
        if switch_to.is_some() {
            return;
        }
        // A converging migration's deadline ends the wait too: the backups may take nothing for ever
        // (one stopped committing), and only the next `converge` fails the migration (or forces it).
        shared.wait_until(Duration::from_secs(3600), |g| {
            (g.sender.can_begin_epoch() && g.sender.max_unacked_bytes() < budget)
                || shared.stopping()
                || g.migration.as_ref().is_some_and(|m| m.overdue())
        });
    }

    /// Whether the VMM cannot take an epoch now (a snapshot VMM whose VM another migration holds, say):
    /// then the loop waits a moment, and the status says why.
    fn vmm_busy(&mut self) -> bool {
        let why = self.vmm.snapshots().and_then(|s| s.busy());
        let mut g = self.shared.lock();
        if why != g.waiting {
            match &why {
                Some(w) => tracing::warn!("epochs wait: {w}"),
                None => tracing::info!("epochs go on"),
            }
            g.waiting = why.clone();
        }
        drop(g);
        if why.is_some() {
            let shared = self.shared.clone();
            shared.wait_until(Duration::from_millis(200), |_| false);
            return true;
        }
        false
    }

    /// Whether the run should end: a signal, `--duration`, or the demo's duration after the initial copy.
    /// Sets the stop flag, so that back-pressure waits end too.
    pub(super) fn stopping(&self) -> bool {
        let steady_done = self.opts.duration_after_initial_copy
            && self.opts.duration.is_some_and(|d| {
                let g = self.shared.lock();
                let dur = &g.durability;
                dur.initial_sync
                    .is_some_and(|t| dur.started.elapsed() >= t + d)
            });
        if steady_done {
            self.shared.request_stop();
        }
        self.shared.stopping()
    }

    /// One epoch, top to bottom (see the module docs). `last`: the run's final epoch. `switch_to`: the
    /// migration converged, this is the final epoch and the switchover to that backup follows.
    fn epoch(&mut self, last: bool, switch_to: Option<usize>) -> anyhow::Result<()> {
        let (e, starts) = self.open();
        if let Some(target) = switch_to {
            // The guest stays paused until the target commits this epoch: it goes there alone.
            self.shared.lock().sender.serve_alone_until(target, e);
        }
        let targets: Vec<usize> = starts
            .iter()
            .enumerate()
            .filter(|(_, s)| !matches!(s, EpochStart::NotStreaming))
            .map(|(b, _)| b)
            .collect();
        let vmm = self.vmm.clone();
        let (changed, switch) = match (vmm.dirty_log(), vmm.snapshots()) {
            (Some(log), _) => self.dirty_log_epoch(log, e, &starts, &targets, last, switch_to)?,
            (None, Some(snaps)) => {
                self.snapshot_epoch(snaps, e, &starts, &targets, last, switch_to)?
            }
            (None, None) => anyhow::bail!(
                "{} offers neither a dirty log nor snapshots: nothing to replicate with",
                vmm.name()
            ),
        };
        self.close(e, &targets, changed);
        if let (Some(target), Some(times)) = (switch_to, switch) {
            self.switchover(e, target, times)?;
            if self.migrated {
                return Ok(());
            }
        }
        self.control()
    }

    /// Step 1: the epoch's number (above anything a backup holds) and its start on every backup.
    fn open(&mut self) -> (u64, Vec<EpochStart>) {
        let mut g = self.shared.lock();
        let floor = (0..g.sender.backups())
            .map(|b| g.sender.committed(b))
            .max()
            .unwrap_or(0);
        let e = self.next_epoch.max(floor + 1);
        self.next_epoch = e + 1;
        self.stats.epochs += 1;
        g.durability.first_epoch.get_or_insert(e);
        let starts = (0..g.sender.backups())
            .map(|b| g.sender.begin_epoch(b, e))
            .collect();
        (e, starts)
    }

    /// Steps 2-6 for a VMM with a dirty log. Returns the pages the epoch changed and, when switching over,
    /// the pause's timings (the guest is still paused then).
    fn dirty_log_epoch(
        &mut self,
        log: &dyn DirtyLog,
        e: u64,
        starts: &[EpochStart],
        targets: &[usize],
        last: bool,
        switch_to: Option<usize>,
    ) -> anyhow::Result<(Vec<DirtyBitmap>, Option<SwitchTimes>)> {
        let resynced = self.resync(log, e, starts)?;
        let switching = switch_to.is_some();
        let mut precopied: Option<Vec<DirtyBitmap>> = None;
        // Discard policy: when the pause finds more than staging holds, the pause is abandoned (the pages go
        // back to the VMM, the guest runs on) and the epoch goes on with more pre-copy; it ends at the first
        // pause whose pages fit. The replica falls behind meanwhile instead of the guest standing still.
        let mut discarded = false;
        let cut = loop {
            let long_epoch = self
                .last_pause_at
                .is_none_or(|t| t.elapsed() > 2 * Duration::from_millis(self.cfg.epoch_ms));
            let wanted = discarded
                || resynced
                || long_epoch
                || self.stats.last_dirty_bytes > self.cfg.staging / 2;
            // Stopping: no more rounds; the final epoch is cut at the next pause. Switching over: the
            // migration converged, so the pause takes what is left.
            if wanted && !self.stopping() && !switching {
                self.precopy(log, e, targets, &mut precopied)?;
            }
            let cut = self.pause(log, e, last, switching)?;
            // A service failed its contribution under the `fail` policy: nothing of this cut commits.
            if !cut.contributed {
                self.abandon(log, e, cut)?;
                discarded = true;
                continue;
            }
            // Stopping: the final epoch is cut even when it overflows (as under `pause`), so that the
            // sidecar can exit with the replica consistent rather than discard forever.
            if !cut.fits
                && self.cfg.emergency == Emergency::Discard
                && !self.stopping()
                && !switching
            {
                self.discard(log, e, cut)?;
                discarded = true;
                continue;
            }
            break cut;
        };
        let (shipped, switch) = if cut.fits {
            let index = self.stage(log, &cut)?;
            let switch = if switching {
                self.save_for_switch(&cut)
            } else {
                None
            };
            if !switching {
                self.vmm.resume().context("resuming the guest")?;
            }
            self.stats.cut(cut.t0.elapsed());
            tracing::debug!(epoch = e, pages = cut.pages, vmm_pause = ?cut.vmm_pause, paused = ?cut.paused,
                harvested = ?cut.harvested, resumed = ?cut.t0.elapsed(), "epoch pause");
            (
                self.ship(e, targets, Pages::Staged(&index)).map(|_| ()),
                switch,
            )
        } else {
            self.overflow(log, e, targets, &cut, switching)
        };
        log.release(cut.harvest.seq, shipped.is_ok())?;
        if shipped.is_err() && switch.is_some() {
            let _ = self.vmm.resume();
        }
        shipped?;
        let mut changed = cut.harvest.bitmaps;
        if let Some(pre) = precopied {
            changed
                .iter_mut()
                .zip(&pre)
                .for_each(|(a, b)| a.or_assign(b));
        }
        Ok((changed, switch))
    }

    /// Step 2: resync prefixes, read from live RAM before the pause (anything the guest changes after a
    /// page was read is dirty and comes again in this epoch's delta). Backups that need the same pages (all
    /// of RAM, or the same history) share one encoding. Returns whether any backup was resynced.
    fn resync(
        &mut self,
        log: &dyn DirtyLog,
        e: u64,
        starts: &[EpochStart],
    ) -> anyhow::Result<bool> {
        let groups = self.history.resync_groups(starts, e);
        let resynced = !groups.is_empty();
        for g in groups {
            let n = self.ship(e, &g.backups, Pages::Live(log, &g.set))?;
            self.stats.resync_bytes += n * self.page_size as u64 * g.backups.len() as u64;
            tracing::info!(backups = ?g.backups, from = ?g.from, epoch = e, pages = n, "resync prefix sent");
        }
        Ok(resynced)
    }

    /// Step 3: pre-copy rounds from live RAM until what is dirty fits the pause, the guest stops converging
    /// with the throttle spent, or five rounds are done. The rounds' pages accumulate in `precopied`.
    fn precopy(
        &mut self,
        log: &dyn DirtyLog,
        e: u64,
        targets: &[usize],
        precopied: &mut Option<Vec<DirtyBitmap>>,
    ) -> anyhow::Result<()> {
        let mut previous_round = u64::MAX;
        for _ in 0..MAX_PRECOPY_ROUNDS {
            let h = log.harvest().context("harvesting dirty pages")?;
            // Guest output handed over with any harvest belongs to this epoch.
            self.shared.console.lock().push(&h.output);
            let bytes = h.bitmaps.iter().map(|b| b.count()).sum::<u64>() * self.page_size as u64;
            // Small enough for the pause: leave it to the pause. Not converging (the guest dirtied nearly
            // as much as the last round sent) with the throttle spent: more rounds only delay the pause and
            // the emergency policy, which is what decides how this ends. Below the top, rounds go on while
            // the throttle rises.
            if bytes <= self.cfg.staging / 2
                || (self.pacing.spent() && bytes > previous_round / 10 * 9)
            {
                log.release(h.seq, false)?;
                break;
            }
            previous_round = bytes;
            self.stats.dirty_bytes += bytes;
            let set = PageSet::Union(h.bitmaps);
            let r = self.ship(e, targets, Pages::Live(log, &set));
            log.release(h.seq, r.is_ok())?;
            r?;
            self.stats.precopy_rounds += 1;
            // A pre-copy round is where a guest that outruns the paths shows: let the controller throttle
            // it now, not only at the end of this (long) epoch.
            self.stats.last_dirty_bytes = bytes;
            self.control()?;
            let PageSet::Union(bms) = set else {
                unreachable!()
            };
            match precopied {
                None => *precopied = Some(bms),
                Some(acc) => acc.iter_mut().zip(&bms).for_each(|(a, b)| a.or_assign(b)),
            }
        }
        Ok(())
    }

    /// Step 4: the pause. The vCPUs stop, the last dirty pages are harvested, the VMM's RAM hash is
    /// recorded (`--ram-hashes`), the vCPU and device state is saved (every epoch's end marker carries it,
    /// so that a backup can promote the epoch).
    fn pause(
        &mut self,
        log: &dyn DirtyLog,
        e: u64,
        last: bool,
        switching: bool,
    ) -> anyhow::Result<Cut> {
        let t0 = Instant::now();
        self.last_pause_at = Some(t0);
        let vmm_pause = self.vmm.pause().context("pausing the guest")?;
        let paused = t0.elapsed();
        self.shared.lock().durability.pause_at.insert(e, t0);
        let harvest = match log.harvest() {
            Ok(h) => h,
            Err(err) => {
                let _ = self.vmm.resume();
                return Err(err).context("harvesting dirty pages");
            }
        };
        if let Err(err) = self.record_hash(e, last, None) {
            let _ = log.release(harvest.seq, false);
            let _ = self.vmm.resume();
            return Err(err);
        }
        self.shared.console.lock().push(&harvest.output);
        self.pause_state = match self.vmm.save_state() {
            Ok(s) => Some(s),
            Err(err) => {
                tracing::warn!(
                    epoch = e,
                    "saving vCPU and device state failed; this epoch cannot be promoted: {err}"
                );
                None
            }
        };
        // The services' state is cut while the guest stands still, as its RAM is.
        let contributed = self.contribute_at_pause(e, switching);
        let harvested = t0.elapsed();
        let pages: u64 = harvest.bitmaps.iter().map(|b| b.count()).sum();
        let bytes = pages * self.page_size as u64;
        self.stats.dirty_bytes += bytes;
        self.stats.last_dirty_bytes = bytes;
        Ok(Cut {
            t0,
            vmm_pause,
            paused,
            harvested,
            harvest,
            pages,
            bytes,
            fits: bytes <= self.cfg.staging,
            contributed,
        })
    }

    /// Appends the VMM's RAM hash at this cut to `--ram-hashes` (all epochs, or only the last with
    /// `final_hash_only`). `known`: the hash the VMM already gave (a snapshot's).
    pub(super) fn record_hash(
        &mut self,
        e: u64,
        last: bool,
        known: Option<String>,
    ) -> anyhow::Result<()> {
        if self.hashes_out.is_none() || (self.opts.final_hash_only && !last) {
            return Ok(());
        }
        let h = match known {
            Some(h) => h,
            None => self.vmm.ram_hash().context("hashing guest RAM")?,
        };
        // One write per line, so a reader never sees half of one.
        let line = format!("{}\n", serde_json::json!({"epoch": e, "ram_hash": h}));
        self.hashes_out
            .as_mut()
            .expect("checked")
            .write_all(line.as_bytes())?;
        Ok(())
    }

    /// The `discard` emergency: the pause's pages overflow staging, so the pause is abandoned. The pages go
    /// back to the VMM (they are harvested again), the guest resumes, and the epoch continues.
    fn discard(&mut self, log: &dyn DirtyLog, e: u64, cut: Cut) -> anyhow::Result<()> {
        log.release(cut.harvest.seq, false)?;
        self.vmm.resume().context("resuming the guest")?;
        self.stats.dirty_bytes -= cut.bytes;
        self.stats.discards += 1;
        tracing::warn!(
            epoch = e,
            dirty_bytes = cut.bytes,
            staging = self.cfg.staging,
            "emergency (discard): the pause's pages overflow staging; guest resumed, epoch continues"
        );
        Ok(())
    }

    /// Step 5: copies the dirty ranges into staging while the guest stands still.
    fn stage(&mut self, log: &dyn DirtyLog, cut: &Cut) -> anyhow::Result<Vec<StagedRange>> {
        match stage_dirty(log, &cut.harvest.bitmaps, &mut self.staging, 2) {
            Ok(i) => Ok(i),
            Err(err) => {
                // Nothing of this epoch went anywhere, a switchover included: the guest runs on here.
                let _ = log.release(cut.harvest.seq, false);
                let _ = self.vmm.resume();
                Err(err).context("copying dirty pages")
            }
        }
    }

    /// Step 5-6 when the pages overflow staging (the `pause` policy): the guest stays paused while they are
    /// encoded straight from RAM.
    fn overflow(
        &mut self,
        log: &dyn DirtyLog,
        e: u64,
        targets: &[usize],
        cut: &Cut,
        switching: bool,
    ) -> (anyhow::Result<()>, Option<SwitchTimes>) {
        self.stats.overflow_epochs += 1;
        tracing::warn!(
            epoch = e,
            dirty_bytes = cut.bytes,
            staging = self.cfg.staging,
            "epoch overflows staging; guest stays paused while it is sent"
        );
        let switch = if switching {
            self.save_for_switch(cut)
        } else {
            None
        };
        let set = PageSet::Union(cut.harvest.bitmaps.clone());
        let r = self.ship(e, targets, Pages::Live(log, &set)).map(|_| ());
        let r = if switch.is_none() || r.is_err() {
            r.and(self.vmm.resume().context("resuming the guest"))
        } else {
            r
        };
        self.stats.cut(cut.t0.elapsed());
        (r, switch)
    }

    /// Step 7: ends the epoch on every backup it went to, with the state and the services'
    /// contributions taken at its pause; records what it changed.
    pub(super) fn close(&mut self, e: u64, targets: &[usize], changed: Vec<DirtyBitmap>) {
        {
            let contributions = std::mem::take(&mut self.contributions);
            let mut g = self.shared.lock();
            for &b in targets {
                g.sender
                    .end_epoch_with(b, e, self.pause_state.clone(), contributions.clone());
            }
        }
        self.shared.wake.notify_one();
        self.history.insert(e, changed);
    }
}
