//! Helpers for multi-process tests: certificates, backup/relay/VMM processes, hashes.
#![allow(dead_code)]

pub mod kv;
pub mod libvirt;
pub mod qemu;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_endophyte");

/// Whether /dev/kvm is usable; under CI its absence is a failure, not a skip.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok && std::env::var_os("CI").is_some() {
        panic!("/dev/kvm is required under CI");
    }
    ok
}

/// Log filter for the processes a test starts: `ENDOPHYTE_TEST_LOG`, default `warn`.
pub fn log_level() -> String {
    std::env::var("ENDOPHYTE_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        let child = Command::new(EXE)
            .args(args)
            .env("RUST_LOG", log_level())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Self {
            child,
            name: name.into(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn certs(dir: &Path, network: &str, nodes: &[&str]) -> PathBuf {
    let d = dir.join(format!("certs-{network}"));
    endophyte_engine::tls::init_network(&d, network).unwrap();
    for n in nodes {
        endophyte_engine::tls::issue_node(&d, n).unwrap();
    }
    d
}

pub fn backup(certs: &Path, node: &str, addr: SocketAddr, data: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "backup".to_string(),
        "--listen".into(),
        addr.to_string(),
        "--node".into(),
        node.into(),
        "--certs".into(),
        certs.display().to_string(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Proc::spawn(node, &refs)
}

pub fn relay(listen: SocketAddr, upstream: SocketAddr) -> Proc {
    Proc::spawn(
        "relay",
        &["relay", "--route", &format!("{listen}={upstream}")],
    )
}

/// Boots a testvm guest (through `endophyte testvm-serve`) and waits for its attach socket.
pub fn vmm(socket: &Path, mem: &str, workload: &str) -> Proc {
    vmm_with(socket, mem, workload, &[], None)
}

/// As [`vmm`], with extra `testvm-serve` flags, and its stderr (where the guest's console goes) appended
/// to `console` when given.
pub fn vmm_with(
    socket: &Path,
    mem: &str,
    workload: &str,
    extra: &[&str],
    console: Option<&Path>,
) -> Proc {
    let mut cmd = Command::new(EXE);
    cmd.args([
        "testvm-serve",
        "--fill",
        "--mem",
        mem,
        "--workload",
        workload,
    ])
    .arg("--attach-socket")
    .arg(socket)
    .args(extra)
    .env("RUST_LOG", log_level())
    .stdin(Stdio::null());
    if let Some(p) = console {
        cmd.stderr(std::fs::File::create(p).unwrap());
    }
    let p = Proc {
        child: cmd.spawn().expect("spawning the VMM"),
        name: "vmm".into(),
    };
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "VMM socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// Waits up to 30 s for `p` (a socket a process binds) to appear.
pub fn wait_path(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no {}", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `endophyte migrate vm1 --to TO --output json --control CTL EXTRA...`: whether it succeeded, and
/// its JSON.
pub fn migrate_cli(ctl: &Path, to: &str, extra: &[&str]) -> (bool, serde_json::Value) {
    let out = Command::new(EXE)
        .args(["migrate", "vm1", "--to", to, "--output", "json"])
        .arg("--control")
        .arg(ctl)
        .args(extra)
        .env("RUST_LOG", log_level())
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    (
        out.status.success(),
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
    )
}

pub fn hash_file(p: &Path) -> String {
    endophyte_demo::probe::hash_file(p).unwrap()
}

/// epoch -> the VMM's guest RAM hash taken during that epoch's pause.
pub fn ram_hashes(p: &Path) -> std::collections::BTreeMap<u64, String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        // Read while the sidecar runs, the last line may still be partly written.
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["epoch"].as_u64().unwrap(),
                v["ram_hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The epoch the backup's replica file holds durably (its last checkpoint).
pub fn checkpoint(vm_dir: &Path) -> u64 {
    endophyte_demo::probe::checkpoint_on_disk(vm_dir).unwrap()
}

/// Waits up to 15 s for the backup to checkpoint `epoch`; returns the checkpoint then.
pub fn checkpoint_reaching(vm_dir: &Path, epoch: u64) -> u64 {
    endophyte_demo::probe::wait_checkpoint(vm_dir, epoch, Duration::from_secs(15)).unwrap()
}

/// The sidecar flags every test uses: VM `vm1` behind `sock`, node `primary` of the `certs` network, and
/// the VMM's RAM hash at every pause appended to `hashes`.
/// The replica of `vm1` under the backup data directory `data` is exactly guest RAM at the run's last
/// epoch: its checkpoint reaches that epoch, and its bytes hash to what the VMM computed at that
/// epoch's pause (`hashes`, the sidecar's `--ram-hashes`).
pub fn assert_replica_exact(report: &serde_json::Value, hashes: &Path, data: &Path) {
    let last = report["last_epoch"].as_u64().unwrap();
    let h = ram_hashes(hashes);
    let vm_dir = data.join("vm1");
    assert_eq!(checkpoint_reaching(&vm_dir, last), last, "{report}");
    assert_eq!(hash_file(&vm_dir.join("replica.img")), h[&last], "{report}");
}

pub fn base_args(sock: &Path, certs: &Path, hashes: &Path) -> Vec<String> {
    vec![
        "--vm-id=vm1".into(),
        format!("--attach-socket={}", sock.display()),
        format!("--certs={}", certs.display()),
        "--node=primary".into(),
        format!("--ram-hashes={}", hashes.display()),
    ]
}

/// Runs `endophyte sidecar` to completion and returns its JSON report.
pub fn sidecar(args: &[String]) -> serde_json::Value {
    let out = Command::new(EXE)
        .arg("sidecar")
        .args(args)
        .env("RUST_LOG", log_level())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "sidecar failed: {:?}", out.status);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A sidecar started by [`sidecar_start`]: killed when dropped (a failed test leaves nothing running);
/// finish it with [`sidecar_stop`] or take the process with [`Sidecar::into_child`].
pub struct Sidecar(Option<Child>);

impl Sidecar {
    /// The process, no longer killed on drop.
    pub fn into_child(mut self) -> Child {
        self.0.take().expect("a running sidecar")
    }
}

impl std::ops::Deref for Sidecar {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a running sidecar")
    }
}

impl std::ops::DerefMut for Sidecar {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a running sidecar")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `endophyte sidecar` in the background; finish it with [`sidecar_stop`].
pub fn sidecar_start(args: &[String]) -> Sidecar {
    Sidecar(Some(
        Command::new(EXE)
            .arg("sidecar")
            .args(args)
            .env("RUST_LOG", log_level())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    ))
}

/// Waits up to `limit` for `child` to exit by itself; panics naming `what` otherwise.
pub fn exit_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(t.elapsed() < limit, "{what} did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asks a sidecar started by [`sidecar_start`] to stop (SIGTERM: final epoch, then exit) and returns its
/// JSON report.
pub fn sidecar_stop(sidecar: Sidecar) -> serde_json::Value {
    let child = sidecar.into_child();
    // SAFETY: kill(2) on the pid of a child we own and have not yet waited for, so the pid is not reused.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to the sidecar");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sidecar failed: {:?}", out.status);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET /v1/status` on a sidecar's control socket, waiting up to 30 s for the socket to appear.
pub fn status(ctl: &Path) -> serde_json::Value {
    let t = Instant::now();
    while !ctl.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "no control socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    endophyte_engine::control::request(ctl, "GET", "/v1/status", None).unwrap()
}

/// Polls the sidecar's status every 100 ms until `ok` holds (up to `limit`); returns the status then.
pub fn status_until(
    ctl: &Path,
    limit: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = status(ctl);
        if ok(&s) {
            return s;
        }
        assert!(t.elapsed() < limit, "{what}: not after {limit:?}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's own pages-written counter, read through an attach connection.
pub fn guest_pages(c: &endophyte_attach::client::AttachClient) -> u64 {
    endophyte_demo::probe::guest_pages_written(c).unwrap()
}

/// One backup `b1` (started with `b1_flags`) and a VMM running `workload` in `mem`, in a scratch
/// directory; certificates for `primary` and `b1`.
pub struct OneBackup {
    pub tmp: tempfile::TempDir,
    pub certs: PathBuf,
    pub a1: SocketAddr,
    pub d1: PathBuf,
    pub b1: Proc,
    pub sock: PathBuf,
    pub vmm: Proc,
}

pub fn one_backup(b1_flags: &[&str], mem: &str, workload: &str) -> OneBackup {
    one_backup_with(b1_flags, mem, workload, &[], false)
}

/// As [`one_backup`], with extra `testvm-serve` flags for the VMM, and its console (stderr) kept in
/// `<tmp>/console.log` when `console`.
pub fn one_backup_with(
    b1_flags: &[&str],
    mem: &str,
    workload: &str,
    vmm_flags: &[&str],
    console: bool,
) -> OneBackup {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path(), "test", &["primary", "b1"]);
    let a1 = free_udp();
    let d1 = tmp.path().join("d1");
    let b1 = backup(&certs, "b1", a1, &d1, b1_flags);
    let sock = tmp.path().join("vm.sock");
    let log = tmp.path().join("console.log");
    let vmm = vmm_with(
        &sock,
        mem,
        workload,
        vmm_flags,
        console.then_some(log.as_path()),
    );
    OneBackup {
        tmp,
        certs,
        a1,
        d1,
        b1,
        sock,
        vmm,
    }
}

/// Kills, when dropped, every process whose command line names `dir`: the VMs a backup started there
/// (a QEMU target outlives its backup daemon by design) must not outlive the test.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let needle = self.0.display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        let me = std::process::id().to_string();
        for p in procs.flatten() {
            let name = p.file_name().to_string_lossy().into_owned();
            if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                if let Ok(pid) = name.parse::<i32>() {
                    // SAFETY: kill(2) with a pid read from /proc and a signal number; no memory is involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}
