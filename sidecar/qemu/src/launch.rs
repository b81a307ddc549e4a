//! Starting a replica as a QEMU VM on a backup: a QEMU started from the backup's command template with
//! `-incoming defer -S` waits (started at a migration's warm-up); the restore feeds it a migration stream
//! rebuilt from the replica's pages and the epoch's [`QemuState`] ([`rebuild`]); the VM stays paused until
//! it is resumed.
//!
//! The command template is the backup's configuration (`endophyte backup --target-qemu`): the QEMU command
//! line that defines the VM's machine and devices, as the source's, with `{qmp}` where the monitor socket
//! this backup drives goes (`-qmp unix:{qmp},server=on,wait=off`); `{dir}` and `{vm}` name the VM's
//! directory and id. The launcher adds `-incoming defer -S`. QEMU itself refuses a stream of another
//! machine type or device model, and says which.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_vmm::{Launcher, TargetVm, VmState, VmmError};
use serde_json::{json, Value};

use crate::layout::RamLayout;
use crate::qmp::{MigrationInfo, Qmp, QmpError};
use crate::state::QemuState;
use crate::stream::write::Writer;
use crate::stream::TARGET_PAGE_SIZE;

/// How long a started QEMU has to answer on its monitor.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
const FD_NAME: &str = "endophyte-restore";

fn qmp_err(op: &'static str) -> impl FnOnce(QmpError) -> VmmError {
    move |e| VmmError::Failed {
        op,
        message: e.to_string(),
    }
}

/// Writes the stream that restores the VM of `state` from the replica file `replica` (laid out as
/// [`RamLayout`] of its blocks) into `w`; returns the bytes written.
///
/// # Errors
/// Reading the replica or writing failed.
pub fn rebuild(state: &QemuState, replica: &File, w: impl Write) -> std::io::Result<u64> {
    let layout = RamLayout::new(state.blocks.clone());
    let mut out = Writer::begin(
        BufWriter::with_capacity(1 << 20, w),
        &state.prefix,
        &state.ram_start,
        &state.blocks,
        state.section_id,
    )?;
    let mut buf = vec![0u8; 1 << 20];
    for (i, b) in state.blocks.iter().enumerate() {
        let mut off = 0u64;
        while off < b.used_bytes {
            let n = (b.used_bytes - off).min(buf.len() as u64) as usize;
            replica.read_exact_at(&mut buf[..n], layout.addr(i, off))?;
            for (k, page) in buf[..n].chunks(TARGET_PAGE_SIZE).enumerate() {
                let at = off + (k * TARGET_PAGE_SIZE) as u64;
                if endophyte_wire::chunk::is_zero_page(page) {
                    out.zero(i, at)?;
                } else {
                    out.page(i, at, page)?;
                }
            }
            off += n as u64;
        }
    }
    let (mut w, n) = out.finish(&state.tail)?;
    w.flush()?;
    Ok(n)
}

/// Starts QEMUs from a command template. See the module docs.
#[derive(Clone, Debug)]
pub struct QemuLauncher {
    template: Vec<String>,
}

impl QemuLauncher {
    /// A launcher for `template` (program and arguments).
    ///
    /// # Errors
    /// An empty template, or one without `{qmp}` (the backup could not drive the VM).
    pub fn new(template: Vec<String>) -> Result<Self, VmmError> {
        if template.is_empty() || !template.iter().any(|a| a.contains("{qmp}")) {
            return Err(VmmError::Failed {
                op: "configuring the target QEMU command",
                message: format!(
                    "{template:?} must name QEMU and give it a monitor at {{qmp}} (-qmp unix:{{qmp}},server=on,wait=off)"
                ),
            });
        }
        Ok(Self { template })
    }

    /// Parses a command line with POSIX shell quoting (words split on blanks, quotes and backslashes as
    /// in sh; no expansion).
    ///
    /// # Errors
    /// As [`QemuLauncher::new`]; unbalanced quotes.
    pub fn parse(line: &str) -> Result<Self, VmmError> {
        let words = shell_words::split(line).map_err(|e| VmmError::Failed {
            op: "parsing the target VMM command line",
            message: format!("{line:?}: {e}"),
        })?;
        Self::new(words)
    }
}

impl Launcher for QemuLauncher {
    fn name(&self) -> String {
        format!("QEMU ({})", self.template.join(" "))
    }

    fn launch(&self, vm_dir: &Path) -> Result<Box<dyn TargetVm>, VmmError> {
        let qmp_path = vm_dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let vm = vm_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let subst = |a: &str| {
            a.replace("{qmp}", &qmp_path.display().to_string())
                .replace("{dir}", &vm_dir.display().to_string())
                .replace("{vm}", &vm)
        };
        let log = vm_dir.join("qemu.log");
        let logf = File::create(&log).map_err(|source| VmmError::Process {
            op: format!("creating {}", log.display()),
            source,
        })?;
        let mut child = Command::new(subst(&self.template[0]))
            .args(self.template[1..].iter().map(|a| subst(a)))
            .args(["-incoming", "defer", "-S"])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(|source| VmmError::Process {
                op: "opening QEMU's log".into(),
                source,
            })?)
            .stderr(logf)
            .spawn()
            .map_err(|source| VmmError::Process {
                op: format!("starting {:?}", self.template[0]),
                source,
            })?;
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(VmmError::Failed {
                    op: "starting the target QEMU",
                    message: format!("it exited at start ({st}): {}", tail.trim()),
                });
            }
            match Qmp::connect(&qmp_path, Duration::from_secs(60)) {
                Ok(qmp) => {
                    return Ok(Box::new(QemuTargetVm {
                        child,
                        qmp: Some(qmp),
                        qmp_path,
                        main_ram: 0,
                        dir: vm_dir.to_owned(),
                    }))
                }
                Err(e) if t.elapsed() > START_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(VmmError::Failed {
                        op: "starting the target QEMU",
                        message: format!(
                            "its monitor never answered within {START_TIMEOUT:?}: {e}"
                        ),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// A QEMU started by [`QemuLauncher`].
pub struct QemuTargetVm {
    child: Child,
    /// Dropped once the VM runs, so that a sidecar can take the monitor.
    qmp: Option<Qmp>,
    qmp_path: PathBuf,
    main_ram: u64,
    dir: PathBuf,
}

impl QemuTargetVm {
    fn qmp(&mut self) -> Result<&mut Qmp, VmmError> {
        self.qmp.as_mut().ok_or_else(|| VmmError::Failed {
            op: "driving the target QEMU",
            message: "its monitor was handed over once the VM ran".into(),
        })
    }
}

impl TargetVm for QemuTargetVm {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn endpoint(&self) -> String {
        self.qmp_path.display().to_string()
    }

    fn restore(&mut self, replica: &Path, state: &VmState) -> Result<(), VmmError> {
        let st = QemuState::from_vm_state(state).map_err(|e| VmmError::StateFormat {
            vmm: "QEMU".into(),
            expected: crate::state::STATE_FORMAT,
            found: format!("{} ({e})", state.format),
            version: state.version,
        })?;
        let file = File::open(replica).map_err(|source| VmmError::Process {
            op: format!("opening the replica {}", replica.display()),
            source,
        })?;
        let (ours, theirs) = UnixStream::pair().map_err(|source| VmmError::Process {
            op: "making the restore's socket pair".into(),
            source,
        })?;
        let q = self.qmp()?;
        q.execute_with_fd(
            "getfd",
            json!({ "fdname": FD_NAME }),
            Some(theirs.as_raw_fd()),
        )
        .map_err(qmp_err("handing QEMU the restore stream"))?;
        drop(theirs);
        q.execute(
            "migrate-incoming",
            json!({ "uri": format!("fd:{FD_NAME}") }),
        )
        .map_err(qmp_err("starting the incoming migration"))?;
        // Written from another thread while this one follows QEMU's side.
        let writer = std::thread::spawn(move || rebuild(&st, &file, ours));
        let t = Instant::now();
        let done = loop {
            let m: MigrationInfo = self
                .qmp()?
                .query("query-migrate")
                .map_err(qmp_err("following the restore"))?;
            match m.status.as_deref() {
                Some("completed") => break Ok(()),
                Some("failed" | "cancelled") => {
                    break Err(m.error_desc.unwrap_or_else(|| "failed".into()))
                }
                _ if t.elapsed() > Duration::from_secs(120) => {
                    break Err(format!("not done after 2 min (status {:?})", m.status))
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let written = writer.join().map_err(|_| VmmError::Failed {
            op: "restoring the VM",
            message: "the stream writer panicked".into(),
        })?;
        if let Err(why) = done {
            let log = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
            return Err(VmmError::Failed {
                op: "restoring the VM into QEMU",
                message: format!("{why}; QEMU said: {}", log.trim()),
            });
        }
        written.map_err(|source| VmmError::Process {
            op: "writing the restore stream".into(),
            source,
        })?;
        self.main_ram = state_main_ram(state);
        Ok(())
    }

    fn ram_hash(&mut self) -> Result<String, VmmError> {
        let (main, dir) = (self.main_ram, self.dir.clone());
        crate::source::pmem_hash(self.qmp()?, &dir, main)
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        self.qmp()?
            .execute("cont", Value::Null)
            .map_err(qmp_err("resuming the VM"))?;
        // The VM runs: its monitor is free for whoever replicates it from here.
        self.qmp = None;
        Ok(())
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state_main_ram(state: &VmState) -> u64 {
    QemuState::from_vm_state(state)
        .ok()
        .and_then(|s| s.blocks.first().map(|b| b.used_bytes))
        .unwrap_or(0)
}
