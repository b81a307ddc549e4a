//! vCPU threads: the run loop, kicks, pause/resume, throttling and the guest's port I/O.
//!
//! A vCPU thread owns the right to run its `VcpuFd` (behind a mutex that the controller takes only while
//! the vCPU is parked, to read or write its registers). To get a vCPU out of `KVM_RUN`, the controller
//! sends it [`kick_signal`]: the handler sets `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` whether
//! the signal arrived inside the guest or just before entering it (api.rst 5, `immediate_exit`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::guest::{EXCEPTION_PORT, NAP_PORT, SERIAL_PORT_BASE};
use crate::memory::GuestRam;

/// How long one throttle period lasts; a vCPU throttled by `f` sleeps `f` of every period (as QEMU's
/// `cpu-throttle`, whose time slice is 10 ms).
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);
/// Longest nap the guest may ask for.
const MAX_NAP: Duration = Duration::from_millis(50);

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: p points at immediate_exit in this thread's kvm_run mapping, set by the vCPU thread for as long as its VcpuFd lives and cleared before it is dropped; a volatile byte store is signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the kick signal handler (idempotent).
///
/// # Errors
/// The OS error from `sigaction`.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    (*ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| e.errno())
    }))
    .map_err(std::io::Error::from_raw_os_error)
}

/// What the controller wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Run the guest.
    Run,
    /// Park outside `KVM_RUN` until told otherwise.
    Pause,
    /// Leave the run loop for good.
    Stop,
}

/// Why a VM stopped on its own: a guest exception, a triple fault, a KVM error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum VmFault {
    /// The guest took an exception; its IDT stub reported it.
    #[error("guest exception on vCPU {vcpu}: vector {vector} ({name}), error code {error_code:#x}, RIP {rip:#x}, CR2 {cr2:#x}")]
    GuestException {
        /// vCPU index.
        vcpu: u32,
        /// Exception vector.
        vector: u64,
        /// Mnemonic of the vector (#PF, #GP, ...).
        name: &'static str,
        /// Error code (0 for vectors without one).
        error_code: u64,
        /// Guest RIP of the faulting instruction.
        rip: u64,
        /// CR2 (faulting address for #PF).
        cr2: u64,
    },
    /// The vCPU shut down (triple fault) or failed to enter the guest.
    #[error("vCPU {vcpu} stopped: {why}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: u32,
        /// What KVM reported.
        why: String,
    },
}

/// Mnemonic of an exception vector (Intel SDM vol. 3A, table 6-1).
pub fn vector_name(v: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
        "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
    ];
    NAMES.get(v as usize).copied().unwrap_or("unknown")
}

/// Shared run state of all vCPUs of one VM.
#[derive(Debug)]
pub struct CtlState {
    /// What the vCPUs should do.
    pub want: Want,
    /// vCPUs parked (paused) right now.
    pub parked: u32,
    /// vCPU threads that have left their run loop.
    pub exited: u32,
    /// First fault that stopped the VM.
    pub fault: Option<VmFault>,
    /// Bumped by the throttler at the start of every throttle period.
    pub throttle_seq: u64,
    /// Bumped after every dirty-ring harvest (wakes vCPUs waiting on a full ring).
    pub harvest_seq: u64,
    /// vCPUs waiting for a harvest because their dirty ring is full.
    pub ring_full_waiting: u32,
}

/// Controller-side synchronization for the vCPUs of one VM.
#[derive(Debug)]
pub struct Control {
    state: Mutex<CtlState>,
    cv: Condvar,
    /// Throttle fraction in millionths (0 = none).
    pub throttle_ppm: AtomicU64,
    /// Total `KVM_EXIT_DIRTY_RING_FULL` exits.
    pub ring_full_exits: AtomicU64,
}

impl Control {
    /// A control block with the vCPUs parked (they start when told to run).
    pub fn new() -> Self {
        Self {
            state: Mutex::new(CtlState {
                want: Want::Pause,
                parked: 0,
                exited: 0,
                fault: None,
                throttle_seq: 0,
                harvest_seq: 0,
                ring_full_waiting: 0,
            }),
            cv: Condvar::new(),
            throttle_ppm: AtomicU64::new(0),
            ring_full_exits: AtomicU64::new(0),
        }
    }

    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiter after a state change.
    pub fn notify(&self) {
        self.cv.notify_all();
    }

    /// Waits until `done` holds, or `timeout` passes; returns the guard and whether `done` holds.
    pub fn wait_until<'a>(
        &self,
        guard: MutexGuard<'a, CtlState>,
        timeout: Duration,
        mut done: impl FnMut(&CtlState) -> bool,
    ) -> (MutexGuard<'a, CtlState>, bool) {
        let (g, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |s| !done(s))
            .unwrap_or_else(|e| e.into_inner());
        let ok = done(&g);
        (g, ok)
    }

    /// Records a fault (the first one wins) and asks every vCPU to stop.
    pub fn fail(&self, fault: VmFault) {
        let mut st = self.lock();
        if st.fault.is_none() {
            st.fault = Some(fault);
        }
        st.want = Want::Stop;
        drop(st);
        self.notify();
    }
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

/// The controller's handle on one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    /// The vCPU fd, locked by the vCPU thread while it runs and by the controller while it is parked.
    pub fd: Arc<Mutex<VcpuFd>>,
    /// pthread id of the vCPU thread, once started.
    pub thread: Mutex<Option<libc::pthread_t>>,
    /// True while the thread is inside `KVM_RUN` (or about to enter it).
    pub in_guest: AtomicBool,
    /// Incremented after every return from `KVM_RUN`.
    pub exits: AtomicU64,
}

impl VcpuHandle {
    /// Sends the kick signal to the vCPU thread (no-op before it started).
    pub fn kick(&self) {
        if let Some(t) = *self.thread.lock().unwrap_or_else(|e| e.into_inner()) {
            // SAFETY: t is the pthread id of a live vCPU thread (handles are dropped only after the threads are joined); the signal has a handler installed, so it cannot kill the process.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// Where the guest's serial output goes.
pub type Console =
    vm_superio::Serial<NoIrq, vm_superio::serial::NoEvents, Box<dyn std::io::Write + Send>>;

/// The serial port's interrupt line: testvm has no interrupt controller, and the guest polls.
#[derive(Debug)]
pub struct NoIrq;

impl vm_superio::Trigger for NoIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u32,
    /// Its handle (shared with the controller).
    pub handle: Arc<VcpuHandle>,
    /// Run control shared by all vCPUs.
    pub ctl: Arc<Control>,
    /// Guest RAM, to read exception frames.
    pub ram: Arc<GuestRam>,
    /// The serial console.
    pub console: Arc<Mutex<Console>>,
}

/// Body of a vCPU thread: runs until told to stop or until the guest faults.
pub fn run_vcpu(cx: VcpuContext) {
    {
        let mut fd = cx.handle.fd.lock().unwrap_or_else(|e| e.into_inner());
        let p = std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }
    vcpu_loop(&cx);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    let mut st = cx.ctl.lock();
    st.exited += 1;
    drop(st);
    cx.ctl.notify();
}

fn vcpu_loop(cx: &VcpuContext) {
    let ctl = &cx.ctl;
    let mut throttle_seen = 0u64;
    loop {
        // Park, stop or pay the throttle before entering the guest.
        {
            let mut st = ctl.lock();
            let mut parked = false;
            loop {
                match st.want {
                    Want::Stop => {
                        if parked {
                            st.parked -= 1;
                        }
                        return;
                    }
                    Want::Pause => {
                        if !parked {
                            parked = true;
                            st.parked += 1;
                            ctl.notify();
                        }
                        st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    Want::Run => {
                        if parked {
                            st.parked -= 1;
                        }
                        break;
                    }
                }
            }
            let ppm = ctl.throttle_ppm.load(Ordering::Relaxed);
            if st.throttle_seq != throttle_seen {
                throttle_seen = st.throttle_seq;
                if ppm > 0 {
                    let sleep = THROTTLE_PERIOD.mul_f64(ppm as f64 / 1e6);
                    let (g, _) = ctl.wait_until(st, sleep, |s| s.want != Want::Run);
                    st = g;
                    if st.want != Want::Run {
                        continue;
                    }
                }
            }
            cx.handle.in_guest.store(true, Ordering::SeqCst);
        }
        let action = {
            let mut fd = cx.handle.fd.lock().unwrap_or_else(|e| e.into_inner());
            let exit = fd.run();
            cx.handle.in_guest.store(false, Ordering::SeqCst);
            cx.handle.exits.fetch_add(1, Ordering::SeqCst);
            let action = match exit {
                Ok(VcpuExit::IoOut(port, data)) => io_out(cx, port, data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    io_in(cx, port, data);
                    Action::Continue
                }
                Ok(VcpuExit::Hlt) => Action::Nap(Duration::from_millis(1)),
                Ok(VcpuExit::Unsupported(crate::dirty::KVM_EXIT_DIRTY_RING_FULL)) => {
                    Action::RingFull
                }
                Ok(VcpuExit::Shutdown) => fail(cx, "triple fault (KVM_EXIT_SHUTDOWN)".into()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => fail(
                    cx,
                    format!("KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU {cpu}"),
                ),
                Ok(VcpuExit::InternalError) => fail(cx, "KVM_EXIT_INTERNAL_ERROR".into()),
                Ok(other) => fail(cx, format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Continue,
                Err(e) => fail(cx, format!("KVM_RUN failed: {e}")),
            };
            fd.set_kvm_immediate_exit(0);
            match action {
                Action::Exception(vector) => Action::Fault(exception_fault(cx, &fd, vector)),
                other => other,
            }
        };
        match action {
            Action::Continue | Action::Exception(_) => {}
            Action::Nap(d) => {
                let st = ctl.lock();
                let seq = st.throttle_seq;
                let _ = ctl.wait_until(st, d.min(MAX_NAP), |s| {
                    s.want != Want::Run || s.throttle_seq != seq
                });
            }
            Action::RingFull => {
                ctl.ring_full_exits.fetch_add(1, Ordering::Relaxed);
                let mut st = ctl.lock();
                let seq = st.harvest_seq;
                st.ring_full_waiting += 1;
                ctl.notify();
                loop {
                    let (g, done) = ctl.wait_until(st, Duration::from_millis(100), |s| {
                        s.harvest_seq != seq || s.want != Want::Run
                    });
                    st = g;
                    if done {
                        break;
                    }
                }
                st.ring_full_waiting -= 1;
            }
            Action::Fault(fault) => {
                ctl.fail(fault);
                return;
            }
        }
    }
}

/// What the run loop does after an exit.
enum Action {
    Continue,
    Nap(Duration),
    RingFull,
    /// The guest reported this exception vector (turned into a `Fault` while the fd is still locked).
    Exception(u64),
    Fault(VmFault),
}

fn fail(cx: &VcpuContext, why: String) -> Action {
    Action::Fault(VmFault::VcpuFailed {
        vcpu: cx.index,
        why,
    })
}

fn io_out(cx: &VcpuContext, port: u16, data: &[u8]) -> Action {
    match port {
        NAP_PORT => {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            Action::Nap(Duration::from_micros(u64::from(u32::from_le_bytes(b))))
        }
        EXCEPTION_PORT => {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            Action::Exception(u64::from(u32::from_le_bytes(b)))
        }
        p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) => {
            let mut console = cx.console.lock().unwrap_or_else(|e| e.into_inner());
            for &byte in data {
                // Writes to the sink can fail (closed pipe); the guest must not care.
                let _ = console.write((p - SERIAL_PORT_BASE) as u8, byte);
            }
            Action::Continue
        }
        _ => Action::Continue, // unclaimed ports ignore writes, as on real hardware
    }
}

fn io_in(cx: &VcpuContext, port: u16, data: &mut [u8]) {
    if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&port) {
        let mut console = cx.console.lock().unwrap_or_else(|e| e.into_inner());
        let v = console.read((port - SERIAL_PORT_BASE) as u8);
        data.fill(v);
    } else {
        data.fill(0xff); // unclaimed ports read as all ones
    }
}

/// Builds the fault for an exception the guest reported: the stub left `[vector, error, rip, ...]` at RSP.
fn exception_fault(cx: &VcpuContext, fd: &VcpuFd, vector: u64) -> VmFault {
    let (rsp, cr2) = match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => (r.rsp, s.cr2),
        _ => (0, 0),
    };
    let word = |i: u64| cx.ram.read_u64(rsp + 8 * i).unwrap_or(u64::MAX);
    VmFault::GuestException {
        vcpu: cx.index,
        vector,
        name: vector_name(vector),
        error_code: word(1),
        rip: word(2),
        cr2,
    }
}

/// Kicks every vCPU that is inside `KVM_RUN` and waits until each has left it at least once, so that
/// anything KVM buffers per vCPU (PML entries) has reached the dirty log or ring. Returns how long it
/// took.
pub fn sync_vcpus(vcpus: &[Arc<VcpuHandle>], ctl: &Control) -> Duration {
    let t0 = Instant::now();
    let before: Vec<Option<u64>> = vcpus
        .iter()
        .map(|v| {
            v.in_guest
                .load(Ordering::SeqCst)
                .then(|| v.exits.load(Ordering::SeqCst))
        })
        .collect();
    for (v, b) in vcpus.iter().zip(&before) {
        if b.is_some() {
            v.kick();
        }
    }
    for (v, b) in vcpus.iter().zip(&before) {
        if let Some(b) = b {
            let mut spins = 0u32;
            while v.exits.load(Ordering::SeqCst) == *b && v.in_guest.load(Ordering::SeqCst) {
                spins += 1;
                if spins % 64 == 0 {
                    v.kick();
                    if ctl.lock().want == Want::Stop {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
    t0.elapsed()
}
