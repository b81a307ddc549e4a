//! Runs the Endophyte sidecar against the VM's QEMU once its monitor socket appears (QEMU starts after
//! the domain is defined), and stops it when KubeVirt says the VM is done (`Shutdown`) or the hook stops.
//!
//! A sidecar that fails within [`PERMANENT_WITHIN`] of its start (a refused capability, bad settings, a
//! QEMU it cannot use) is not restarted: the error is permanent and is logged. One that ran longer and
//! then failed is restarted after a back-off (1 s, doubling to 30 s), as long as the monitor is there.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::Notify;

use crate::vmi::Attachment;

/// A sidecar that exits with an error this soon after its start is not restarted.
pub const PERMANENT_WITHIN: Duration = Duration::from_secs(10);
/// The sidecar's staging buffer in the hook container unless the VM's settings give one: the hook
/// container's default budget is 64 MiB, and with the sidecar's own default (32 MiB) a 1 GiB guest's
/// sidecar peaked at 125 MB; with 8 MiB at 38 MB (docs/kubevirt.md).
pub const HOOK_STAGING: &str = "8MiB";
/// How long a stopping sidecar gets for its final epoch before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Where the sidecar runs from and what it is given besides the VM's attachment.
#[derive(Clone, Debug)]
pub struct SidecarLaunch {
    /// The `endophyte` binary.
    pub endophyte: PathBuf,
    /// The certificate directory (a mounted Secret).
    pub certs: PathBuf,
    /// QEMU's monitor socket as this container sees it.
    pub qmp: PathBuf,
    /// The sidecar's control socket.
    pub control: PathBuf,
    /// The fencing authority's etcd endpoints (`--etcd`); empty: none (the sidecar says so loudly).
    pub etcd: Vec<String>,
}

/// The sidecar's supervisor; one per hook process (one VM per virt-launcher pod).
pub struct Supervisor {
    launch: SidecarLaunch,
    state: Mutex<State>,
    stop: Notify,
}

struct State {
    /// Shutdown came, or the sidecar exited on its own: no sidecar starts again.
    stopped: bool,
    attachment: Option<Attachment>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Supervisor {
    /// A supervisor that will start sidecars as `launch` says.
    pub fn new(launch: SidecarLaunch) -> Arc<Self> {
        Arc::new(Self {
            launch,
            state: Mutex::new(State {
                stopped: false,
                attachment: None,
                task: None,
            }),
            stop: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_stopped(&self) {
        self.lock().stopped = true;
    }

    /// The domain was defined for `a`: start watching for QEMU unless already doing so. A later define
    /// with other settings takes effect when the sidecar next starts.
    pub fn attach(self: &Arc<Self>, a: Attachment) {
        let mut st = self.lock();
        if st.attachment.as_ref().is_some_and(|old| *old != a) {
            tracing::warn!(vm = %a.vm_id, "the domain was redefined with other Endophyte settings; they apply when the sidecar next starts");
        }
        st.attachment = Some(a);
        let live = st.task.as_ref().is_some_and(|t| !t.is_finished());
        if !live && !st.stopped {
            let me = Arc::clone(self);
            st.task = Some(tokio::spawn(async move { me.run().await }));
        }
    }

    /// Stops the sidecar (SIGTERM: its final epoch, then exit; killed after [`STOP_GRACE`]) and waits for
    /// it.
    pub async fn shutdown(&self) {
        let task = {
            let mut st = self.lock();
            st.stopped = true;
            st.task.take()
        };
        self.stop.notify_waiters();
        self.stop.notify_one();
        if let Some(t) = task {
            let _ = t.await;
        }
        self.set_stopped();
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            // QEMU creates its monitor once libvirt starts it.
            while !self.launch.qmp.exists() {
                tokio::select! {
                    _ = self.stop.notified() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            let Some(a) = self.lock().attachment.clone() else {
                return;
            };
            let mut child = match self.spawn(&a) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("starting {}: {e}", self.launch.endophyte.display());
                    return;
                }
            };
            let started = Instant::now();
            tracing::info!(vm = %a.vm_id, qmp = %self.launch.qmp.display(), "sidecar started");
            let status = tokio::select! {
                s = child.wait() => s,
                _ = self.stop.notified() => {
                    let s = stop(&mut child).await;
                    tracing::info!(vm = %a.vm_id, "sidecar stopped: {s:?}");
                    return;
                }
            };
            let ran = started.elapsed();
            match status {
                Ok(s) if s.success() => {
                    tracing::info!(vm = %a.vm_id, "sidecar exited");
                    self.set_stopped();
                    return;
                }
                Ok(s) if ran < PERMANENT_WITHIN => {
                    tracing::error!(vm = %a.vm_id, "the sidecar failed {ran:?} after its start ({s}); not restarted: see its log above");
                    return;
                }
                other => {
                    tracing::warn!(vm = %a.vm_id, "sidecar ended after {ran:?}: {other:?}; restarting in {backoff:?}");
                    tokio::select! {
                        _ = self.stop.notified() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn spawn(&self, a: &Attachment) -> std::io::Result<Child> {
        let l = &self.launch;
        let mut c = Command::new(&l.endophyte);
        c.arg("sidecar")
            .arg("--qmp")
            .arg(&l.qmp)
            .arg("--vm-id")
            .arg(&a.vm_id)
            .arg("--node")
            .arg(&a.node)
            .arg("--certs")
            .arg(&l.certs)
            .arg("--control-socket")
            .arg(&l.control);
        if let Some(cfg) = &a.config {
            c.arg("--config").arg(cfg);
        } else if !a
            .args
            .iter()
            .any(|f| f == "--staging" || f.starts_with("--staging="))
        {
            c.arg("--staging").arg(HOOK_STAGING);
        }
        for b in &a.backups {
            c.arg("--backup").arg(b);
        }
        if !l.etcd.is_empty() {
            c.arg("--etcd").arg(l.etcd.join(","));
        }
        c.args(&a.args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
    }
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn stop(child: &mut Child) -> std::io::Result<ExitStatus> {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on the pid of a child we own and have not yet reaped, so it is not reused.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            tracing::warn!("the sidecar did not stop within {STOP_GRACE:?}; killing it");
            child.kill().await?;
            child.wait().await
        }
    }
}
