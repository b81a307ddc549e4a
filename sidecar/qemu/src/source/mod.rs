//! A running QEMU as a replication source ([`SourceVmm`] with [`Snapshots`]), over QMP only.
//!
//! Each epoch is one migration of the VM into a socket pair whose other end this process reads (`getfd`,
//! then `migrate fd:`), parsed as it arrives ([`crate::stream`]):
//!
//! - **background snapshot** (capability `background-snapshot`, QEMU >= 6.0 with userfaultfd): QEMU stops
//!   the VM, saves its device state, write-protects guest RAM, resumes it, and streams RAM as of the stop;
//!   the guest stands still only for the stop (QEMU's `downtime`);
//! - **pre-copy** where QEMU refuses background snapshots (no userfaultfd for it, a memory backend it
//!   cannot write-protect): an ordinary migration streams RAM while the guest runs; once every page went
//!   once the sidecar stops the VM, QEMU sends what changed meanwhile and the device state, and the
//!   sidecar resumes it (`cont`). The guest stands still for that last dirty set. Chosen at connect,
//!   reported in [`QemuSource::mode`].
//!
//! A VM paused at the call (a switchover's final epoch) gets an ordinary migration, which leaves it paused
//! (a background snapshot would resume it). Capabilities and parameters this sidecar changes for an epoch
//! are set back after it; while someone else's migration of the VM runs (libvirt's, KubeVirt's), epochs
//! wait ([`Snapshots::busy`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use endophyte_vmm::{
    Capabilities, DirtyLog, Geometry, SnapshotCut, SnapshotPage, Snapshots, SourceVmm, Tracking,
    VmState, VmmError,
};
use serde_json::Value;

use crate::layout::RamLayout;
use crate::qmp::{CapabilityState, MigrationInfo, QemuVersion, Qmp, QmpError, StatusInfo};
use crate::stream::TARGET_PAGE_SIZE;

mod epoch;
pub mod hash;

use epoch::set_capability;
pub use hash::{masked_ram_hash, pmem_hash, LEGACY_WINDOW, MAX_HASHED_RAM};

/// Oldest QEMU supported: background snapshots came with 6.0.
pub const MIN_VERSION: QemuVersion = QemuVersion {
    major: 6,
    minor: 0,
    micro: 0,
};
/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// The fd name this sidecar gives QEMU for an epoch's stream.
const FD_NAME: &str = "endophyte-epoch";
/// Capabilities QEMU refuses with a background snapshot (QEMU's `check_caps_background_snapshot`), and
/// that also change the stream in ways this parser does not read.
const INCOMPATIBLE: &[&str] = &[
    "postcopy-ram",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "return-path",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "release-ram",
    "rdma-pin-all",
    "compress",
    "xbzrle",
    "x-colo",
    "validate-uuid",
    "zero-copy-send",
    "x-ignore-shared",
];

/// How epochs are taken from this QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpochMode {
    /// Background snapshots.
    BackgroundSnapshot,
    /// Pre-copy cut with `stop`, because QEMU refused background snapshots; QEMU's reason.
    PreCopy {
        /// Why background snapshots were refused.
        why: String,
    },
}

pub(crate) fn qmp_err(op: &'static str) -> impl FnOnce(QmpError) -> VmmError {
    move |e| VmmError::Failed {
        op,
        message: e.to_string(),
    }
}

/// A QEMU reached through one of its QMP monitors. See the module docs.
pub struct QemuSource {
    qmp: Mutex<Qmp>,
    name: String,
    layout: RamLayout,
    geometry: Geometry,
    mode: EpochMode,
    version: QemuVersion,
    paused: AtomicBool,
    /// Set when a pre-copy epoch found the VM stopped by someone else at its cut.
    stopped_by_other: AtomicBool,
    /// A pre-copy epoch left the VM stopped (postmigrate) for someone else who stopped it meanwhile.
    left_stopped: AtomicBool,
    tmp: PathBuf,
}

impl QemuSource {
    /// Connects to the QMP monitor at `path` and checks what this QEMU can do: its version, that nothing
    /// blocks its migration (a VFIO device, say), that no capability incompatible with replication is on,
    /// and whether it takes background snapshots (else pre-copy, with QEMU's reason kept in
    /// [`QemuSource::mode`]). Scratch files (RAM dumps for verification) go under `tmp`.
    ///
    /// # Errors
    /// The monitor is not reachable; QEMU is too old, blocks migration, or has an incompatible capability
    /// on; its RAM layout cannot be read. Each message says what is missing.
    pub fn connect(path: &Path, tmp: &Path) -> Result<Self, VmmError> {
        let mut q =
            Qmp::connect(path, QMP_TIMEOUT).map_err(qmp_err("attaching to QEMU's monitor"))?;
        let version = q.version();
        let name = format!("QEMU {version} ({}, QMP {})", q.package(), path.display());
        if version < MIN_VERSION {
            return Err(VmmError::Unsupported {
                vmm: name,
                what: "take background snapshots (QEMU 6.0 or later is needed)",
            });
        }
        // SAFETY: sysconf has no preconditions.
        let host_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if host_page != TARGET_PAGE_SIZE {
            return Err(VmmError::Failed {
                op: "checking QEMU",
                message: format!("host pages of {host_page} bytes; replicating QEMU's 4 KiB target pages needs 4 KiB host pages"),
            });
        }
        let mig: MigrationInfo = q.query("query-migrate").map_err(qmp_err("checking QEMU"))?;
        if let Some(reasons) = mig.blocked_reasons.as_ref().filter(|r| !r.is_empty()) {
            return Err(VmmError::Failed {
                op: "checking QEMU",
                message: format!(
                    "{name} cannot migrate this VM, so it cannot be replicated: {}",
                    reasons.join("; ")
                ),
            });
        }
        let caps: Vec<CapabilityState> = q
            .query("query-migrate-capabilities")
            .map_err(qmp_err("checking QEMU"))?;
        let on: Vec<&str> = caps
            .iter()
            .filter(|c| c.state && INCOMPATIBLE.contains(&c.capability.as_str()))
            .map(|c| c.capability.as_str())
            .collect();
        if !on.is_empty() {
            return Err(VmmError::Failed {
                op: "checking QEMU",
                message: format!(
                    "{name} has migration capabilities on that replication cannot work with: {} (turn them off with migrate-set-capabilities)",
                    on.join(", ")
                ),
            });
        }
        if !caps.iter().any(|c| c.capability == "background-snapshot") {
            return Err(VmmError::Unsupported {
                vmm: name,
                what: "take background snapshots (no background-snapshot capability)",
            });
        }
        // Does it take background snapshots here? QEMU checks userfaultfd and the memory backends when the
        // capability is set; it is set back at once.
        let mode = match set_capability(&mut q, "background-snapshot", true) {
            Ok(()) => {
                set_capability(&mut q, "background-snapshot", false)
                    .map_err(qmp_err("setting a capability back"))?;
                EpochMode::BackgroundSnapshot
            }
            Err(QmpError::Command { desc, .. }) => EpochMode::PreCopy { why: desc },
            Err(e) => return Err(qmp_err("checking QEMU")(e)),
        };
        if let EpochMode::PreCopy { why } = &mode {
            tracing::warn!(vmm = %name, "QEMU refuses background snapshots ({why}): epochs are pre-copy migrations cut with stop, which pause the guest for their last dirty set");
        }
        let text = q
            .hmp("info ramblock")
            .map_err(qmp_err("reading QEMU's RAM blocks"))?;
        let layout = RamLayout::from_info_ramblock(&text).map_err(|e| VmmError::Failed {
            op: "reading QEMU's RAM blocks",
            message: e.to_string(),
        })?;
        let name = match &mode {
            EpochMode::BackgroundSnapshot => format!("{name}, epochs from background snapshots"),
            EpochMode::PreCopy { why } => format!(
                "{name}, epochs from pre-copy migrations cut with stop (QEMU refuses background snapshots: {why})"
            ),
        };
        if mig.active() {
            tracing::warn!(vmm = %name, status = ?mig.status, "a migration of this VM is under way; epochs wait for it to end");
        }
        Ok(Self {
            geometry: layout.geometry(),
            layout,
            name,
            mode,
            version,
            paused: AtomicBool::new(false),
            stopped_by_other: AtomicBool::new(false),
            left_stopped: AtomicBool::new(false),
            tmp: tmp.to_owned(),
            qmp: Mutex::new(q),
        })
    }

    /// How epochs are taken.
    pub fn mode(&self) -> &EpochMode {
        &self.mode
    }

    /// The replica's layout of this VM's RAM blocks.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    fn qmp(&self) -> std::sync::MutexGuard<'_, Qmp> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// BLAKE3 of main RAM from QEMU's `pmemsave` ([`hash::pmem_hash`]).
    fn pmem_hash(&self) -> Result<String, VmmError> {
        hash::pmem_hash(&mut self.qmp(), &self.tmp, self.layout.main_ram_bytes())
    }
}

impl SourceVmm for QemuSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            tracking: Tracking::FullSnapshot,
            throttle: false,
            output_hold: false,
            ram_hash: true,
            pause_in_snapshot: true,
        }
    }

    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        None
    }

    fn snapshots(&self) -> Option<&dyn Snapshots> {
        Some(self)
    }

    fn pause(&self) -> Result<Duration, VmmError> {
        let t = Instant::now();
        self.qmp()
            .execute("stop", Value::Null)
            .map_err(qmp_err("pausing the guest"))?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(t.elapsed())
    }

    fn resume(&self) -> Result<(), VmmError> {
        self.qmp()
            .execute("cont", Value::Null)
            .map_err(qmp_err("resuming the guest"))?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn save_state(&self) -> Result<VmState, VmmError> {
        Err(VmmError::Unsupported {
            vmm: self.name.clone(),
            what: "save its state apart from a snapshot",
        })
    }

    fn set_throttle(&self, _fraction: f64) -> Result<(), VmmError> {
        // QEMU's own throttles: cpu-throttle acts only inside its migrations (with auto-converge, which
        // background snapshots refuse); set-vcpu-dirty-limit needs KVM's dirty ring and, measured here
        // (QEMU 7.2 on nested KVM), freezes the vCPU for good. See docs/qemu.md.
        Err(VmmError::Unsupported {
            vmm: self.name.clone(),
            what: "throttle its vCPUs (see docs/qemu.md, throttling)",
        })
    }

    fn hold_output(&self, _hold: bool) -> Result<(), VmmError> {
        Err(VmmError::Unsupported {
            vmm: self.name.clone(),
            what: "hold guest output",
        })
    }

    fn ram_hash(&self) -> Result<String, VmmError> {
        self.pmem_hash()
    }

    fn shutdown(&self) -> Result<(), VmmError> {
        match self.qmp().execute("quit", Value::Null) {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(qmp_err("shutting QEMU down")(e)),
        }
    }
}

impl Snapshots for QemuSource {
    fn busy(&self) -> Option<String> {
        let mut q = self.qmp();
        match q.query::<MigrationInfo>("query-migrate") {
            Ok(m) if m.active() => {
                return Some(format!(
                    "QEMU is migrating this VM (status {}): epochs wait until that migration ends",
                    m.status.unwrap_or_default()
                ))
            }
            Ok(_) => {}
            Err(e) => return Some(format!("QEMU's monitor: {e}")),
        }
        match q.query::<StatusInfo>("query-status") {
            Ok(s) if s.status == "postmigrate" && self.left_stopped.load(Ordering::SeqCst) => {
                Some(format!(
                    "the VM is {}: stopped during an epoch (not by this sidecar), epochs wait until it runs",
                    s.status
                ))
            }
            // QEMU refuses to migrate a VM an earlier migration left stopped until it runs again.
            Ok(s) if matches!(s.status.as_str(), "postmigrate" | "inmigrate" | "prelaunch") => Some(format!(
                "the VM is {} (stopped after a migration, or not started): epochs wait until it runs",
                s.status
            )),
            // Paused by someone else (a user, libvirt): an epoch would either resume it (a background
            // snapshot) or leave it postmigrate, where QEMU refuses their own save or migration. Nothing
            // changes while it is paused; the replica holds the last epoch before.
            Ok(s) if !s.running && !self.paused.load(Ordering::SeqCst) => Some(format!(
                "the VM is {} (not by this sidecar): epochs wait until it runs",
                s.status
            )),
            Ok(_) => {
                self.left_stopped.store(false, Ordering::SeqCst);
                None
            }
            Err(e) => Some(format!("QEMU's monitor: {e}")),
        }
    }

    fn snapshot(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        ram_hash: bool,
    ) -> Result<SnapshotCut, VmmError> {
        self.cut(sink, ram_hash, false)
    }

    fn snapshot_into_pause(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        ram_hash: bool,
    ) -> Result<SnapshotCut, VmmError> {
        self.cut(sink, ram_hash, true)
    }
}

impl QemuSource {
    fn cut(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        ram_hash: bool,
        into_pause: bool,
    ) -> Result<SnapshotCut, VmmError> {
        let (state, pause, paused_at) = self.take(sink, into_pause)?;
        let hash = if ram_hash && self.paused.load(Ordering::SeqCst) {
            Some(self.pmem_hash()?)
        } else {
            None
        };
        Ok(SnapshotCut {
            state: state.to_vm_state(),
            pause,
            ram_hash: hash,
            paused_at,
        })
    }
}
