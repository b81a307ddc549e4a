//! Endophyte's replication engine: everything behind the `endophyte` binary but its command line. It
//! drives VMMs only through [`endophyte_vmm`]'s traits and speaks the sans-IO protocol of
//! [`endophyte_wire`].
//!
//! - [`primary`]: the sidecar on the VM's node: the epoch cycle, the path driver, throttling, the
//!   migration source, its control API and report (`endophyte sidecar`).
//! - [`backup`]: the backup node: paths in, one replica per VM, the migration target and promote
//!   (`endophyte backup`); [`store`]: the replica's files (journal, apply, checkpoint); [`fence`]: the
//!   fence record on disk.
//! - [`services`]: the versioned gRPC API through which other subsystems take part (docs/services.md).
//! - [`relay`]: UDP relays that add paths without decrypting them (`endophyte relay`).
//! - [`tls`]: network CAs and node certificates (`endophyte certs`), mutual TLS configuration.
//! - [`transport`]: QUIC paths carrying the frames of [`endophyte_wire`].
//! - [`config`]: the sidecar's TOML configuration.
//! - [`throttle`]: the controller that turns measured pressure into a vCPU throttle along a curve, and
//!   LAN/WAN tuning.
//! - [`metrics`]: Prometheus exposition (`GET /metrics`) shared by the sidecar and the backup.
//! - [`control`]: the control API's transport, shapes and tables; [`migrate`]: a migration's request,
//!   status and report, and the CLI's client for it.
//!
//! `docs/architecture.md` has the module map and the data path of one epoch and one switchover.

pub use endophyte_authority::{self as authority, AuthorityConfig};

pub mod backup;
pub mod config;
pub mod control;
pub mod fence;
pub mod metrics;
pub mod migrate;
pub mod primary;
pub mod relay;
pub mod services;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod transport;

/// A random u64 from the OS (through std's hash seed, mixed with the clock): sessions, instances, keys.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
