//! Attach protocol messages and framing.
//!
//! A frame on the Unix stream socket is a 12-byte header followed by a JSON body:
//!
//! ```text
//! 0      4        6        8         12
//! +------+--------+--------+---------+----------------------+
//! | EATP | version| flags=0| body len| JSON body (len bytes) |
//! +------+--------+--------+---------+----------------------+
//!   magic  u16 LE   u16 LE   u32 LE
//! ```
//!
//! File descriptors travel as `SCM_RIGHTS` ancillary data on the `sendmsg` that carries the frame; the
//! receiver gets them with the header. The body length is checked against [`MAX_BODY_BYTES`] before
//! anything is allocated. Control messages are small and rare (a few per epoch), so JSON's cost does not
//! matter and its readability does; bulk data (guest RAM, dirty bitmaps) never crosses the socket: it is
//! shared memory handed over as file descriptors.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"EATP";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Versions this crate can speak, newest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];
/// Largest body accepted, bytes.
pub const MAX_BODY_BYTES: u32 = 1 << 20;
/// Most file descriptors accepted with one frame.
pub const MAX_FDS: usize = 16;
/// Length of a frame's header, bytes.
pub const HEADER_BYTES: usize = 12;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed.
    #[error("attach socket: {0}")]
    Io(#[from] std::io::Error),
    /// Peer closed the connection between frames.
    #[error("the peer closed the attach connection")]
    Closed,
    /// Not our protocol.
    #[error(
        "bad frame magic {0:02x?} (expected \"EATP\"): the peer does not speak the attach protocol"
    )]
    BadMagic([u8; 4]),
    /// A frame of a version we do not speak.
    #[error("frame of attach protocol version {0}; this side speaks {SUPPORTED_VERSIONS:?}")]
    BadVersion(u16),
    /// Oversized body.
    #[error("frame body of {0} bytes exceeds the {MAX_BODY_BYTES}-byte limit")]
    TooLarge(u32),
    /// Body is not valid JSON for the expected message.
    #[error("malformed message body: {0}")]
    Malformed(#[from] serde_json::Error),
    /// More descriptors than allowed.
    #[error("frame carried more than {MAX_FDS} file descriptors")]
    TooManyFds,
}

/// One guest RAM region as the VMM describes it. Its memory arrives as a file descriptor, in the order
/// of the regions list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Offset into the file descriptor where the region starts.
    pub fd_offset: u64,
}

/// What the VMM tells a client at the handshake.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VMM name and version.
    pub vmm: String,
    /// vCPUs (0 for a VMM on standby, waiting for a restore).
    pub vcpus: u32,
    /// Page size in bytes: the unit of dirty tracking.
    pub page_size: u64,
    /// Guest RAM regions; their fds follow the frame in this order, then the dirty-bitmap fd.
    pub regions: Vec<RegionInfo>,
    /// Size of the shared dirty-bitmap memfd, bytes (region bitmaps back to back, 8-byte words).
    pub bitmap_bytes: u64,
    /// Whether the vCPUs are running.
    pub running: bool,
    /// Whether dirty logging is on.
    pub dirty_logging: bool,
    /// What this VMM can do beyond the basics (pause, resume, save, restore). Absent from an older
    /// agent, which had all of these.
    #[serde(default)]
    pub features: Features,
}

/// Optional abilities of a VMM, declared at the handshake so that the sidecar adapts instead of failing
/// mid-run (a VMM without a throttle gets the emergency policy, one without a console gate releases its
/// output at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// `start_dirty_log`, `harvest` and `release_harvest` work: the VMM has an incremental dirty log.
    pub dirty_log: bool,
    /// `set_throttle` works.
    pub throttle: bool,
    /// `hold_console` works (output commit).
    pub hold_console: bool,
    /// A VMM on standby takes `prepare`: it builds the VM (KVM VM, memory slot, vCPUs) ahead of the
    /// restore, so that the switchover's restore only loads the vCPU and device state. Absent (false)
    /// from an older agent.
    #[serde(default)]
    pub prepare: bool,
    /// The agent has a run guard ([`Request::ArmGuard`]): it pauses the guest itself when the sidecar
    /// that armed it goes silent or away. Absent (false) from an older agent.
    #[serde(default)]
    pub guard: bool,
}

impl Default for Features {
    fn default() -> Self {
        Self {
            dirty_log: true,
            throttle: true,
            hold_console: true,
            prepare: false,
            guard: false,
        }
    }
}

/// A request from the client (sidecar) to the agent (VMM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message: the versions the client speaks and who it is.
    Hello {
        /// Versions, any order.
        versions: Vec<u16>,
        /// Client name and version, for logs.
        client: String,
    },
    /// Start reporting dirty pages.
    StartDirtyLog,
    /// Stop reporting dirty pages.
    StopDirtyLog,
    /// Take the dirty pages since the last harvest into the shared bitmap. Only one harvest may be
    /// outstanding per connection; it must be released before the next.
    Harvest,
    /// Release harvest `seq`: `consumed = false` (or closing the connection) puts its pages back, so that
    /// the next harvest reports them again.
    ReleaseHarvest {
        /// Sequence number from [`Response::Harvested`].
        seq: u64,
        /// Whether the client consumed the pages.
        consumed: bool,
    },
    /// Stop all vCPUs.
    Pause,
    /// Let the vCPUs run.
    Resume,
    /// Make each vCPU sleep `fraction` (0..=0.99) of every time slice.
    SetThrottle {
        /// Fraction of time the vCPUs sleep.
        fraction: f64,
    },
    /// BLAKE3 of all guest RAM, computed by the VMM (VM must be paused).
    HashRam,
    /// Output commit: hold guest console output and hand it over with each harvest (`true`), or print it
    /// directly again (`false`).
    HoldConsole {
        /// Whether to hold.
        hold: bool,
    },
    /// vCPU and device state (VM must be paused); opaque to the protocol.
    SaveState,
    /// To a VMM on standby: start a VM from `state` on the RAM file sent with this frame (mapped, not
    /// copied). Reconnect afterwards to see the new VM.
    Restore {
        /// State from [`Response::State`].
        state: serde_json::Value,
    },
    /// To a VMM on standby, ahead of a [`Request::Restore`] (a migration's warm-up): build the VM that
    /// `state` describes on the RAM file sent with this frame (mapped, not copied), with nothing loaded
    /// into its vCPUs and nothing running. A later restore on the same file and layout only loads the
    /// state; any other restore builds afresh. Offered when [`Features::prepare`] is set.
    Prepare {
        /// State from [`Response::State`]: its layout is what is built.
        state: serde_json::Value,
    },
    /// Arms the run guard on this connection: from now on the agent pauses the guest by itself when no
    /// request arrives on it for `timeout_ms` (a hung sidecar) or it closes (a dead one), and then refuses
    /// every resume until a sidecar arms the guard again. One connection holds the guard; arming while
    /// another does (and is alive) is refused. `generation` is the VM's generation the arming sidecar
    /// holds, for the logs.
    ArmGuard {
        /// Silence after which the guest is paused, milliseconds.
        timeout_ms: u64,
        /// The VM's generation the sidecar holds.
        generation: u64,
    },
    /// Disarms the guard this connection holds (a sidecar leaving the guest to run on, on purpose).
    DisarmGuard,
    /// Nothing but proof of life for the guard (any request is one).
    KeepAlive,
    /// Current [`VmInfo`] (no descriptors).
    Status,
    /// Stop the VM and exit the VMM.
    Shutdown,
}

/// Error categories, so a client can react without parsing messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not valid now (e.g. hashing while running, harvest while one is outstanding).
    BadState,
    /// The request is malformed or has bad arguments.
    BadRequest,
    /// No version in common.
    VersionMismatch,
    /// The VMM failed (KVM error, I/O error).
    Internal,
    /// The VM stopped on a guest fault.
    Faulted,
}

/// A response from the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Handshake accepted; region fds and the bitmap fd follow.
    Hello {
        /// Version chosen.
        version: u16,
        /// The VM.
        vm: VmInfo,
    },
    /// Done.
    Ok,
    /// A harvest is in the shared bitmap.
    Harvested {
        /// Sequence number to release it with.
        seq: u64,
        /// Dirty pages in it.
        dirty_pages: u64,
        /// How long the harvest took in the VMM, microseconds.
        harvest_us: u64,
        /// Guest console output produced since the previous harvest, when the console is held (output
        /// commit); absent otherwise.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        console: Vec<u8>,
    },
    /// vCPUs stopped.
    Paused {
        /// How long stopping took, microseconds.
        pause_us: u64,
    },
    /// RAM hash.
    Hash {
        /// BLAKE3, hex.
        blake3: String,
    },
    /// Saved state.
    State {
        /// Opaque VMM state.
        state: serde_json::Value,
    },
    /// Current VM info.
    Status {
        /// The VM.
        vm: VmInfo,
    },
    /// The request failed.
    Error {
        /// Category.
        code: ErrorCode,
        /// What went wrong, for humans.
        message: String,
    },
}

/// Writes one frame carrying `msg` and `fds`.
///
/// # Errors
/// [`FrameError::Io`] if the socket fails; [`FrameError::TooLarge`] if the body exceeds the limit.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fds: &[RawFd]) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_BODY_BYTES)
        .ok_or(FrameError::TooLarge(u32::MAX))?;
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    if fds.len() > MAX_FDS {
        return Err(FrameError::TooManyFds);
    }
    if fds.is_empty() {
        let mut s = sock;
        s.write_all(&header)?;
        s.write_all(&body)?;
        return Ok(());
    }
    // The descriptors ride on the first sendmsg; the rest of the frame follows as plain bytes.
    let mut frame = header.to_vec();
    frame.extend_from_slice(&body);
    let sent = sock
        .send_with_fds(&[frame.as_slice()], fds)
        .map_err(|e| FrameError::Io(e.into()))?;
    let mut s = sock;
    s.write_all(&frame[sent..])?;
    Ok(())
}

/// Reads one frame: its message and any file descriptors that came with it.
///
/// # Errors
/// [`FrameError::Closed`] at a clean end of stream; the other [`FrameError`]s for a bad frame. Nothing
/// is allocated for a body before its length has been checked.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_BYTES,
    }];
    // SAFETY: the iovec points at `header`, which is valid for writes of HEADER_BYTES for the call.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| FrameError::Io(e.into()))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        .map(|&fd| {
            // SAFETY: recv_with_fds returned nfds new descriptors in raw_fds[..nfds], owned by us from now on.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    if n == 0 {
        return Err(FrameError::Closed);
    }
    let mut s = sock;
    if n < HEADER_BYTES {
        s.read_exact(&mut header[n..])?;
    }
    let len = parse_header(&header)?;
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((decode_body(&body)?, fds))
}

/// Checks a frame's 12-byte header (magic, version, length limit) and returns its body length in bytes.
///
/// # Errors
/// [`FrameError::BadMagic`], [`FrameError::BadVersion`] or [`FrameError::TooLarge`].
pub fn parse_header(header: &[u8; HEADER_BYTES]) -> Result<u32, FrameError> {
    let magic: [u8; 4] = header[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(FrameError::BadVersion(version));
    }
    let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if len > MAX_BODY_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame's JSON body as a `T` ([`Request`] or [`Response`]).
///
/// # Errors
/// [`FrameError::Malformed`], with serde's reason.
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send(
            &a,
            &Request::SetThrottle { fraction: 0.5 },
            &[f.as_raw_fd()],
        )
        .unwrap();
        let (m, fds): (Request, _) = recv(&b).unwrap();
        assert_eq!(m, Request::SetThrottle { fraction: 0.5 });
        assert_eq!(fds.len(), 1);
        send(&a, &Request::Pause, &[]).unwrap();
        let (m, fds): (Request, _) = recv(&b).unwrap();
        assert_eq!((m, fds.len()), (Request::Pause, 0));
    }

    #[test]
    fn rejects_bad_frames_before_allocating() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = &a;
        w.write_all(b"HTTP/1.1 200").unwrap();
        assert!(matches!(recv::<Request>(&b), Err(FrameError::BadMagic(_))));

        let (a, b) = UnixStream::pair().unwrap();
        let mut h = Vec::from(MAGIC);
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        (&a).write_all(&h).unwrap();
        assert!(matches!(
            recv::<Request>(&b),
            Err(FrameError::TooLarge(u32::MAX))
        ));

        let (a, b) = UnixStream::pair().unwrap();
        let mut h = Vec::from(MAGIC);
        h.extend_from_slice(&9u16.to_le_bytes());
        h.extend_from_slice(&[0, 0, 2, 0, 0, 0]);
        (&a).write_all(&h).unwrap();
        assert!(matches!(
            recv::<Request>(&b),
            Err(FrameError::BadVersion(9))
        ));

        let (a, b) = UnixStream::pair().unwrap();
        let mut h = Vec::from(MAGIC);
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&[0, 0, 5, 0, 0, 0]);
        h.extend_from_slice(b"{oops");
        (&a).write_all(&h).unwrap();
        assert!(matches!(recv::<Request>(&b), Err(FrameError::Malformed(_))));

        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(recv::<Request>(&b), Err(FrameError::Closed)));
    }
}
