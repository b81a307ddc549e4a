//! Starting attach-protocol VMMs on a backup: a configured command that starts a VMM on standby (no VM,
//! waiting for a `restore`) with its attach socket in the VM's directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_attach::client::AttachClient;

use super::unwrap_state;
use crate::{Launcher, TargetVm, VmState, VmmError};

/// How long a started VMM has to answer on its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The placeholder replaced by the attach socket's path in the command.
pub const SOCKET_PLACEHOLDER: &str = "{socket}";

/// Starts `command` (program and arguments; every `{socket}` replaced by the VM directory's `vmm.sock`)
/// and attaches to it. The command must start a VMM on standby, e.g.
/// `testvm standby --attach-socket {socket}`.
#[derive(Clone, Debug)]
pub struct AttachLauncher {
    command: Vec<String>,
}

impl AttachLauncher {
    /// A launcher running `command`.
    ///
    /// # Errors
    /// An empty command, or one without the `{socket}` placeholder (the VMM would not know where to
    /// listen).
    pub fn new(command: Vec<String>) -> Result<Self, VmmError> {
        if command.is_empty() || !command.iter().any(|a| a.contains(SOCKET_PLACEHOLDER)) {
            return Err(VmmError::Failed {
                op: "configuring the target VMM command",
                message: format!(
                    "{command:?} must name a program and pass it {SOCKET_PLACEHOLDER} (where its attach socket goes)"
                ),
            });
        }
        Ok(Self { command })
    }

    /// Parses a command line with POSIX shell quoting (words split on blanks, quotes and backslashes as
    /// in sh; no expansion).
    ///
    /// # Errors
    /// As [`AttachLauncher::new`]; unbalanced quotes.
    pub fn parse(line: &str) -> Result<Self, VmmError> {
        Self::new(crate::command_words(line)?)
    }

    fn spawn(&self, socket: &Path) -> Result<Child, VmmError> {
        let _ = std::fs::remove_file(socket);
        let sock = socket.display().to_string();
        let args: Vec<String> = self.command[1..]
            .iter()
            .map(|a| a.replace(SOCKET_PLACEHOLDER, &sock))
            .collect();
        Command::new(&self.command[0])
            .args(&args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| VmmError::Process {
                op: format!("starting the target VMM {:?}", self.command[0]),
                source,
            })
    }
}

impl Launcher for AttachLauncher {
    fn name(&self) -> String {
        format!("attach-protocol VMM ({})", self.command.join(" "))
    }

    fn launch(&self, vm_dir: &Path) -> Result<Box<dyn TargetVm>, VmmError> {
        let socket = vm_dir.join("vmm.sock");
        let t = Instant::now();
        let mut child = self.spawn(&socket)?;
        loop {
            match AttachClient::connect_with(&socket, "endophyte-backup", false) {
                Ok(client) => {
                    return Ok(Box::new(AttachTargetVm {
                        child,
                        socket,
                        client,
                        name: self.name(),
                    }))
                }
                Err(e) => {
                    let exited = child.try_wait().ok().flatten();
                    if exited.is_some() || t.elapsed() > START_TIMEOUT {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(VmmError::Failed {
                            op: "starting the target VMM",
                            message: match exited {
                                Some(st) => format!("{} exited at start: {st}", self.name()),
                                None => format!(
                                    "{} did not answer on {} within {START_TIMEOUT:?}: {e}",
                                    self.name(),
                                    socket.display()
                                ),
                            },
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// A VMM started by [`AttachLauncher`].
pub struct AttachTargetVm {
    child: Child,
    socket: PathBuf,
    client: AttachClient,
    name: String,
}

fn open_replica(replica: &Path) -> Result<std::fs::File, VmmError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(replica)
        .map_err(|source| VmmError::Process {
            op: format!("opening the replica {}", replica.display()),
            source,
        })
}

fn failed(op: &'static str) -> impl FnOnce(endophyte_attach::ClientError) -> VmmError {
    move |e| VmmError::Failed {
        op,
        message: e.to_string(),
    }
}

impl TargetVm for AttachTargetVm {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn endpoint(&self) -> String {
        self.socket.display().to_string()
    }

    /// A VMM that declares [`endophyte_attach::proto::Features::prepare`] builds the VM (KVM VM, memory
    /// slot on the replica, vCPUs) now, at the warm-up, so that the switchover's restore only loads the
    /// state. The replica is mapped shared, so what later epochs write into it is already there.
    fn preload(&mut self, replica: &Path, state: &VmState) -> Result<bool, VmmError> {
        if !self.client.info().features.prepare {
            return Ok(false);
        }
        let json = unwrap_state(state, &self.name)?;
        let ram = open_replica(replica)?;
        self.client
            .prepare(json, &ram)
            .map_err(failed("preparing the VM ahead of the switchover"))?;
        Ok(true)
    }

    fn restore(&mut self, replica: &Path, state: &VmState) -> Result<(), VmmError> {
        let json = unwrap_state(state, &self.name)?;
        let ram = open_replica(replica)?;
        self.client
            .restore(json, &ram)
            .map_err(failed("restoring the VM"))?;
        // The restored VM is served on a fresh connection, mapped lazily: this one only hashes (in the VMM)
        // and resumes, so populating guest RAM here would only add to the downtime.
        self.client = AttachClient::connect_with(&self.socket, "endophyte-backup", false)
            .map_err(failed("reconnecting to the restored VM"))?;
        Ok(())
    }

    fn ram_hash(&mut self) -> Result<String, VmmError> {
        self.client.vmm_hash().map_err(failed("hashing guest RAM"))
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        self.client.resume().map_err(failed("resuming the VM"))
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
