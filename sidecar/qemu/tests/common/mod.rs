//! Real QEMU processes for the tests: started with the project's guest or none, RAM in a file the test
//! filled, a QMP monitor for the test. Without qemu-system-x86_64 the tests skip, except under CI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_qemu::qmp::Qmp;

/// Whether QEMU is installed; under CI its absence is a failure.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var_os("CI").is_some() {
        panic!("CI must install qemu-system-x86");
    }
    ok
}

/// KVM when /dev/kvm opens, TCG otherwise.
pub fn accel() -> &'static str {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        "kvm"
    } else {
        "tcg"
    }
}

/// A QEMU process, killed when dropped.
pub struct Qemu {
    pub child: Child,
    pub qmp_path: PathBuf,
    pub log: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// A QMP connection to it.
    pub fn qmp(&self) -> Qmp {
        let t = Instant::now();
        loop {
            match Qmp::connect(&self.qmp_path, Duration::from_secs(60)) {
                Ok(q) => return q,
                Err(e) => {
                    assert!(
                        t.elapsed() < Duration::from_secs(30),
                        "QEMU's monitor never answered: {e}: {}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// The machine and device arguments the tests' VMs share (source and target alike): `mem` MiB of RAM in
/// `ram_file` (shared, so that background snapshots can write-protect it).
pub fn vm_args(mem_mib: u64, ram_file: &Path) -> Vec<String> {
    vec![
        "-machine".into(),
        format!("pc,accel={},memory-backend=mem0", accel()),
        "-cpu".into(),
        "qemu64".into(),
        "-smp".into(),
        "1".into(),
        "-m".into(),
        format!("{mem_mib}M"),
        "-object".into(),
        format!(
            "memory-backend-file,id=mem0,size={mem_mib}M,mem-path={},share=on",
            ram_file.display()
        ),
        "-display".into(),
        "none".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
    ]
}

/// Starts QEMU with `args` plus a monitor at `dir/<name>.qmp` and a log at `dir/<name>.log`.
pub fn start(dir: &Path, name: &str, args: &[String]) -> Qemu {
    let qmp_path = dir.join(format!("{name}.qmp"));
    let log = dir.join(format!("{name}.log"));
    let child = Command::new("qemu-system-x86_64")
        .args(args)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .expect("starting qemu-system-x86_64");
    Qemu {
        child,
        qmp_path,
        log,
    }
}

/// A RAM file in /dev/shm (tmpfs: QEMU can write-protect shared memory there), filled by the host.
pub struct RamFile(pub PathBuf);

impl Drop for RamFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn ram_file(tag: &str, mem_mib: u64) -> RamFile {
    let p = PathBuf::from(format!(
        "/dev/shm/endophyte-test-{tag}-{}.ram",
        std::process::id()
    ));
    testvm::qemu_guest::prefill(&p, mem_mib << 20).unwrap();
    RamFile(p)
}
