//! The VMM boundary: everything the replication engine needs from a VMM, and nothing it does not.
//!
//! The engine (crate `endophyte-engine`) never names a VMM. It drives a source VMM through
//! [`SourceVmm`] and starts VMs on a backup through a [`Launcher`]; each VMM kind implements both. Two kinds
//! of source fit the trait:
//!
//! - one with an **incremental dirty log** ([`DirtyLog`]): the engine harvests the pages written since the
//!   last harvest and reads them from guest RAM it maps (testvm, or any VMM linking the attach agent: the
//!   KVM dirty bitmap or ring);
//! - one that can only hand over a **consistent full snapshot** per epoch ([`Snapshots`]): every page as of
//!   one instant, streamed; the engine keeps a hash per page and ships only the pages that changed (stock
//!   QEMU's background snapshot, whose dirty log stays inside QEMU).
//!
//! What else a VMM can do is declared in [`Capabilities`], and the engine adapts: no throttle means the
//! emergency policy alone handles a guest that outruns the network, no output hold means guest output is
//! not held back until its epoch is durable. Calling something a VMM declared it cannot do is an error
//! ([`VmmError::Unsupported`]), never a silent no-op.
//!
//! vCPU and device state is a [`VmState`]: bytes with a format tag and version that only the VMM kind that
//! saved them opens; replication carries them untouched.
//!
//! Implementations: [`attach`] (the attach protocol: testvm, both source and launcher).

pub mod attach;

use std::path::Path;
use std::time::Duration;

pub use endophyte_attach::bitmap::DirtyBitmap;
pub use endophyte_wire::VmState;

/// Errors at the VMM boundary. Each names the VMM operation and what the VMM said.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM cannot do this (it said so in its [`Capabilities`]).
    #[error("{vmm} cannot {what}")]
    Unsupported {
        /// The VMM, as [`SourceVmm::name`] gives it.
        vmm: String,
        /// What was asked.
        what: &'static str,
    },
    /// The VMM refused or failed the operation.
    #[error("{op}: {message}")]
    Failed {
        /// The operation.
        op: &'static str,
        /// What the VMM said.
        message: String,
    },
    /// Starting, reaching or watching the VMM's process failed.
    #[error("{op}: {source}")]
    Process {
        /// What was being done.
        op: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A VM state of a format this VMM kind does not read.
    #[error("the VM state is of format {found:?} version {version}; {vmm} restores {expected:?}")]
    StateFormat {
        /// The VMM kind.
        vmm: String,
        /// The format it reads.
        expected: &'static str,
        /// The format found.
        found: String,
        /// Its version.
        version: u32,
    },
    /// A snapshot was cut short by its consumer (the engine stopping, a send failing).
    #[error("snapshot abandoned: {0}")]
    Abandoned(String),
    /// The VMM's run guard tripped: it paused the guest because this sidecar was silent or away
    /// ([`SourceVmm::arm_guard`]).
    #[error("the VMM's run guard tripped: {0}")]
    GuardTripped(String),
}

/// A guest RAM region in the replica's address space (for a VMM with one flat guest address space, its
/// guest physical addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte's address.
    pub addr: u64,
    /// Size in bytes, a multiple of the page size.
    pub size_bytes: u64,
}

/// The shape of guest RAM as replicated: page size and regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Page size in bytes: the unit of dirty tracking and of replication (the host's).
    pub page_size: u64,
    /// Regions, in address order, not overlapping.
    pub regions: Vec<Region>,
}

impl Geometry {
    /// Bytes from address 0 to the end of the last region: the replica file's size.
    pub fn mem_bytes(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.addr + r.size_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Pages up to [`Geometry::mem_bytes`].
    pub fn pages(&self) -> u64 {
        self.mem_bytes() / self.page_size.max(1)
    }
}

/// How a source VMM tells the engine what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// An incremental dirty log and random access to guest RAM: [`SourceVmm::dirty_log`].
    DirtyLog,
    /// One consistent snapshot of all of guest RAM per epoch: [`SourceVmm::snapshots`].
    FullSnapshot,
}

/// What a source VMM can do beyond pause, resume and saving its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// How changed pages are found.
    pub tracking: Tracking,
    /// [`SourceVmm::set_throttle`] works.
    pub throttle: bool,
    /// [`SourceVmm::hold_output`] works (output commit).
    pub output_hold: bool,
    /// [`SourceVmm::ram_hash`] works (verification in tests and the demo).
    pub ram_hash: bool,
    /// [`Snapshots::snapshot_into_pause`] works: the switchover's final snapshot streams while the guest
    /// runs and the VMM pauses it only for the last changes (QEMU's pre-copy). Otherwise the engine pauses
    /// the VM first and the whole snapshot is downtime.
    pub pause_in_snapshot: bool,
}

/// Pages written since the previous harvest, held until released.
#[derive(Debug)]
pub struct Harvest {
    /// Sequence number to release it with.
    pub seq: u64,
    /// One bitmap per region, in [`Geometry::regions`] order.
    pub bitmaps: Vec<DirtyBitmap>,
    /// Guest output produced since the previous harvest while output is held ([`SourceVmm::hold_output`]).
    pub output: Vec<u8>,
}

/// A source VMM with an incremental dirty log.
pub trait DirtyLog: Sync {
    /// Starts tracking writes; only writes from now on are reported.
    ///
    /// # Errors
    /// The VMM refused (another consumer owns its log, say).
    fn start(&self) -> Result<(), VmmError>;
    /// Stops tracking writes.
    ///
    /// # Errors
    /// The VMM refused.
    fn stop(&self) -> Result<(), VmmError>;
    /// Takes the pages written since the last harvest. While paused, the harvest is exact.
    ///
    /// # Errors
    /// The VMM failed; the pages stay in its log.
    fn harvest(&self) -> Result<Harvest, VmmError>;
    /// Releases harvest `seq`: `consumed = false` puts its pages back, so that the next harvest reports them
    /// again (a harvest whose pages could not be staged or sent must never lose them).
    ///
    /// # Errors
    /// The VMM failed.
    fn release(&self, seq: u64, consumed: bool) -> Result<(), VmmError>;
    /// Copies guest RAM at `addr` into `buf`. May be called from several threads at once.
    ///
    /// # Errors
    /// The range is outside guest RAM.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmmError>;
}

/// One page of a snapshot: its address and its bytes, `None` for a page of zeroes.
pub type SnapshotPage<'a> = (u64, Option<&'a [u8]>);

/// What a snapshot's cut yields besides its pages.
#[derive(Debug)]
pub struct SnapshotCut {
    /// vCPU and device state at the cut.
    pub state: VmState,
    /// How long the guest stood still for the cut.
    pub pause: Duration,
    /// BLAKE3 of guest RAM at the cut, hex ([`SourceVmm::ram_hash`]'s), when asked for (tests and the
    /// demo) and the VMM can give one of the cut's instant: one whose snapshot runs on with the guest
    /// gives `None` unless the VM was paused.
    pub ram_hash: Option<String>,
    /// When the guest stopped, for a snapshot that left it paused ([`Snapshots::snapshot_into_pause`]).
    pub paused_at: Option<std::time::Instant>,
}

/// A source VMM that hands over one consistent snapshot of all of guest RAM per call.
pub trait Snapshots: Sync {
    /// Why no snapshot can be taken now, if so (another migration of the VM is under way, say): the engine
    /// waits and says why in its status. Transient by nature; permanent refusals are errors of
    /// [`Snapshots::snapshot`].
    fn busy(&self) -> Option<String> {
        None
    }

    /// Takes a snapshot: every page as of one instant goes to `sink`, in any order; a page may come more
    /// than once, and then its last copy is the one of the snapshot's instant. When the VM is paused at the
    /// call it stays paused; otherwise it runs on (the VMM may pause it briefly for the cut, reported in
    /// [`SnapshotCut::pause`]).
    ///
    /// # Errors
    /// The VMM failed, or `sink` returned an error ([`VmmError::Abandoned`]).
    fn snapshot(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        ram_hash: bool,
    ) -> Result<SnapshotCut, VmmError>;

    /// The switchover's final snapshot, with [`Capabilities::pause_in_snapshot`]: as
    /// [`Snapshots::snapshot`] of a running VM, but the VMM pauses the guest for the last changes and
    /// it stays paused, from [`SnapshotCut::paused_at`] on; [`SourceVmm::resume`] resumes it.
    ///
    /// # Errors
    /// [`VmmError::Unsupported`] without the capability (the default); as [`Snapshots::snapshot`].
    fn snapshot_into_pause(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        ram_hash: bool,
    ) -> Result<SnapshotCut, VmmError> {
        let _ = (sink, ram_hash);
        Err(VmmError::Unsupported {
            vmm: "this VMM".into(),
            what: "pause the guest inside a snapshot",
        })
    }
}

/// A VMM running the guest to replicate. See the module docs.
pub trait SourceVmm: Send + Sync {
    /// The VMM, for messages: kind, version, how it is reached.
    fn name(&self) -> &str;
    /// Guest RAM's shape.
    fn geometry(&self) -> &Geometry;
    /// What it can do.
    fn capabilities(&self) -> Capabilities;
    /// Its dirty log, when [`Capabilities::tracking`] is [`Tracking::DirtyLog`].
    fn dirty_log(&self) -> Option<&dyn DirtyLog>;
    /// Its snapshots, when [`Capabilities::tracking`] is [`Tracking::FullSnapshot`].
    fn snapshots(&self) -> Option<&dyn Snapshots>;
    /// Stops every vCPU; returns how long that took in the VMM.
    ///
    /// # Errors
    /// The VMM failed.
    fn pause(&self) -> Result<Duration, VmmError>;
    /// Lets the vCPUs run.
    ///
    /// # Errors
    /// The VMM failed.
    fn resume(&self) -> Result<(), VmmError>;
    /// vCPU and device state (paused only).
    ///
    /// # Errors
    /// The VMM failed, or it runs.
    fn save_state(&self) -> Result<VmState, VmmError>;
    /// Makes each vCPU sleep `fraction` (0..=0.99) of its time.
    ///
    /// # Errors
    /// [`VmmError::Unsupported`] without [`Capabilities::throttle`].
    fn set_throttle(&self, fraction: f64) -> Result<(), VmmError>;
    /// Holds guest output for [`Harvest::output`] (`true`), or lets it flow again, releasing what is held
    /// (`false`).
    ///
    /// # Errors
    /// [`VmmError::Unsupported`] without [`Capabilities::output_hold`].
    fn hold_output(&self, hold: bool) -> Result<(), VmmError>;
    /// BLAKE3 of guest RAM computed by the VMM, hex (paused only). What "guest RAM" covers is the VMM
    /// kind's: all of it for testvm; for QEMU the main RAM block as its physical view shows it, legacy
    /// window zeroed (`endophyte_qemu::source::pmem_hash`).
    ///
    /// # Errors
    /// [`VmmError::Unsupported`] without [`Capabilities::ram_hash`]; the VMM failed.
    fn ram_hash(&self) -> Result<String, VmmError>;
    /// Stops the VM and the VMM for good (the VM runs elsewhere now).
    ///
    /// # Errors
    /// The VMM failed.
    fn shutdown(&self) -> Result<(), VmmError>;

    /// Arms the VMM's run guard (fail closed): the VMM pauses the guest by itself once this sidecar
    /// sends nothing for `timeout` ([`SourceVmm::keep_alive`]) or goes away, and resumes it only for a
    /// sidecar that arms the guard again. `generation` is the VM's generation this sidecar holds. Returns
    /// `false` for a VMM without a guard (the default), which a dead sidecar leaves running.
    ///
    /// # Errors
    /// The VMM refused (another sidecar guards the guest) or failed.
    fn arm_guard(&self, timeout: Duration, generation: u64) -> Result<bool, VmmError> {
        let _ = (timeout, generation);
        Ok(false)
    }

    /// Proof of life for an armed guard.
    ///
    /// # Errors
    /// The guard tripped (the guest was paused; the message says why) or the VMM failed.
    fn keep_alive(&self) -> Result<(), VmmError> {
        Ok(())
    }

    /// Disarms the guard: the guest is left as it is when this sidecar goes (a clean stop without an
    /// authority).
    ///
    /// # Errors
    /// The VMM failed.
    fn disarm_guard(&self) -> Result<(), VmmError> {
        Ok(())
    }
}

/// A VMM process a backup started for a switchover or a promote: it first holds no VM, then the restored
/// VM, paused, then the running VM.
pub trait TargetVm: Send {
    /// Its process id (recorded in the fence before any VM exists in it).
    fn pid(&self) -> u32;
    /// Where tools reach it (its control socket), for status output.
    fn endpoint(&self) -> String;
    /// Starts the VM from `state` on the replica file `replica`, used as guest RAM in place (not
    /// copied), paused.
    ///
    /// # Errors
    /// [`VmmError::StateFormat`] for a state of another VMM kind; the VMM refused or failed.
    fn restore(&mut self, replica: &Path, state: &VmState) -> Result<(), VmmError>;
    /// Loads the replica file `replica` (holding the committed epoch whose state is `state`) ahead of a
    /// switchover, in the background; from then on [`TargetVm::replica_changed`] passes on what epochs
    /// rewrite, and [`TargetVm::restore`] carries only the rest. Returns whether it does: the default
    /// does nothing and returns `false` (its restore loads everything).
    ///
    /// # Errors
    /// The VMM refused or failed; the engine then stops this VMM and launches another for the switchover.
    fn preload(&mut self, replica: &Path, state: &VmState) -> Result<bool, VmmError> {
        let _ = (replica, state);
        Ok(false)
    }
    /// Whether [`TargetVm::preload`]'s loading still runs (`Ok(true)`); `Ok(false)` once it is done, or
    /// when none runs (the default).
    ///
    /// # Errors
    /// The preload failed.
    fn loading(&mut self) -> Result<bool, VmmError> {
        Ok(false)
    }
    /// A committed epoch rewrote these pages of the replica (guest addresses, page-aligned) since
    /// [`TargetVm::preload`]. The default ignores them.
    ///
    /// # Errors
    /// As [`TargetVm::preload`].
    fn replica_changed(&mut self, pages: &[u64]) -> Result<(), VmmError> {
        let _ = pages;
        Ok(())
    }
    /// BLAKE3 of guest RAM of the restored VM, hex (it is paused).
    ///
    /// # Errors
    /// The VMM failed.
    fn ram_hash(&mut self) -> Result<String, VmmError>;
    /// Lets the restored VM run.
    ///
    /// # Errors
    /// The VMM failed.
    fn resume(&mut self) -> Result<(), VmmError>;
    /// Whether the process has exited (reaped if so).
    fn exited(&mut self) -> bool;
    /// Kills the process and reaps it.
    fn stop(&mut self);
}

/// Splits a VMM command line into words with POSIX shell quoting (blanks separate words; quotes and
/// backslashes as in sh; no expansion), for the [`Launcher`]s configured with one.
///
/// # Errors
/// [`VmmError::Failed`] naming the line, for unbalanced quotes or a trailing backslash.
pub fn command_words(line: &str) -> Result<Vec<String>, VmmError> {
    shell_words::split(line).map_err(|e| VmmError::Failed {
        op: "parsing the target VMM command line",
        message: format!("{line:?}: {e}"),
    })
}

/// How a backup starts VMMs for this VMM kind.
pub trait Launcher: Send + Sync {
    /// The kind and command, for messages.
    fn name(&self) -> String;
    /// Starts a VMM with no VM, its sockets in `vm_dir`, and waits until it answers.
    ///
    /// # Errors
    /// The process did not start or never answered (the error says which and how long it waited).
    fn launch(&self, vm_dir: &Path) -> Result<Box<dyn TargetVm>, VmmError>;
}
