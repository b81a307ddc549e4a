//! Stock QEMU as an Endophyte VMM, driven over QMP only (no patches, no agent in QEMU).
//!
//! - [`qmp`]: the QMP client (commands with ids, events, file descriptors with `getfd`).
//! - [`stream`]: QEMU's migration stream: a sans-IO parser and a writer.
//! - [`state`]: a QEMU VM's state as replication carries it (the stream's header, RAM section start and
//!   device tail).
//! - [`layout`]: where the VM's RAM blocks lie in its replica.
//! - [`source`]: a running QEMU as a replication source: one background snapshot (or pre-copy, cut with
//!   `stop`) per epoch.
//! - [`export`]: a replica as a plain migration stream file or a libvirt save image.
//! - [`launch`]: a replica started as a new QEMU (`-incoming defer`, the stream rebuilt from the replica)
//!   on a backup, for a switchover or a promote.
//!
//! `docs/qemu.md` says how it works, what it needs from QEMU and the host, and what it measured.

pub mod export;
pub mod launch;
pub mod layout;
pub mod qmp;
pub mod source;
pub mod state;
pub mod stream;

pub use launch::feed::rebuild;
pub use launch::QemuLauncher;
pub use source::{EpochMode, QemuSource};
pub use state::QemuState;
