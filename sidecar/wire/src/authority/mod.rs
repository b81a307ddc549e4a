//! The fencing authority, sans-IO: who may run a VM, decided by an external coordination service (etcd
//! v3), and the primary's hold on it.
//!
//! Per VM the authority keeps two keys (docs/fencing.md has the argument in full):
//!
//! - the **record** (`.../vms/<vm>/record`): `{generation, holder, state}`, the VM's fencing token and the
//!   node allowed to run it. It is changed only by transactions that compare its revision, so of two
//!   concurrent changes exactly one lands ([`decide`] plans them; the engine's authority client sends them).
//! - the **lease key** (`.../vms/<vm>/lease`): attached to the holder's lease (an etcd lease with a TTL),
//!   so it disappears when the holder stops renewing it, measured at the etcd server. A promote is
//!   allowed only while the lease key is absent; it replaces the record (`g -> g+1`, naming the promoting
//!   node) and puts a lease key of its own in the same transaction.
//!
//! The holder's side is [`HoldKeeper`]: it asks for keep-alives and fences the guest before the lease
//! can have expired at the server (as in Patroni's leader key with a TTL, and Chubby's sequencers, the
//! generation travels as a fencing token). Time is [`BootInstant`], a reading of `CLOCK_BOOTTIME`
//! passed in by the caller: unlike `CLOCK_MONOTONIC`, it keeps counting while the machine is suspended,
//! so a primary that wakes from a suspend sees its hold as expired.
//!
//! Nothing here does I/O or reads a clock.

mod decide;
mod hold;

pub use decide::{
    claim, hand_over, promote, settle_promote, ClaimPlan, LeaseKeyOp, Observed, Refusal, TxnPlan,
};
pub use hold::{HoldAction, HoldKeeper, HoldTiming, TimingError};

use std::time::Duration;

/// A reading of the node's `CLOCK_BOOTTIME` (time since boot, suspend included), passed in by the caller.
///
/// Only differences of two readings on the same node mean anything; nodes never compare theirs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// The reading `since_boot` after boot.
    pub fn from_since_boot(since_boot: Duration) -> Self {
        Self(since_boot)
    }

    /// Time since boot.
    pub fn since_boot(self) -> Duration {
        self.0
    }

    /// `self - earlier`, zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0 + d)
    }
}

impl std::ops::Sub<Duration> for BootInstant {
    type Output = BootInstant;
    fn sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d))
    }
}

/// What a VM's record says of its holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordState {
    /// The holder runs the VM (or may: a primary, or a backup that promoted it).
    Running,
    /// A migration's source handed the generation to the holder (the switchover's commit point); the
    /// holder has not yet put a lease key of its own. The source's lease still guards it until then.
    Handover,
}

impl RecordState {
    /// The name in the record's JSON and in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Handover => "handover",
        }
    }

    /// Parses [`RecordState::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "handover" => Some(Self::Handover),
            _ => None,
        }
    }
}

impl std::fmt::Display for RecordState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM's record at the authority: its generation (the fencing token) and the one node allowed to run it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    /// The VM's generation. Every promote and migration raises it by one.
    pub generation: u64,
    /// The node (its certificate's name) that may run the VM under `generation`.
    pub holder: String,
    /// See [`RecordState`].
    pub state: RecordState,
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation {} held by {:?} ({})",
            self.generation, self.holder, self.state
        )
    }
}

/// The lease key's value: which node's lease guards the record, for which generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseView {
    /// The node whose lease the key is attached to.
    pub node: String,
    /// The generation that lease guards.
    pub generation: u64,
    /// The etcd lease's id.
    pub lease_id: i64,
    /// What the server says is left of it (`None` when not asked).
    pub remaining: Option<Duration>,
}
