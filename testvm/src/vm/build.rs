//! Building a testvm VM: a fresh one with the guest program, its page tables and its RAM filled
//! ([`Vm::boot`]), or one restored from a saved state over a copy of its RAM ([`Vm::restore`]); the KVM VM,
//! its memory slot, dirty rings and vCPUs, and the threads that run them.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region, Msrs,
};
use kvm_ioctls::Kvm;

use super::{
    throttler, Vm, VmConfig, VmError, VmState, MAX_CPUID_ENTRIES, MSR_IA32_TSC, PAUSE_TIMEOUT,
    RING_BYTES, STATE_FORMAT, STATE_VERSION,
};
use crate::dirty::{DirtyError, DirtyRing, DirtySource};
use crate::guest::GuestImage;
use crate::layout::{self, Layout, WorkloadConfig};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, Control, VcpuContext, VcpuHandle};

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
        let mut vm = Self::prepare(state, ram_file, dirty_source, console)?;
        vm.load_state(state)?;
        Ok(vm)
    }

    /// The first half of [`Vm::restore`], for a standby ahead of a switchover: the KVM VM, its memory slot
    /// on `ram_file` and its vCPUs, for `state`'s layout, with nothing loaded and no vCPU thread. Finish
    /// with [`Vm::load_state`].
    ///
    /// # Errors
    /// As [`Vm::restore`].
    pub fn prepare(
        state: &VmState,
        ram_file: File,
        dirty_source: DirtySource,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmError> {
        Self::check_state(state)?;
        let page_size = crate::memory::host_page_size();
        let ram = GuestRam::from_file(ram_file, state.layout.mem_bytes, page_size)?;
        Self::create(
            ram,
            state.layout.clone(),
            state.workload.clone(),
            dirty_source,
            console,
        )
    }

    fn check_state(state: &VmState) -> Result<(), VmError> {
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
        Ok(())
    }

    /// The second half of [`Vm::restore`]: loads `state` into a VM from [`Vm::prepare`] whose layout it
    /// has, and starts its vCPU threads parked.
    ///
    /// # Errors
    /// [`VmError::BadState`] for state of another layout or format; [`VmError`] for a failing KVM call.
    pub fn load_state(&mut self, state: &VmState) -> Result<(), VmError> {
        Self::check_state(state)?;
        if state.layout != self.layout || !self.threads.is_empty() {
            return Err(VmError::BadState(
                "the state is of another layout than the prepared VM, or the VM already runs"
                    .into(),
            ));
        }
        for (i, s) in state.vcpus.iter().enumerate() {
            let fd = self.vcpus[i].fd.lock().unwrap_or_else(|e| e.into_inner());
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
            let mut c = self.console.lock().unwrap_or_else(|e| e.into_inner());
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
        self.spawn_threads()?;
        Ok(())
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
