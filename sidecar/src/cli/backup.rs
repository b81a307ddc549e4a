//! `endophyte backup`: a backup node, with the VMM it starts VMs with for switchovers and promotes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use endophyte_engine::backup::{BackupConfig, BackupNode};
use endophyte_engine::store::{CrashPoint, Durability};
use endophyte_qemu::QemuLauncher;
use endophyte_vmm::attach::launch::AttachLauncher;
use endophyte_vmm::Launcher;

/// `endophyte backup`'s flags.
#[derive(Args)]
pub struct BackupArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// Directory for replicas (one subdirectory per VM).
    #[arg(long)]
    data_dir: PathBuf,
    /// Certificate directory (ca.pem, <node>.pem, <node>.key).
    #[arg(long)]
    certs: PathBuf,
    /// This node's name.
    #[arg(long)]
    node: String,
    /// Epochs staged per VM at once.
    #[arg(long, default_value_t = 4)]
    max_staged_epochs: usize,
    /// The command that starts an attach-protocol VMM on standby for a switchover or a promote; `{socket}`
    /// becomes its attach socket in the VM's directory, e.g. "testvm standby --attach-socket {socket}".
    /// Default: this binary's `testvm-serve --standby` (with the `demo` feature); without one, switchovers
    /// and promotes are refused, saying so.
    #[arg(long, conflicts_with = "target_qemu")]
    target_vmm: Option<String>,
    /// Start VMs here as QEMUs instead, from this command line: the VM's machine and devices as on its
    /// source, with `-qmp unix:{qmp},server=on,wait=off` for the monitor this backup drives (`{dir}` and
    /// `{vm}` name the VM's directory and id); `-incoming defer -S` is added. Words as in sh (quotes, backslashes).
    #[arg(long)]
    target_qemu: Option<String>,
    /// When an epoch counts as committed: `disk` once its journal is fsynced (survives the backup host's
    /// loss), `memory` once it is written and verified (survives the backup process's crash; a host crash
    /// loses at most the epochs since the last checkpoint, and the primary resyncs from the older epoch).
    #[arg(long, value_enum, default_value_t = Durability::Disk)]
    durability: Durability,
    /// Test hook: abort halfway through applying the first epoch with pages at or above this one.
    #[arg(long, hide = true)]
    crash_during_apply: Option<u64>,
    /// Test hook: abort with a switchover prepared (VMM started, VM restored, not yet answered).
    #[arg(long, hide = true)]
    crash_during_switchover: bool,
    /// Test hook: hang for good at the commit of the first epoch at or above this one.
    #[arg(long, hide = true)]
    hang_at_commit: Option<u64>,
    /// Serve the control API on this Unix socket (`endophyte status`, `endophyte promote`).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Serve the services API (gRPC, proto/services_v1.proto) on this Unix socket.
    #[arg(long)]
    services_socket: Option<PathBuf>,
    /// How long services have to restore their state before a VM started here (switchover, promote)
    /// resumes, ms; one that takes longer is reported and the VM resumes.
    #[arg(long, default_value_t = 2000)]
    service_restore_ms: u64,
    /// Also serve `GET /metrics` (Prometheus) on this TCP address, e.g. 0.0.0.0:9401 (the control socket
    /// serves it too).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The primaries' lease, ms: how long a primary may be silent before this backup presumes it dead
    /// and allows a promote. Sidecars refuse a lease that is not safely above their self-fence bound.
    #[arg(long, default_value_t = endophyte_engine::backup::DEFAULT_LEASE.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1000..=600_000))]
    lease_ms: u64,
    /// The fencing authority: etcd v3 endpoints, comma-separated (`http://127.0.0.1:2379`). A promote then
    /// needs the VM's holder to have lost its lease there; `--force` is refused.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Recover every replica (redo interrupted commits), print each VM's committed epoch as JSON, exit.
    #[arg(long)]
    recover_only: bool,
}

/// The default target VMM command: this binary's testvm VMM, when it has one.
fn default_target_vmm() -> anyhow::Result<Option<Vec<String>>> {
    if !cfg!(feature = "demo") {
        return Ok(None);
    }
    let exe =
        std::env::current_exe().context("finding this binary for the default --target-vmm")?;
    Ok(Some(vec![
        exe.display().to_string(),
        "testvm-serve".into(),
        "--standby".into(),
        "--attach-socket".into(),
        "{socket}".into(),
    ]))
}

/// Runs the node until the process ends (or recovers and exits with `--recover-only`).
///
/// # Errors
/// Certificates, the data directory, a replica that cannot be recovered, a bad `--target-vmm`.
pub fn run(a: BackupArgs) -> anyhow::Result<()> {
    let identity = endophyte_engine::tls::Identity::load(&a.certs, &a.node)
        .with_context(|| format!("loading node {:?}'s certificates", a.node))?;
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let launcher: Option<Arc<dyn Launcher>> = match (&a.target_vmm, &a.target_qemu) {
        (_, Some(line)) => Some(Arc::new(
            QemuLauncher::parse(line).context("--target-qemu")?,
        )),
        (Some(line), None) => Some(Arc::new(
            AttachLauncher::parse(line).context("--target-vmm")?,
        )),
        (None, None) => match default_target_vmm()? {
            Some(cmd) => Some(Arc::new(AttachLauncher::new(cmd)?)),
            None => None,
        },
    };
    if launcher.is_none() {
        tracing::warn!("no --target-vmm: this backup keeps replicas but cannot start VMs (switchover, promote)");
    }
    let cfg = BackupConfig {
        listen: a.listen,
        data_dir: a.data_dir,
        max_staged_epochs: a.max_staged_epochs,
        crash: CrashPoint {
            during_apply: a.crash_during_apply,
            during_switchover: a.crash_during_switchover,
            hang_at_commit: a.hang_at_commit,
        },
        durability: a.durability,
        control_socket: a.control_socket,
        metrics_listen: a.metrics_listen,
        services_socket: a.services_socket,
        lease: std::time::Duration::from_millis(a.lease_ms),
        launcher,
        service_restore: std::time::Duration::from_millis(a.service_restore_ms),
        authority: (!a.etcd.is_empty())
            .then(|| endophyte_engine::AuthorityConfig::new(a.etcd.clone())),
    };
    if let Some(auth) = &cfg.authority {
        auth.validate().map_err(|e| anyhow::anyhow!(e))?;
    }
    let node = BackupNode::new(identity, cfg);
    let recovered = node.recover_all()?;
    if a.recover_only {
        let m: serde_json::Map<String, serde_json::Value> = recovered
            .into_iter()
            .map(|(vm, e)| (vm, serde_json::json!({ "committed_epoch": e })))
            .collect();
        println!("{}", serde_json::Value::Object(m));
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(node.serve())
}
