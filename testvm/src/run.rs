//! `testvm run`: boot a VM, harvest its dirty pages every `harvest_ms`, and (with `verify_dirty`) check
//! every page the guest says it wrote against what the harvests reported.
//!
//! The check uses the guest's own log: the guest writes a page, then appends its frame number to its log
//! ring. Before harvest `k` the VMM reads each ring's head; entries below that head were appended, hence
//! their pages written, before harvest `k` read KVM's log. An entry consumed at harvest `k` must therefore
//! have been reported by harvest `k` or `k - 1` (the write may precede the previous harvest when the
//! guest waited on a full ring between the write and the append). Anything else is a missed page.

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

/// Per-page bookkeeping of the dirty-tracking check.
struct Verifier {
    /// Harvest number (1-based) that last reported each page; 0 = never.
    last_report: Vec<u32>,
    missed: std::collections::BTreeSet<u64>,
    checked: u64,
}

impl Verifier {
    fn record(&mut self, harvest: u32, bitmaps: &[endophyte_attach::bitmap::DirtyBitmap]) {
        for bm in bitmaps {
            let first = bm.base_gpa() / bm.page_size();
            for p in bm.iter_pages() {
                self.last_report[(first + p) as usize] = harvest;
            }
        }
    }

    fn check(&mut self, harvest: u32, gfn: u64) {
        self.checked += 1;
        let seen = self.last_report.get(gfn as usize).copied().unwrap_or(0);
        if seen == 0 || seen + 1 < harvest {
            self.missed.insert(gfn);
        }
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
    let mut verifier = opts.verify_dirty.then(|| Verifier {
        last_report: vec![0; pages as usize],
        missed: Default::default(),
        checked: 0,
    });
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
        let heads: Vec<u64> = if verifier.is_some() {
            (0..layout.vcpus)
                .map(|i| vm.guest_log_head(i))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let h0 = Instant::now();
        let bitmaps = vm.harvest()?;
        harvest_us.push(h0.elapsed().as_secs_f64() * 1e6);
        dirty_total += bitmaps.iter().map(|b| b.count()).sum::<u64>();
        if let Some(v) = verifier.as_mut() {
            v.record(harvest_no, &bitmaps);
            for (i, &head) in heads.iter().enumerate() {
                vm.drain_guest_log(i as u32, head, |gfn| v.check(harvest_no, gfn))?;
            }
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
