//! The demo's QEMU guests: testvm's QEMU twin ([`testvm::qemu_guest`]) on a machine both the source and the
//! backups' QEMUs are started with, its RAM a /dev/shm file the host filled, read through a monitor of the
//! demo's own; and the CPU QEMU's threads other than the vCPUs used.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use endophyte_qemu::qmp::Qmp;
use serde_json::Value;
use testvm::qemu_guest;

/// The guest: RAM, hot set and rate.
#[derive(Clone, Debug)]
pub struct Guest {
    /// The guest program, written out.
    pub elf: PathBuf,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// Hot set, pages.
    pub hot_pages: u64,
    /// Page writes per second.
    pub rate: u64,
    /// The host's TSC frequency, Hz, which the guest paces by ([`qemu_guest::tsc_hz`]).
    pub tsc_hz: u64,
}

impl Guest {
    /// The machine, devices and guest after the program, RAM the backend `backend` (id `mem0`); named
    /// threads (`CPU 0/KVM`), so that QEMU's other threads' CPU can be told apart.
    pub fn args(&self, backend: &str) -> Vec<String> {
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
        let mut a: Vec<String> = [
            "-name",
            "demo-vm,debug-threads=on",
            "-accel",
            accel,
            "-machine",
            "pc,memory-backend=mem0",
            "-cpu",
            "qemu64",
            "-smp",
            "1",
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-kernel",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(self.elf.display().to_string());
        a.push("-append".into());
        a.push(qemu_guest::cmdline(
            self.hot_pages,
            self.rate,
            self.tsc_hz,
            true,
        ));
        a.push("-m".into());
        a.push(format!("{}M", self.mem >> 20));
        a.push("-object".into());
        a.push(backend.into());
        a
    }

    /// `endophyte backup --target-qemu`: the same machine with anonymous RAM, the backup's monitor, the
    /// demo's (`{dir}/probe.qmp`) and the console in the VM's directory.
    pub fn target_template(&self) -> String {
        let mut w = vec!["qemu-system-x86_64".to_string()];
        w.extend(self.args(&format!(
            "memory-backend-ram,id=mem0,size={}M",
            self.mem >> 20
        )));
        w.extend(
            [
                "-qmp",
                "unix:{qmp},server=on,wait=off",
                "-qmp",
                "unix:{dir}/probe.qmp,server=on,wait=off",
                "-serial",
                "file:{dir}/serial.log",
            ]
            .map(String::from),
        );
        shell_words::join(w)
    }
}

/// A QEMU of the demo's, killed on drop; its RAM file removed.
pub struct QemuVm {
    /// The process.
    pub child: Child,
    /// The monitor the sidecar uses.
    pub sidecar_qmp: PathBuf,
    /// The demo's monitor.
    pub probe: Qmp,
    /// The RAM file in /dev/shm.
    pub ram: PathBuf,
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ram);
    }
}

/// Boots `guest` in `dir` (tag `tag` names its files) with RAM filled by the host, extra QEMU arguments
/// `extra`; returns once its workload runs. With `deny_userfaultfd`, QEMU runs under a seccomp filter
/// that fails userfaultfd(2) with EPERM, as the default seccomp profiles of Docker and containerd do for
/// a process without CAP_SYS_PTRACE: it then refuses background snapshots.
///
/// # Errors
/// QEMU did not start, or the guest did not reach its workload within 2 minutes.
pub fn boot(
    dir: &Path,
    tag: &str,
    guest: &Guest,
    extra: &[String],
    deny_userfaultfd: bool,
) -> anyhow::Result<QemuVm> {
    let ram = PathBuf::from(format!(
        "/dev/shm/endophyte-demo-{}-{tag}.ram",
        std::process::id()
    ));
    qemu_guest::prefill(&ram, guest.mem).with_context(|| format!("filling {}", ram.display()))?;
    let sidecar_qmp = dir.join(format!("{tag}.qmp"));
    let probe_qmp = dir.join(format!("{tag}-probe.qmp"));
    let backend = format!(
        "memory-backend-file,id=mem0,size={}M,mem-path={},share=on",
        guest.mem >> 20,
        ram.display()
    );
    let err = dir.join(format!("{tag}.err"));
    let mut cmd = Command::new("qemu-system-x86_64");
    if deny_userfaultfd {
        let filter = no_userfaultfd_filter()?;
        // The closure runs in the forked child before exec.
        // SAFETY: it only makes system calls (prctl, seccomp) on a filter built before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || seccompiler::apply_filter(&filter).map_err(std::io::Error::other));
        }
    }
    let child = cmd
        .args(guest.args(&backend))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sidecar_qmp.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", probe_qmp.display()))
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("{tag}.serial")).display()
        ))
        .args(extra)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let probe = match connect(&probe_qmp, Duration::from_secs(30)) {
        Ok(q) => q,
        Err(e) => {
            let said = std::fs::read_to_string(&err).unwrap_or_default();
            bail!("{e}; QEMU said: {}", said.trim());
        }
    };
    let mut vm = QemuVm {
        child,
        sidecar_qmp,
        probe,
        ram,
    };
    let t = Instant::now();
    while guest_status(&mut vm.probe).map(|s| s.0) != Some(2) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the guest did not start its workload within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(vm)
}

/// A seccomp filter that fails userfaultfd(2) with EPERM and allows everything else (what a container
/// runtime's default profile does to a process without CAP_SYS_PTRACE).
///
/// # Errors
/// The filter cannot be compiled for this architecture.
pub fn no_userfaultfd_filter() -> anyhow::Result<seccompiler::BpfProgram> {
    let rules = std::collections::BTreeMap::from([(libc::SYS_userfaultfd, vec![])]);
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// A QMP connection, waiting up to `limit` for the socket.
///
/// # Errors
/// It did not answer in time.
pub fn connect(path: &Path, limit: Duration) -> anyhow::Result<Qmp> {
    let t = Instant::now();
    loop {
        match Qmp::connect(path, Duration::from_secs(60)) {
            Ok(q) => return Ok(q),
            Err(e) if t.elapsed() > limit => {
                return Err(e).with_context(|| format!("QEMU's monitor {}", path.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn read_u64(q: &mut Qmp, gpa: u64) -> Option<u64> {
    let out = q.hmp(&format!("xp /1gx {gpa:#x}")).ok()?;
    let hex = out.split(':').nth(1)?.trim().strip_prefix("0x")?;
    u64::from_str_radix(hex, 16).ok()
}

/// The guest's status record read by QEMU (`xp`): `(state, pages written)`.
pub fn guest_status(q: &mut Qmp) -> Option<(u64, u64)> {
    if read_u64(q, qemu_guest::STATUS_GPA)? != qemu_guest::STATUS_MAGIC {
        return None;
    }
    Some((
        read_u64(q, qemu_guest::STATUS_GPA + qemu_guest::ST_STATE)?,
        read_u64(q, qemu_guest::STATUS_GPA + qemu_guest::ST_PAGES)?,
    ))
}

/// The guest's counter through `q` now and `after` later.
///
/// # Errors
/// The monitor does not show the guest's record.
pub fn counter_over(q: &mut Qmp, after: Duration) -> anyhow::Result<(u64, u64)> {
    let a = guest_status(q).context("reading the guest's counter")?.1;
    std::thread::sleep(after);
    let b = guest_status(q).context("reading the guest's counter")?.1;
    Ok((a, b))
}

/// CPU time (user + system) QEMU process `pid`'s threads other than its vCPUs (`CPU n/KVM`, `CPU n/TCG`)
/// used so far: its main loop, I/O and migration threads, those that exited included (a migration
/// thread lives for one migration). The process's total (`/proc/PID/stat`, which keeps exited threads'
/// time) less its vCPU threads'.
pub fn non_vcpu_cpu(pid: u32) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |stat: &Path| -> u64 {
        let stat = std::fs::read_to_string(stat).unwrap_or_default();
        // Fields after the command (which may hold spaces) in parentheses: utime and stime are the
        // 14th and 15th of proc(5), the 12th and 13th after it.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
        } else {
            0
        }
    };
    let total = ticks(Path::new(&format!("/proc/{pid}/stat")));
    let mut vcpus = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.starts_with("CPU ") {
                vcpus += ticks(&t.path().join("stat"));
            }
        }
    }
    Duration::from_secs_f64(total.saturating_sub(vcpus) as f64 / hz)
}

/// CPU time (user + system) this process used so far.
pub fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given; no other memory is involved.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// `query-migrate`'s answer.
///
/// # Errors
/// The monitor failed.
pub fn query_migrate(q: &mut Qmp) -> anyhow::Result<Value> {
    Ok(q.execute("query-migrate", Value::Null)?)
}
