//! testvm: a tiny KVM VMM and the guest workload programs that Endophyte's tests, demo and bench run.
//!
//! - [`guest`]: the guest program (x86-64 assembly built into this crate) and the records it shares with
//!   the VMM: config block, per-vCPU status records, per-vCPU log rings.
//! - [`layout`]: the guest physical memory map, page tables, GDT/IDT, workload descriptions.
//! - [`memory`]: guest RAM in a memfd or a file, mapped shared.
//! - [`dirty`]: KVM dirty tracking (bitmap with manual protect, and the dirty ring).
//! - [`vcpu`], [`vm`]: vCPU threads and the VM (pause/resume, throttle, harvest, hashing, save/restore).
//! - [`agent`]: the VMM side of the attach protocol, serving a [`vm::Vm`] to a sidecar.
//! - [`qemu_guest`]: the same hotset workload as a multiboot guest for QEMU.
//! - [`run`]: the `testvm run` driver with its dirty-tracking check against the guest's own log.
//! - [`serve`]: serving a booted or standby VM over the attach protocol, console gated.
//!
//! The host must have `/dev/kvm`. Guests start directly in 64-bit long mode on page tables the VMM builds,
//! which is what runs at full speed under nested KVM (kvm_pvm) as well.

pub mod agent;
pub mod dirty;
pub mod guest;
pub mod layout;
pub mod memory;
pub mod qemu_guest;
pub mod run;
pub mod serve;
pub mod vcpu;
pub mod vm;

pub use dirty::DirtySource;
pub use layout::WorkloadConfig;
pub use vm::{Vm, VmConfig, VmError, VmState};
