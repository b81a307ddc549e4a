//! `endophyte sidecar`: flags and TOML into a [`SidecarConfig`], the VMM attached, the engine run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use endophyte_engine::config::{BackupSpec, SidecarConfig, TrackingMode};
use endophyte_engine::primary::{run_sidecar, RunOptions};
use endophyte_qemu::{EpochMode, QemuSource};
use endophyte_vmm::attach::AttachSource;
use endophyte_vmm::{SourceVmm, Tracking};

/// `endophyte sidecar`'s flags; each overrides the TOML file's setting.
#[derive(Args)]
pub struct SidecarArgs {
    /// TOML configuration; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The VM's name.
    #[arg(long)]
    vm_id: Option<String>,
    /// The VMM's attach socket (testvm).
    #[arg(long, conflicts_with = "qmp")]
    attach_socket: Option<PathBuf>,
    /// A QMP monitor socket of a running QEMU (for example the extra monitor a libvirt domain or a
    /// KubeVirt hook adds). Epochs are its background snapshots (or pre-copy migrations where it refuses
    /// them); QEMU is driven over QMP only.
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// How changed pages are found: the VMM's dirty log, or a full snapshot per epoch diffed by page
    /// hashes (for VMMs without a dirty log; with the attach protocol, to exercise that path).
    #[arg(long, value_enum)]
    tracking: Option<endophyte_engine::config::TrackingMode>,
    /// Certificate directory.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// This node's name.
    #[arg(long)]
    node: Option<String>,
    /// Epoch length in ms.
    #[arg(long)]
    epoch_ms: Option<u64>,
    /// Staging buffer size (e.g. 32MiB).
    #[arg(long, value_parser = endophyte_engine::config::parse_bytes)]
    staging: Option<u64>,
    /// Paths per backup.
    #[arg(long)]
    paths: Option<usize>,
    /// Backups that must commit an epoch for it to be durable.
    #[arg(long)]
    quorum: Option<usize>,
    /// A backup: name=NODE,addr=IP:PORT[,paths=N][,via=RELAY+RELAY] (repeatable; replaces the file's list).
    #[arg(long = "backup", value_parser = BackupSpec::parse)]
    backups: Vec<BackupSpec>,
    /// Send chunks uncompressed.
    #[arg(long)]
    no_compress: bool,
    /// Throttle curve, e.g. linear:start=0.5,max=0.9 or exponential:start=0.3,max=0.95,steepness=4.
    #[arg(long)]
    curve: Option<String>,
    /// What to do when an epoch overflows the staging buffer.
    #[arg(long, value_enum)]
    emergency: Option<endophyte_engine::config::Emergency>,
    /// What to do with the guest when no quorum of backups answered within --fence-after-ms: pause
    /// (default; it resumes when they answer again), stop, or off.
    #[arg(long, value_enum)]
    self_fence: Option<endophyte_engine::config::SelfFencePolicy>,
    /// The fencing authority: etcd v3 endpoints, comma-separated (`http://127.0.0.1:2379`). The sidecar
    /// claims the VM there and pauses the guest once its hold cannot be shown to be alive.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The authority lease's TTL, ms (default 5000; whole seconds at etcd).
    #[arg(long)]
    authority_ttl_ms: Option<u64>,
    /// The VMM's run guard, ms (default 1500): the VMM pauses the guest once the sidecar is silent this
    /// long or dies.
    #[arg(long)]
    guard_ms: Option<u64>,
    /// The self-fence bound, ms (default 2000); each backup's lease must be safely longer.
    #[arg(long)]
    fence_after_ms: Option<u64>,
    /// Congestion controller of the paths: cubic (default, loss-based) or bbr (random loss on a long path
    /// does not cut the rate; for lossy WAN paths).
    #[arg(long, value_enum)]
    congestion: Option<endophyte_engine::tls::Congestion>,
    /// Cap on what the sidecar sends, all paths together (e.g. 20MB/s).
    #[arg(long, value_parser = endophyte_engine::config::parse_rate)]
    max_bandwidth: Option<u64>,
    /// Stop after this long (e.g. 20s), at an epoch boundary.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Append the VMM's guest RAM hash at every epoch's pause to this file (JSON lines; for tests).
    #[arg(long)]
    ram_hashes: Option<PathBuf>,
    /// Write the final report (JSON) here as well as to stdout.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Append released guest console output to this file (default: stderr).
    #[arg(long)]
    console_out: Option<PathBuf>,
    /// Serve the control API on this Unix socket (for `endophyte status`, `set` and `migrate`; they look for
    /// /run/endophyte/VM.ctl by default).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Serve the services API (gRPC, proto/services_v1.proto) on this Unix socket.
    #[arg(long)]
    services_socket: Option<PathBuf>,
    /// How long a service has to contribute to an epoch, ms (default 50; part of the epoch's pause).
    #[arg(long)]
    service_deadline_ms: Option<u64>,
    /// What a late or failing service contribution does to its epoch: skip (default; the epoch commits
    /// without it), fail (the cut is abandoned and retried), pause (the guest waits for the service).
    #[arg(long, value_enum)]
    service_policy: Option<endophyte_engine::services::ServicePolicy>,
    /// How long services may hold a converged migration's switchover, ms (default 5000).
    #[arg(long)]
    service_hold_ms: Option<u64>,
    /// Also serve `GET /metrics` (Prometheus) on this TCP address, e.g. 0.0.0.0:9400 (the control socket
    /// serves it too).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The VM's current generation (fencing token; see `fence.json` on the node it was started on).
    #[arg(long)]
    generation: Option<u64>,
    /// Release guest console output at once instead of when its epoch is durable.
    #[arg(long)]
    no_output_commit: bool,
}

fn config(a: &SidecarArgs) -> anyhow::Result<SidecarConfig> {
    let mut c = match &a.config {
        Some(p) => SidecarConfig::from_file(p)?,
        None => SidecarConfig::default(),
    };
    if let Some(v) = &a.vm_id {
        c.vm_id = v.clone();
    }
    if let Some(v) = &a.attach_socket {
        c.attach_socket = v.clone();
        c.qmp = None;
    }
    if let Some(v) = &a.qmp {
        c.qmp = Some(v.clone());
        c.attach_socket = PathBuf::new();
    }
    if let Some(v) = a.tracking {
        c.tracking = v;
    }
    if let Some(v) = &a.certs {
        c.certs = v.clone();
    }
    if let Some(v) = &a.node {
        c.node = v.clone();
    }
    if let Some(v) = a.epoch_ms {
        c.epoch_ms = v;
        c.explicit.epoch_ms = true;
    }
    if let Some(v) = a.staging {
        c.staging = v;
        c.explicit.staging = true;
    }
    if let Some(v) = a.paths {
        c.paths_per_backup = v;
    }
    if let Some(v) = a.quorum {
        c.quorum = v;
    }
    if !a.backups.is_empty() {
        c.backups = a.backups.clone();
    }
    if a.no_compress {
        c.compress = false;
    }
    if let Some(v) = &a.curve {
        c.curve = v.clone();
    }
    if let Some(v) = a.congestion {
        c.congestion = v;
    }
    if let Some(v) = a.self_fence {
        c.self_fence = v;
    }
    if let Some(v) = a.fence_after_ms {
        c.fence_after_ms = v;
    }
    if !a.etcd.is_empty() {
        c.authority = Some(endophyte_engine::AuthorityConfig::new(a.etcd.clone()));
    }
    if let (Some(v), Some(auth)) = (a.authority_ttl_ms, c.authority.as_mut()) {
        auth.ttl_ms = v;
    }
    if let Some(v) = a.guard_ms {
        c.guard_ms = v;
    }
    if let Some(v) = a.emergency {
        c.emergency = v;
    }
    if let Some(v) = a.max_bandwidth {
        c.max_bandwidth = Some(v);
    }
    if let Some(v) = &a.control_socket {
        c.control_socket = Some(v.clone());
    }
    if let Some(v) = &a.services_socket {
        c.services_socket = Some(v.clone());
    }
    if let Some(v) = a.service_deadline_ms {
        c.service_deadline_ms = v;
    }
    if let Some(v) = a.service_policy {
        c.service_policy = v;
    }
    if let Some(v) = a.service_hold_ms {
        c.service_hold_ms = v;
    }
    if let Some(v) = a.metrics_listen {
        c.metrics_listen = Some(v);
    }
    if let Some(v) = a.generation {
        c.generation = v;
    }
    if a.no_output_commit {
        c.output_commit = false;
    }
    c.validate()?;
    Ok(c)
}

/// Runs the sidecar and prints its report.
///
/// # Errors
/// A bad configuration, a VMM that cannot be attached, or the run's failure.
pub fn run(a: &SidecarArgs) -> anyhow::Result<()> {
    let cfg = config(a)?;
    let vmm: Arc<dyn SourceVmm> = match &cfg.qmp {
        Some(qmp) => {
            let q = QemuSource::connect(qmp, &std::env::temp_dir())
                .with_context(|| format!("attaching to QEMU through {}", qmp.display()))?;
            if let EpochMode::PreCopy { why } = q.mode() {
                eprintln!("endophyte: QEMU refuses background snapshots ({why}); epochs are pre-copy migrations cut with stop");
            }
            Arc::new(q)
        }
        None => {
            let tracking = match cfg.tracking {
                TrackingMode::DirtyLog => Tracking::DirtyLog,
                TrackingMode::FullSnapshot => Tracking::FullSnapshot,
            };
            Arc::new(
                AttachSource::connect(&cfg.attach_socket, tracking)
                    .with_context(|| format!("attaching to {}", cfg.attach_socket.display()))?,
            )
        }
    };
    let report = run_sidecar(
        cfg,
        vmm,
        RunOptions {
            duration: a.duration,
            duration_after_initial_copy: false,
            ram_hashes: a.ram_hashes.clone(),
            final_hash_only: false,
            report: a.report.clone(),
            console_out: a.console_out.clone(),
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
