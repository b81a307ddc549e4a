//! A testvm virtual machine: KVM VM and vCPUs, guest RAM, dirty tracking, pause/resume, throttle, hashing,
//! and vCPU/device state save and restore.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use endophyte_attach::bitmap::DirtyBitmap;
use kvm_bindings::{
    kvm_enable_cap, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region, Msrs,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::dirty::{self, DirtyError, DirtyRing, DirtySource};
use crate::guest::{self, GuestImage, GuestState};
use crate::layout::{self, Layout, WorkloadConfig};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, Console, Control, VcpuContext, VcpuHandle, VmFault, Want};

/// Bytes of dirty ring per vCPU (65536 entries of 16 bytes), capped by what KVM allows.
const RING_BYTES: usize = 1 << 20;
/// `KVM_MAX_CPUID_ENTRIES` in the kernel.
const MAX_CPUID_ENTRIES: usize = 256;
/// IA32_TIME_STAMP_COUNTER.
const MSR_IA32_TSC: u32 = 0x10;
/// How long to wait for vCPUs to park before reporting a stuck pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Format tag of saved testvm state.
pub const STATE_FORMAT: &str = "endophyte-testvm-state";
/// Version of the saved state format.
pub const STATE_VERSION: u32 = 1;

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

/// One vCPU's saved registers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// IA32_TSC.
    pub tsc: u64,
}

/// x87/SSE registers (mirrors `kvm_fpu`, which has no serde support).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers ST0..ST7 (80 bits each, in 16-byte slots).
    pub fpr: [[u8; 16]; 8],
    /// FCW, FSW.
    pub fcw: u16,
    /// FSW.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last x87 opcode.
    pub last_opcode: u16,
    /// Last x87 instruction pointer.
    pub last_ip: u64,
    /// Last x87 data pointer.
    pub last_dp: u64,
    /// XMM0..XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The 16550's registers (mirrors vm-superio's `SerialState`, which has no serde support).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SerialRegs {
    /// DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Bytes waiting for the guest.
    pub in_buffer: Vec<u8>,
}

/// Everything needed to resume the VM elsewhere, given a copy of its RAM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Always [`STATE_FORMAT`].
    pub format: String,
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Guest memory map.
    pub layout: Layout,
    /// The workload the guest runs (informational; the guest reads its config from RAM).
    pub workload: WorkloadConfig,
    /// TSC frequency of the source, kHz.
    pub tsc_khz: u32,
    /// Per-vCPU registers.
    pub vcpus: Vec<VcpuState>,
    /// Serial port.
    pub serial: SerialRegs,
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
    /// Creates a VM, writes the guest program and its tables into fresh guest RAM, and starts its vCPU
    /// threads parked. Call [`Vm::resume`] to run the guest.
    ///
    /// # Errors
    /// [`VmError`] for a bad configuration or any failing KVM call.
    pub fn boot(cfg: VmConfig) -> Result<Self, VmError> {
        let page_size = crate::memory::host_page_size();
        let image = GuestImage::get();
        let layout = Layout::new(
            cfg.mem_bytes,
            cfg.vcpus,
            page_size,
            image.bytes.len() as u64,
            cfg.verify_dirty,
        )?;
        let ram = GuestRam::new_memfd(cfg.mem_bytes, page_size)?;
        let mut vm = Self::create(
            ram,
            layout.clone(),
            cfg.workload.clone(),
            cfg.dirty_source,
            cfg.console,
        )?;
        let mut werr = None;
        layout.write_system_area(&image, &mut |gpa, bytes| {
            if let Err(e) = vm.ram.write(gpa, bytes) {
                werr.get_or_insert(e);
            }
        });
        if let Some(e) = werr {
            return Err(e.into());
        }
        vm.ram.write(
            layout.config_gpa,
            &layout.config_block(&cfg.workload, u64::from(vm.tsc_khz) * 1000),
        )?;
        if cfg.workload.fill {
            fill_prng(
                &vm.ram,
                layout.work_gpa,
                layout.mem_bytes,
                cfg.workload.seed,
            )?;
        }
        for i in 0..layout.vcpus {
            let fd = vm.vcpus[i as usize]
                .fd
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let verr = |op, source| VmError::Vcpu {
                op,
                vcpu: i,
                source,
            };
            let mut sregs = fd.get_sregs().map_err(|e| verr("KVM_GET_SREGS", e))?;
            long_mode_sregs(&mut sregs, &layout);
            fd.set_sregs(&sregs).map_err(|e| verr("KVM_SET_SREGS", e))?;
            let regs = kvm_regs {
                rip: layout.image_gpa + image.entry_offset,
                rsp: layout.stack_top(i),
                rdi: u64::from(i),
                rsi: layout.config_gpa,
                rflags: 0x2,
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(|e| verr("KVM_SET_REGS", e))?;
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            fd.set_fpu(&fpu).map_err(|e| verr("KVM_SET_FPU", e))?;
        }
        vm.spawn_threads()?;
        Ok(vm)
    }

    /// Creates a VM on `ram_file` (a copy of a saved VM's RAM, mapped shared, not copied) and loads
    /// `state` into its vCPUs and devices. vCPUs start parked; call [`Vm::resume`].
    ///
    /// # Errors
    /// [`VmError::BadState`] for state of another format, version or RAM size; [`VmError`] otherwise.
    pub fn restore(
        state: &VmState,
        ram_file: File,
        dirty_source: DirtySource,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmError> {
        if state.format != STATE_FORMAT || state.version != STATE_VERSION {
            return Err(VmError::BadState(format!(
                "format {:?} version {} (expected {STATE_FORMAT:?} version {STATE_VERSION})",
                state.format, state.version
            )));
        }
        let page_size = crate::memory::host_page_size();
        if state.layout.page_size != page_size {
            return Err(VmError::BadState(format!(
                "saved with {}-byte pages, this host has {page_size}",
                state.layout.page_size
            )));
        }
        if state.vcpus.len() != state.layout.vcpus as usize {
            return Err(VmError::BadState(format!(
                "{} vCPU states for {} vCPUs",
                state.vcpus.len(),
                state.layout.vcpus
            )));
        }
        let ram = GuestRam::from_file(ram_file, state.layout.mem_bytes, page_size)?;
        let mut vm = Self::create(
            ram,
            state.layout.clone(),
            state.workload.clone(),
            dirty_source,
            console,
        )?;
        for (i, s) in state.vcpus.iter().enumerate() {
            let fd = vm.vcpus[i].fd.lock().unwrap_or_else(|e| e.into_inner());
            let verr = |op, source| VmError::Vcpu {
                op,
                vcpu: i as u32,
                source,
            };
            fd.set_sregs(&s.sregs)
                .map_err(|e| verr("KVM_SET_SREGS", e))?;
            fd.set_regs(&s.regs).map_err(|e| verr("KVM_SET_REGS", e))?;
            fd.set_fpu(&kvm_fpu::from(&s.fpu))
                .map_err(|e| verr("KVM_SET_FPU", e))?;
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: s.tsc,
                ..Default::default()
            }])
            .expect("one MSR fits");
            fd.set_msrs(&msrs).map_err(|e| verr("KVM_SET_MSRS", e))?;
        }
        {
            let mut c = vm.console.lock().unwrap_or_else(|e| e.into_inner());
            let r = &state.serial.regs;
            let st = vm_superio::serial::SerialState {
                baud_divisor_low: r[0],
                baud_divisor_high: r[1],
                interrupt_enable: r[2],
                interrupt_identification: r[3],
                line_control: r[4],
                line_status: r[5],
                modem_control: r[6],
                modem_status: r[7],
                scratch: r[8],
                in_buffer: state.serial.in_buffer.clone(),
            };
            let sink = std::mem::replace(c.writer_mut(), Box::new(std::io::sink()));
            *c = vm_superio::Serial::from_state(
                &st,
                vcpu::NoIrq,
                vm_superio::serial::NoEvents,
                sink,
            )
            .map_err(|e| VmError::BadState(format!("serial state: {e:?}")))?;
        }
        vm.spawn_threads()?;
        Ok(vm)
    }

    fn create(
        ram: GuestRam,
        layout: Layout,
        workload: WorkloadConfig,
        dirty_source: DirtySource,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmError> {
        let kerr = |op| move |source| VmError::Kvm { op, source };
        vcpu::install_kick_handler().map_err(|e| VmError::Kvm {
            op: "installing the kick signal handler",
            source: e.into(),
        })?;
        let kvm = Kvm::new().map_err(kerr("opening /dev/kvm"))?;
        let vm_fd = kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
        match dirty_source {
            DirtySource::Bitmap => {
                if vm_fd
                    .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
                    == 0
                {
                    return Err(DirtyError::Unsupported {
                        cap: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                        what: "the bitmap dirty source",
                    }
                    .into());
                }
                let cap = kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [
                        u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
                        0,
                        0,
                        0,
                    ],
                    ..Default::default()
                };
                vm_fd
                    .enable_cap(&cap)
                    .map_err(kerr("enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"))?;
            }
            DirtySource::Ring => {
                let max =
                    vm_fd.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING));
                if max <= 0 {
                    return Err(DirtyError::Unsupported {
                        cap: "KVM_CAP_DIRTY_LOG_RING",
                        what: "the ring dirty source",
                    }
                    .into());
                }
                let cap = kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
                    args: [RING_BYTES.min(max as usize) as u64, 0, 0, 0],
                    ..Default::default()
                };
                vm_fd
                    .enable_cap(&cap)
                    .map_err(kerr("enabling KVM_CAP_DIRTY_LOG_RING"))?;
            }
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size_bytes(),
            userspace_addr: ram.host_addr() as u64,
        };
        // SAFETY: the region describes guest RAM's mapping, which `ram` keeps alive for as long as the VM: it is stored in the Vm and dropped after the VM fd (field order) and the vCPU threads are joined.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
        let cpuid = kvm
            .get_supported_cpuid(MAX_CPUID_ENTRIES)
            .map_err(kerr("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        let mut rings = Vec::new();
        let ring_bytes = RING_BYTES.min(
            vm_fd
                .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_DIRTY_LOG_RING))
                .max(0) as usize,
        );
        for i in 0..layout.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(|source| VmError::Vcpu {
                    op: "KVM_CREATE_VCPU",
                    vcpu: i,
                    source,
                })?;
            let mut c = cpuid.clone();
            for e in c.as_mut_slice() {
                if e.function == 1 {
                    e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24); // initial APIC ID
                }
            }
            fd.set_cpuid2(&c).map_err(|source| VmError::Vcpu {
                op: "KVM_SET_CPUID2",
                vcpu: i,
                source,
            })?;
            if dirty_source == DirtySource::Ring {
                rings.push(DirtyRing::map(i, &fd, ring_bytes, layout.page_size)?);
            }
            vcpus.push(Arc::new(VcpuHandle {
                fd: Arc::new(Mutex::new(fd)),
                thread: Mutex::new(None),
                in_guest: AtomicBool::new(false),
                exits: Default::default(),
            }));
        }
        let tsc_khz = vcpus[0]
            .fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_tsc_khz()
            .map_err(|source| VmError::Vcpu {
                op: "KVM_GET_TSC_KHZ",
                vcpu: 0,
                source,
            })?;
        let console = vm_superio::Serial::new(vcpu::NoIrq, console);
        Ok(Self {
            vm_fd: Arc::new(vm_fd),
            ram: Arc::new(ram),
            layout,
            workload,
            tsc_khz,
            ctl: Arc::new(Control::new()),
            vcpus,
            threads: Vec::new(),
            rings,
            dirty_source,
            logging: AtomicBool::new(false),
            harvest_lock: Mutex::new(()),
            throttler: None,
            throttler_stop: Arc::new(AtomicBool::new(false)),
            console: Arc::new(Mutex::new(console)),
            _kvm: kvm,
        })
    }

    fn spawn_threads(&mut self) -> Result<(), VmError> {
        for (i, h) in self.vcpus.iter().enumerate() {
            let cx = VcpuContext {
                index: i as u32,
                handle: h.clone(),
                ctl: self.ctl.clone(),
                ram: self.ram.clone(),
                console: self.console.clone(),
            };
            let name = format!("vcpu{i}");
            let t = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || vcpu::run_vcpu(cx))
                .map_err(|source| VmError::Spawn { what: name, source })?;
            *h.thread.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::os::unix::thread::JoinHandleExt::as_pthread_t(&t));
            self.threads.push(t);
        }
        // Wait for every vCPU to park, so that pause/resume accounting starts from a known state.
        let st = self.ctl.lock();
        let n = self.layout.vcpus;
        let (_st, ok) = self.ctl.wait_until(st, PAUSE_TIMEOUT, |s| s.parked == n);
        if !ok {
            return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
        }
        let (ctl, vcpus, stop) = (
            self.ctl.clone(),
            self.vcpus.clone(),
            self.throttler_stop.clone(),
        );
        self.throttler = Some(
            std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || throttler(ctl, vcpus, stop))
                .map_err(|source| VmError::Spawn {
                    what: "throttle".into(),
                    source,
                })?,
        );
        Ok(())
    }

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

    /// Starts dirty logging: from now on every page the guest or the VMM writes is reported by
    /// [`Vm::harvest`]. Pages written before are not (the first epoch ships all of RAM anyway).
    ///
    /// # Errors
    /// [`VmError::Kvm`] if KVM refuses the memory slot update.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        self.set_slot_logging(true)?;
        self.ram.vmm_bitmap().reset();
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops dirty logging.
    ///
    /// # Errors
    /// [`VmError::Kvm`] if KVM refuses the memory slot update.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.logging.store(false, Ordering::SeqCst);
        self.set_slot_logging(false)
    }

    fn set_slot_logging(&self, on: bool) -> Result<(), VmError> {
        let _g = self.harvest_lock.lock().unwrap_or_else(|e| e.into_inner());
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: self.ram.size_bytes(),
            userspace_addr: self.ram.host_addr() as u64,
        };
        // SAFETY: same region as at creation, only the logging flag changes; the mapping outlives the VM.
        unsafe { self.vm_fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION (dirty logging)",
            source,
        })
    }

    /// Whether dirty logging is on.
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::SeqCst)
    }

    /// Takes the dirty pages since the last harvest: KVM's log (bitmap or ring) ORed with the pages the
    /// VMM wrote itself. The bits are removed from their sources: a caller that fails to consume them
    /// must hand them back with [`Vm::put_back`] (or use [`Vm::harvest_with`]). Works while running
    /// or paused. Returns one bitmap per memory region (testvm has one).
    ///
    /// # Errors
    /// [`VmError::NotLogging`], or [`VmError::Dirty`] when KVM fails; bits already taken from KVM are then
    /// kept in the VMM bitmap, so they are reported by the next harvest.
    pub fn harvest(&self) -> Result<Vec<DirtyBitmap>, VmError> {
        let _g = self.harvest_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.is_logging() {
            return Err(VmError::NotLogging);
        }
        let mut bm = DirtyBitmap::new(
            0,
            self.layout.page_size,
            self.layout.mem_bytes / self.layout.page_size,
        );
        let kvm_result = match self.dirty_source {
            DirtySource::Bitmap => dirty::harvest_bitmap(&self.vm_fd, 0, &mut bm),
            DirtySource::Ring => {
                vcpu::sync_vcpus(&self.vcpus, &self.ctl);
                let mut r = Ok(());
                for ring in &self.rings {
                    if let Err(e) = ring.collect(std::slice::from_mut(&mut bm)) {
                        r = Err(e);
                    }
                }
                let reset = dirty::reset_dirty_rings(&self.vm_fd);
                let mut st = self.ctl.lock();
                st.harvest_seq += 1;
                drop(st);
                self.ctl.notify();
                r.and(reset)
            }
        };
        bm.or_words(&self.ram.vmm_bitmap().get_and_reset());
        if let Err(e) = kvm_result {
            self.put_back(std::slice::from_ref(&bm));
            return Err(e.into());
        }
        Ok(vec![bm])
    }

    /// Marks the pages of `bitmaps` dirty again (in the VMM bitmap), so the next harvest reports them.
    pub fn put_back(&self, bitmaps: &[DirtyBitmap]) {
        let vmm = self.ram.vmm_bitmap();
        for bm in bitmaps {
            let first = bm.base_gpa() / bm.page_size();
            for p in bm.iter_pages() {
                vmm.set_bit((first + p) as usize);
            }
        }
    }

    /// Harvests and hands the bitmaps to `consume`; if it fails, the bits are put back so that no dirty
    /// page is lost, and its error is returned as the inner `Err`.
    ///
    /// # Errors
    /// Outer: harvest failure ([`Vm::harvest`]). Inner: the consumer's error.
    pub fn harvest_with<T, E>(
        &self,
        consume: impl FnOnce(&[DirtyBitmap]) -> Result<T, E>,
    ) -> Result<Result<T, E>, VmError> {
        let bitmaps = self.harvest()?;
        let r = consume(&bitmaps);
        if r.is_err() {
            self.put_back(&bitmaps);
        }
        Ok(r)
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

/// Fills `[start, end)` of guest RAM with xorshift64 output seeded from `seed` (host speed, before boot).
fn fill_prng(ram: &GuestRam, start: u64, end: u64, seed: u64) -> Result<(), MemoryError> {
    const CHUNK: usize = 1 << 20;
    let mut x = seed | 1;
    let mut buf = vec![0u8; CHUNK];
    let mut gpa = start;
    while gpa < end {
        let n = CHUNK.min((end - gpa) as usize);
        for w in buf[..n].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        ram.write(gpa, &buf[..n])?;
        gpa += n as u64;
    }
    Ok(())
}

fn long_mode_sregs(sregs: &mut kvm_sregs, layout: &Layout) {
    let code = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: layout::CODE_SELECTOR,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_bindings::kvm_segment {
        selector: layout::DATA_SELECTOR,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = layout.gdt_gpa;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.idt.base = layout.idt_gpa;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr3 = layout.pml4_gpa;
    // CR0: PE | MP | ET | NE | WP | PG. CR4: PAE | OSFXSR | OSXMMEXCPT. EFER: LME | LMA.
    sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    sregs.efer = 0x100 | 0x400;
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
