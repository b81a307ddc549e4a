//! The migration target's half of a switchover, and the fence that keeps exactly one copy of a VM running.
//!
//! A backup that receives [`Switchover`] for a VM whose replica holds the final epoch:
//!
//! 1. records the fence, `fence.json` = `{generation, state: "running", epoch, session, vmm_socket}`,
//!    written atomically and fsynced before anything starts. From then on the backup refuses replication
//!    into this VM (its replica file is now guest RAM) and any switchover of the same or a lower generation.
//!    A backup restarted later sees the fence and does not redo journals over the running VM's RAM;
//! 2. starts a VMM on standby (`endophyte testvm-serve --standby`) with its attach socket in the VM's
//!    directory;
//! 3. asks it to restore the vCPU and device state onto `replica.img`, mapped shared as guest RAM: no copy;
//! 4. optionally hashes guest RAM (tests, the demo), then resumes the guest and answers [`SwitchedOver`].
//!
//! A failure before the resume stops that VMM, rewrites the fence as `"aborted"` (this generation never
//! starts here) and answers an error; the replica is still the replica of the final epoch. A
//! `SwitchoverAbort` for a generation that is not running records the same `"aborted"` fence.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_attach::client::AttachClient;
use endophyte_wire::{SwitchedOver, Switchover};
use serde::{Deserialize, Serialize};

/// The fence record of a VM on this node (`<vm dir>/fence.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// Highest generation seen for this VM here.
    pub generation: u64,
    /// `"running"`: the VM runs here from `epoch`; `"aborted"`: `generation` was abandoned and never
    /// starts here.
    pub state: String,
    /// Epoch the VM started from.
    pub epoch: u64,
    /// Session of that epoch.
    pub session: u64,
    /// The running VMM's attach socket.
    pub vmm_socket: PathBuf,
}

impl Fence {
    /// Reads `dir/fence.json`; `None` when there is none.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let p = dir.join("fence.json");
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", p.display())),
        }
    }

    /// Whether the VM runs here.
    pub fn running(&self) -> bool {
        self.state == "running"
    }

    /// Writes `dir/fence.json` atomically (temporary file, fsync, rename, fsync of the directory).
    ///
    /// # Errors
    /// I/O, with the path.
    pub fn store(&self, dir: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        let p = dir.join("fence.json");
        let tmp = dir.join("fence.json.tmp");
        let io = |what: &str, e: std::io::Error| anyhow::anyhow!("{what} {}: {e}", p.display());
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(&serde_json::to_vec(self)?)
            .map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        std::fs::rename(&tmp, &p).map_err(|e| io("renaming", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the directory of", e))?;
        Ok(())
    }
}

/// A VM started on this node from its replica.
pub struct Started {
    /// The answer for the source.
    pub done: SwitchedOver,
    /// The VMM process (it keeps running when the backup exits).
    pub vmm: Child,
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Steps 2-4 of the module docs, after the fence is recorded: starts the VM from `replica` with the
/// state in `sw`, resumes it and returns the timings. `settle` is what steps before took.
///
/// # Errors
/// Which step failed and why; the VMM started for it is stopped.
pub fn start_from_replica(
    dir: &Path,
    replica: &Path,
    sw: &Switchover,
    settle: Duration,
) -> anyhow::Result<Started> {
    let socket = dir.join("vmm.sock");
    let _ = std::fs::remove_file(&socket);
    let t = Instant::now();
    let exe = std::env::current_exe()?;
    let mut vmm = Command::new(exe)
        .args(["testvm-serve", "--standby", "--attach-socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting the VMM: {e}"))?;
    let r = (|| -> anyhow::Result<SwitchedOver> {
        let client = loop {
            match AttachClient::connect(&socket, "endophyte-backup") {
                Ok(c) => break c,
                Err(_) if t.elapsed() < Duration::from_secs(10) => {
                    if let Some(st) = vmm.try_wait()? {
                        anyhow::bail!("the VMM exited at start: {st}");
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => anyhow::bail!("the VMM's attach socket never answered: {e}"),
            }
        };
        let spawn = t.elapsed();
        let state: serde_json::Value = serde_json::from_slice(&sw.state)
            .map_err(|e| anyhow::anyhow!("the vCPU and device state is not JSON: {e}"))?;
        let ram = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(replica)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", replica.display()))?;
        let t1 = Instant::now();
        client
            .restore(state, &ram)
            .map_err(|e| anyhow::anyhow!("restoring the VM: {e}"))?;
        drop(client);
        // The restored VM is served on a fresh connection.
        let client = AttachClient::connect(&socket, "endophyte-backup")
            .map_err(|e| anyhow::anyhow!("reconnecting to the restored VM: {e}"))?;
        let restore = t1.elapsed();
        let t2 = Instant::now();
        let ram_hash = if sw.verify {
            client
                .vmm_hash()
                .map_err(|e| anyhow::anyhow!("hashing guest RAM: {e}"))?
        } else {
            String::new()
        };
        let verify = if sw.verify {
            t2.elapsed()
        } else {
            Duration::ZERO
        };
        let t3 = Instant::now();
        client
            .resume()
            .map_err(|e| anyhow::anyhow!("resuming the guest: {e}"))?;
        Ok(SwitchedOver {
            generation: sw.generation,
            epoch: sw.epoch,
            settle_us: us(settle),
            spawn_us: us(spawn),
            restore_us: us(restore),
            verify_us: us(verify),
            resume_us: us(t3.elapsed()),
            ram_hash,
        })
    })();
    match r {
        Ok(done) => Ok(Started { done, vmm }),
        Err(e) => {
            let _ = vmm.kill();
            let _ = vmm.wait();
            Err(e)
        }
    }
}
