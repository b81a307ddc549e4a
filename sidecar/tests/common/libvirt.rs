//! A real libvirtd for the end-to-end tests: started if it is not running, and transient domains of the
//! project's QEMU guest on it (destroyed when dropped). QEMU runs as libvirt's `libvirt-qemu` user, so the
//! files it reads and the directory its sockets go in are made reachable by that user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::qemu::{connect, guest_status, HOT_PAGES};
use endophyte_qemu::qmp::Qmp;
use testvm::qemu_guest;

/// The libvirt connection every call uses.
pub const URI: &str = "qemu:///system";
/// The user libvirt runs QEMU as (Debian's default `user` in qemu.conf).
const QEMU_USER: &str = "libvirt-qemu";

/// Runs `virsh -c URI args...`.
pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running virsh (apt-get install libvirt-clients): {e}"))
}

/// Runs virsh and returns its stdout; panics with its stderr when it fails.
pub fn virsh_ok(args: &[&str]) -> String {
    let o = virsh(args);
    assert!(
        o.status.success(),
        "virsh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Whether a libvirtd with the QEMU driver answers, starting `virtlogd` and `libvirtd` as daemons if it
/// does not. Without libvirt installed: false, or a failure under CI (`.ci/run` installs it).
pub fn libvirtd() -> bool {
    let installed = Command::new("virsh")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Path::new("/usr/sbin/libvirtd").exists();
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install libvirt-daemon-system and libvirt-clients"
        );
        return false;
    }
    let answers = || virsh(&["version"]).status.success();
    if !answers() {
        // Several test binaries may race here; a second daemon exits on the first's pid file.
        let _ = Command::new("/usr/sbin/virtlogd").arg("-d").status();
        let _ = Command::new("/usr/sbin/libvirtd").arg("-d").status();
        let t = Instant::now();
        while !answers() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "libvirtd did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let kvm = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode() & 0o006);
    assert_eq!(
        kvm.ok(),
        Some(0o006),
        "/dev/kvm must be readable and writable by {QEMU_USER} (chmod 666 /dev/kvm, as .ci/run does)"
    );
    true
}

/// A transient libvirt domain of the project's QEMU guest: destroyed when dropped.
pub struct Domain {
    /// Its libvirt name.
    pub name: String,
    /// The directory QEMU's sockets and dumps go in (owned by libvirt's QEMU user).
    pub run: PathBuf,
    /// The monitor the domain XML adds for the sidecar.
    pub sidecar_qmp: PathBuf,
    /// The monitor it adds for the test.
    pub probe_qmp: PathBuf,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

/// Guest RAM of the libvirt tests' domains, MiB: the guest fills it itself (libvirt creates the memfd, so
/// the host cannot), about 2 s per MiB above the 4 MiB it keeps zero under this machine's emulation.
pub const MEM_MIB: u64 = 16;

/// The domain XML of the project's QEMU guest named `name`: `MEM_MIB` of shared memfd RAM (what
/// background snapshots can write-protect, and what KubeVirt's memfd backing gives), the CPU model this
/// machine's KVM runs, no devices beyond the serial console, and extra QMP monitors in `run` added
/// through the qemu namespace: the test's, and the sidecar's when `sidecar_monitor` (a KubeVirt hook adds
/// its own otherwise).
pub fn domain_xml(name: &str, elf: &Path, run: &Path, rate: u64, sidecar_monitor: bool) -> String {
    let cmdline = qemu_guest::cmdline(HOT_PAGES, rate, qemu_guest::tsc_hz(), false);
    let sidecar = if sidecar_monitor {
        format!(
            "\n    <qemu:arg value='-qmp'/>\n    <qemu:arg value='unix:{}/sidecar.qmp,server=on,wait=off'/>",
            run.display()
        )
    } else {
        String::new()
    };
    let run = run.display();
    format!(
        r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{MEM_MIB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{elf}</kernel>
    <cmdline>{cmdline}</cmdline>
  </os>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='allow'>qemu64</model>
    <feature policy='disable' name='svm'/>
  </cpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='file'><source path='{run}/serial.log'/></serial>
  </devices>
  <qemu:commandline>{sidecar}
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{run}/probe.qmp,server=on,wait=off'/>
  </qemu:commandline>
</domain>
"#,
        elf = elf.display()
    )
}

/// Makes `dir` (a test's scratch directory) and its parents up to /tmp traversable by libvirt's QEMU user,
/// writes the guest program there, and creates `dir/run` owned by that user.
pub fn prepare(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let elf = dir.join("guest.elf");
    std::fs::write(&elf, qemu_guest::GUEST_ELF).unwrap();
    std::fs::set_permissions(&elf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let o = Command::new("chown")
        .arg(format!("{QEMU_USER}:"))
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "chown {QEMU_USER} {}: {}",
        run.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    (elf, run)
}

/// A domain name of its own for this test process.
pub fn unique_name(tag: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("endophyte-test-{}-{tag}-{n}", std::process::id())
}

/// Starts a transient domain of the guest in `dir` at `rate` pages/s and waits until the guest runs its
/// workload (it fills its RAM first); returns it and the test's monitor.
pub fn start(dir: &Path, tag: &str, rate: u64) -> (Domain, Qmp) {
    let name = unique_name(tag);
    let (elf, run) = prepare(dir);
    let xml = dir.join(format!("{name}.xml"));
    std::fs::write(&xml, domain_xml(&name, &elf, &run, rate, true)).unwrap();
    create(&xml, &name, &run)
}

/// Starts the transient domain `xml` (named `name`, its monitors in `run`) and waits for its workload.
pub fn create(xml_file: &Path, name: &str, run: &Path) -> (Domain, Qmp) {
    virsh_ok(&["create", &xml_file.display().to_string()]);
    let dom = Domain {
        name: name.to_string(),
        sidecar_qmp: run.join("sidecar.qmp"),
        probe_qmp: run.join("probe.qmp"),
        run: run.to_owned(),
    };
    let mut probe = connect(&dom.probe_qmp);
    wait_workload(&mut probe);
    (dom, probe)
}

/// The uid libvirt runs QEMU as.
pub fn qemu_uid() -> u32 {
    let o = Command::new("id").args(["-u", QEMU_USER]).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("the libvirt-qemu user")
}

/// Waits up to 2 minutes for the guest behind `q` to report its workload running.
pub fn wait_workload(q: &mut Qmp) {
    let t = Instant::now();
    while guest_status(q).map(|s| s.0) != Some(2) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the guest did not start its workload within 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `virsh domstate NAME`, trimmed (`running`, `paused`, `shut off`).
pub fn domstate(name: &str) -> String {
    virsh_ok(&["domstate", name]).trim().to_string()
}

/// Pauses and resumes the domain through virsh while a sidecar replicates it, and checks that libvirt
/// tracks both and that the guest runs after. QEMU 7.2 resumes the VM at the end of a background
/// snapshot's setup whatever its run state, so a suspend landing in that ~10 ms pause is undone
/// (docs/qemu.md); a user suspends again, as this does.
pub fn suspend_and_resume(name: &str, probe: &mut Qmp) {
    let mut paused = false;
    for _ in 0..5 {
        virsh_ok(&["suspend", name]);
        std::thread::sleep(Duration::from_millis(300));
        if domstate(name) == "paused" {
            paused = true;
            break;
        }
    }
    assert!(paused, "virsh suspend did not hold in 5 tries");
    virsh_ok(&["resume", name]);
    assert_eq!(domstate(name), "running");
    let p = super::qemu::pages(probe);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        super::qemu::pages(probe) > p,
        "the guest resumed by virsh runs"
    );
}

/// Exports the replica of `vm` kept in `data_dir` as a libvirt save image of the domain XML `xml`
/// (`--paused`), brings it back with `virsh restore`, and checks that the domain returns paused with the
/// replica's RAM (`want_hash`, by QEMU's own `pmemsave`) and the guest's counter at `counter`, and counts
/// on once `virsh resume` runs it. Returns the export's JSON report.
pub fn restore_export(
    data_dir: &Path,
    vm: &str,
    xml: &Path,
    dom: &Domain,
    want_hash: &str,
    counter: u64,
) -> serde_json::Value {
    let image = dom.run.join(format!("{vm}.save"));
    let o = Command::new(super::EXE)
        .args(["export", "--data-dir", &data_dir.display().to_string()])
        .args(["--vm", vm, "--format", "libvirt", "--paused"])
        .args(["--domain-xml", &xml.display().to_string()])
        .args(["--output", &image.display().to_string()])
        .env("RUST_LOG", super::log_level())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // libvirtd reads the image, defines the domain from its XML and feeds QEMU the stream.
    virsh_ok(&["restore", &image.display().to_string()]);
    assert_eq!(domstate(&dom.name), "paused", "restored as the image says");
    let mut probe = connect(&dom.probe_qmp);
    // QEMU (libvirt's user) writes the dump into the run directory.
    let restored =
        endophyte_qemu::source::hash::pmem_hash(&mut probe, &dom.run, MEM_MIB << 20).unwrap();
    assert_eq!(
        restored, want_hash,
        "the restored guest's RAM against the replica"
    );
    assert_eq!(
        super::qemu::pages(&mut probe),
        counter,
        "paused at the replica's count"
    );
    virsh_ok(&["resume", &dom.name]);
    std::thread::sleep(Duration::from_millis(500));
    let now = super::qemu::pages(&mut probe);
    assert!(
        now > counter,
        "the restored guest goes on: {counter} then {now}"
    );
    assert_eq!(domstate(&dom.name), "running");
    serde_json::from_slice(&o.stdout).unwrap()
}
