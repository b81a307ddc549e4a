//! The demos' processes on loopback: two `endophyte backup` processes (each with a relay on every other
//! path) and, for the testvm demos, a testvm VMM (`endophyte testvm-serve`), all children of this
//! process, killed with it.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use endophyte_engine::config::BackupSpec;

/// Child processes, killed and reaped when dropped.
pub struct Kids(pub Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// Runs `f` in a fresh scratch directory `$TMPDIR/endophyte-<name>-<pid>`, removed afterwards whatever
/// `f` returned.
///
/// # Errors
/// The directory cannot be made; `f`'s error.
pub fn in_scratch_dir<T>(
    name: &str,
    f: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let dir = std::env::temp_dir().join(format!("endophyte-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Waits (up to `limit`) until `path` exists.
///
/// # Errors
/// It did not appear.
pub fn wait_for(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while !path.exists() {
        if t.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Two backups on loopback, each with a relay on every other path.
pub struct Backups {
    /// The processes.
    pub kids: Kids,
    /// The network's certificates (nodes `primary`, `backup-1`, `backup-2`).
    pub certs: PathBuf,
    /// The backups, for the sidecar's configuration.
    pub backups: Vec<BackupSpec>,
    /// Each backup's directory for the demo VM (`demo-vm`).
    pub data_dirs: Vec<PathBuf>,
    /// Each backup's control socket.
    pub controls: Vec<PathBuf>,
    /// Each backup's services socket.
    pub services: Vec<PathBuf>,
}

/// Starts, in `dir`, the certificates and two backups (`backup-1`, `backup-2`) given `extra` flags, each
/// reached over `paths` paths of which every other one goes through a relay.
///
/// # Errors
/// A process did not start.
pub fn start_backups(dir: &Path, paths: usize, extra: &[String]) -> anyhow::Result<Backups> {
    let exe = std::env::current_exe()?;
    let certs = dir.join("certs");
    endophyte_engine::tls::init_network(&certs, "demo")?;
    for n in ["primary", "backup-1", "backup-2"] {
        endophyte_engine::tls::issue_node(&certs, n)?;
    }
    let mut kids = Kids(vec![]);
    let mut backups = vec![];
    let mut data_dirs: Vec<PathBuf> = vec![];
    let mut controls = vec![];
    let mut services = vec![];
    for (i, name) in ["backup-1", "backup-2"].iter().enumerate() {
        let addr = free_udp_port()?;
        let data = dir.join(format!("data-{}", i + 1));
        let control = dir.join(format!("{name}.ctl"));
        let svc = dir.join(format!("{name}.svc"));
        kids.0.push(
            Command::new(&exe)
                .args(["backup", "--listen", &addr.to_string(), "--node", name])
                .arg("--certs")
                .arg(&certs)
                .arg("--data-dir")
                .arg(&data)
                .arg("--control-socket")
                .arg(&control)
                .arg("--services-socket")
                .arg(&svc)
                .args(extra)
                .stdin(Stdio::null())
                .spawn()
                .context("starting a backup")?,
        );
        // Every other path of each backup goes through a relay.
        let relay = free_udp_port()?;
        kids.0.push(
            Command::new(&exe)
                .args(["relay", "--route", &format!("{relay}={addr}")])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a relay")?,
        );
        backups.push(BackupSpec {
            name: name.to_string(),
            addr,
            paths: Some(paths),
            via: vec![relay],
        });
        data_dirs.push(data.join("demo-vm"));
        controls.push(control);
        services.push(svc);
    }
    Ok(Backups {
        kids,
        certs,
        backups,
        data_dirs,
        controls,
        services,
    })
}

/// The demo's processes on loopback: two backups (each with a relay on every other path) and a testvm VMM.
pub struct Cluster {
    /// The processes.
    pub kids: Kids,
    /// The network's certificates.
    pub certs: PathBuf,
    /// The backups, for the sidecar's configuration.
    pub backups: Vec<BackupSpec>,
    /// Each backup's directory for the demo VM.
    pub data_dirs: Vec<PathBuf>,
    /// The VMM's attach socket.
    pub socket: PathBuf,
    /// Each backup's control socket.
    pub controls: Vec<PathBuf>,
    /// Each backup's services socket.
    pub services: Vec<PathBuf>,
}

impl Cluster {
    /// The demos' sidecar for this cluster: VM `demo-vm` on its VMM, node `primary`, both backups
    /// over `paths` paths each, durable once both committed.
    pub fn sidecar_config(&self, paths: usize) -> endophyte_engine::config::SidecarConfig {
        endophyte_engine::config::SidecarConfig {
            vm_id: "demo-vm".into(),
            attach_socket: self.socket.clone(),
            certs: self.certs.clone(),
            node: "primary".into(),
            paths_per_backup: paths,
            quorum: 2,
            backups: self.backups.clone(),
            ..Default::default()
        }
    }
}

/// Starts the cluster in `dir`: certificates, backups (committing with `durability`), relays, and a VMM
/// with `mem` bytes running `workload`; returns once the VMM's attach socket is there.
///
/// # Errors
/// A process did not start, or the VMM's socket did not appear within a minute.
pub fn start_cluster(
    dir: &Path,
    paths: usize,
    mem: u64,
    workload: &str,
    durability: endophyte_engine::store::Durability,
) -> anyhow::Result<Cluster> {
    let exe = std::env::current_exe()?;
    let Backups {
        mut kids,
        certs,
        backups,
        data_dirs,
        controls,
        services,
    } = start_backups(
        dir,
        paths,
        &[
            "--durability".into(),
            clap::ValueEnum::to_possible_value(&durability)
                .expect("every level has a name")
                .get_name()
                .into(),
        ],
    )?;
    let socket = dir.join("vm.sock");
    kids.0.push(
        Command::new(&exe)
            .args(["testvm-serve", "--fill", "--workload", workload])
            .arg("--mem")
            .arg(mem.to_string())
            .arg("--attach-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .context("starting testvm")?,
    );
    wait_for(&socket, Duration::from_secs(60))?;
    Ok(Cluster {
        kids,
        certs,
        backups,
        data_dirs,
        socket,
        controls,
        services,
    })
}
