//! QEMU VMs for the end-to-end tests: the project's QEMU guest (testvm's hotset twin), RAM filled by the
//! host in /dev/shm, a monitor for the sidecar and one for the test.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_qemu::qmp::Qmp;
use testvm::qemu_guest;

pub const MEM_MIB: u64 = 64;
/// The hot set: 4 MiB from 4 MiB up.
pub const HOT_PAGES: u64 = 1024;

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

/// The guest program, written into `dir`.
pub fn guest_elf(dir: &Path) -> PathBuf {
    let p = dir.join("guest.elf");
    std::fs::write(&p, qemu_guest::GUEST_ELF).unwrap();
    p
}

/// The machine, devices and guest, as a command line after the program: RAM the memory backend
/// `backend` (its id `mem0`), the guest at `rate` pages/s over the hot set.
pub fn vm_args(backend: &str, elf: &Path, rate: u64) -> Vec<String> {
    vm_args_hot(backend, elf, HOT_PAGES, rate)
}

/// As [`vm_args`] with a hot set of `hot` pages.
pub fn vm_args_hot(backend: &str, elf: &Path, hot: u64, rate: u64) -> Vec<String> {
    let accel = if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        "kvm"
    } else {
        "tcg"
    };
    vec![
        "-accel".into(),
        accel.into(),
        "-machine".into(),
        "pc,memory-backend=mem0".into(),
        "-cpu".into(),
        "qemu64".into(),
        "-smp".into(),
        "1".into(),
        "-m".into(),
        format!("{MEM_MIB}M"),
        "-object".into(),
        backend.into(),
        "-display".into(),
        "none".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-kernel".into(),
        elf.display().to_string(),
        "-append".into(),
        qemu_guest::cmdline(hot, rate, qemu_guest::tsc_hz(), true),
    ]
}

/// RAM as a shared mapping of the file `ram`.
pub fn file_backend(ram: &Path) -> String {
    format!(
        "memory-backend-file,id=mem0,size={MEM_MIB}M,mem-path={},share=on",
        ram.display()
    )
}

/// The `endophyte backup --target-qemu` command line for this VM: its machine and devices with anonymous
/// RAM, the monitor the backup drives, a second one for the test (`{dir}/test.qmp`), the serial console
/// in the VM's directory.
pub fn target_template(elf: &Path) -> String {
    let mut words = vec!["qemu-system-x86_64".to_string()];
    words.extend(vm_args(
        &format!("memory-backend-ram,id=mem0,size={MEM_MIB}M"),
        elf,
        1,
    ));
    words.extend([
        "-qmp".into(),
        "unix:{qmp},server=on,wait=off".into(),
        "-qmp".into(),
        "unix:{dir}/test.qmp,server=on,wait=off".into(),
        "-serial".into(),
        "file:{dir}/serial.log".into(),
    ]);
    shell_words::join(words)
}

/// A QEMU the test started, killed when dropped, with its RAM file removed.
pub struct Vm {
    pub child: Child,
    pub sidecar_qmp: PathBuf,
    pub test: Qmp,
    pub ram: PathBuf,
    /// Where its stderr (`qemu.err`) and console (`serial.log`) go.
    pub dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows what QEMU said and its state.
            let st = self.test.execute("query-status", serde_json::Value::Null);
            let err = std::fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default();
            let console = std::fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default();
            eprintln!(
                "QEMU's status: {st:?}\nQEMU's stderr:\n{err}\nThe guest's console:\n{console}"
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ram);
    }
}

/// A RAM file in /dev/shm of its own for a VM of this test process (tests run in parallel threads of
/// one process: a name per call, or their QEMUs would share guest RAM).
pub fn shm(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(format!(
        "/dev/shm/endophyte-test-{}-{tag}-{n}.ram",
        std::process::id()
    ))
}

/// Boots the guest with RAM filled by the host, two monitors, and waits until its workload runs. Without
/// `userfaultfd`, QEMU runs under a seccomp filter that refuses it the userfaultfd(2) system call, as
/// the default seccomp profiles of Docker and containerd do for a process without CAP_SYS_PTRACE.
pub fn boot(dir: &Path, rate: u64, userfaultfd: bool) -> Vm {
    boot_hot(dir, HOT_PAGES, rate, userfaultfd)
}

/// As [`boot`] with a hot set of `hot` pages.
pub fn boot_hot(dir: &Path, hot: u64, rate: u64, userfaultfd: bool) -> Vm {
    let ram = shm("source");
    qemu_guest::prefill(&ram, MEM_MIB << 20).unwrap();
    let elf = guest_elf(dir);
    let sidecar_qmp = dir.join("sidecar.qmp");
    let test_qmp = dir.join("test.qmp");
    let mut cmd = Command::new("qemu-system-x86_64");
    if !userfaultfd {
        let filter = no_userfaultfd_filter();
        // SAFETY: the closure runs in the forked child before exec; it only makes system calls (prctl,
        // seccomp) on a filter built before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || seccompiler::apply_filter(&filter).map_err(std::io::Error::other));
        }
    }
    let child = cmd
        .args(vm_args_hot(&file_backend(&ram), &elf, hot, rate))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sidecar_qmp.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", test_qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("serial.log").display()))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
        .spawn()
        .expect("starting QEMU");
    let test = connect(&test_qmp);
    let mut vm = Vm {
        child,
        sidecar_qmp,
        test,
        ram,
        dir: dir.to_owned(),
    };
    let t = Instant::now();
    while guest_status(&mut vm.test).map(|s| s.0) != Some(2) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the guest did not start its workload"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    vm
}

/// A seccomp filter that fails userfaultfd(2) with EPERM and allows everything else.
fn no_userfaultfd_filter() -> seccompiler::BpfProgram {
    let rules = std::collections::BTreeMap::from([(libc::SYS_userfaultfd, vec![])]);
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .unwrap();
    filter.try_into().unwrap()
}

/// A monitor connection, waiting up to 30 s for the socket.
pub fn connect(path: &Path) -> Qmp {
    let t = Instant::now();
    loop {
        match Qmp::connect(path, Duration::from_secs(60)) {
            Ok(q) => return q,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "QMP {}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn read_u64(q: &mut Qmp, gpa: u64) -> Option<u64> {
    let out = q.hmp(&format!("xp /1gx {gpa:#x}")).ok()?;
    let hex = out.split(':').nth(1)?.trim().strip_prefix("0x")?;
    u64::from_str_radix(hex, 16).ok()
}

/// The guest's status record, through the monitor: `(state, pages written)`.
pub fn guest_status(q: &mut Qmp) -> Option<(u64, u64)> {
    if read_u64(q, qemu_guest::STATUS_GPA)? != qemu_guest::STATUS_MAGIC {
        return None;
    }
    Some((
        read_u64(q, qemu_guest::STATUS_GPA + qemu_guest::ST_STATE)?,
        read_u64(q, qemu_guest::STATUS_GPA + qemu_guest::ST_PAGES)?,
    ))
}

/// The guest's pages-written counter, through the monitor.
pub fn pages(q: &mut Qmp) -> u64 {
    guest_status(q).expect("the guest's status record").1
}

/// Pages (by byte offset) where `a` and `b` differ, outside the legacy window 0xa0000-0x100000,
/// where QEMU's physical view shows firmware over RAM by design.
pub fn differing_ram_pages(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .map(|(i, p)| ((i * 4096) as u64, p))
        .filter(|(at, _)| !(0xa0000..0x100000).contains(at))
        .filter(|(_, (x, y))| x != y)
        .map(|(at, _)| at)
        .collect()
}
