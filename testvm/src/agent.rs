//! The VMM side of the attach protocol for testvm: [`VmHost`] serves a [`Vm`] (or a VMM on standby that
//! waits for a restore) through [`endophyte_attach::agent`].

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, RwLock};
use std::time::Duration;

use endophyte_attach::agent::{AttachTarget, TargetError, TargetRegion};
use endophyte_attach::bitmap::DirtyBitmap;
use endophyte_attach::proto::{ErrorCode, Features, RegionInfo, VmInfo};

use crate::dirty::DirtySource;
use crate::vm::{Vm, VmError, VmState};

/// Makes a console sink for a VM that is about to start (restores need a fresh one).
pub type ConsoleFactory = Box<dyn Fn() -> Box<dyn std::io::Write + Send> + Send + Sync>;

/// A VMM process's VM, shared between its own driver and attach connections.
pub struct VmHost {
    vm: RwLock<Option<Vm>>,
    dirty_source: DirtySource,
    console: ConsoleFactory,
    shutdown: Mutex<bool>,
    shutdown_cv: Condvar,
    gate: Option<ConsoleGate>,
    throttle: bool,
    /// A VM built ahead of a restore (`prepare`), with the identity (device, inode) of its RAM file.
    prepared: Mutex<Option<(Vm, (u64, u64))>>,
}

/// The (device, inode) of `f`: which file a RAM descriptor is, to match a restore with its preparation.
fn file_identity(f: &File) -> Result<(u64, u64), TargetError> {
    use std::os::unix::fs::MetadataExt;
    let m = f
        .metadata()
        .map_err(|e| TargetError::internal(format!("reading the RAM file's metadata: {e}")))?;
    Ok((m.dev(), m.ino()))
}

fn parse_state(state: serde_json::Value) -> Result<VmState, TargetError> {
    serde_json::from_value(state).map_err(|e| TargetError {
        code: ErrorCode::BadRequest,
        message: format!("not a testvm state: {e}"),
    })
}

/// A console sink with output commit: it prints through its inner sink, except while held, when it
/// buffers until the holder takes the bytes (see `AttachTarget::hold_console`).
#[derive(Clone)]
pub struct ConsoleGate {
    state: std::sync::Arc<Mutex<GateState>>,
}

struct GateState {
    held: bool,
    buf: Vec<u8>,
    out: Box<dyn std::io::Write + Send>,
}

impl ConsoleGate {
    /// A gate in front of `out`, open (printing) at first.
    pub fn new(out: Box<dyn std::io::Write + Send>) -> Self {
        Self {
            state: std::sync::Arc::new(Mutex::new(GateState {
                held: false,
                buf: Vec::new(),
                out,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds output (`true`), or prints what is buffered and lets output through again (`false`).
    pub fn hold(&self, hold: bool) {
        let mut g = self.lock();
        g.held = hold;
        if !hold {
            let buf = std::mem::take(&mut g.buf);
            let _ = g.out.write_all(&buf);
        }
    }

    /// The bytes buffered since the last call.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.lock().buf)
    }
}

impl std::io::Write for ConsoleGate {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = self.lock();
        if g.held {
            g.buf.extend_from_slice(buf);
            Ok(buf.len())
        } else {
            g.out.write(buf)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.lock().out.flush()
    }
}

impl VmHost {
    /// Routes `hold_console`/`take_console` to `gate`, which must be the booted VM's console sink.
    pub fn with_console_gate(mut self, gate: ConsoleGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Refuses `set_throttle` and declares no throttle at the handshake: a VMM without one, for testing
    /// how a sidecar copes.
    pub fn without_throttle(mut self) -> Self {
        self.throttle = false;
        self
    }

    /// Hosts `vm`, or nothing (standby) until a client restores one.
    pub fn new(vm: Option<Vm>, dirty_source: DirtySource, console: ConsoleFactory) -> Self {
        Self {
            vm: RwLock::new(vm),
            dirty_source,
            console,
            shutdown: Mutex::new(false),
            shutdown_cv: Condvar::new(),
            gate: None,
            throttle: true,
            prepared: Mutex::new(None),
        }
    }

    /// Runs `f` on the VM, if there is one.
    pub fn with_vm<T>(&self, f: impl FnOnce(&Vm) -> T) -> Option<T> {
        self.vm
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(f)
    }

    /// Waits until a client asked for shutdown or `timeout` passed; returns whether shutdown was asked.
    pub fn wait_shutdown(&self, timeout: Duration) -> bool {
        let g = self.shutdown.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .shutdown_cv
            .wait_timeout_while(g, timeout, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    /// Takes the VM out (for the final report and teardown).
    pub fn take_vm(&self) -> Option<Vm> {
        self.vm.write().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn vm<T>(&self, f: impl FnOnce(&Vm) -> Result<T, VmError>) -> Result<T, TargetError> {
        let g = self.vm.read().unwrap_or_else(|e| e.into_inner());
        let vm = g
            .as_ref()
            .ok_or_else(|| TargetError::bad_state("this VMM is on standby: no VM yet"))?;
        f(vm).map_err(to_target_error)
    }
}

fn to_target_error(e: VmError) -> TargetError {
    let code = match &e {
        VmError::NotPaused { .. } | VmError::NotLogging => ErrorCode::BadState,
        VmError::Faulted(_) => ErrorCode::Faulted,
        VmError::BadState(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    TargetError {
        code,
        message: e.to_string(),
    }
}

impl AttachTarget for VmHost {
    fn hold_console(&self, hold: bool) -> Result<(), TargetError> {
        match &self.gate {
            Some(g) => {
                g.hold(hold);
                Ok(())
            }
            None => Err(TargetError {
                code: ErrorCode::BadRequest,
                message: "this VM's console has no gate; it cannot be held".into(),
            }),
        }
    }

    fn take_console(&self) -> Vec<u8> {
        self.gate
            .as_ref()
            .map(ConsoleGate::take)
            .unwrap_or_default()
    }

    fn describe(&self) -> (VmInfo, Vec<TargetRegion>) {
        let page_size = crate::memory::host_page_size();
        let g = self.vm.read().unwrap_or_else(|e| e.into_inner());
        let mut info = VmInfo {
            vmm: format!("testvm {}", env!("CARGO_PKG_VERSION")),
            vcpus: 0,
            page_size,
            regions: Vec::new(),
            bitmap_bytes: 0,
            running: false,
            dirty_logging: false,
            features: Features {
                dirty_log: true,
                throttle: self.throttle,
                hold_console: self.gate.is_some(),
                prepare: true,
                // The attach agent's own; it says so at the handshake.
                guard: false,
            },
        };
        let mut regions = Vec::new();
        if let Some(vm) = g.as_ref() {
            info.vcpus = vm.layout().vcpus;
            info.running = !vm.is_paused() && vm.fault().is_none();
            info.dirty_logging = vm.is_logging();
            let r = RegionInfo {
                gpa: 0,
                size_bytes: vm.ram().size_bytes(),
                fd_offset: 0,
            };
            if let Ok(fd) = vm.ram().file().try_clone() {
                info.regions.push(r.clone());
                regions.push(TargetRegion {
                    info: r,
                    fd: OwnedFd::from(fd),
                });
            }
        }
        (info, regions)
    }

    fn start_dirty_log(&self) -> Result<(), TargetError> {
        self.vm(|vm| vm.start_dirty_log())
    }

    fn stop_dirty_log(&self) -> Result<(), TargetError> {
        self.vm(|vm| vm.stop_dirty_log())
    }

    fn harvest(&self) -> Result<Vec<DirtyBitmap>, TargetError> {
        self.vm(|vm| vm.harvest())
    }

    fn put_back(&self, bitmaps: &[DirtyBitmap]) {
        self.with_vm(|vm| vm.put_back(bitmaps));
    }

    fn pause(&self) -> Result<Duration, TargetError> {
        self.vm(|vm| vm.pause())
    }

    fn resume(&self) -> Result<(), TargetError> {
        self.vm(|vm| vm.resume())
    }

    fn set_throttle(&self, fraction: f64) -> Result<(), TargetError> {
        if !self.throttle {
            return Err(TargetError {
                code: ErrorCode::BadRequest,
                message: "this VMM has no vCPU throttle".into(),
            });
        }
        // Clearing the throttle of a VMM whose VM left (migrated away, or not restored yet) has nothing
        // to clear: the agent does that when the client that throttled goes, and it is no error.
        if fraction == 0.0 && self.vm.read().unwrap_or_else(|e| e.into_inner()).is_none() {
            return Ok(());
        }
        self.vm(|vm| {
            vm.set_throttle(fraction);
            Ok(())
        })
    }

    fn hash_ram(&self) -> Result<blake3::Hash, TargetError> {
        self.vm(|vm| vm.hash_ram())
    }

    fn save_state(&self) -> Result<serde_json::Value, TargetError> {
        let state = self.vm(|vm| vm.save_state())?;
        serde_json::to_value(state)
            .map_err(|e| TargetError::internal(format!("encoding state: {e}")))
    }

    fn restore(&self, state: serde_json::Value, ram: File) -> Result<(), TargetError> {
        let mut g = self.vm.write().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return Err(TargetError::bad_state(
                "this VMM already runs a VM; restore needs one on standby",
            ));
        }
        let state = parse_state(state)?;
        let id = file_identity(&ram)?;
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let vm = match prepared {
            // Built at the warm-up on this very file: only the vCPU and device state is left to load.
            Some((mut vm, pid)) if pid == id && vm.layout() == &state.layout => {
                vm.load_state(&state).map_err(to_target_error)?;
                vm
            }
            // None, or one for another file or layout (dropped here): build it now.
            _ => Vm::restore(&state, ram, self.dirty_source, (self.console)())
                .map_err(to_target_error)?,
        };
        *g = Some(vm);
        Ok(())
    }

    fn prepare(&self, state: serde_json::Value, ram: File) -> Result<(), TargetError> {
        if self.vm.read().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Err(TargetError::bad_state(
                "this VMM already runs a VM; prepare needs one on standby",
            ));
        }
        let state = parse_state(state)?;
        let id = file_identity(&ram)?;
        let vm = Vm::prepare(&state, ram, self.dirty_source, (self.console)())
            .map_err(to_target_error)?;
        *self.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some((vm, id));
        Ok(())
    }

    fn shutdown(&self) {
        if let Some(vm) = self.vm.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = vm.pause();
        }
        *self.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shutdown_cv.notify_all();
    }
}

/// A console sink that prints each guest line to stderr, prefixed `[guest]`.
#[derive(Debug, Default)]
pub struct ConsoleToStderr(Vec<u8>);

impl std::io::Write for ConsoleToStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                eprintln!("[guest] {}", String::from_utf8_lossy(&self.0));
                self.0.clear();
            } else {
                self.0.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves `host` over the attach protocol on the Unix socket `socket` until a client asks for shutdown or
/// `duration` passes; then drops the VM and removes the socket.
///
/// # Errors
/// If the socket cannot be bound, or the guest stops with a fault (the error names it).
pub fn serve_on_socket(
    host: std::sync::Arc<VmHost>,
    socket: &std::path::Path,
    duration: Option<Duration>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let bound = endophyte_attach::socket::bind_in_place(socket, None);
    let listener = bound.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding the attach socket {}: {e}", socket.display()),
        )
    })?;
    let target: std::sync::Arc<dyn AttachTarget> = host.clone();
    std::thread::Builder::new()
        .name("attach".into())
        .spawn(move || endophyte_attach::agent::serve(listener, target))?;
    eprintln!(
        "testvm: serving the attach protocol on {}",
        socket.display()
    );
    let deadline = duration.map(|d| std::time::Instant::now() + d);
    loop {
        if host.wait_shutdown(Duration::from_millis(100)) {
            break;
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            break;
        }
        if let Some(Some(fault)) = host.with_vm(|vm| vm.fault()) {
            let _ = std::fs::remove_file(socket);
            return Err(std::io::Error::other(format!("the guest stopped: {fault}")));
        }
    }
    drop(host.take_vm());
    let _ = std::fs::remove_file(socket);
    Ok(())
}
