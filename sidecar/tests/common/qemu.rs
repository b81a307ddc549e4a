//! QEMU VMs for the end-to-end tests: the project's QEMU guest (testvm's hotset twin), RAM filled by the
//! host in /dev/shm, a monitor for the sidecar and one for the test.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use endophyte_demo::qemu::vm::guest_status;
use endophyte_demo::qemu::vm::{no_userfaultfd_filter, Guest};
use endophyte_qemu::qmp::Qmp;
use endophyte_qemu::source::hash::masked_ram_hash;
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

/// The project's QEMU guest with this file's RAM size: `hot` pages at `rate` pages/s.
fn guest(elf: &Path, hot: u64, rate: u64) -> Guest {
    Guest {
        elf: elf.to_owned(),
        mem: MEM_MIB << 20,
        hot_pages: hot,
        rate,
        tsc_hz: qemu_guest::tsc_hz(),
    }
}

/// The machine, devices and guest, as a command line after the program: RAM the memory backend
/// `backend` (its id `mem0`), the guest at `rate` pages/s over the hot set.
pub fn vm_args(backend: &str, elf: &Path, rate: u64) -> Vec<String> {
    vm_args_hot(backend, elf, HOT_PAGES, rate)
}

/// As [`vm_args`] with a hot set of `hot` pages.
pub fn vm_args_hot(backend: &str, elf: &Path, hot: u64, rate: u64) -> Vec<String> {
    guest(elf, hot, rate).args(backend)
}

/// RAM as a shared mapping of the file `ram`.
pub fn file_backend(ram: &Path) -> String {
    format!(
        "memory-backend-file,id=mem0,size={MEM_MIB}M,mem-path={},share=on",
        ram.display()
    )
}

/// The `endophyte backup --target-qemu` command line for this VM: its machine and devices with anonymous
/// RAM, the monitor the backup drives, a second one for the test (`{dir}/probe.qmp`), the serial console
/// in the VM's directory.
pub fn target_template(elf: &Path) -> String {
    guest(elf, HOT_PAGES, 1).target_template()
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
        let filter = no_userfaultfd_filter().unwrap();
        // The closure runs in the forked child before exec.
        // SAFETY: it only makes system calls (prctl, seccomp) on a filter built before the fork, and allocates nothing.
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

/// A monitor connection, waiting up to 30 s for the socket.
pub fn connect(path: &Path) -> Qmp {
    endophyte_demo::qemu::vm::connect(path, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"))
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

/// The sidecar flags for the QEMU behind `qmp`: VM `vm1`, node `primary`, control socket `ctl`.
pub fn sidecar_args(qmp: &Path, certs: &Path, ctl: &Path) -> Vec<String> {
    vec![
        "--vm-id=vm1".into(),
        format!("--qmp={}", qmp.display()),
        format!("--certs={}", certs.display()),
        "--node=primary".into(),
        format!("--control-socket={}", ctl.display()),
    ]
}

/// The replica in `vm_dir`: its first `mem_bytes` of RAM hashed as QEMU's `pmemsave` is hashed
/// ([`masked_ram_hash`]: the legacy window left out), and the guest's counter in it.
pub fn replica_hash_and_counter(vm_dir: &Path, mem_bytes: u64) -> (String, u64) {
    let file = vm_dir.join("replica.img");
    let mut main = std::fs::read(&file).unwrap();
    main.truncate(mem_bytes as usize);
    let (_, counter) = qemu_guest::status_in_file(&file)
        .unwrap()
        .expect("the guest's status record in the replica");
    (masked_ram_hash(&mut main), counter)
}

/// After a sidecar run with `--ram-hashes hashes` stopped (its final epoch cut with the guest paused and
/// hashed from QEMU's `pmemsave`): checks that the backup's replica in `vm_dir` is that epoch's RAM;
/// returns the epoch, that hash and the guest's counter in the replica.
pub fn final_epoch_is_pmemsave(hashes: &Path, vm_dir: &Path, mem_bytes: u64) -> (u64, String, u64) {
    let h = super::ram_hashes(hashes);
    let (&last, qemu_hash) = h.last_key_value().expect("the final epoch's hash");
    assert_eq!(super::checkpoint_reaching(vm_dir, last), last);
    let (want, counter) = replica_hash_and_counter(vm_dir, mem_bytes);
    assert_eq!(&want, qemu_hash, "replica against pmemsave, epoch {last}");
    (last, want, counter)
}
