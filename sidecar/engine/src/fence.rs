//! The migration target's half of a switchover, and the fence that keeps exactly one copy of a VM running.
//!
//! A backup that receives [`Switchover`] for a VM whose replica holds the final epoch:
//!
//! 1. records the fence, `fence.json` = `{generation, state: "prepared", epoch, session, vmm_socket,
//!    vmm_pid}`, in place and not synced (see [`Fence::record`]) before any VM exists. While the fence is not
//!    `"aborted"`, the backup refuses replication into this VM and any switchover of the same or a lower
//!    generation;
//! 2. starts a VMM on standby (`endophyte testvm-serve --standby`) with its attach socket in the VM's
//!    directory;
//! 3. asks it to restore the vCPU and device state onto `replica.img`, mapped shared as guest RAM (no
//!    copy), paused;
//! 4. optionally hashes guest RAM (tests, the demo), and answers `SwitchoverReady`;
//! 5. on the source's `SwitchoverCommit` only: rewrites the fence as `"running"` (durably, in place with
//!    `O_DIRECT | O_DSYNC`), resumes the
//!    guest, and answers `SwitchedOver`. From then on the replica file is the running VM's RAM.
//!
//! A failure before the commit, the source's `SwitchoverAbort`, or no commit within a minute stops the
//! prepared VMM and rewrites the fence as `"aborted"`: this generation never starts here, and the replica
//! (which the paused VM never changed) is still the replica of the final epoch. A backup restarted with a
//! `"prepared"` fence does the same; with a `"running"` one it leaves the VM alone and never redoes a
//! journal over its RAM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_attach::client::AttachClient;
use endophyte_wire::{Switchover, SwitchoverReady};
use serde::{Deserialize, Serialize};

/// Size of `fence.json`: one aligned block, so that a record overwrites it in place with direct I/O.
pub const FENCE_BYTES: usize = 4096;

/// The fence record of a VM on this node (`<vm dir>/fence.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// Highest generation seen for this VM here.
    pub generation: u64,
    /// `"running"`: the VM runs here from `epoch`; `"aborted"`: `generation` was abandoned and never
    /// starts here; `"departed"`: it ran here under `generation` and its VMM exited (it migrated away or
    /// stopped), so this node is a backup for it again.
    pub state: String,
    /// Epoch the VM started from.
    pub epoch: u64,
    /// Session of that epoch.
    pub session: u64,
    /// The VMM's attach socket.
    pub vmm_socket: PathBuf,
    /// The VMM's process id (0 before it started).
    #[serde(default)]
    pub vmm_pid: u32,
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

    /// Whether a switchover was prepared here and neither committed nor aborted.
    pub fn prepared(&self) -> bool {
        self.state == "prepared"
    }

    /// After a restart: a switchover left prepared never committed (the commit records `"running"` before
    /// the resume), so its VM never ran. Stops its VMM if it is still there and records `"aborted"`.
    ///
    /// # Errors
    /// Recording the fence failed.
    pub fn abort_leftover(&mut self, dir: &Path) -> anyhow::Result<()> {
        if self.vmm_pid != 0 {
            // The VM in that VMM was never resumed. At worst the process is gone already (ESRCH).
            // SAFETY: kill(2) on a pid we recorded for a VMM we started; no memory is involved.
            let _ = unsafe { libc::kill(self.vmm_pid as i32, libc::SIGKILL) };
        }
        tracing::warn!(dir = %dir.display(), generation = self.generation,
            "a switchover was left prepared by a crash: its VM never ran; aborted");
        self.state = "aborted".into();
        self.vmm_pid = 0;
        self.store(dir)
    }

    /// Makes sure `dir/fence.json` exists durably at its full size ([`FENCE_BYTES`]), so that later
    /// records overwrite it in place without changing any metadata ([`Fence::record`]). Writes a
    /// `"none"` record (generation 0) if there is no fence yet.
    ///
    /// # Errors
    /// I/O, with the path.
    pub fn ensure_file(dir: &Path) -> anyhow::Result<()> {
        let p = dir.join("fence.json");
        if std::fs::metadata(&p).is_ok_and(|m| m.len() == FENCE_BYTES as u64) {
            return Ok(());
        }
        let current = Self::load(dir)?.unwrap_or_else(|| Self {
            state: "none".into(),
            ..Self::default()
        });
        current.store(dir)
    }

    /// Overwrites `dir/fence.json` in place, one aligned [`FENCE_BYTES`] block with `O_DIRECT`, and with
    /// `O_DSYNC` when `durable`: on stable storage when this returns, without the filesystem journal
    /// commit an fsync waits for (15-75 ms here while replicas are being written back, against about 1 ms
    /// for this). For the steps inside the guest's downtime: the `"prepared"` record (not durable: it only
    /// serves cleanup; losing it in a crash leaves a paused VMM behind, never a running guest) and the
    /// `"running"` record (durable, before the resume). Call [`Fence::ensure_file`] first. Where
    /// `O_DIRECT` is refused (tmpfs), a buffered write, with fdatasync when `durable`.
    ///
    /// # Errors
    /// I/O, with the path; a record longer than [`FENCE_BYTES`].
    pub fn record(&self, dir: &Path, durable: bool) -> anyhow::Result<()> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let p = dir.join("fence.json");
        let json = serde_json::to_vec(self)?;
        anyhow::ensure!(
            json.len() <= FENCE_BYTES,
            "fence record of {} bytes exceeds {FENCE_BYTES}",
            json.len()
        );
        let layout =
            std::alloc::Layout::from_size_align(FENCE_BYTES, FENCE_BYTES).expect("a valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        anyhow::ensure!(!ptr.is_null(), "allocating the fence block");
        // SAFETY: `ptr` points to FENCE_BYTES zeroed bytes we own until the dealloc below.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, FENCE_BYTES) };
        buf.fill(b' ');
        buf[..json.len()].copy_from_slice(&json);
        let flags = libc::O_DIRECT | if durable { libc::O_DSYNC } else { 0 };
        let r = match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(flags)
            .open(&p)
        {
            Ok(f) => f.write_all_at(buf, 0),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| {
                    f.write_all_at(buf, 0)?;
                    if durable {
                        f.sync_data()?;
                    }
                    Ok(())
                }),
            Err(e) => Err(e),
        };
        // SAFETY: allocated above with this layout; `buf` is not used after this.
        unsafe { std::alloc::dealloc(ptr, layout) };
        r.map_err(|e| anyhow::anyhow!("writing {}: {e}", p.display()))
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
        let mut bytes = serde_json::to_vec(self)?;
        anyhow::ensure!(bytes.len() <= FENCE_BYTES, "fence record too long");
        bytes.resize(FENCE_BYTES, b' ');
        f.write_all(&bytes).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        std::fs::rename(&tmp, &p).map_err(|e| io("renaming", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the directory of", e))?;
        Ok(())
    }
}

/// A VMM on standby (no VM yet), started ahead of a switchover when the source starts converging
/// (`SwitchoverWarmup`), so that the switchover does not wait for a process to start.
pub struct Standby {
    /// The VMM process.
    pub vmm: Child,
    /// Its attach connection.
    pub client: AttachClient,
    /// When it was started.
    pub since: Instant,
}

impl Standby {
    /// Starts a standby VMM with its attach socket in `dir`.
    ///
    /// # Errors
    /// The process did not start or its socket did not answer within 10 s.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let socket = dir.join("vmm.sock");
        let t = Instant::now();
        let mut vmm = spawn_standby(&socket)?;
        match connect_standby(&mut vmm, &socket, t) {
            Ok(client) => Ok(Self {
                vmm,
                client,
                since: t,
            }),
            Err(e) => {
                let _ = vmm.kill();
                let _ = vmm.wait();
                Err(e)
            }
        }
    }

    /// Stops it.
    pub fn stop(mut self) {
        let _ = self.vmm.kill();
        let _ = self.vmm.wait();
    }
}

fn spawn_standby(socket: &Path) -> anyhow::Result<Child> {
    let _ = std::fs::remove_file(socket);
    Command::new(std::env::current_exe()?)
        .args(["testvm-serve", "--standby", "--attach-socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting the VMM: {e}"))
}

fn connect_standby(vmm: &mut Child, socket: &Path, t: Instant) -> anyhow::Result<AttachClient> {
    loop {
        match AttachClient::connect_with(socket, "endophyte-backup", false) {
            Ok(c) => return Ok(c),
            Err(_) if t.elapsed() < Duration::from_secs(10) => {
                if let Some(st) = vmm.try_wait()? {
                    anyhow::bail!("the VMM exited at start: {st}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => anyhow::bail!("the VMM's attach socket never answered: {e}"),
        }
    }
}

/// A VM prepared on this node from its replica, paused, waiting for the source's commit.
pub struct Prepared {
    /// The answer for the source.
    pub ready: SwitchoverReady,
    /// The VMM process (it keeps running when the backup exits).
    pub vmm: Child,
    /// Its attach connection, to resume the guest on commit.
    pub client: AttachClient,
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Steps 1-4 of the module docs: starts a VMM on standby, has `record_fence` record the `"prepared"` fence
/// with its pid (before any VM exists in it, so a crash before that leaves only an empty standby VMM), and
/// prepares the VM from `replica` with the state in `sw`, paused.
///
/// # Errors
/// Which step failed and why; the VMM started for it is stopped.
pub fn prepare_from_replica(
    dir: &Path,
    replica: &Path,
    sw: &Switchover,
    crash_after_restore: bool,
    warm: Option<Standby>,
    record_fence: impl FnOnce(u32) -> anyhow::Result<()>,
) -> anyhow::Result<Prepared> {
    let socket = dir.join("vmm.sock");
    let t = Instant::now();
    let warm = warm.and_then(|mut s| match s.vmm.try_wait() {
        Ok(None) => Some(s),
        _ => {
            tracing::warn!(
                "the standby VMM started ahead of the switchover has exited; starting another"
            );
            None
        }
    });
    let (mut vmm, warm_client) = match warm {
        Some(Standby { vmm, client, .. }) => (vmm, Some(client)),
        None => (spawn_standby(&socket)?, None),
    };
    let pid = vmm.id();
    let r = (|| -> anyhow::Result<(SwitchoverReady, AttachClient)> {
        let t0 = Instant::now();
        record_fence(pid)?;
        let settle = t0.elapsed();
        let client = match warm_client {
            Some(c) => c,
            None => connect_standby(&mut vmm, &socket, t)?,
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
        // Lazily mapped: this connection only hashes (in the VMM) and resumes.
        let client = AttachClient::connect_with(&socket, "endophyte-backup", false)
            .map_err(|e| anyhow::anyhow!("reconnecting to the restored VM: {e}"))?;
        let restore = t1.elapsed();
        if crash_after_restore {
            tracing::error!("test hook: crashing with a switchover prepared");
            std::process::abort();
        }
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
        Ok((
            SwitchoverReady {
                generation: sw.generation,
                epoch: sw.epoch,
                settle_us: us(settle),
                spawn_us: us(spawn.saturating_sub(settle)),
                restore_us: us(restore),
                verify_us: us(verify),
                ram_hash,
            },
            client,
        ))
    })();
    match r {
        Ok((ready, client)) => Ok(Prepared { ready, vmm, client }),
        Err(e) => {
            let _ = vmm.kill();
            let _ = vmm.wait();
            Err(e)
        }
    }
}
