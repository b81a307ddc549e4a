//! The switchover: the last step of a two-phase live migration, as two sans-IO state machines.
//!
//! The source's guest is paused and its final epoch is on its way to every backup. Then:
//!
//! ```text
//!  source (SourceSwitchover, inside the Sender)                 target (TargetSwitchover, per VM)
//!     |  ... final epoch's chunks and EpochEnd ...                  |
//!     |<------------------------------------- Committed{final} -----|
//!     |-- Switchover{generation, session, epoch, state} ----------->|  checks generation and replica
//!     |                                                             |  Launch -> RecordFence(prepared)
//!     |                                                             |  -> Restore (paused) [-> HashRam]
//!     |<------------------------------------- SwitchoverReady ------|
//!     |-- SwitchoverCommit{generation} ---------------------------->|  RecordFence(running, durable)
//!     |          (from here the source never resumes)               |  -> Resume
//!     |<------------------------------------- SwitchedOver ---------|
//!  source VM stopped for good                                 the VM runs here
//! ```
//!
//! Safety rests on one rule: the target resumes a guest only on the commit, and only after recording
//! `running` durably. So every failure before the commit (a refusal, a timeout, lost paths, a target that
//! died) is undone by resuming the source, after telling the target to drop what it prepared
//! (`SwitchoverAbort`, which it also does by itself after a minute, or on restart). After the commit the
//! source resumes only if the target says it gave the generation up (`Error` with
//! [`crate::ErrorCode::SwitchoverFailed`]); any other silence leaves the guest paused (in doubt: it may run
//! there), which is safe, where two running copies would not be.
//!
//! Both machines are deterministic and take `now` from the caller: [`source::SourceSwitchover`] is driven
//! by the [`crate::Sender`] (its messages go out through the sender's paths like everything else), and
//! [`target::TargetSwitchover`] by the backup, which executes its [`target::TargetAction`]s against a VMM.

pub mod source;
pub mod target;

pub use source::{
    AuthorityVerdict, SourcePhase, SourceSwitchover, SourceTimeline, SwitchoverOutcome, Timeouts,
};
pub use target::{Origin, TargetAction, TargetEvent, TargetSwitchover};

/// Where a VM stands on one node, as its fence record says (`fence.json` on a backup).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FenceState {
    /// Nothing was ever prepared or run here; the node is a backup.
    #[default]
    None,
    /// A switchover (or promote) of `generation` prepared the VM here, paused; it has not run.
    Prepared,
    /// The VM runs here under `generation`: its replica file is the running VM's RAM.
    Running,
    /// `generation` was given up here and never starts here.
    Aborted,
    /// The VM ran here under `generation` and its VMM exited (it migrated away or stopped): the node is a
    /// backup again.
    Departed,
}

impl FenceState {
    /// The name used in fence records and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Prepared => "prepared",
            Self::Running => "running",
            Self::Aborted => "aborted",
            Self::Departed => "departed",
        }
    }

    /// Parses [`FenceState::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "prepared" => Self::Prepared,
            "running" => Self::Running,
            "aborted" => Self::Aborted,
            "departed" => Self::Departed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for FenceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM's fence on one node: the highest generation seen there and what it means. The generation is the
/// fencing token of the VM: a node never starts a generation at or below the one it recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fence {
    /// Highest generation seen for this VM here.
    pub generation: u64,
    /// What `generation` is here.
    pub state: FenceState,
    /// Epoch the VM started from (prepared or running).
    pub epoch: u64,
    /// Sidecar session of that epoch.
    pub session: u64,
    /// Process id of the VMM holding the prepared or running VM (0: none).
    pub vmm_pid: u32,
}

impl Fence {
    /// Whether replication into this VM's replica is refused here (it is prepared or runs here).
    pub fn holds_vm(&self) -> bool {
        matches!(self.state, FenceState::Prepared | FenceState::Running)
    }
}
