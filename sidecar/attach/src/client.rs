//! The sidecar side of the attach protocol: connect to a VMM's agent, map its guest RAM read-only, and
//! drive the VM.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use memmap2::{Mmap, MmapOptions};

use crate::bitmap::{words_for, DirtyBitmap};
use crate::proto::{self, ErrorCode, FrameError, Request, Response, VmInfo, SUPPORTED_VERSIONS};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("connecting to the VMM agent at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Framing or socket error.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The agent refused the request.
    #[error("the VMM refused {request}: {message} ({code:?})")]
    Refused {
        /// The request, by name.
        request: &'static str,
        /// Category.
        code: ErrorCode,
        /// The agent's message.
        message: String,
    },
    /// The agent answered something that makes no sense for the request.
    #[error("unexpected answer to {request}: {got}")]
    Unexpected {
        /// The request, by name.
        request: &'static str,
        /// What came back.
        got: String,
    },
    /// Mapping guest RAM or the bitmap failed.
    #[error("mapping {what}: {source}")]
    Map {
        /// What was mapped.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// An access outside guest RAM.
    #[error("guest RAM access of {len} bytes at GPA {gpa:#x} is outside every region")]
    OutOfRange {
        /// GPA.
        gpa: u64,
        /// Length.
        len: usize,
    },
}

/// One guest RAM region mapped read-only.
pub struct MappedRegion {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    map: Mmap,
}

/// A harvest held in the shared bitmap; release it with [`AttachClient::release`].
#[derive(Debug)]
pub struct Harvest {
    /// Sequence number.
    pub seq: u64,
    /// One bitmap per region.
    pub bitmaps: Vec<DirtyBitmap>,
    /// Time the harvest took in the VMM.
    pub harvest_time: Duration,
    /// Guest console output since the previous harvest (only while the console is held).
    pub console: Vec<u8>,
}

/// A connection to a VMM's attach agent.
pub struct AttachClient {
    stream: UnixStream,
    /// One request and its answer at a time: the epoch loop, the self-fence and the guard's keep-alive
    /// share the connection.
    calls: std::sync::Mutex<()>,
    version: u16,
    info: VmInfo,
    regions: Vec<MappedRegion>,
    bitmap: Option<Mmap>,
}

impl AttachClient {
    /// Connects to the agent at `path`, performs the handshake and maps guest RAM read-only, populated up
    /// front (what the sidecar needs: no page-table fault inside an epoch pause).
    ///
    /// # Errors
    /// [`ClientError`] if the socket, the handshake or a mapping fails.
    pub fn connect(path: impl AsRef<Path>, client_name: &str) -> Result<Self, ClientError> {
        Self::connect_with(path, client_name, true)
    }

    /// Like [`AttachClient::connect`], but maps guest RAM lazily when `populate` is false: for clients
    /// that control the VM and read little or none of its RAM (a migration target resuming it), for which
    /// populating 1 GiB would cost about 100 ms here.
    ///
    /// # Errors
    /// [`ClientError`] if the socket, the handshake or a mapping fails.
    pub fn connect_with(
        path: impl AsRef<Path>,
        client_name: &str,
        populate: bool,
    ) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        proto::send(
            &stream,
            &Request::Hello {
                versions: SUPPORTED_VERSIONS.to_vec(),
                client: client_name.into(),
            },
            &[],
        )?;
        let (resp, mut fds): (Response, Vec<OwnedFd>) = proto::recv(&stream)?;
        let (version, info) = match resp {
            Response::Hello { version, vm } => (version, vm),
            Response::Error { code, message } => {
                return Err(ClientError::Refused {
                    request: "hello",
                    code,
                    message,
                })
            }
            other => {
                return Err(ClientError::Unexpected {
                    request: "hello",
                    got: format!("{other:?}"),
                })
            }
        };
        if fds.len() != info.regions.len() + 1 {
            return Err(ClientError::Unexpected {
                request: "hello",
                got: format!(
                    "{} descriptors for {} regions plus the bitmap",
                    fds.len(),
                    info.regions.len()
                ),
            });
        }
        let bitmap_fd = File::from(fds.pop().expect("checked length"));
        let mut regions = Vec::new();
        for (r, fd) in info.regions.iter().zip(fds) {
            let file = File::from(fd);
            let mut opts = MmapOptions::new();
            opts.offset(r.fd_offset).len(r.size_bytes as usize);
            if populate {
                opts.populate();
            }
            // SAFETY: a read-only shared mapping of guest RAM. The guest keeps writing it, so the bytes are only ever read through raw-pointer copies (see `read`), never as long-lived references.
            let map = unsafe { opts.map(&file) }.map_err(|source| ClientError::Map {
                what: "guest RAM",
                source,
            })?;
            regions.push(MappedRegion { gpa: r.gpa, map });
        }
        // SAFETY: read-only shared mapping of the bitmap memfd; read only between a Harvested reply and the next request, while the agent does not write it.
        let bitmap = unsafe {
            MmapOptions::new()
                .len(info.bitmap_bytes as usize)
                .map(&bitmap_fd)
        }
        .map_err(|source| ClientError::Map {
            what: "the dirty bitmap",
            source,
        })?;
        Ok(Self {
            stream,
            calls: std::sync::Mutex::new(()),
            version,
            info,
            regions,
            bitmap: Some(bitmap),
        })
    }

    /// Protocol version in use.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// What the VMM reported at the handshake.
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    fn call(
        &self,
        request: &'static str,
        req: &Request,
        fds: &[i32],
    ) -> Result<Response, ClientError> {
        let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        proto::send(&self.stream, req, fds)?;
        let (resp, _fds): (Response, Vec<OwnedFd>) = proto::recv(&self.stream)?;
        match resp {
            Response::Error { code, message } => Err(ClientError::Refused {
                request,
                code,
                message,
            }),
            r => Ok(r),
        }
    }

    fn expect_ok(&self, request: &'static str, req: &Request) -> Result<(), ClientError> {
        self.expect_ok_with_fds(request, req, &[])
    }

    fn expect_ok_with_fds(
        &self,
        request: &'static str,
        req: &Request,
        fds: &[i32],
    ) -> Result<(), ClientError> {
        match self.call(request, req, fds)? {
            Response::Ok => Ok(()),
            other => Err(ClientError::Unexpected {
                request,
                got: format!("{other:?}"),
            }),
        }
    }

    /// Starts dirty logging.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn start_dirty_log(&self) -> Result<(), ClientError> {
        self.expect_ok("start_dirty_log", &Request::StartDirtyLog)
    }

    /// Stops dirty logging.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn stop_dirty_log(&self) -> Result<(), ClientError> {
        self.expect_ok("stop_dirty_log", &Request::StopDirtyLog)
    }

    /// Takes the dirty pages since the last harvest. Release the harvest with [`AttachClient::release`]
    /// once its pages are safely copied (or as not consumed, to have them reported again).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn harvest(&self) -> Result<Harvest, ClientError> {
        let (seq, harvest_us, console) = match self.call("harvest", &Request::Harvest, &[])? {
            Response::Harvested {
                seq,
                harvest_us,
                console,
                ..
            } => (seq, harvest_us, console),
            other => {
                return Err(ClientError::Unexpected {
                    request: "harvest",
                    got: format!("{other:?}"),
                })
            }
        };
        let shm = self.bitmap.as_ref().expect("mapped at connect");
        let page = self.info.page_size;
        let mut off = 0usize;
        let mut bitmaps = Vec::new();
        for r in &self.info.regions {
            let pages = r.size_bytes / page;
            let n = words_for(pages);
            let mut words = vec![0u64; n];
            if off + n * 8 > shm.len() {
                return Err(ClientError::Unexpected {
                    request: "harvest",
                    got: "bitmap shorter than the regions".into(),
                });
            }
            // SAFETY: [off, off + n * 8) is inside the shared bitmap (checked above), which the agent does not write until our next request; any bit pattern is a valid u64.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    shm.as_ptr().add(off),
                    words.as_mut_ptr().cast::<u8>(),
                    n * 8,
                )
            };
            off += n * 8;
            bitmaps.push(DirtyBitmap::from_words(r.gpa, page, pages, words));
        }
        Ok(Harvest {
            seq,
            bitmaps,
            harvest_time: Duration::from_micros(harvest_us),
            console,
        })
    }

    /// Releases harvest `seq`; `consumed = false` puts its pages back.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn release(&self, seq: u64, consumed: bool) -> Result<(), ClientError> {
        self.expect_ok(
            "release_harvest",
            &Request::ReleaseHarvest { seq, consumed },
        )
    }

    /// Output commit: asks the VMM to hold guest console output and hand it over with each harvest
    /// (`hold = true`), or to print it directly again.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when the VMM has no console gate.
    pub fn hold_console(&self, hold: bool) -> Result<(), ClientError> {
        self.expect_ok("hold_console", &Request::HoldConsole { hold })
    }

    /// Stops every vCPU; returns how long that took in the VMM.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn pause(&self) -> Result<Duration, ClientError> {
        match self.call("pause", &Request::Pause, &[])? {
            Response::Paused { pause_us } => Ok(Duration::from_micros(pause_us)),
            other => Err(ClientError::Unexpected {
                request: "pause",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Arms the agent's run guard on this connection (see [`Request::ArmGuard`]): the agent pauses the
    /// guest itself if this client sends nothing for `timeout` or goes away.
    ///
    /// # Errors
    /// [`ClientError::Refused`]: another connection holds the guard, or an agent without one.
    pub fn arm_guard(&self, timeout: Duration, generation: u64) -> Result<(), ClientError> {
        self.expect_ok(
            "arm_guard",
            &Request::ArmGuard {
                timeout_ms: timeout.as_millis() as u64,
                generation,
            },
        )
    }

    /// Disarms the run guard this connection holds: the guest is left as it is.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn disarm_guard(&self) -> Result<(), ClientError> {
        self.expect_ok("disarm_guard", &Request::DisarmGuard)
    }

    /// Proof of life for the run guard.
    ///
    /// # Errors
    /// [`ClientError::Refused`] naming the trip when the guard tripped (the guest was paused).
    pub fn keep_alive(&self) -> Result<(), ClientError> {
        self.expect_ok("keep_alive", &Request::KeepAlive)
    }

    /// Lets the vCPUs run.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn resume(&self) -> Result<(), ClientError> {
        self.expect_ok("resume", &Request::Resume)
    }

    /// Sets the vCPU throttle fraction (0..=0.99).
    ///
    /// # Errors
    /// [`ClientError`], e.g. `BadRequest` for a fraction out of range.
    pub fn set_throttle(&self, fraction: f64) -> Result<(), ClientError> {
        self.expect_ok("set_throttle", &Request::SetThrottle { fraction })
    }

    /// BLAKE3 of guest RAM as the VMM computes it (paused only), hex.
    ///
    /// # Errors
    /// [`ClientError`], `BadState` while running.
    pub fn vmm_hash(&self) -> Result<String, ClientError> {
        match self.call("hash_ram", &Request::HashRam, &[])? {
            Response::Hash { blake3 } => Ok(blake3),
            other => Err(ClientError::Unexpected {
                request: "hash_ram",
                got: format!("{other:?}"),
            }),
        }
    }

    /// BLAKE3 of guest RAM computed here, through this process's own read-only mapping, in GPA order.
    /// Only meaningful while the VM is paused.
    pub fn local_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for r in &self.regions {
            let mut off = 0;
            while off < r.map.len() {
                let n = buf.len().min(r.map.len() - off);
                copy_from(&r.map, off, &mut buf[..n]);
                h.update(&buf[..n]);
                off += n;
            }
        }
        h.finalize().to_hex().to_string()
    }

    /// Copies guest RAM at `gpa` into `buf` through this process's mapping.
    ///
    /// # Errors
    /// [`ClientError::OutOfRange`] if the range is not inside one region.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + buf.len() as u64 <= r.gpa + r.map.len() as u64)
            .ok_or(ClientError::OutOfRange {
                gpa,
                len: buf.len(),
            })?;
        copy_from(&r.map, (gpa - r.gpa) as usize, buf);
        Ok(())
    }

    /// Saves vCPU and device state (paused only).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn save_state(&self) -> Result<serde_json::Value, ClientError> {
        match self.call("save_state", &Request::SaveState, &[])? {
            Response::State { state } => Ok(state),
            other => Err(ClientError::Unexpected {
                request: "save_state",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Asks a VMM on standby to start a VM from `state` on `ram` (sent as a descriptor).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn restore(&self, state: serde_json::Value, ram: &File) -> Result<(), ClientError> {
        self.expect_ok_with_fds("restore", &Request::Restore { state }, &[ram.as_raw_fd()])
    }

    /// Asks a VMM on standby to build the VM `state` describes on `ram` ahead of a [`AttachClient::restore`]
    /// (see [`Request::Prepare`]).
    ///
    /// # Errors
    /// [`ClientError`]; a VMM without [`crate::proto::Features::prepare`] refuses it.
    pub fn prepare(&self, state: serde_json::Value, ram: &File) -> Result<(), ClientError> {
        self.expect_ok_with_fds("prepare", &Request::Prepare { state }, &[ram.as_raw_fd()])
    }

    /// Current VM info.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn status(&self) -> Result<VmInfo, ClientError> {
        match self.call("status", &Request::Status, &[])? {
            Response::Status { vm } => Ok(vm),
            other => Err(ClientError::Unexpected {
                request: "status",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Stops the VM and the VMM.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.expect_ok("shutdown", &Request::Shutdown)
    }
}

/// Copies `out.len()` bytes at `off` of a mapping another process writes concurrently.
fn copy_from(map: &Mmap, off: usize, out: &mut [u8]) {
    assert!(off + out.len() <= map.len(), "copy outside the mapping");
    // SAFETY: the range is inside the mapping (asserted); copying through raw pointers never creates a reference to memory the guest may be writing, and any byte pattern is a valid u8.
    unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(off), out.as_mut_ptr(), out.len()) };
}
