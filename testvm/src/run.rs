//! `testvm run`: boot a VM, harvest its dirty pages every `harvest_ms`, and (with `verify_dirty`) check
//! every page the guest says it wrote against what the harvests reported.
//!
//! The check uses the guest's own log, and is exact however the host schedules the vCPU threads. Each
//! vCPU appends a page's frame number to its log ring and then writes the page, one page after another,
//! so the write of entry `i` happens after entry `i` was appended and before entry `i + 1` was. Around
//! harvest `k`'s read of KVM's log (the "fetch") the VMM reads every ring's head twice: `pre_k` just
//! before the fetch and `post_k` just after. Then for entry `i`:
//!
//! - if `post_j <= i`, entry `i` was appended after fetch `j`, so its write came after fetch `j`;
//! - if `pre_k >= i + 2`, entry `i + 1` was appended before fetch `k`, so the write of `i` came before it.
//!
//! With `L = 1 + max{j : post_j <= i}` and `U = min{k : pre_k >= i + 2}`, the write lies between fetch
//! `L - 1` and fetch `U`, and the first harvest after it, somewhere in `L..=U`, must report the page. The
//! VMM checks entry `i` at harvest `U`: the page's latest report must be at least `L`. Anything else is a
//! missed page. The newest entry of each vCPU may still be in flight at the end and is not checked.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::dirty::DirtySource;
use crate::layout::WorkloadConfig;
use crate::vm::{Vm, VmConfig, VmError};

/// Options of one run.
pub struct RunOptions {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Workload.
    pub workload: WorkloadConfig,
    /// How long the guest runs (after the fill, if any, has been started).
    pub duration: Duration,
    /// Harvest interval.
    pub harvest_interval: Duration,
    /// Check dirty tracking against the guest's log.
    pub verify_dirty: bool,
    /// KVM dirty source.
    pub dirty_source: DirtySource,
    /// Throttle fraction for the whole run.
    pub throttle: f64,
    /// Guest serial output.
    pub console: Box<dyn std::io::Write + Send>,
}

/// What a run measured. Field names are the JSON output of `testvm run --output json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Workload, in `--workload` syntax.
    pub workload: String,
    /// Dirty source used.
    pub dirty_source: DirtySource,
    /// Wall time the guest ran, seconds.
    pub elapsed_s: f64,
    /// Pages the guest's workload wrote (its own counters, all vCPUs).
    pub guest_pages_written: u64,
    /// Write rate the guest measured with its own TSC, pages/s, all vCPUs.
    pub guest_rate_pages_per_s: f64,
    /// The guest's running checksums combined (XOR over vCPUs).
    pub guest_checksum: String,
    /// Harvests done.
    pub harvests: u64,
    /// Dirty pages reported over all harvests.
    pub dirty_pages_harvested: u64,
    /// Median harvest duration, microseconds.
    pub harvest_us_p50: f64,
    /// 99th percentile harvest duration, microseconds.
    pub harvest_us_p99: f64,
    /// Logged guest writes no harvest reported (`None` without verification).
    pub missed_pages: Option<u64>,
    /// Guest page writes checked against the harvests (`None` without verification).
    pub verified_writes: Option<u64>,
    /// Times the guest waited on a full log ring.
    pub log_stalls: u64,
    /// Dirty-ring-full exits.
    pub ring_full_exits: u64,
    /// Guest exceptions (the run stops at the first).
    pub exceptions: u64,
    /// The fault that stopped the VM, if any.
    pub fault: Option<String>,
}

/// Bookkeeping of the dirty-tracking check (see the module docs).
struct Verifier {
    /// Harvest number (1-based) that last reported each page; 0 = never.
    last_report: Vec<u32>,
    /// Per vCPU: the head read just after each harvest's fetch (`post_k`, index k - 1).
    post: Vec<Vec<u64>>,
    /// Per vCPU: entries consumed so far (the ring's tail).
    next: Vec<u64>,
    missed: std::collections::BTreeSet<u64>,
    checked: u64,
}

impl Verifier {
    fn new(pages: u64, vcpus: u32) -> Self {
        Self {
            last_report: vec![0; pages as usize],
            post: vec![Vec::new(); vcpus as usize],
            next: vec![0; vcpus as usize],
            missed: Default::default(),
            checked: 0,
        }
    }

    /// Harvest `k` (1-based) reported `bitmaps`; `pre`/`post` are the heads read around its fetch.
    /// Checks and consumes every entry that became checkable.
    fn harvest(
        &mut self,
        vm: &Vm,
        k: u32,
        pre: &[u64],
        post: &[u64],
        bitmaps: &[endophyte_attach::bitmap::DirtyBitmap],
    ) -> Result<(), VmError> {
        for bm in bitmaps {
            let first = bm.base_gpa() / bm.page_size();
            for p in bm.iter_pages() {
                self.last_report[(first + p) as usize] = k;
            }
        }
        for (v, (&pre_k, &post_k)) in pre.iter().zip(post).enumerate() {
            self.post[v].push(post_k);
            // Entries i with i + 2 <= pre_k are complete before this fetch.
            let upto = pre_k.saturating_sub(1).max(self.next[v]);
            let history = &self.post[v];
            let (last_report, missed, checked) =
                (&self.last_report, &mut self.missed, &mut self.checked);
            let mut i = self.next[v];
            vm.drain_guest_log(v as u32, upto, |gfn| {
                // L = 1 + (number of harvests whose post head was <= i), as post heads never decrease.
                let lower = 1 + history.partition_point(|&h| h <= i) as u32;
                let seen = last_report.get(gfn as usize).copied().unwrap_or(0);
                if seen < lower {
                    missed.insert(gfn);
                }
                *checked += 1;
                i += 1;
            })?;
            self.next[v] = upto;
        }
        Ok(())
    }
}

/// Boots a VM with `opts`, runs it for `opts.duration` while harvesting, and reports.
///
/// # Errors
/// [`VmError`] when the VM cannot be built or a harvest fails. A guest fault is not an error here: it is
/// reported in [`RunReport::fault`] and `exceptions`.
pub fn run(opts: RunOptions) -> Result<RunReport, VmError> {
    let vm = Vm::boot(VmConfig {
        mem_bytes: opts.mem_bytes,
        vcpus: opts.vcpus,
        workload: opts.workload.clone(),
        verify_dirty: opts.verify_dirty,
        dirty_source: opts.dirty_source,
        console: opts.console,
    })?;
    let layout = vm.layout().clone();
    let pages = layout.mem_bytes / layout.page_size;
    let mut verifier = opts
        .verify_dirty
        .then(|| Verifier::new(pages, layout.vcpus));
    vm.start_dirty_log()?;
    vm.set_throttle(opts.throttle);
    vm.resume()?;
    let t0 = Instant::now();
    let mut harvest_us = Vec::new();
    let mut dirty_total = 0u64;
    let mut harvest_no = 0u32;
    let mut fault = None;
    let mut next = t0 + opts.harvest_interval;
    let mut last = false;
    loop {
        let now = Instant::now();
        if now >= t0 + opts.duration {
            // Final harvest with the guest paused, so that everything it wrote is accounted for.
            match vm.pause() {
                Ok(_) => {}
                Err(VmError::Faulted(f)) => fault = Some(f),
                Err(e) => return Err(e),
            }
            last = true;
        } else if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(5)));
            if let Some(f) = vm.fault() {
                fault = Some(f);
                break;
            }
            continue;
        }
        next += opts.harvest_interval;
        harvest_no += 1;
        let heads = |vm: &Vm| -> Result<Vec<u64>, VmError> {
            if verifier.is_some() {
                (0..layout.vcpus).map(|i| vm.guest_log_head(i)).collect()
            } else {
                Ok(Vec::new())
            }
        };
        let pre = heads(&vm)?;
        let h0 = Instant::now();
        let bitmaps = vm.harvest()?;
        harvest_us.push(h0.elapsed().as_secs_f64() * 1e6);
        let post = heads(&vm)?;
        dirty_total += bitmaps.iter().map(|b| b.count()).sum::<u64>();
        if let Some(v) = verifier.as_mut() {
            v.harvest(&vm, harvest_no, &pre, &post, &bitmaps)?;
        }
        if last || fault.is_some() {
            break;
        }
    }
    let elapsed = t0.elapsed();
    if fault.is_none() {
        fault = vm.fault();
    }
    let tsc_hz = f64::from(vm.tsc_khz()) * 1000.0;
    let mut written = 0;
    let mut checksum = 0u64;
    let mut rate = 0.0;
    let mut stalls = 0;
    for i in 0..layout.vcpus {
        let s = vm.guest_status(i)?;
        written += s.pages_written;
        checksum ^= s.checksum;
        stalls += s.log_stalls;
        if s.pages_written > 0 && s.last_tsc > s.work_start_tsc {
            rate += s.pages_written as f64 / ((s.last_tsc - s.work_start_tsc) as f64 / tsc_hz);
        }
    }
    harvest_us.sort_by(f64::total_cmp);
    Ok(RunReport {
        mem_bytes: layout.mem_bytes,
        vcpus: layout.vcpus,
        workload: opts.workload.describe(),
        dirty_source: vm.dirty_source(),
        elapsed_s: elapsed.as_secs_f64(),
        guest_pages_written: written,
        guest_rate_pages_per_s: rate,
        guest_checksum: format!("{checksum:016x}"),
        harvests: harvest_us.len() as u64,
        dirty_pages_harvested: dirty_total,
        harvest_us_p50: percentile(&harvest_us, 0.50),
        harvest_us_p99: percentile(&harvest_us, 0.99),
        missed_pages: verifier.as_ref().map(|v| v.missed.len() as u64),
        verified_writes: verifier.as_ref().map(|v| v.checked),
        log_stalls: stalls,
        ring_full_exits: vm.ring_full_exits(),
        exceptions: u64::from(matches!(
            fault,
            Some(crate::vcpu::VmFault::GuestException { .. })
        )),
        fault: fault.map(|f| f.to_string()),
    })
}

/// The `q` quantile (0..=1) of sorted `v`, nearest-rank; 0 for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
