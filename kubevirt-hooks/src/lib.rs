//! KubeVirt integration: the hook sidecar and plugin servers that attach an Endophyte sidecar to a VM.
//!
//! - [`domain`]: the domain XML mutation (an extra QMP monitor through `<qemu:commandline>`);
//! - [`vmi`]: the VM's Endophyte settings, from the VMI's `endophyte.io/*` annotations;
//! - [`supervisor`]: runs `endophyte sidecar` against QEMU's monitor once it appears, stops it at Shutdown;
//! - [`server`]: the gRPC services virt-launcher calls (hook Info and Callbacks, plugin MutateDomain);
//! - [`collector`]: virt-launcher's side of the protocol (for tests and operators);
//! - [`proto`]: their messages, generated from `proto/`.
pub mod collector;
pub mod domain;
pub mod proto;
pub mod server;
pub mod supervisor;
pub mod vmi;
