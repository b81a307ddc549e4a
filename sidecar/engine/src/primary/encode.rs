//! Page encoding: pages into chunks (zero pages elided, lz4), chunks into the sender for their backups,
//! with back-pressure. One path for every source of pages: staged in the pause, read from live RAM, or
//! streamed by a snapshot.

use std::time::Duration;

use anyhow::Context;
use endophyte_vmm::{DirtyBitmap, DirtyLog, VmmError};
use endophyte_wire::{ChunkBuilder, PageChunk};

use super::epoch::EpochLoop;
use super::history::PageSet;

/// One staged range: `(gpa, offset in staging, length in bytes)`.
pub type StagedRange = (u64, usize, usize);

/// Pages on their way into chunks for a set of backups.
pub(super) struct Outbox {
    builder: ChunkBuilder,
    targets: Vec<usize>,
    /// Pages put so far.
    pub pages: u64,
    /// The last page put in the open chunk (a chunk's pages must be in increasing order).
    last_gpa: Option<u64>,
}

impl Outbox {
    /// Chunks of epoch `e` for `targets`.
    pub fn new(lp: &EpochLoop, e: u64, targets: &[usize]) -> Self {
        Self {
            builder: ChunkBuilder::new(e, lp.page_size, lp.cfg.chunk_pages),
            targets: targets.to_vec(),
            pages: 0,
            last_gpa: None,
        }
    }

    /// The backups it sends to.
    pub fn targets(&self) -> &[usize] {
        &self.targets
    }
}

/// Where a [`EpochLoop::ship`] takes its pages from.
pub(super) enum Pages<'a> {
    /// Copied into the staging buffer during the pause.
    Staged(&'a [StagedRange]),
    /// Read from running guest RAM now: the pages of a set.
    Live(&'a dyn DirtyLog, &'a PageSet),
}

impl EpochLoop {
    /// Adds the page at `gpa` to `out`; a full chunk goes to the sender. Pages may come in any order, and
    /// a page may come again: a page at or below the open chunk's last one closes that chunk first, and
    /// since chunks apply in order, a later copy of a page replaces an earlier one.
    pub(super) fn put(&mut self, out: &mut Outbox, gpa: u64, page: &[u8]) -> anyhow::Result<()> {
        if out.last_gpa.is_some_and(|last| gpa <= last) && !out.builder.is_empty() {
            let c = out.builder.finish(self.cfg.compress);
            self.push(&out.targets, c)?;
        }
        out.last_gpa = Some(gpa);
        out.builder.push(gpa, page);
        out.pages += 1;
        if out.builder.is_full() {
            let c = out.builder.finish(self.cfg.compress);
            self.push(&out.targets, c)?;
        }
        Ok(())
    }

    /// Sends `out`'s last, partial chunk.
    pub(super) fn flush(&mut self, out: &mut Outbox) -> anyhow::Result<()> {
        if !out.builder.is_empty() {
            let c = out.builder.finish(self.cfg.compress);
            self.push(&out.targets, c)?;
        }
        Ok(())
    }

    /// Encodes `pages` as chunks of epoch `e` for `targets`; returns how many pages.
    pub(super) fn ship(
        &mut self,
        e: u64,
        targets: &[usize],
        pages: Pages<'_>,
    ) -> anyhow::Result<u64> {
        let ps = self.page_size;
        let mut out = Outbox::new(self, e, targets);
        match pages {
            Pages::Staged(index) => {
                let staging = std::mem::take(&mut self.staging);
                let r = (|| {
                    for &(gpa, off, len) in index {
                        for i in (0..len).step_by(ps) {
                            self.put(&mut out, gpa + i as u64, &staging[off + i..off + i + ps])?;
                        }
                    }
                    anyhow::Ok(())
                })();
                self.staging = staging;
                r?;
            }
            Pages::Live(log, set) => {
                let mut page = vec![0u8; ps];
                let regions = self.vmm.geometry().regions.clone();
                for (ri, r) in regions.iter().enumerate() {
                    let live = |me: &mut Self, page: &mut Vec<u8>, out: &mut Outbox, idx: u64| {
                        let gpa = r.addr + idx * ps as u64;
                        log.read(gpa, page).context("reading guest RAM")?;
                        me.put(out, gpa, page)
                    };
                    match set {
                        PageSet::All => {
                            for idx in 0..r.size_bytes / ps as u64 {
                                live(self, &mut page, &mut out, idx)?;
                            }
                        }
                        PageSet::Union(bms) => {
                            let Some(bm) = bms.get(ri) else { continue };
                            for idx in bm.iter_pages() {
                                live(self, &mut page, &mut out, idx)?;
                            }
                        }
                    }
                }
            }
        }
        self.flush(&mut out)?;
        Ok(out.pages)
    }

    /// Hands `chunk` to the sender for every backup in `targets`, then waits while any of them holds more
    /// unacknowledged bytes than the budget (back-pressure). A stop request ends the wait, so that a stuck
    /// backup cannot keep the sidecar from cutting its final epoch and exiting; so does a converging
    /// migration's deadline, so that the migration fails then instead of waiting on a stuck target.
    fn push(&mut self, targets: &[usize], chunk: PageChunk) -> anyhow::Result<()> {
        self.stats.raw_bytes += u64::from(chunk.n_pages) * self.page_size as u64;
        self.stats.body_bytes += chunk.body.len() as u64;
        {
            let mut g = self.shared.lock();
            for &b in targets {
                g.sender.push_chunk(b, chunk.clone());
            }
        }
        self.shared.wake.notify_one();
        let budget = self.cfg.max_unacked as usize;
        let shared = self.shared.clone();
        shared.wait_until(Duration::from_secs(3600), |g| {
            targets
                .iter()
                .all(|&b| g.sender.unacked_bytes(b) < budget || !g.sender.is_streaming(b))
                || shared.stopping()
                || g.migration.as_ref().is_some_and(|m| m.overdue())
        });
        self.control_mid_send()
    }
}

type CopyJob<'a> = (&'a [StagedRange], &'a mut [u8], usize);

/// Copies the pages named by `bitmaps` from guest RAM into `staging`, range by range (ranges coalesced from
/// the bitmaps), and returns `(gpa, staging offset, length in bytes)` per range. This is the memcpy inside
/// the epoch pause. Copies of random pages are bound by memory latency rather than bandwidth, so above
/// 1 MiB the ranges are split between `copy_threads` threads (the paused vCPUs leave their cores idle).
///
/// # Errors
/// A range outside guest RAM.
///
/// # Panics
/// If the pages do not fit `staging` (callers check the count first).
pub fn stage_dirty(
    log: &dyn DirtyLog,
    bitmaps: &[DirtyBitmap],
    staging: &mut [u8],
    copy_threads: usize,
) -> Result<Vec<StagedRange>, VmmError> {
    let mut off = 0usize;
    let mut index = Vec::new();
    for bm in bitmaps {
        for r in bm.ranges() {
            let len = r.len_bytes as usize;
            index.push((r.gpa, off, len));
            off += len;
        }
    }
    let threads = if off < 1 << 20 {
        1
    } else {
        copy_threads.max(1)
    };
    // Cut the ranges into `threads` runs of about equal bytes, each with its own slice of staging.
    let per = off.div_ceil(threads);
    let mut jobs: Vec<CopyJob<'_>> = Vec::new();
    let mut rest = &mut staging[..off];
    let (mut start, mut base) = (0usize, 0usize);
    while start < index.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < index.len() && (bytes < per || end == start) {
            bytes += index[end].2;
            end += 1;
        }
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(bytes);
        rest = tail;
        jobs.push((&index[start..end], mine, base));
        base += bytes;
        start = end;
    }
    let copy = |(ranges, dst, base): CopyJob<'_>| {
        for &(gpa, o, len) in ranges {
            log.read(gpa, &mut dst[o - base..o - base + len])?;
        }
        Ok::<(), VmmError>(())
    };
    if jobs.len() <= 1 {
        jobs.into_iter().try_for_each(copy)?;
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs.into_iter().map(|j| s.spawn(move || copy(j))).collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("copy thread panicked"))
        })?;
    }
    Ok(index)
}
