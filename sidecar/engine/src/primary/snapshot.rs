//! Epochs of a VMM that hands over full snapshots ([`endophyte_vmm::Snapshots`]): every page of the
//! snapshot is hashed and compared with its hash from the last epoch, and only pages that changed go to
//! the backups (plus, for a backup that (re)joined, the pages it lacks). The hashes are the only memory
//! this costs: 16 bytes per guest page (4 MiB per GiB), never a copy of guest RAM.
//!
//! The hash is BLAKE3 keyed with a random per-run key, truncated to 128 bits: a guest cannot make a page
//! look unchanged without knowing the key, and two different pages collide with probability 2^-128.

use std::time::{Duration, Instant};

use anyhow::Context;
use endophyte_vmm::{DirtyBitmap, Snapshots};
use endophyte_wire::EpochStart;

use super::encode::Outbox;
use super::epoch::EpochLoop;
use super::history::PageSet;
use super::migration::SwitchTimes;

/// The hash of every page as last sent, by page index (0: never seen).
pub(super) struct PageHashes {
    key: [u8; 32],
    hashes: Vec<u128>,
}

impl PageHashes {
    /// Room for `pages` pages, all unknown, with a fresh key.
    pub fn new(pages: u64) -> Self {
        let mut key = [0u8; 32];
        // SAFETY: getrandom(2) writes at most `key.len()` bytes into `key`, which we own.
        let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
        if n != key.len() as isize {
            // No kernel entropy call: the key is then only as good as std's seed; still per run.
            for chunk in key.chunks_mut(8) {
                chunk.copy_from_slice(&crate::random_u64().to_le_bytes());
            }
        }
        Self {
            key,
            hashes: vec![0; pages as usize],
        }
    }

    /// Records `page`'s hash at `index`; returns whether it differs from the last one (or none was known).
    pub fn update(&mut self, index: usize, page: &[u8]) -> bool {
        let h = blake3::keyed_hash(&self.key, page);
        let h = u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes")).max(1);
        let slot = &mut self.hashes[index];
        let changed = *slot != h;
        *slot = h;
        changed
    }
}

impl EpochLoop {
    /// Steps 2-6 of an epoch (see [`super::epoch`]) for a VMM that hands over full snapshots. Returns the
    /// pages that changed and, when switching over, the cut's timings (the guest stays paused then).
    pub(super) fn snapshot_epoch(
        &mut self,
        snaps: &dyn Snapshots,
        e: u64,
        starts: &[EpochStart],
        targets: &[usize],
        last: bool,
        switch_to: Option<usize>,
    ) -> anyhow::Result<(Vec<DirtyBitmap>, Option<SwitchTimes>)> {
        let ps = self.page_size;
        let geometry = self.vmm.geometry().clone();
        // Backups that (re)joined get what they lack besides what changed; the others only what changed.
        let mut extra: Vec<(PageSet, Outbox)> = Vec::new();
        for g in self.history.resync_groups(starts, e) {
            let out = Outbox::new(self, e, &g.backups);
            extra.push((g.set, out));
        }
        let delta_targets: Vec<usize> = targets
            .iter()
            .copied()
            .filter(|b| !extra.iter().any(|(_, o)| o.targets().contains(b)))
            .collect();
        let mut delta = Outbox::new(self, e, &delta_targets);
        let mut changed: Vec<DirtyBitmap> = geometry
            .regions
            .iter()
            .map(|r| {
                DirtyBitmap::new(
                    r.addr,
                    geometry.page_size,
                    r.size_bytes / geometry.page_size,
                )
            })
            .collect();

        let switching = switch_to.is_some();
        self.contribute_before_snapshot(e, switching);
        let started = Instant::now();
        // The switchover's snapshot: streamed while the guest runs, the VMM pausing it for the last
        // changes, where it can; else the guest is paused first and all of it is downtime.
        let live = switching && self.vmm.capabilities().pause_in_snapshot;
        let want_hash = self.hashes_out.is_some() && (!self.opts.final_hash_only || last);
        // The final epoch's RAM hash (verification) is of one instant only with the guest paused: a
        // VMM's running snapshot gives none otherwise.
        let paused_for_hash = want_hash && last && !switching;
        if (switching && !live) || paused_for_hash {
            // The guest stays paused from here: the snapshot of a paused VM leaves it paused.
            self.vmm.pause().context("pausing the guest")?;
        }
        let paused = started.elapsed();
        let mut hashes = self
            .page_hashes
            .take()
            .unwrap_or_else(|| PageHashes::new(geometry.pages()));
        let zero = vec![0u8; ps];
        let mut failure: Option<anyhow::Error> = None;
        let mut region = 0usize;
        let cut = {
            let mut sink = |(addr, data): endophyte_vmm::SnapshotPage<'_>| {
                let page = data.unwrap_or(&zero);
                // Pages come in any order; most follow the one before in the same region.
                let within =
                    |r: &endophyte_vmm::Region| addr >= r.addr && addr < r.addr + r.size_bytes;
                if !within(&geometry.regions[region]) {
                    match geometry.regions.iter().position(within) {
                        Some(r) => region = r,
                        None => {
                            return Err(format!(
                                "the VMM sent a page at {addr:#x}, outside guest RAM"
                            ))
                        }
                    }
                }
                let index = addr / ps as u64;
                let is_new = hashes.update(index as usize, page);
                if is_new {
                    changed[region].set((addr - geometry.regions[region].addr) / ps as u64);
                }
                let r = (|| {
                    if is_new && !delta.targets().is_empty() {
                        self.put(&mut delta, addr, page)?;
                    }
                    for (set, out) in &mut extra {
                        let local = (addr - geometry.regions[region].addr) / ps as u64;
                        if is_new || set.contains(region, local) {
                            self.put(out, addr, page)?;
                        }
                    }
                    anyhow::Ok(())
                })();
                r.map_err(|err| {
                    let why = format!("{err:#}");
                    failure = Some(err);
                    why
                })
            };
            if live {
                snaps.snapshot_into_pause(&mut sink, want_hash)
            } else {
                snaps.snapshot(&mut sink, want_hash)
            }
        };
        // Downtime and the epoch's cut count from when the guest stopped.
        let t0 = match &cut {
            Ok(c) if live => c.paused_at.unwrap_or_else(Instant::now),
            _ => started,
        };
        self.last_pause_at = Some(t0);
        {
            let mut g = self.shared.lock();
            g.durability.pause_at.insert(e, t0);
            if self.vmm.capabilities().pause_in_snapshot && !switching {
                g.durability.handed_at.insert(e, Instant::now());
            }
        }
        self.page_hashes = Some(hashes);
        if paused_for_hash {
            self.vmm
                .resume()
                .context("resuming the guest after the final epoch")?;
        }
        let cut = match (cut, failure) {
            (Ok(c), None) => c,
            (_, Some(err)) => {
                if switching {
                    let _ = self.vmm.resume();
                }
                return Err(err);
            }
            (Err(err), None) => {
                if switching {
                    let _ = self.vmm.resume();
                }
                return Err(err).context("taking a snapshot");
            }
        };
        self.flush(&mut delta)?;
        for (_, out) in &mut extra {
            self.flush(out)?;
            self.stats.resync_bytes += out.pages * ps as u64 * out.targets().len() as u64;
        }
        if let Some(h) = cut.ram_hash.clone() {
            // A running snapshot's VMM may give none: nothing is recorded rather than a later RAM's.
            self.record_hash(e, last, Some(h))?;
        }
        let pages: u64 = changed.iter().map(DirtyBitmap::count).sum();
        self.stats.dirty_bytes += pages * ps as u64;
        self.stats.last_dirty_bytes = pages * ps as u64;
        self.stats.cut(if switching || paused_for_hash {
            t0.elapsed()
        } else {
            cut.pause
        });
        self.pause_state = Some(cut.state);
        let switch = if switching {
            let paused = if live { Duration::ZERO } else { paused };
            let times = SwitchTimes {
                t0,
                paused,
                harvested: paused,
                staged: t0.elapsed(),
            };
            self.save_for_switch_at(times)
        } else {
            None
        };
        tracing::debug!(epoch = e, changed = pages, pause = ?cut.pause, took = ?t0.elapsed(), "snapshot epoch");
        Ok((changed, switch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_new_once_and_again_only_when_it_changes() {
        let mut h = PageHashes::new(4);
        let a = vec![1u8; 4096];
        let mut b = a.clone();
        assert!(h.update(2, &a), "never seen");
        assert!(!h.update(2, &a));
        b[4095] ^= 1;
        assert!(h.update(2, &b));
        assert!(h.update(3, &vec![0u8; 4096]), "a zero page is new too");
        assert!(!h.update(3, &vec![0u8; 4096]));
    }
}
