//! Replication messages and their binary encoding inside a frame (see [`crate::frame`]).
//!
//! | type | message | direction | payload (little-endian) |
//! |---|---|---|---|
//! | 1 | Hello | sidecar -> backup, first on each path | session u64, path u32, page_size u32, mem_bytes u64, vm_id (u16 len + UTF-8), generation u64 (optional: absent reads 0) |
//! | 2 | Welcome | backup -> sidecar | instance u64, committed_epoch u64, committed_session u64, node (u16 len + UTF-8), lease_ms u32 |
//! | 3 | Chunk | sidecar -> backup | epoch u64, seq u32, n_pages u32, raw_len u32, flags u8, 3 zero bytes, content_hash [32], body |
//! | 4 | ChunkAck | backup -> sidecar | epoch u64, seq u32 |
//! | 5 | EpochEnd | sidecar -> backup | epoch u64, base_epoch u64, chunk_count u32, page_count u64, epoch_hash [32], VM state (see [`crate::vmstate`]; one zero byte: none), service contributions (see [`crate::contrib`]; absent: none) |
//! | 6 | Committed | backup -> sidecar | epoch u64 |
//! | 7 | Error | either | code u16, message (u16 len + UTF-8) |
//! | 8 | Ping | either | token u64 |
//! | 9 | Pong | either | token u64 |
//! | 10 | Switchover | sidecar -> migration target | generation u64, session u64, epoch u64, flags u8 (bit 0: verify), 7 zero bytes, VM state (see [`crate::vmstate`]; required) |
//! | 11 | SwitchoverReady | target -> sidecar | generation u64, epoch u64, settle_us u64, spawn_us u64, restore_us u64, verify_us u64, ram_hash (u16 len + UTF-8; empty unless verify) |
//! | 12 | SwitchoverCommit | sidecar -> target | generation u64 |
//! | 13 | SwitchedOver | target -> sidecar | generation u64, resume_us u64 |
//! | 14 | SwitchoverAbort | sidecar -> target | generation u64 |
//! | 15 | SwitchoverWarmup | sidecar -> target | generation u64 |
//! | 16 | SwitchoverStandby | target -> sidecar | generation u64, preloaded u8 (0 or 1) |
//!
//! Type 0 is reserved as invalid. Strings (u16 length + UTF-8) longer than 65,535 bytes are cut at the last
//! character boundary before that length.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::chunk::PageChunk;
use crate::contrib::{self, ContribError, Contribution};
use crate::frame::{encode_header, FrameError, FrameHeader, RawFrame, HEADER_BYTES};
use crate::vmstate::{self, VmState, VmStateError};

/// Why a frame's payload is not a valid message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The frame itself was refused.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The type byte names no message.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The payload is too short or inconsistent for its type.
    #[error("malformed {msg} message: {why}")]
    Malformed {
        /// Which message.
        msg: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The VM state a message carries is malformed.
    #[error("malformed {msg} message: {source}")]
    State {
        /// Which message.
        msg: &'static str,
        /// What is wrong with the state.
        source: VmStateError,
    },
    /// The service contributions an end marker carries are malformed.
    #[error("malformed EpochEnd message: {0}")]
    Contributions(#[from] ContribError),
}

/// Error codes carried by [`Message::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame or chunk failed its CRC, hash or structure checks.
    Corrupt = 1,
    /// A frame exceeded the size cap.
    TooLarge = 2,
    /// An epoch at or below the committed epoch was offered by a new session.
    Replay = 3,
    /// An epoch's base does not match what the receiver holds.
    BaseMismatch = 4,
    /// The Hello was refused (unknown or inconsistent VM geometry).
    BadHello = 5,
    /// The receiver failed internally (disk full, I/O error).
    Internal = 6,
    /// A message arrived out of protocol order.
    Protocol = 7,
    /// More epochs in flight than the receiver stages.
    TooManyEpochs = 8,
    /// The VM runs on this node now (after a switchover or a promote), or the generation is stale:
    /// replication into its RAM, or starting it again, is refused.
    Fenced = 9,
    /// A switchover was refused (the replica does not hold the final epoch, the VMM failed to start).
    SwitchoverFailed = 10,
    /// The peer may not act for this VM: the fencing authority names another holder or generation, or a
    /// switchover message names a generation its path's Hello does not lead to.
    PermissionDenied = 11,
    /// Any code this version does not know.
    Unknown = 0xffff,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Corrupt,
            2 => Self::TooLarge,
            3 => Self::Replay,
            4 => Self::BaseMismatch,
            5 => Self::BadHello,
            6 => Self::Internal,
            7 => Self::Protocol,
            8 => Self::TooManyEpochs,
            9 => Self::Fenced,
            10 => Self::SwitchoverFailed,
            11 => Self::PermissionDenied,
            _ => Self::Unknown,
        }
    }
}

/// First message on every path: which VM, which session, which path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Random per sidecar run; a backup seeing a new session treats old epochs as replays.
    pub session: u64,
    /// Index of this path among the sidecar's paths to this backup.
    pub path: u32,
    /// Guest page size in bytes (the host's).
    pub page_size: u32,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// The VM's name, unique per network.
    pub vm_id: String,
    /// The VM's generation the sender holds (its fencing token): a backup refuses a sender below the
    /// generation it has seen, and under a fencing authority one that is not the authority's holder of
    /// exactly this generation. Encoded after `vm_id`; a Hello without it (an older sidecar) reads as 0.
    pub generation: u64,
}

/// The backup's answer to Hello: where replication resumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Random per backup process start; a change tells the sidecar the backup restarted and lost staging.
    pub instance: u64,
    /// Newest epoch the backup holds committed (0: empty replica).
    pub committed_epoch: u64,
    /// Session that sent that epoch (0: unknown). Epoch numbers are only comparable within one session's
    /// history, so a sidecar resyncs from its dirty-page history only when this is its own session.
    pub committed_session: u64,
    /// The backup's node name.
    pub node: String,
    /// The backup's lease on its primaries, ms: after this long without a frame from the primary it
    /// presumes it dead and may promote. The sidecar checks its self-fence bound against it
    /// ([`crate::lease::check_timing`]).
    pub lease_ms: u32,
}

/// The end marker of one epoch on one backup stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochEnd {
    /// The epoch.
    pub epoch: u64,
    /// Epoch the receiver must hold committed for this one to apply on top (0: empty replica).
    pub base_epoch: u64,
    /// Chunks in the epoch on this stream: seqs 0..chunk_count.
    pub chunk_count: u32,
    /// Page entries over all chunks.
    pub page_count: u64,
    /// BLAKE3 over the chunks' content hashes in seq order (see [`epoch_hash`]).
    pub epoch_hash: [u8; 32],
    /// The VM's vCPU and device state at the epoch's pause ([`VmState`], opaque here); `None` when the
    /// VMM could not save it (such an epoch cannot be promoted). Journaled with the epoch, so that a backup
    /// can promote its committed epoch.
    pub state: Option<VmState>,
    /// The registered services' contributions at the epoch's pause ([`crate::contrib`]), committed with
    /// it: what each service's twin receives when the VM resumes from this epoch elsewhere.
    pub contributions: Vec<Contribution>,
}

/// Every message of the replication protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// Chunk `seq` of an epoch (the epoch is inside the chunk).
    Chunk {
        /// Position of the chunk in its epoch's stream; chunks apply in seq order.
        seq: u32,
        /// The pages.
        chunk: PageChunk,
    },
    /// The receiver has chunk `seq` of `epoch` verified and journaled.
    ChunkAck {
        /// Epoch.
        epoch: u64,
        /// Chunk.
        seq: u32,
    },
    /// See [`EpochEnd`].
    EpochEnd(EpochEnd),
    /// The receiver committed `epoch`: it is in the replica and survives a crash.
    Committed {
        /// Epoch.
        epoch: u64,
    },
    /// A refusal; the sender of it closes the path afterwards.
    Error {
        /// What kind of error.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Liveness and RTT probe.
    Ping {
        /// Echoed in the Pong.
        token: u64,
    },
    /// Answer to Ping.
    Pong {
        /// The Ping's token.
        token: u64,
    },
    /// See [`Switchover`].
    Switchover(Switchover),
    /// See [`SwitchoverReady`].
    SwitchoverReady(SwitchoverReady),
    /// The source's decision: the VM is the target's now; resume it. Sent only after
    /// [`Message::SwitchoverReady`]; the source never resumes after sending it.
    SwitchoverCommit {
        /// The switchover's generation.
        generation: u64,
    },
    /// The guest runs on the target.
    SwitchedOver {
        /// The switchover's generation.
        generation: u64,
        /// Resuming the vCPUs, microseconds.
        resume_us: u64,
    },
    /// A migration to this node started converging: start what a switchover needs (a standby VMM) now,
    /// so that the switchover does not wait for it. Not answered; harmless if no switchover follows.
    SwitchoverWarmup {
        /// The coming switchover's generation.
        generation: u64,
    },
    /// The answer to [`Message::SwitchoverWarmup`] once the standby VMM is as ready as it gets: it runs
    /// and, when `preloaded`, holds the replica, so that the switchover's restore carries only the final
    /// epoch. Sent also when the standby could not start (`preloaded` false): nothing better will come.
    SwitchoverStandby {
        /// The coming switchover's generation.
        generation: u64,
        /// The standby loaded the replica ahead of the switchover.
        preloaded: bool,
    },
    /// The source abandons the switchover (and resumes): the target stops the VM it prepared and never
    /// starts `generation`. Not answered. A target that hears nothing also gives up after a while: it
    /// resumes a prepared VM only on [`Message::SwitchoverCommit`].
    SwitchoverAbort {
        /// The switchover's generation.
        generation: u64,
    },
}

/// Migration switchover, sent by the sidecar to the target after the target committed the final epoch
/// (the source VM is paused): prepare the VM from the replica at `epoch` with this vCPU and device state,
/// paused, and answer [`SwitchoverReady`]; or refuse with [`Message::Error`] (the source then resumes).
/// The guest resumes on the target only on [`Message::SwitchoverCommit`]: a target that dies before it
/// never runs the guest, so the source can resume safely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Switchover {
    /// Fencing token: higher than any generation this VM ran under before. The target records it before
    /// starting the VM and never starts the same or a lower generation again.
    pub generation: u64,
    /// Sidecar session whose epoch the replica must hold.
    pub session: u64,
    /// The final epoch: the replica must have committed exactly this one.
    pub epoch: u64,
    /// Hash guest RAM after the restore and before the resume, and report it (tests and the demo; the
    /// hash is inside the downtime).
    pub verify: bool,
    /// vCPU and device state from the source VMM at the final pause (opaque here).
    pub state: VmState,
}

/// The VM is prepared on the target, paused; step durations in microseconds, measured there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchoverReady {
    /// The switchover's generation.
    pub generation: u64,
    /// The epoch the VM started from.
    pub epoch: u64,
    /// Waiting for the final epoch to be in the replica file and recording the generation.
    pub settle_us: u64,
    /// Starting the VMM on standby.
    pub spawn_us: u64,
    /// Restoring vCPU and device state onto the replica file mapped as guest RAM.
    pub restore_us: u64,
    /// Hashing guest RAM (0 unless asked).
    pub verify_us: u64,
    /// BLAKE3 of guest RAM before the resume, hex; empty unless asked.
    pub ram_hash: String,
}

const CHUNK_FIXED: usize = 8 + 4 + 4 + 4 + 1 + 3 + 32;

/// A message ready for the wire: header and fixed fields in `head`, bulk data (chunk bodies) in `body`.
///
/// Written as `head` then `body`; kept apart so chunk bodies go out without a copy.
#[derive(Clone, Debug)]
pub struct EncodedFrame {
    /// Frame header plus the message's fixed fields.
    pub head: Bytes,
    /// Bulk payload (empty for small messages).
    pub body: Bytes,
}

impl EncodedFrame {
    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether the frame is empty (never true for a valid frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Both parts joined, for byte-stream tests.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        v
    }
}

/// Writes `s` as u16 length + UTF-8, cut at the last character boundary at or below 65,535 bytes (a longer
/// error message loses its tail, never its validity as UTF-8).
fn put_str(b: &mut BytesMut, s: &str) {
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    b.put_u16_le(n as u16);
    b.put_slice(&s.as_bytes()[..n]);
}

fn get_str(p: &mut Bytes, msg: &'static str) -> Result<String, MessageError> {
    let m = |why| MessageError::Malformed { msg, why };
    if p.remaining() < 2 {
        return Err(m("string length missing"));
    }
    let n = p.get_u16_le() as usize;
    if p.remaining() < n {
        return Err(m("string truncated"));
    }
    let s = p.split_to(n);
    String::from_utf8(s.to_vec()).map_err(|_| m("string is not UTF-8"))
}

impl Message {
    /// The frame type byte of this message.
    pub fn msg_type(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Welcome(_) => 2,
            Message::Chunk { .. } => 3,
            Message::ChunkAck { .. } => 4,
            Message::EpochEnd(_) => 5,
            Message::Committed { .. } => 6,
            Message::Error { .. } => 7,
            Message::Ping { .. } => 8,
            Message::Pong { .. } => 9,
            Message::Switchover(_) => 10,
            Message::SwitchoverReady(_) => 11,
            Message::SwitchoverCommit { .. } => 12,
            Message::SwitchedOver { .. } => 13,
            Message::SwitchoverAbort { .. } => 14,
            Message::SwitchoverWarmup { .. } => 15,
            Message::SwitchoverStandby { .. } => 16,
        }
    }

    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Chunk { .. } => "Chunk",
            Message::ChunkAck { .. } => "ChunkAck",
            Message::EpochEnd(_) => "EpochEnd",
            Message::Committed { .. } => "Committed",
            Message::Error { .. } => "Error",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Switchover(_) => "Switchover",
            Message::SwitchoverReady(_) => "SwitchoverReady",
            Message::SwitchoverCommit { .. } => "SwitchoverCommit",
            Message::SwitchedOver { .. } => "SwitchedOver",
            Message::SwitchoverAbort { .. } => "SwitchoverAbort",
            Message::SwitchoverWarmup { .. } => "SwitchoverWarmup",
            Message::SwitchoverStandby { .. } => "SwitchoverStandby",
        }
    }

    /// Encodes the message as one frame.
    pub fn encode(&self) -> EncodedFrame {
        let mut b = BytesMut::with_capacity(HEADER_BYTES + 64);
        b.put_slice(&[0u8; HEADER_BYTES]);
        let mut body = Bytes::new();
        match self {
            Message::Hello(h) => {
                b.put_u64_le(h.session);
                b.put_u32_le(h.path);
                b.put_u32_le(h.page_size);
                b.put_u64_le(h.mem_bytes);
                put_str(&mut b, &h.vm_id);
                b.put_u64_le(h.generation);
            }
            Message::Welcome(w) => {
                b.put_u64_le(w.instance);
                b.put_u64_le(w.committed_epoch);
                b.put_u64_le(w.committed_session);
                put_str(&mut b, &w.node);
                b.put_u32_le(w.lease_ms);
            }
            Message::Chunk { seq, chunk } => {
                b.put_u64_le(chunk.epoch);
                b.put_u32_le(*seq);
                b.put_u32_le(chunk.n_pages);
                b.put_u32_le(chunk.raw_len);
                b.put_u8(u8::from(chunk.compressed));
                b.put_slice(&[0u8; 3]);
                b.put_slice(&chunk.content_hash);
                body = chunk.body.clone();
            }
            Message::ChunkAck { epoch, seq } => {
                b.put_u64_le(*epoch);
                b.put_u32_le(*seq);
            }
            Message::EpochEnd(e) => {
                b.put_u64_le(e.epoch);
                b.put_u64_le(e.base_epoch);
                b.put_u32_le(e.chunk_count);
                b.put_u64_le(e.page_count);
                b.put_slice(&e.epoch_hash);
                // In the head, not the body: journals append the head of this frame.
                vmstate::encode_opt(&mut b, e.state.as_ref());
                if !e.contributions.is_empty() {
                    contrib::encode(&mut b, &e.contributions);
                }
            }
            Message::Committed { epoch } => b.put_u64_le(*epoch),
            Message::Error { code, message } => {
                b.put_u16_le(*code as u16);
                put_str(&mut b, message);
            }
            Message::Ping { token } | Message::Pong { token } => b.put_u64_le(*token),
            Message::Switchover(w) => {
                b.put_u64_le(w.generation);
                b.put_u64_le(w.session);
                b.put_u64_le(w.epoch);
                b.put_u8(u8::from(w.verify));
                b.put_slice(&[0u8; 7]);
                // The tag and lengths in the head; the (possibly large) state itself goes out uncopied.
                vmstate::encode_head(&mut b, Some(&w.state));
                body = w.state.data.clone();
            }
            Message::SwitchoverReady(d) => {
                for v in [
                    d.generation,
                    d.epoch,
                    d.settle_us,
                    d.spawn_us,
                    d.restore_us,
                    d.verify_us,
                ] {
                    b.put_u64_le(v);
                }
                put_str(&mut b, &d.ram_hash);
            }
            Message::SwitchedOver {
                generation,
                resume_us,
            } => {
                b.put_u64_le(*generation);
                b.put_u64_le(*resume_us);
            }
            Message::SwitchoverCommit { generation }
            | Message::SwitchoverAbort { generation }
            | Message::SwitchoverWarmup { generation } => b.put_u64_le(*generation),
            Message::SwitchoverStandby {
                generation,
                preloaded,
            } => {
                b.put_u64_le(*generation);
                b.put_u8(u8::from(*preloaded));
            }
        }
        let header = encode_header(self.msg_type(), &[&b[HEADER_BYTES..], &body]);
        b[..HEADER_BYTES].copy_from_slice(&header);
        EncodedFrame {
            head: b.freeze(),
            body,
        }
    }

    /// Decodes a checked frame (see [`FrameHeader::verify`] / [`crate::frame::FrameDecoder`]).
    ///
    /// # Errors
    /// [`MessageError::UnknownType`] or [`MessageError::Malformed`].
    pub fn decode(frame: RawFrame) -> Result<Self, MessageError> {
        let mut p = frame.payload;
        macro_rules! need {
            ($msg:literal, $n:expr) => {
                if p.remaining() < $n {
                    return Err(MessageError::Malformed {
                        msg: $msg,
                        why: "payload too short",
                    });
                }
            };
        }
        let msg = match frame.msg_type {
            1 => {
                need!("Hello", 24);
                let session = p.get_u64_le();
                let path = p.get_u32_le();
                let page_size = p.get_u32_le();
                let mem_bytes = p.get_u64_le();
                let vm_id = get_str(&mut p, "Hello")?;
                let generation = if p.remaining() >= 8 {
                    p.get_u64_le()
                } else {
                    0
                };
                Message::Hello(Hello {
                    session,
                    path,
                    page_size,
                    mem_bytes,
                    vm_id,
                    generation,
                })
            }
            2 => {
                need!("Welcome", 24);
                let instance = p.get_u64_le();
                let committed_epoch = p.get_u64_le();
                let committed_session = p.get_u64_le();
                let node = get_str(&mut p, "Welcome")?;
                need!("Welcome", 4);
                let lease_ms = p.get_u32_le();
                Message::Welcome(Welcome {
                    instance,
                    committed_epoch,
                    committed_session,
                    node,
                    lease_ms,
                })
            }
            3 => {
                need!("Chunk", CHUNK_FIXED);
                let epoch = p.get_u64_le();
                let seq = p.get_u32_le();
                let n_pages = p.get_u32_le();
                let raw_len = p.get_u32_le();
                let flags = p.get_u8();
                let mut pad = [0u8; 3];
                p.copy_to_slice(&mut pad);
                if flags & !1 != 0 || pad != [0; 3] {
                    return Err(MessageError::Malformed {
                        msg: "Chunk",
                        why: "reserved flag bits set",
                    });
                }
                let mut content_hash = [0u8; 32];
                p.copy_to_slice(&mut content_hash);
                Message::Chunk {
                    seq,
                    chunk: PageChunk {
                        epoch,
                        n_pages,
                        raw_len,
                        compressed: flags & 1 != 0,
                        content_hash,
                        body: p.split_off(0),
                    },
                }
            }
            4 => {
                need!("ChunkAck", 12);
                Message::ChunkAck {
                    epoch: p.get_u64_le(),
                    seq: p.get_u32_le(),
                }
            }
            5 => {
                need!("EpochEnd", 60);
                let epoch = p.get_u64_le();
                let base_epoch = p.get_u64_le();
                let chunk_count = p.get_u32_le();
                let page_count = p.get_u64_le();
                let mut epoch_hash = [0u8; 32];
                p.copy_to_slice(&mut epoch_hash);
                let state = vmstate::decode_opt(&mut p).map_err(|source| MessageError::State {
                    msg: "EpochEnd",
                    source,
                })?;
                let contributions = contrib::decode(&mut p)?;
                Message::EpochEnd(EpochEnd {
                    epoch,
                    base_epoch,
                    chunk_count,
                    page_count,
                    epoch_hash,
                    state,
                    contributions,
                })
            }
            6 => {
                need!("Committed", 8);
                Message::Committed {
                    epoch: p.get_u64_le(),
                }
            }
            7 => {
                need!("Error", 2);
                let code = ErrorCode::from_u16(p.get_u16_le());
                let message = get_str(&mut p, "Error")?;
                Message::Error { code, message }
            }
            8 => {
                need!("Ping", 8);
                Message::Ping {
                    token: p.get_u64_le(),
                }
            }
            9 => {
                need!("Pong", 8);
                Message::Pong {
                    token: p.get_u64_le(),
                }
            }
            10 => {
                need!("Switchover", 33);
                let generation = p.get_u64_le();
                let session = p.get_u64_le();
                let epoch = p.get_u64_le();
                let flags = p.get_u8();
                let mut pad = [0u8; 7];
                p.copy_to_slice(&mut pad);
                if flags & !1 != 0 || pad != [0; 7] {
                    return Err(MessageError::Malformed {
                        msg: "Switchover",
                        why: "reserved flag bits set",
                    });
                }
                let state = vmstate::decode_opt(&mut p)
                    .map_err(|source| MessageError::State {
                        msg: "Switchover",
                        source,
                    })?
                    .ok_or(MessageError::Malformed {
                        msg: "Switchover",
                        why: "no VM state",
                    })?;
                Message::Switchover(Switchover {
                    generation,
                    session,
                    epoch,
                    verify: flags & 1 != 0,
                    state,
                })
            }
            11 => {
                need!("SwitchoverReady", 48);
                let mut v = [0u64; 6];
                for x in &mut v {
                    *x = p.get_u64_le();
                }
                let ram_hash = get_str(&mut p, "SwitchoverReady")?;
                Message::SwitchoverReady(SwitchoverReady {
                    generation: v[0],
                    epoch: v[1],
                    settle_us: v[2],
                    spawn_us: v[3],
                    restore_us: v[4],
                    verify_us: v[5],
                    ram_hash,
                })
            }
            12 => {
                need!("SwitchoverCommit", 8);
                Message::SwitchoverCommit {
                    generation: p.get_u64_le(),
                }
            }
            13 => {
                need!("SwitchedOver", 16);
                Message::SwitchedOver {
                    generation: p.get_u64_le(),
                    resume_us: p.get_u64_le(),
                }
            }
            14 => {
                need!("SwitchoverAbort", 8);
                Message::SwitchoverAbort {
                    generation: p.get_u64_le(),
                }
            }
            15 => {
                need!("SwitchoverWarmup", 8);
                Message::SwitchoverWarmup {
                    generation: p.get_u64_le(),
                }
            }
            16 => {
                need!("SwitchoverStandby", 9);
                let generation = p.get_u64_le();
                let preloaded = match p.get_u8() {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(MessageError::Malformed {
                            msg: "SwitchoverStandby",
                            why: "preloaded is neither 0 nor 1",
                        })
                    }
                };
                Message::SwitchoverStandby {
                    generation,
                    preloaded,
                }
            }
            other => return Err(MessageError::UnknownType(other)),
        };
        if !matches!(msg, Message::Chunk { .. }) && p.has_remaining() {
            return Err(MessageError::Malformed {
                msg: msg.name(),
                why: "trailing bytes",
            });
        }
        Ok(msg)
    }

    /// Checks a frame whose header and payload were read separately, then decodes it.
    ///
    /// # Errors
    /// [`FrameError::Crc`] (as [`MessageError::Frame`]) or a decoding error.
    pub fn from_parts(
        header_bytes: &[u8; HEADER_BYTES],
        header: &FrameHeader,
        payload: Bytes,
    ) -> Result<Self, MessageError> {
        header.verify(header_bytes, &[&payload])?;
        Self::decode(RawFrame {
            msg_type: header.msg_type,
            payload,
        })
    }
}

/// The epoch hash carried by [`EpochEnd`]: BLAKE3 over `page_count (u64)` then each chunk's content hash
/// in seq order.
pub fn epoch_hash<'a>(
    page_count: u64,
    chunk_hashes: impl IntoIterator<Item = &'a [u8; 32]>,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&page_count.to_le_bytes());
    for c in chunk_hashes {
        h.update(c);
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests;
