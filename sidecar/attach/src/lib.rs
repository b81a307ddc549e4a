//! Endophyte's attach protocol: how a sidecar process sees a VMM's guest RAM and drives its VM.
//!
//! KVM's VM ioctls only work from the process that created the VM, so the VMM links a small agent
//! ([`agent`]) that does the KVM calls, and the sidecar uses a client ([`client`]). They talk over a Unix
//! socket ([`proto`]): a versioned handshake hands the sidecar the guest RAM regions as memfds
//! (`SCM_RIGHTS`), which it maps read-only, plus a shared memfd into which the agent writes harvested dirty
//! bitmaps ([`bitmap`]). See docs/attach-protocol.md for the sequence.
//!
//! - [`bitmap`]: dirty-page bitmaps and their coalescing into `{gpa, len}` ranges.
//! - [`proto`]: messages and framing.
//! - [`agent`]: the VMM side, serving any [`agent::AttachTarget`].
//! - [`client`]: the sidecar side.
//! - `guard`: the agent's run guard, which pauses the guest when its sidecar goes silent or away.
//! - [`inspect`]: a check that a client's view of guest RAM is the VMM's.
//! - [`socket`]: Unix sockets that appear only once they accept.

pub mod agent;
pub mod bitmap;
pub mod client;
mod guard;
pub mod inspect;
pub mod proto;
pub mod socket;

pub use agent::{AttachTarget, TargetError};
pub use client::{AttachClient, ClientError, Harvest};
pub use proto::{ErrorCode, Features, VmInfo};
