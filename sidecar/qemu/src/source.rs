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

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use endophyte_vmm::{
    Capabilities, DirtyLog, Geometry, SnapshotCut, SnapshotPage, Snapshots, SourceVmm, Tracking,
    VmState, VmmError,
};
use serde_json::{json, Value};

use crate::layout::RamLayout;
use crate::qmp::{CapabilityState, MigrationInfo, QemuVersion, Qmp, QmpError, StatusInfo};
use crate::state::QemuState;
use crate::stream::parse::Parser;
use crate::stream::{Record, TARGET_PAGE_SIZE};

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

fn qmp_err(op: &'static str) -> impl FnOnce(QmpError) -> VmmError {
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
        let status: StatusInfo = q.query("query-status").map_err(qmp_err("checking QEMU"))?;
        if mig.active() {
            tracing::warn!(vmm = %name, status = ?mig.status, "a migration of this VM is under way; epochs wait for it to end");
        }
        Ok(Self {
            geometry: layout.geometry(),
            layout,
            name,
            mode,
            version,
            paused: AtomicBool::new(!status.running),
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

    /// Runs one migration into this process and feeds its pages to `sink`; returns the state and the
    /// guest's pause, ms (QEMU's downtime).
    fn take(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
    ) -> Result<(QemuState, Duration), VmmError> {
        let was_paused = self.paused.load(Ordering::SeqCst);
        let background = self.mode == EpochMode::BackgroundSnapshot && !was_paused;
        let (ours, theirs) = UnixStream::pair().map_err(|source| VmmError::Process {
            op: "making the epoch's socket pair".into(),
            source,
        })?;
        // What this epoch changes in QEMU, to set back afterwards.
        let mut restore_bandwidth: Option<u64> = None;
        {
            let mut q = self.qmp();
            if background {
                set_capability(&mut q, "background-snapshot", true)
                    .map_err(qmp_err("turning background snapshots on"))?;
            } else {
                // An ordinary migration is rate-limited by default (128 MiB/s); an epoch wants it all.
                let p = q
                    .execute("query-migrate-parameters", Value::Null)
                    .map_err(qmp_err("reading the migration parameters"))?;
                restore_bandwidth = p["max-bandwidth"].as_u64();
                q.execute(
                    "migrate-set-parameters",
                    json!({ "max-bandwidth": u64::MAX >> 12 }),
                )
                .map_err(qmp_err("lifting the migration bandwidth limit"))?;
            }
            let started = q
                .execute_with_fd(
                    "getfd",
                    json!({ "fdname": FD_NAME }),
                    Some(theirs.as_raw_fd()),
                )
                .and_then(|_| q.execute("migrate", json!({ "uri": format!("fd:{FD_NAME}") })));
            drop(theirs);
            if let Err(e) = started {
                self.set_back(&mut q, background, restore_bandwidth);
                return Err(qmp_err("starting the epoch's migration")(e));
            }
        }
        let read = self.read_stream(ours, sink, !background && !was_paused);
        let mut q = self.qmp();
        if read.is_err() {
            let _ = q.execute("migrate_cancel", Value::Null);
        }
        let done = wait_migration(&mut q);
        self.set_back(&mut q, background, restore_bandwidth);
        // An ordinary migration leaves the VM stopped (postmigrate): it runs on unless it was paused.
        if !background && !was_paused {
            q.execute("cont", Value::Null)
                .map_err(qmp_err("resuming the guest after the epoch"))?;
        }
        drop(q);
        let state = read?;
        let info = done?;
        let pause = Duration::from_millis(info.downtime.unwrap_or(0));
        Ok((state, pause))
    }

    fn set_back(&self, q: &mut Qmp, background: bool, bandwidth: Option<u64>) {
        if background {
            if let Err(e) = set_capability(q, "background-snapshot", false) {
                tracing::error!("setting background-snapshot back off: {e}");
            }
        }
        if let Some(b) = bandwidth {
            if let Err(e) = q.execute("migrate-set-parameters", json!({ "max-bandwidth": b })) {
                tracing::error!("setting max-bandwidth back to {b}: {e}");
            }
        }
    }

    /// Reads the stream to its end; with `cut`, stops the VM once every page went once (pre-copy).
    fn read_stream(
        &self,
        mut s: UnixStream,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        cut: bool,
    ) -> Result<QemuState, VmmError> {
        let bad = |e: crate::stream::StreamError| VmmError::Failed {
            op: "reading QEMU's migration stream",
            message: e.to_string(),
        };
        let mut p = Parser::new();
        let mut buf = vec![0u8; 1 << 20];
        let (mut prefix, mut machine, mut ram) = (None, String::new(), None);
        let total_pages = self.geometry.pages();
        let mut pages_seen = 0u64;
        let mut stopped = false;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(VmmError::Process {
                        op: "reading QEMU's migration stream".into(),
                        source,
                    })
                }
            };
            p.push(&buf[..n]);
            while let Some(r) = p.poll().map_err(bad)? {
                match r {
                    Record::Prefix { bytes, machine: m } => {
                        prefix = Some(bytes);
                        machine = m;
                    }
                    Record::RamStart {
                        bytes,
                        section_id,
                        blocks,
                    } => {
                        if !self.layout.matches(&blocks) {
                            return Err(VmmError::Failed {
                                op: "reading QEMU's migration stream",
                                message: format!(
                                    "its RAM blocks {blocks:?} are not the ones QEMU listed at attach ({:?}): memory hot-plugged? restart the sidecar",
                                    self.layout.blocks()
                                ),
                            });
                        }
                        ram = Some((bytes, section_id, blocks));
                    }
                    Record::Page {
                        block,
                        offset,
                        data,
                    } => {
                        let addr = self.layout.addr(block, offset);
                        sink((addr, data.as_deref())).map_err(VmmError::Abandoned)?;
                        pages_seen += 1;
                        if cut && !stopped && pages_seen >= total_pages {
                            // Every page went once: the VM stops, and QEMU sends what changed since.
                            self.qmp()
                                .execute("stop", Value::Null)
                                .map_err(qmp_err("stopping the guest to cut the epoch"))?;
                            stopped = true;
                        }
                    }
                    Record::DeviceTail(_) => {}
                }
            }
        }
        let tail = p.finish().map_err(bad)?;
        let (ram_start, section_id, blocks) = ram.ok_or_else(|| VmmError::Failed {
            op: "reading QEMU's migration stream",
            message: "it has no RAM section".into(),
        })?;
        Ok(QemuState {
            qemu_version: self.version.to_string(),
            machine,
            prefix: prefix.unwrap_or_default(),
            ram_start,
            section_id,
            blocks,
            tail,
        })
    }

    /// BLAKE3 of guest RAM as the guest sees it from address 0 (the main RAM block), from QEMU's own
    /// `pmemsave`, hex. The VM must be paused.
    fn pmem_hash(&self) -> Result<String, VmmError> {
        pmem_hash(&mut self.qmp(), &self.tmp, self.layout.main_ram_bytes())
    }
}

/// BLAKE3 of `bytes` of guest memory from address 0, dumped by QEMU's `pmemsave` into a file under `tmp`
/// (removed after), hex.
///
/// # Errors
/// QEMU refused the dump, or the file could not be read.
pub fn pmem_hash(q: &mut Qmp, tmp: &Path, bytes: u64) -> Result<String, VmmError> {
    let f = tmp.join(format!("endophyte-pmem-{}.bin", std::process::id()));
    q.execute(
        "pmemsave",
        json!({ "val": 0, "size": bytes, "filename": f.display().to_string() }),
    )
    .map_err(qmp_err("dumping guest RAM (pmemsave)"))?;
    let r = (|| {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(&f)?)?;
        Ok::<_, std::io::Error>(h.finalize().to_hex().to_string())
    })();
    let _ = std::fs::remove_file(&f);
    r.map_err(|source| VmmError::Process {
        op: format!("hashing {}", f.display()),
        source,
    })
}

fn set_capability(q: &mut Qmp, name: &str, on: bool) -> Result<(), QmpError> {
    q.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": name, "state": on }] }),
    )
    .map(|_| ())
}

/// Waits (up to a minute) for the migration to end; `completed` is success.
fn wait_migration(q: &mut Qmp) -> Result<MigrationInfo, VmmError> {
    let t = Instant::now();
    loop {
        let m: MigrationInfo = q
            .query("query-migrate")
            .map_err(qmp_err("following the epoch's migration"))?;
        match m.status.as_deref() {
            Some("completed") => return Ok(m),
            Some("failed" | "cancelled") => {
                return Err(VmmError::Failed {
                    op: "QEMU's epoch migration",
                    message: m
                        .error_desc
                        .unwrap_or_else(|| format!("status {:?}", m.status)),
                })
            }
            _ if t.elapsed() > Duration::from_secs(60) => {
                return Err(VmmError::Failed {
                    op: "QEMU's epoch migration",
                    message: format!("not done after a minute (status {:?})", m.status),
                })
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
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
        Err(VmmError::Unsupported {
            vmm: self.name.clone(),
            what: "throttle its vCPUs outside its own migrations",
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
        match self.qmp().query::<MigrationInfo>("query-migrate") {
            Ok(m) if m.active() => Some(format!(
                "QEMU is migrating this VM (status {}): epochs wait until that migration ends",
                m.status.unwrap_or_default()
            )),
            Ok(_) => None,
            Err(e) => Some(format!("QEMU's monitor: {e}")),
        }
    }

    fn snapshot(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        ram_hash: bool,
    ) -> Result<SnapshotCut, VmmError> {
        let (state, pause) = self.take(sink)?;
        let hash = if ram_hash && self.paused.load(Ordering::SeqCst) {
            Some(self.pmem_hash()?)
        } else {
            None
        };
        Ok(SnapshotCut {
            state: state.to_vm_state(),
            pause,
            ram_hash: hash,
        })
    }
}
