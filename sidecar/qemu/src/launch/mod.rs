//! Starting a replica as a QEMU VM on a backup: a QEMU started from the backup's command template with
//! `-incoming defer -S` waits (started at a migration's warm-up) and loads the replica as a migration
//! stream rebuilt from its pages ([`feed`]): ahead of a switchover, all of it and then what each epoch
//! rewrites ([`TargetVm::preload`]), so that the restore sends only the final epoch's pages and its device
//! state ([`QemuState`]); for a promote, all at once. The VM stays paused until it is resumed.
//!
//! The command template is the backup's configuration (`endophyte backup --target-qemu`): the QEMU command
//! line that defines the VM's machine and devices, as the source's, with `{qmp}` where the monitor socket
//! this backup drives goes (`-qmp unix:{qmp},server=on,wait=off`); `{dir}` and `{vm}` name the VM's
//! directory and id. The launcher adds `-incoming defer -S`. QEMU itself refuses a stream of another
//! machine type or device model, and says which.

pub mod feed;
pub mod libvirt;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_vmm::{Launcher, TargetVm, VmState, VmmError};
use serde_json::{json, Value};

use crate::qmp::{MigrationInfo, Qmp, QmpError};
use crate::state::QemuState;
use feed::Feeder;

/// How long a started QEMU has to answer on its monitor.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
const FD_NAME: &str = "endophyte-restore";

fn qmp_err(op: &'static str) -> impl FnOnce(QmpError) -> VmmError {
    move |e| VmmError::Failed {
        op,
        message: e.to_string(),
    }
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
        Self::new(endophyte_vmm::command_words(line)?)
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
                        feeder: None,
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
    /// The incoming stream being written, once started.
    feeder: Option<Feeder>,
}

impl QemuTargetVm {
    /// Starts the incoming migration and its stream: `state`'s header and every page of `replica`.
    fn start_feed(&mut self, replica: &Path, state: QemuState) -> Result<(), VmmError> {
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
        self.feeder = Some(Feeder::start(state, file, ours));
        Ok(())
    }

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

    fn preload(&mut self, replica: &Path, state: &VmState) -> Result<bool, VmmError> {
        if self.feeder.is_none() {
            let st = qemu_state(state)?;
            self.start_feed(replica, st)?;
        }
        Ok(true)
    }

    fn loading(&mut self) -> Result<bool, VmmError> {
        match &self.feeder {
            Some(f) => f.loaded().map(|l| !l).map_err(|e| VmmError::Failed {
                op: "loading the replica into the standby QEMU",
                message: e.to_string(),
            }),
            None => Ok(false),
        }
    }

    fn replica_changed(&mut self, pages: &[u64]) -> Result<(), VmmError> {
        match &self.feeder {
            Some(f) => f.pages(pages).map_err(|e| VmmError::Failed {
                op: "loading the replica into the standby QEMU",
                message: e.to_string(),
            }),
            None => Ok(()),
        }
    }

    fn restore(&mut self, replica: &Path, state: &VmState) -> Result<(), VmmError> {
        let st = qemu_state(state)?;
        if self.feeder.is_none() {
            self.start_feed(replica, st.clone())?;
        }
        let feeder = self.feeder.take().expect("just started");
        let t = Instant::now();
        let written = feeder.finish(&st);
        let fed = t.elapsed();
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
                _ if written.is_err() => break Err("the stream was not written whole".into()),
                _ if t.elapsed() > Duration::from_secs(120) => {
                    break Err(format!("not done after 2 min (status {:?})", m.status))
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        if let Err(why) = done {
            let log = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
            let wrote = written.err().map(|e| format!(" ({e})")).unwrap_or_default();
            return Err(VmmError::Failed {
                op: "restoring the VM into QEMU",
                message: format!("{why}{wrote}; QEMU said: {}", log.trim()),
            });
        }
        written.map_err(|e| VmmError::Failed {
            op: "restoring the VM into QEMU",
            message: e.to_string(),
        })?;
        self.main_ram = st.blocks.first().map_or(0, |b| b.used_bytes);
        tracing::info!(?fed, loaded = ?t.elapsed(), "restored into QEMU");
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

/// The QEMU state a VM state carries.
fn qemu_state(state: &VmState) -> Result<QemuState, VmmError> {
    QemuState::from_vm_state(state).map_err(|e| VmmError::StateFormat {
        vmm: "QEMU".into(),
        expected: crate::state::STATE_FORMAT,
        found: format!("{} ({e})", state.format),
        version: state.version,
    })
}
