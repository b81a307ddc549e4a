//! Endophyte's demonstrations and test fixtures, kept out of the engine: nothing here is production
//! code, and the engine does not depend on it (nor on testvm).
//!
//! - [`replicate`]: `endophyte demo replicate`, a replicated guest on loopback with its replicas checked.
//! - [`migrate`]: `endophyte demo migrate` (and `endophyte demo`), replication then a live migration.
//! - [`qemu`]: `endophyte demo qemu`, a QEMU/KVM guest replicated, migrated and promoted.
//! - [`services`]: `endophyte demo services`, the example key-value service riding along with a
//!   replicated, migrated and promoted guest.
//! - [`cluster`]: the processes they start: backups, relays, a testvm VMM.
//! - [`serve`]: `endophyte testvm-serve`, the testvm VMM the demo, the tests and the bench run.
//! - [`probe`]: checks on evidence from outside the code under test: the guest's own counter, file
//!   hashes, a replica's checkpoint on disk.

pub mod cluster;
pub mod migrate;
pub mod probe;
pub mod qemu;
pub mod replicate;
pub mod serve;
pub mod services;

/// The example key-value service (`examples/kv-service`), run as `endophyte example-kv` by the demo
/// and the tests.
pub use endophyte_kv_service as kv;

/// Output format of a demo.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    /// Human-readable summary.
    Text,
    /// One JSON object.
    Json,
}
