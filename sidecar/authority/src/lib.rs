//! Endophyte's fencing authority client: who may run a VM, kept in an existing coordination service
//! (etcd v3), never in Endophyte's own files.
//!
//! The protocol's decisions are sans-IO in [`endophyte_wire::authority`]: what a claim, a promote and a
//! migration's hand-over write, as compare-and-set plans, and the holder's [`HoldKeeper`] that fences
//! the guest before its lease can have expired at the server. This crate sends those plans:
//!
//! - [`Authority`]: the five calls the plans need (observe, grant, keep alive, apply, revoke), and
//!   [`EtcdAuthority`], their implementation on etcd v3 (the `etcd-client` crate). docs/fencing.md
//!   maps the same calls onto a Kubernetes `coordination.k8s.io` Lease.
//! - [`claim`], [`promote`], [`hand_over`]: one act each, retried over transient errors, refused with
//!   the holder and generation named.
//! - [`Hold`]: a claimed hold kept alive by a task that drives a [`HoldKeeper`] and tells a
//!   [`Fencer`] when the guest must stop and when it may run again.
//!
//! - [`local`]: a single-member etcd on loopback, for tests and the demo.
//!
//! [`HoldKeeper`]: endophyte_wire::authority::HoldKeeper

pub mod clock;
mod config;
mod error;
mod etcd;
mod hold;
pub mod local;
mod ops;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use config::AuthorityConfig;
pub use endophyte_wire::authority::{Observed, Record, RecordState, Refusal, TxnPlan};
pub use error::AuthorityError;
pub use etcd::EtcdAuthority;
pub use hold::{Fencer, Hold, HoldStatus};
pub use ops::{claim, hand_over, promote, Claimed};

/// A boxed future, for the object-safe [`Authority`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The calls the authority's plans need. Every call is bounded in time by the implementation; a timeout
/// is a transient [`AuthorityError`].
pub trait Authority: Send + Sync {
    /// Where the authority is, for logs and status (`etcd http://127.0.0.1:2379`).
    fn describe(&self) -> String;

    /// Reads VM `vm`'s record and lease key at one revision, with what is left of the lease.
    fn observe<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<Observed, AuthorityError>>;

    /// Grants a lease of `ttl` (rounded up to whole seconds) to this node; returns its id.
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<i64, AuthorityError>>;

    /// Renews lease `lease`; returns the TTL the server renewed it to (zero: the lease is gone).
    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<Duration, AuthorityError>>;

    /// Applies `plan` for VM `vm` on behalf of `node`, whose own lease is `lease`; returns whether the
    /// compares held (and so whether the writes landed).
    fn apply<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        plan: &'a TxnPlan,
        lease: i64,
    ) -> BoxFuture<'a, Result<bool, AuthorityError>>;

    /// Revokes lease `lease` (its keys go at once).
    fn revoke(&self, lease: i64) -> BoxFuture<'_, Result<(), AuthorityError>>;
}
