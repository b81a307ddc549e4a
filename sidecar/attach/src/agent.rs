//! The VMM side of the attach protocol: serves an [`AttachTarget`] (the VMM's VM) to sidecar clients.
//!
//! Each connection gets its own thread and its own shared dirty-bitmap memfd. A harvest taken on a
//! connection stays outstanding until the client releases it; if the client releases it as not
//! consumed, or the connection ends first, its pages are put back into the VMM, so that no dirty page is
//! ever lost to a sidecar that crashed mid-epoch.
//!
//! What a connection set up for the VM also ends with it: when the connection that last set a throttle
//! closes (the sidecar exited, crashed or was killed), the throttle goes back to 0, and when the one
//! holding console output closes, the held output is printed and output flows again. A killed sidecar
//! thus never leaves its guest slowed down or its console silent.
//!
//! It does leave it paused, when it armed the run guard ([`crate::proto::Request::ArmGuard`]): a sidecar
//! that dies or hangs stops guarding its guest, and a guest nobody guards may be promoted elsewhere, so
//! the agent pauses it (fails closed) and refuses to resume it until a sidecar arms the guard again.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::bitmap::{words_for, DirtyBitmap};
use crate::proto::{
    self, ErrorCode, FrameError, RegionInfo, Request, Response, VmInfo, SUPPORTED_VERSIONS,
};

/// An error a target reports for a request; becomes [`Response::Error`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    /// Category.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl TargetError {
    /// A [`ErrorCode::BadState`] error.
    pub fn bad_state(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::BadState,
            message: message.into(),
        }
    }

    /// An [`ErrorCode::Internal`] error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Internal,
            message: message.into(),
        }
    }
}

/// A guest RAM region with the descriptor that backs it.
pub struct TargetRegion {
    /// Region description.
    pub info: RegionInfo,
    /// A duplicate of the descriptor that backs the region (memfd or file), sent to the client.
    pub fd: OwnedFd,
}

/// What a VMM exposes to the agent. Every method may be called from any connection thread.
pub trait AttachTarget: Send + Sync {
    /// Describes the VM, with a duplicate descriptor for each region.
    fn describe(&self) -> (VmInfo, Vec<TargetRegion>);
    /// Starts dirty logging.
    fn start_dirty_log(&self) -> Result<(), TargetError>;
    /// Stops dirty logging.
    fn stop_dirty_log(&self) -> Result<(), TargetError>;
    /// Takes the dirty pages since the last harvest (one bitmap per region, in region order).
    fn harvest(&self) -> Result<Vec<DirtyBitmap>, TargetError>;
    /// Marks these pages dirty again.
    fn put_back(&self, bitmaps: &[DirtyBitmap]);
    /// Stops every vCPU; returns how long it took.
    fn pause(&self) -> Result<Duration, TargetError>;
    /// Lets the vCPUs run.
    fn resume(&self) -> Result<(), TargetError>;
    /// Sets the vCPU throttle fraction.
    fn set_throttle(&self, fraction: f64) -> Result<(), TargetError>;
    /// BLAKE3 of all guest RAM (paused only).
    fn hash_ram(&self) -> Result<blake3::Hash, TargetError>;
    /// Saves vCPU and device state (paused only).
    fn save_state(&self) -> Result<serde_json::Value, TargetError>;
    /// Starts a VM from `state` on `ram` (a VMM on standby only).
    fn restore(&self, state: serde_json::Value, ram: File) -> Result<(), TargetError>;
    /// Stops the VM; the VMM exits once the agent returns.
    fn shutdown(&self);
    /// Builds the VM `state` describes on `ram` ahead of a restore (a VMM on standby only; see
    /// [`crate::proto::Request::Prepare`]). VMMs that cannot refuse it (the default).
    fn prepare(&self, state: serde_json::Value, ram: File) -> Result<(), TargetError> {
        let _ = (state, ram);
        Err(TargetError {
            code: ErrorCode::BadRequest,
            message: "this VMM cannot prepare a VM ahead of a restore".into(),
        })
    }
    /// Output commit: while `hold` is true, guest console output is buffered for the client instead of
    /// printed, and handed over with each harvest ([`AttachTarget::take_console`]); `false` prints whatever is
    /// still buffered and goes back to printing directly. VMMs without a console gate refuse it (the default).
    fn hold_console(&self, hold: bool) -> Result<(), TargetError> {
        let _ = hold;
        Err(TargetError {
            code: ErrorCode::BadRequest,
            message: "this VMM cannot hold console output".into(),
        })
    }
    /// Console bytes buffered since the last call (empty unless held). Called right after each harvest, so
    /// the bytes belong to the epoch of that harvest.
    fn take_console(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// Which connection holds what, shared by all connections of one agent.
#[derive(Debug, Default)]
struct Holders {
    /// The connection that consumes dirty pages: `(connection id, client name)`. Harvests take pages
    /// away, so two consumers would each see only part of them; one owns the log.
    dirty_log: Option<(u64, String)>,
    /// The connection that set the throttle in force (a non-zero one).
    throttle: Option<u64>,
    /// The connection holding console output.
    console: Option<u64>,
    /// The run guard.
    guard: crate::guard::Guard,
}

/// How often the guard's watchdog looks.
const GUARD_TICK: Duration = Duration::from_millis(50);

/// Pauses the guest for the run guard, logging why.
fn trip(target: &dyn AttachTarget, why: &str) {
    match target.pause() {
        Ok(_) => tracing::error!("run guard: guest paused, failing closed: {why}"),
        Err(e) => tracing::error!("run guard: pausing the guest failed ({e}): {why}"),
    }
}

/// Serves `target` on `listener` until [`AttachTarget::shutdown`] is requested by a client; each
/// connection runs on its own thread. Returns when a client asked for shutdown.
///
/// # Errors
/// Errors of `accept` other than interruptions.
pub fn serve(listener: UnixListener, target: Arc<dyn AttachTarget>) -> std::io::Result<()> {
    // A connection that asked for shutdown signals this eventfd; accept waits in poll(2) on both, so a
    // client connecting (a backup's restore reconnects while the guest is paused) is accepted at once.
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let owner: Arc<Mutex<Holders>> = Arc::default();
    let mut next_id = 1u64;
    let watchdog_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (owner, target, done) = (owner.clone(), target.clone(), watchdog_stop.clone());
        std::thread::Builder::new()
            .name("attach-guard".into())
            .spawn(move || {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(GUARD_TICK);
                    let why = owner
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .guard
                        .check(Instant::now());
                    if let Some(why) = why {
                        trip(&*target, &why);
                    }
                }
            })?;
    }
    let _stop_watchdog =
        scopeguard(move || watchdog_stop.store(true, std::sync::atomic::Ordering::SeqCst));
    listener.set_nonblocking(true)?;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds that outlives the call; its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                let target = target.clone();
                let stop = stop.clone();
                let (owner, id) = (owner.clone(), next_id);
                next_id += 1;
                std::thread::Builder::new()
                    .name("attach-conn".into())
                    .spawn(move || {
                        if let Ok(true) = Connection::new(stream, target, owner, id).run() {
                            let _ = stop.write(1);
                        }
                    })?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The RAM file descriptor sent with a `request` frame (restore, prepare).
fn ram_fd(fds: &mut Vec<OwnedFd>, request: &str) -> Result<File, TargetError> {
    fds.pop().map(File::from).ok_or_else(|| TargetError {
        code: ErrorCode::BadRequest,
        message: format!("{request} needs the RAM file descriptor"),
    })
}

struct Connection {
    stream: UnixStream,
    target: Arc<dyn AttachTarget>,
    /// Shared bitmap memory and its mapping (created at the handshake).
    bitmap: Option<(File, *mut u8, usize)>,
    pending: Option<(u64, Vec<DirtyBitmap>)>,
    next_seq: u64,
    /// What each connection holds, shared by all connections.
    owner: Arc<Mutex<Holders>>,
    id: u64,
    client: String,
}

// SAFETY: the raw pointer is a private MAP_SHARED mapping owned by this connection and only used by the
// thread that runs it; Connection is moved into that thread once.
unsafe impl Send for Connection {}

impl Connection {
    fn new(
        stream: UnixStream,
        target: Arc<dyn AttachTarget>,
        owner: Arc<Mutex<Holders>>,
        id: u64,
    ) -> Self {
        Self {
            stream,
            target,
            bitmap: None,
            pending: None,
            next_seq: 1,
            owner,
            id,
            client: String::new(),
        }
    }

    /// Makes this connection the dirty-log owner if there is none; refuses if another one is.
    fn claim_dirty_log(&self, what: &str) -> Result<(), TargetError> {
        let mut o = self.holders();
        match &o.dirty_log {
            Some((id, name)) if *id != self.id => Err(TargetError::bad_state(format!(
                "cannot {what}: dirty logging belongs to {name:?} (attach connection {id}); a second consumer \
                 would take dirty pages away from it"
            ))),
            _ => {
                o.dirty_log = Some((self.id, self.client.clone()));
                Ok(())
            }
        }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, Holders> {
        self.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns Ok(true) if the client asked for shutdown.
    fn run(mut self) -> Result<bool, FrameError> {
        let result = self.serve_requests();
        if let Some((_, bitmaps)) = self.pending.take() {
            // The client went away mid-harvest: nothing it took may be lost.
            self.target.put_back(&bitmaps);
        }
        // Logging goes on (so no write is missed); the next consumer takes the log over. A throttle or a
        // console hold this connection set ends with it.
        // A client that shut the VM down (it runs elsewhere now) leaves nothing to guard.
        let closed_guard = if matches!(result, Ok(true)) {
            self.holders().guard.disarm(self.id);
            None
        } else {
            self.holders().guard.closed(self.id)
        };
        if let Some(why) = closed_guard {
            trip(&*self.target, &why);
        }
        let (throttled, held) = {
            let mut o = self.holders();
            if o.dirty_log.as_ref().is_some_and(|(id, _)| *id == self.id) {
                o.dirty_log = None;
            }
            (
                o.throttle.take_if(|id| *id == self.id).is_some(),
                o.console.take_if(|id| *id == self.id).is_some(),
            )
        };
        if throttled {
            tracing::warn!(client = %self.client, "the client that throttled the guest went away: throttle cleared");
            if let Err(e) = self.target.set_throttle(0.0) {
                tracing::error!(client = %self.client, "clearing the throttle it left: {e}");
            }
        }
        if held {
            tracing::warn!(client = %self.client, "the client holding console output went away: output released");
            if let Err(e) = self.target.hold_console(false) {
                tracing::error!(client = %self.client, "releasing the console it held: {e}");
            }
        }
        result
    }

    fn serve_requests(&mut self) -> Result<bool, FrameError> {
        // Handshake first.
        let (req, _fds): (Request, Vec<OwnedFd>) = proto::recv(&self.stream)?;
        match req {
            Request::Hello { versions, client } => {
                self.client = client;
                let Some(&v) = SUPPORTED_VERSIONS.iter().find(|v| versions.contains(v)) else {
                    let msg =
                        format!("client speaks {versions:?}, agent speaks {SUPPORTED_VERSIONS:?}");
                    self.send_error(ErrorCode::VersionMismatch, msg)?;
                    return Ok(false);
                };
                let (mut vm, regions) = self.target.describe();
                vm.features.guard = true;
                let bitmap_bytes: u64 = vm
                    .regions
                    .iter()
                    .map(|r| words_for(r.size_bytes / vm.page_size) as u64 * 8)
                    .sum();
                let bitmap_bytes = bitmap_bytes.max(8);
                let (file, ptr) = create_shared(bitmap_bytes as usize).map_err(FrameError::Io)?;
                vm.bitmap_bytes = bitmap_bytes;
                let mut fds: Vec<RawFd> = regions.iter().map(|r| r.fd.as_raw_fd()).collect();
                fds.push(file.as_raw_fd());
                proto::send(&self.stream, &Response::Hello { version: v, vm }, &fds)?;
                self.bitmap = Some((file, ptr, bitmap_bytes as usize));
            }
            _ => {
                self.send_error(
                    ErrorCode::BadRequest,
                    "the first request must be hello".to_string(),
                )?;
                return Ok(false);
            }
        }
        loop {
            let (req, mut fds): (Request, Vec<OwnedFd>) = match proto::recv(&self.stream) {
                Ok(x) => x,
                Err(FrameError::Closed) => return Ok(false),
                Err(FrameError::Malformed(e)) => {
                    self.send_error(ErrorCode::BadRequest, format!("malformed request: {e}"))?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let shutdown = matches!(req, Request::Shutdown);
            self.holders().guard.touch(self.id, true, Instant::now());
            let resp = self.handle(req, &mut fds);
            self.holders().guard.touch(self.id, false, Instant::now());
            let resp = resp.unwrap_or_else(|e| Response::Error {
                code: e.code,
                message: e.message,
            });
            proto::send(&self.stream, &resp, &[])?;
            if shutdown {
                return Ok(true);
            }
        }
    }

    fn handle(&mut self, req: Request, fds: &mut Vec<OwnedFd>) -> Result<Response, TargetError> {
        let t = self.target.clone();
        Ok(match req {
            Request::Hello { .. } => {
                return Err(TargetError {
                    code: ErrorCode::BadRequest,
                    message: "hello was already done".into(),
                })
            }
            Request::StartDirtyLog => {
                self.claim_dirty_log("start dirty logging")?;
                t.start_dirty_log()?;
                Response::Ok
            }
            Request::StopDirtyLog => {
                self.claim_dirty_log("stop dirty logging")?;
                t.stop_dirty_log()?;
                self.holders().dirty_log = None;
                Response::Ok
            }
            Request::Harvest => {
                self.claim_dirty_log("harvest")?;
                if let Some((seq, _)) = &self.pending {
                    return Err(TargetError::bad_state(format!(
                        "harvest {seq} is still outstanding; release it first"
                    )));
                }
                let t0 = Instant::now();
                let bitmaps = t.harvest()?;
                let harvest_us = t0.elapsed().as_micros() as u64;
                if let Err(e) = self.publish(&bitmaps) {
                    t.put_back(&bitmaps);
                    return Err(e);
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let dirty_pages = bitmaps.iter().map(DirtyBitmap::count).sum();
                self.pending = Some((seq, bitmaps));
                Response::Harvested {
                    seq,
                    dirty_pages,
                    harvest_us,
                    console: t.take_console(),
                }
            }
            Request::ReleaseHarvest { seq, consumed } => match self.pending.take() {
                Some((s, bitmaps)) if s == seq => {
                    if !consumed {
                        t.put_back(&bitmaps);
                    }
                    Response::Ok
                }
                other => {
                    self.pending = other;
                    return Err(TargetError::bad_state(format!(
                        "harvest {seq} is not outstanding"
                    )));
                }
            },
            Request::Pause => Response::Paused {
                pause_us: t.pause()?.as_micros() as u64,
            },
            Request::Resume => {
                self.holders().guard.may_resume(self.id)?;
                t.resume()?;
                Response::Ok
            }
            Request::ArmGuard {
                timeout_ms,
                generation,
            } => {
                let client = self.client.clone();
                self.holders().guard.arm(
                    self.id,
                    &client,
                    Duration::from_millis(timeout_ms),
                    generation,
                    Instant::now(),
                )?;
                tracing::info!(%client, timeout_ms, generation, "run guard armed");
                Response::Ok
            }
            Request::DisarmGuard => {
                self.holders().guard.disarm(self.id);
                Response::Ok
            }
            Request::KeepAlive => {
                self.holders().guard.keep_alive(self.id)?;
                Response::Ok
            }
            Request::SetThrottle { fraction } => {
                if !(0.0..=0.99).contains(&fraction) {
                    return Err(TargetError {
                        code: ErrorCode::BadRequest,
                        message: format!("throttle fraction {fraction} is outside 0..=0.99"),
                    });
                }
                t.set_throttle(fraction)?;
                self.holders().throttle = (fraction > 0.0).then_some(self.id);
                Response::Ok
            }
            Request::HashRam => Response::Hash {
                blake3: t.hash_ram()?.to_hex().to_string(),
            },
            Request::SaveState => Response::State {
                state: t.save_state()?,
            },
            Request::Restore { state } => {
                t.restore(state, ram_fd(fds, "restore")?)?;
                Response::Ok
            }
            Request::Prepare { state } => {
                t.prepare(state, ram_fd(fds, "prepare")?)?;
                Response::Ok
            }
            Request::Status => {
                let mut vm = t.describe().0;
                vm.features.guard = true;
                Response::Status { vm }
            }
            Request::HoldConsole { hold } => {
                t.hold_console(hold)?;
                self.holders().console = hold.then_some(self.id);
                Response::Ok
            }
            Request::Shutdown => {
                t.shutdown();
                Response::Ok
            }
        })
    }

    fn send_error(&self, code: ErrorCode, message: String) -> Result<(), FrameError> {
        proto::send(&self.stream, &Response::Error { code, message }, &[])
    }

    /// Copies `bitmaps` into the shared bitmap memory, back to back in region order.
    fn publish(&self, bitmaps: &[DirtyBitmap]) -> Result<(), TargetError> {
        let (_, ptr, len) = self
            .bitmap
            .as_ref()
            .ok_or_else(|| TargetError::bad_state("no handshake"))?;
        let mut off = 0usize;
        for bm in bitmaps {
            let bytes = bm.words().len() * 8;
            if off + bytes > *len {
                return Err(TargetError::internal(
                    "harvest larger than the shared bitmap",
                ));
            }
            // SAFETY: [off, off + bytes) lies inside the mapping of `len` bytes (checked above); the source is the bitmap's own word slice; the regions do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(bm.words().as_ptr().cast::<u8>(), ptr.add(off), bytes)
            };
            off += bytes;
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some((_, ptr, len)) = self.bitmap.take() {
            // SAFETY: unmapping the mapping created in create_shared, exactly once.
            unsafe { libc::munmap(ptr.cast(), len) };
        }
    }
}

/// Creates a memfd of `len` bytes and maps it shared read-write.
fn create_shared(len: usize) -> std::io::Result<(File, *mut u8)> {
    // SAFETY: valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"endophyte-dirty-bitmap".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    // SAFETY: mapping a file we own of exactly `len` bytes; checked for failure.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok((file, p.cast()))
}
