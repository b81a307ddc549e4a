//! `endophyte-kubevirt-hook`: the KubeVirt hook sidecar (or, with `--plugin`, the VEP-190 plugin
//! sidecar) that attaches Endophyte to the VM of its virt-launcher pod.
//!
//! At start it binds its gRPC socket (`endophyte.sock`) in the socket directory and makes the private
//! subdirectory `endophyte/` (virt-launcher's collector skips subdirectories) where QEMU's added monitor
//! (`qmp.sock`) and the sidecar's control socket (`control.sock`) go. Each domain define adds the monitor
//! and starts the sidecar once QEMU opens it; `Shutdown` or SIGTERM stops the sidecar (its final epoch).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use endophyte_kubevirt_hooks::proto::{info, plugins_v1alpha1, v1alpha1, v1alpha2, v1alpha3};
use endophyte_kubevirt_hooks::server::{Hook, HOOKS_DIR, PLUGIN_DIR, PRIVATE, SOCKET};
use endophyte_kubevirt_hooks::supervisor::{SidecarLaunch, Supervisor};

/// The KubeVirt hook sidecar that attaches Endophyte to its pod's VM.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Serve the plugin's DomainHookService (VEP-190, gate `Plugins`) instead of the hook sidecar's
    /// Info and Callbacks.
    #[arg(long)]
    plugin: bool,
    /// Where the gRPC socket goes (default /var/run/kubevirt-hooks, or
    /// /var/run/kubevirt-plugin/endophyte with --plugin).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// The socket directory as the compute container (QEMU) sees it (default
    /// /var/run/kubevirt-hooks/$CONTAINER_NAME for a hook sidecar, the socket directory for a plugin).
    #[arg(long)]
    compute_dir: Option<PathBuf>,
    /// The endophyte binary the sidecar runs as.
    #[arg(long, default_value = "endophyte")]
    endophyte: PathBuf,
    /// The certificate directory (a mounted Secret with ca.pem and the node's certificate and key).
    #[arg(long, default_value = "/etc/endophyte/certs")]
    certs: PathBuf,
    /// The uid QEMU runs as, given the private directory so that QEMU can create its monitor there
    /// (KubeVirt's qemu user is 107); applied when this process runs as root.
    #[arg(long, default_value_t = 107)]
    qemu_uid: u32,
    /// The fencing authority for every sidecar this hook starts: etcd v3 endpoints, comma-separated
    /// (the manifests' `endophyte-etcd` cluster). VM annotations cannot change it.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let socket_dir = a
        .socket_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(if a.plugin { PLUGIN_DIR } else { HOOKS_DIR }));
    let compute_dir = match (&a.compute_dir, a.plugin) {
        (Some(d), _) => d.clone(),
        (None, true) => socket_dir.clone(),
        (None, false) => {
            let c = std::env::var("CONTAINER_NAME").context(
                "CONTAINER_NAME is not set (KubeVirt sets it in hook sidecar containers); give --compute-dir",
            )?;
            Path::new(HOOKS_DIR).join(c)
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(a, socket_dir, compute_dir))
}

async fn serve(a: Args, socket_dir: PathBuf, compute_dir: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&socket_dir)
        .with_context(|| format!("creating {}", socket_dir.display()))?;
    let private = socket_dir.join(PRIVATE);
    std::fs::create_dir_all(&private).with_context(|| format!("creating {}", private.display()))?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o770))?;
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&private, Some(a.qemu_uid), None)
            .with_context(|| format!("giving {} to uid {}", private.display(), a.qemu_uid))?;
    }
    let sock = socket_dir.join(SOCKET);
    if sock.exists() {
        std::fs::remove_file(&sock).with_context(|| format!("removing {}", sock.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("binding {}", sock.display()))?;
    let supervisor = Supervisor::new(SidecarLaunch {
        endophyte: a.endophyte.clone(),
        certs: a.certs.clone(),
        qmp: private.join("qmp.sock"),
        control: private.join("control.sock"),
        etcd: a.etcd.clone(),
    });
    let hook = Hook {
        qmp_for_qemu: compute_dir
            .join(PRIVATE)
            .join("qmp.sock")
            .display()
            .to_string(),
        supervisor: Arc::clone(&supervisor),
    };
    tracing::info!(socket = %sock.display(), monitor = %hook.qmp_for_qemu, plugin = a.plugin, "serving");
    let mut router = tonic::transport::Server::builder();
    let router = if a.plugin {
        router.add_service(
            plugins_v1alpha1::domain_hook_service_server::DomainHookServiceServer::new(hook),
        )
    } else {
        router
            .add_service(info::info_server::InfoServer::new(hook.clone()))
            .add_service(v1alpha1::callbacks_server::CallbacksServer::new(
                hook.clone(),
            ))
            .add_service(v1alpha2::callbacks_server::CallbacksServer::new(
                hook.clone(),
            ))
            .add_service(v1alpha3::callbacks_server::CallbacksServer::new(hook))
    };
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = stop_tx.send(());
    // Connections a client left open would hold a graceful stop forever: give them a little while.
    match tokio::time::timeout(std::time::Duration::from_secs(3), server).await {
        Ok(Ok(r)) => r.context("serving gRPC")?,
        Ok(Err(e)) => return Err(e).context("the gRPC server task"),
        Err(_) => tracing::warn!("clients still connected after 3 s; closing anyway"),
    }
    tracing::info!("stopping: the sidecar's final epoch, then exit");
    supervisor.shutdown().await;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
