//! A testvm virtual machine: KVM VM and vCPUs, guest RAM, dirty tracking, pause/resume, throttle, hashing,
//! and vCPU/device state save and restore.
//!
//! - `build`: making a VM (booted fresh, or restored from a saved state);
//! - `dirty_log`: KVM dirty logging and harvests;
//! - `state`: the saved state's types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyError, DirtyRing, DirtySource};
use crate::guest::{self, GuestState};
use crate::layout::{self, Layout, WorkloadConfig};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, Console, Control, VcpuHandle, VmFault, Want};

mod build;
mod dirty_log;
mod state;

pub use state::{FpuState, SerialRegs, VcpuState, VmState, STATE_FORMAT, STATE_VERSION};

/// Bytes of dirty ring per vCPU (65536 entries of 16 bytes), capped by what KVM allows.
const RING_BYTES: usize = 1 << 20;
/// `KVM_MAX_CPUID_ENTRIES` in the kernel.
const MAX_CPUID_ENTRIES: usize = 256;
/// IA32_TIME_STAMP_COUNTER.
const MSR_IA32_TSC: u32 = 0x10;
/// How long to wait for vCPUs to park before reporting a stuck pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened or a VM-level ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A per-vCPU ioctl failed.
    #[error("{op} on vCPU {vcpu}: {source}")]
    Vcpu {
        /// What was being done.
        op: &'static str,
        /// vCPU index.
        vcpu: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Layout.
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    /// Dirty tracking.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// The operation needs the VM paused.
    #[error("{op} needs the VM paused")]
    NotPaused {
        /// The operation.
        op: &'static str,
    },
    /// Harvest without dirty logging.
    #[error("dirty logging is not enabled")]
    NotLogging,
    /// The VM stopped because of a fault.
    #[error("the VM has stopped: {0}")]
    Faulted(VmFault),
    /// vCPUs did not park in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// Saved state is unusable.
    #[error("saved state: {0}")]
    BadState(String),
    /// Starting a thread failed.
    #[error("spawning {what}: {source}")]
    Spawn {
        /// Thread name.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// How to build a VM.
pub struct VmConfig {
    /// Guest RAM in bytes (a multiple of the host page size).
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest workload.
    pub workload: WorkloadConfig,
    /// Reserve log rings and have the guest log every page it writes.
    pub verify_dirty: bool,
    /// KVM dirty-page source.
    pub dirty_source: DirtySource,
    /// Where the guest's serial output goes.
    pub console: Box<dyn std::io::Write + Send>,
}

/// A vCPU's status record, as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// State the guest reports.
    pub state: Option<GuestState>,
    /// Pages the workload wrote.
    pub pages_written: u64,
    /// Completed passes.
    pub passes: u64,
    /// Running checksum.
    pub checksum: u64,
    /// Guest TSC at the last write.
    pub last_tsc: u64,
    /// Times the log ring was full.
    pub log_stalls: u64,
    /// Guest TSC when the workload started.
    pub work_start_tsc: u64,
}

/// A running (or paused) testvm VM.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    layout: Layout,
    workload: WorkloadConfig,
    tsc_khz: u32,
    ctl: Arc<Control>,
    vcpus: Vec<Arc<VcpuHandle>>,
    threads: Vec<JoinHandle<()>>,
    rings: Vec<DirtyRing>,
    dirty_source: DirtySource,
    logging: AtomicBool,
    harvest_lock: Mutex<()>,
    throttler: Option<JoinHandle<()>>,
    throttler_stop: Arc<AtomicBool>,
    console: Arc<Mutex<Console>>,
    _kvm: Kvm,
}

impl Vm {
    /// Guest memory map.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The workload the guest was started with.
    pub fn workload(&self) -> &WorkloadConfig {
        &self.workload
    }

    /// TSC frequency in kHz as KVM reports it.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The dirty-page source this VM was created with.
    pub fn dirty_source(&self) -> DirtySource {
        self.dirty_source
    }

    /// The fault that stopped the VM, if any.
    pub fn fault(&self) -> Option<VmFault> {
        self.ctl.lock().fault.clone()
    }

    /// `KVM_EXIT_DIRTY_RING_FULL` exits so far.
    pub fn ring_full_exits(&self) -> u64 {
        self.ctl.ring_full_exits.load(Ordering::Relaxed)
    }

    /// Lets the vCPUs run (also the first start after boot or restore).
    ///
    /// # Errors
    /// [`VmError::Faulted`] if the VM stopped on a fault.
    pub fn resume(&self) -> Result<(), VmError> {
        let mut st = self.ctl.lock();
        if let Some(f) = &st.fault {
            return Err(VmError::Faulted(f.clone()));
        }
        st.want = Want::Run;
        drop(st);
        self.ctl.notify();
        Ok(())
    }

    /// Stops every vCPU outside `KVM_RUN` (kicked by signal with `immediate_exit`) and waits until all are
    /// parked. Returns how long that took. Pausing a paused VM returns at once.
    ///
    /// # Errors
    /// [`VmError::Faulted`] if the VM stopped on a fault; [`VmError::PauseTimeout`] if a vCPU did not park.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let t0 = Instant::now();
        let mut st = self.ctl.lock();
        if let Some(f) = &st.fault {
            return Err(VmError::Faulted(f.clone()));
        }
        st.want = Want::Pause;
        drop(st);
        self.ctl.notify();
        for v in &self.vcpus {
            v.kick();
        }
        let n = self.layout.vcpus;
        let mut st = self.ctl.lock();
        loop {
            let (g, ok) = self
                .ctl
                .wait_until(st, Duration::from_millis(2), |s| s.parked + s.exited >= n);
            st = g;
            if ok {
                break;
            }
            if let Some(f) = &st.fault {
                return Err(VmError::Faulted(f.clone()));
            }
            if t0.elapsed() > PAUSE_TIMEOUT {
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
            }
            // A kick can race with a vCPU that was between checks; kick again.
            for v in &self.vcpus {
                v.kick();
            }
        }
        Ok(t0.elapsed())
    }

    /// Whether every vCPU is parked.
    pub fn is_paused(&self) -> bool {
        let st = self.ctl.lock();
        st.want == Want::Pause && st.parked + st.exited >= self.layout.vcpus
    }

    fn require_paused(&self, op: &'static str) -> Result<(), VmError> {
        if self.is_paused() {
            Ok(())
        } else {
            Err(VmError::NotPaused { op })
        }
    }

    /// Sets the throttle: each vCPU sleeps `fraction` (clamped to `[0, 0.99]`) of every
    /// [`vcpu::THROTTLE_PERIOD`].
    pub fn set_throttle(&self, fraction: f64) {
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, 0.99)
        } else {
            0.0
        };
        self.ctl
            .throttle_ppm
            .store((f * 1e6) as u64, Ordering::Relaxed);
    }

    /// The current throttle fraction.
    pub fn throttle(&self) -> f64 {
        self.ctl.throttle_ppm.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// BLAKE3 hash of all guest RAM.
    ///
    /// # Errors
    /// [`VmError::NotPaused`] unless every vCPU is parked.
    pub fn hash_ram(&self) -> Result<blake3::Hash, VmError> {
        self.require_paused("hashing guest RAM")?;
        // SAFETY: every vCPU is parked (checked above) and testvm writes guest RAM only from the threads that drive the VM, which are in this call.
        Ok(unsafe { self.ram.hash() })
    }

    /// Saves vCPU registers and device state.
    ///
    /// # Errors
    /// [`VmError::NotPaused`] unless paused; [`VmError::Vcpu`] if KVM fails.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        self.require_paused("saving VM state")?;
        let mut vcpus = Vec::new();
        for (i, h) in self.vcpus.iter().enumerate() {
            let fd = h.fd.lock().unwrap_or_else(|e| e.into_inner());
            let verr = |op, source| VmError::Vcpu {
                op,
                vcpu: i as u32,
                source,
            };
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_TSC,
                ..Default::default()
            }])
            .expect("one MSR fits");
            fd.get_msrs(&mut msrs)
                .map_err(|e| verr("KVM_GET_MSRS", e))?;
            vcpus.push(VcpuState {
                regs: fd.get_regs().map_err(|e| verr("KVM_GET_REGS", e))?,
                sregs: fd.get_sregs().map_err(|e| verr("KVM_GET_SREGS", e))?,
                fpu: FpuState::from(&fd.get_fpu().map_err(|e| verr("KVM_GET_FPU", e))?),
                tsc: msrs.as_slice()[0].data,
            });
        }
        let c = self.console.lock().unwrap_or_else(|e| e.into_inner());
        let s = c.state();
        Ok(VmState {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            layout: self.layout.clone(),
            workload: self.workload.clone(),
            tsc_khz: self.tsc_khz,
            vcpus,
            serial: SerialRegs {
                regs: [
                    s.baud_divisor_low,
                    s.baud_divisor_high,
                    s.interrupt_enable,
                    s.interrupt_identification,
                    s.line_control,
                    s.line_status,
                    s.modem_control,
                    s.modem_status,
                    s.scratch,
                ],
                in_buffer: s.in_buffer.clone(),
            },
        })
    }

    /// Reads vCPU `vcpu`'s status record from guest RAM.
    ///
    /// # Errors
    /// [`VmError::Memory`] if the record lies outside RAM (a corrupt layout).
    pub fn guest_status(&self, vcpu: u32) -> Result<GuestStatus, VmError> {
        use guest::status as s;
        let base = self.layout.status_record(vcpu);
        let r = |off: usize| self.ram.read_u64(base + off as u64);
        let magic = r(s::MAGIC)?;
        Ok(GuestStatus {
            state: if magic == guest::STATUS_MAGIC {
                GuestState::from_raw(r(s::STATE)?)
            } else {
                Some(GuestState::NotStarted)
            },
            pages_written: r(s::PAGES_WRITTEN)?,
            passes: r(s::PASSES)?,
            checksum: r(s::CHECKSUM)?,
            last_tsc: r(s::LAST_TSC)?,
            log_stalls: r(s::LOG_STALLS)?,
            work_start_tsc: r(s::WORK_START_TSC)?,
        })
    }

    /// Sets the guest's per-vCPU page-write limit (0 = none); vCPUs that reach it stop writing and nap.
    ///
    /// # Errors
    /// [`VmError::Memory`] on a corrupt layout.
    pub fn set_stop_at_pages(&self, pages: u64) -> Result<(), VmError> {
        self.ram.write_u64(
            self.layout.config_gpa + guest::cfg::STOP_AT_PAGES as u64,
            pages,
        )?;
        Ok(())
    }

    /// Consumes vCPU `vcpu`'s log ring (verify mode): calls `f` with each logged page frame number from the
    /// ring's tail up to entry `head` (exclusive, at most a head read earlier with
    /// [`Vm::guest_log_head`]), then advances the tail to `head`.
    ///
    /// # Errors
    /// [`VmError::Memory`] on a corrupt layout; [`VmError::BadState`] when not verifying.
    pub fn drain_guest_log(
        &self,
        vcpu: u32,
        head: u64,
        mut f: impl FnMut(u64),
    ) -> Result<u64, VmError> {
        let ring = self
            .layout
            .log_ring(vcpu)
            .ok_or_else(|| VmError::BadState("the guest is not logging writes".into()))?;
        let tail = self.ram.read_u64(ring + guest::log::TAIL as u64)?;
        let cap = self.layout.log_cap;
        for i in tail..head {
            let slot = ring + self.layout.page_size + (i % cap) * 4;
            f(u64::from(self.ram.read_u32(slot)?));
        }
        if head != tail {
            self.ram.write_u64(ring + guest::log::TAIL as u64, head)?;
        }
        Ok(head - tail)
    }

    /// The current head (entries produced) of vCPU `vcpu`'s log ring.
    ///
    /// # Errors
    /// As [`Vm::drain_guest_log`].
    pub fn guest_log_head(&self, vcpu: u32) -> Result<u64, VmError> {
        let ring = self
            .layout
            .log_ring(vcpu)
            .ok_or_else(|| VmError::BadState("the guest is not logging writes".into()))?;
        Ok(self.ram.read_u64(ring + guest::log::HEAD as u64)?)
    }

    /// Stops the vCPU threads for good and joins them.
    pub fn shutdown(&mut self) {
        let mut st = self.ctl.lock();
        st.want = Want::Stop;
        drop(st);
        self.ctl.notify();
        self.throttler_stop.store(true, Ordering::SeqCst);
        for v in &self.vcpus {
            v.kick();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for v in &self.vcpus {
            *v.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        if let Some(t) = self.throttler.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a throttle period every [`vcpu::THROTTLE_PERIOD`] while a throttle is set: kicks the vCPUs so
/// that each sleeps its share before re-entering the guest.
fn throttler(ctl: Arc<Control>, vcpus: Vec<Arc<VcpuHandle>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(vcpu::THROTTLE_PERIOD);
        if ctl.throttle_ppm.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let mut st = ctl.lock();
        if st.want != Want::Run {
            continue;
        }
        st.throttle_seq += 1;
        drop(st);
        ctl.notify();
        for v in &vcpus {
            if v.in_guest.load(Ordering::SeqCst) {
                v.kick();
            }
        }
    }
}
