//! Endophyte's sans-IO replication core.
//!
//! Everything here is deterministic and free of I/O: no sockets, no threads, no clock (time is passed in),
//! no KVM. The sidecar and backup binaries drive it over QUIC; the tests drive it over simulated links.
//!
//! - [`frame`]: the versioned frame envelope (magic, version, type, length, CRC32C) and a stream decoder
//!   that checks the size cap before allocating.
//! - [`msg`]: the replication messages and their encoding.
//! - [`chunk`]: page chunks (zero pages elided, lz4 block compression, content hash).
//! - [`vmstate`]: the VMM's vCPU and device state, as tagged, versioned bytes replication never opens.
//! - [`sender`]: one VM's epochs to several backups over several paths each (and the switchover's source
//!   half inside it).
//! - [`receiver`]: one VM's replica on a backup: staging, verification, ordered commit.
//! - [`switchover`]: a migration's switchover, source and target state machines, and the fence.
//! - [`authority`]: the fencing authority (etcd): who may run a VM, claims, promotes and hand-overs
//!   as compare-and-set plans, and the holder's keeper of its lease.
//! - [`lease`]: the backups' lease on a primary and the primary's self-fence that keeps within it.
//!
//! The protocol is described, with sequence diagrams, in `docs/replication-protocol.md` and
//! `docs/migration.md`.

pub mod authority;
pub mod chunk;
pub mod contrib;
pub mod frame;
pub mod lease;
pub mod msg;
pub mod receiver;
pub mod sender;
pub mod switchover;
pub mod vmstate;

pub use chunk::{ChunkBuilder, ChunkError, DecodedChunk, PageChunk};
pub use contrib::Contribution;
pub use frame::{FrameDecoder, FrameError, FrameHeader};
pub use msg::{
    EncodedFrame, EpochEnd, ErrorCode, Hello, Message, MessageError, Switchover, SwitchoverReady,
    Welcome,
};
pub use receiver::{Action, Receiver, ReceiverError};
pub use sender::{BackupId, EpochStart, Event, PathId, Sender, SenderConfig, Transmit};
pub use switchover::{Fence, FenceState};
pub use vmstate::VmState;
