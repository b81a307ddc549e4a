//! The KubeVirt hook end to end, on one machine standing in for a virt-launcher pod and two backup
//! nodes: the hook binary in its socket directory, a collector that calls it as virt-launcher does, and a
//! real libvirtd that defines and starts the domain the hook returned. The hook runs the Endophyte
//! sidecar against the monitor it added, which replicates the guest to both backups; `virsh` pauses and
//! resumes the domain meanwhile; the VM migrates to one backup, whose QEMU was started from the command
//! line libvirt gives for the domain (`endophyte target-template`), with equal `pmemsave` hashes on both
//! sides; Shutdown then finds the sidecar gone. That backup dies; the other's replica is QEMU's own
//! `pmemsave` of the guest at its committed epoch, and, exported as a libvirt save image, comes back with
//! `virsh restore`, its guest counting on from the replica.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::libvirt::*;
use common::qemu::{connect, final_epoch_is_pmemsave, pages, replica_hash_and_counter};
use common::*;
use endophyte_kubevirt_hooks::collector;
use serde_json::json;

/// The hook binary. `cargo test --workspace` builds it beside this test's binaries (for the hook crate's
/// own tests); when it is missing or older than the hook's sources (this test run alone after an edit),
/// cargo builds it (another package's binary is not given to this one's tests).
fn hook_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let sibling = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("endophyte-kubevirt-hook"));
    let newest_source =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../kubevirt-hooks/src"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()
            .unwrap();
    if let Some(s) = sibling.filter(|s| {
        s.metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= newest_source)
    }) {
        return s;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .args([
            "build",
            "--profile",
            "test",
            "-p",
            "endophyte-kubevirt-hooks",
            "--bin",
            "endophyte-kubevirt-hook",
            "--message-format",
            "json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(o.status.success(), "building the hook");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .find(|p| p.ends_with("endophyte-kubevirt-hook"))
        .expect("cargo named the hook's executable")
}

/// The VM id the hook derives from [`vmi`]'s owning VirtualMachine's UID, which is also its node name.
const VM: &str = "vm-0e2e0e2e-0000-4000-8000-000000000001";

/// The hook binary, a scratch directory and the reaper of what runs in it.
fn setup() -> (PathBuf, tempfile::TempDir, Reaper) {
    let exe = hook_binary();
    let tmp = tempfile::tempdir().unwrap();
    let reaper = Reaper(tmp.path().to_owned());
    (exe, tmp, reaper)
}

/// The VMI virt-launcher passes: replicated to `backups`, all of which must commit each epoch, with the
/// guest RAM hash of every epoch appended to `hashes`.
fn vmi(backups: &[(&str, std::net::SocketAddr)], hashes: &Path) -> Vec<u8> {
    let backups: Vec<String> = backups
        .iter()
        .map(|(n, a)| format!("name={n},addr={a}"))
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "vm-e2e",
            "namespace": "default",
            "uid": "0e2e0e2e-0000-4000-8000-0000000000ff",
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm-e2e", "uid": "0e2e0e2e-0000-4000-8000-000000000001"}],
            "annotations": {
                "hooks.kubevirt.io/hookSidecars": "[{\"image\": \"endophyte-kubevirt-hook\"}]",
                "endophyte.io/backups": backups.join("; "),
                "endophyte.io/sidecar-args": format!("--quorum {} --ram-hashes {}", backups.len(), hashes.display()),
            }
        },
        "spec": {"domain": {"devices": {}}}
    }))
    .unwrap()
}

#[test]
fn a_vm_the_hook_defined_replicates_migrates_and_comes_back_from_its_replica() {
    if !kvm_available() || !libvirtd() {
        return;
    }
    let (hook_exe, tmp, _reaper) = setup();
    let vm = VM;
    let certs = certs(tmp.path(), "test", &[vm, "b1", "b2"]);
    let (a1, a2) = (free_udp(), free_udp());
    let (d1, d2) = (tmp.path().join("d1"), tmp.path().join("d2"));
    let mut b2 = backup(&certs, "b2", a2, &d2, &[]);
    let (elf, run) = prepare(tmp.path());

    let pod = Pod::start(&hook_exe, tmp.path(), &certs);
    let (rt, c) = (&pod.rt, &pod.hook);
    let mine = pod.dir.clone();

    // The domain virt-launcher would define, through the hook.
    let name = unique_name("kubevirt");
    let original = domain_xml(&name, &elf, &run, 2000, false);
    let hashes = tmp.path().join("hashes.jsonl");
    let vmi = vmi(&[("b1", a1), ("b2", a2)], &hashes);
    let defined = rt
        .block_on(c.on_define_domain(original.as_bytes(), &vmi))
        .unwrap();
    let xml = tmp.path().join("defined.xml");
    std::fs::write(&xml, &defined).unwrap();

    // b1 can take the VM: its QEMU is the one libvirt runs for this domain.
    let o = Command::new(EXE)
        .args([
            "target-template",
            "--libvirt-xml",
            &xml.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let template = String::from_utf8(o.stdout).unwrap();
    let _b1 = backup(&certs, "b1", a1, &d1, &["--target-qemu", template.trim()]);

    let (dom, mut probe) = create(&xml, &name, &run);
    // The hook started the sidecar on the monitor it added.
    let ctl = mine.join("endophyte/control.sock");
    status_until(&ctl, Duration::from_secs(120), "replication", |s| {
        (0..2).all(|i| s["backups"][i]["committed_epoch"].as_u64() > Some(3))
    });
    let sidecar_pid = pid_naming(&ctl.display().to_string()).expect("the sidecar the hook started");
    assert_eq!(domstate(&dom.name), "running");
    suspend_and_resume(&dom.name, &mut probe);
    // A second define (virt-launcher defines again on changes) adds nothing and keeps the sidecar.
    let again = rt.block_on(c.on_define_domain(&defined, &vmi)).unwrap();
    assert_eq!(again, defined);
    let migratable = tmp.path().join("migratable.xml");
    std::fs::write(
        &migratable,
        virsh_ok(&["dumpxml", "--migratable", &dom.name]),
    )
    .unwrap();

    // Migration to b1; both QEMUs' own pmemsave hashes of guest RAM at the switchover.
    let before = pages(&mut probe);
    let out = Command::new(EXE)
        .args(["migrate", vm, "--to", "b1", "--verify", "--output", "json"])
        .arg("--control")
        .arg(&ctl)
        .env("RUST_LOG", log_level())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &st["report"];
    assert!(
        r["source_ram_hash"].as_str().is_some_and(|h| h.len() == 64),
        "{r}"
    );
    assert_eq!(r["target_ram_hash"], r["source_ram_hash"], "{r}");
    drop(probe);
    // The source QEMU quit once the guest ran on b1: libvirt saw its domain end, and still answers.
    let t = std::time::Instant::now();
    while virsh_ok(&["list", "--all", "--name"])
        .lines()
        .any(|l| l.trim() == dom.name)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "libvirt still lists the source domain"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut on_b1 = connect(&d1.join(vm).join("probe.qmp"));
    let p0 = pages(&mut on_b1);
    std::thread::sleep(Duration::from_millis(500));
    let p1 = pages(&mut on_b1);
    assert!(
        p0 >= before && p1 > p0,
        "the guest on b1: {before}, then {p0}, {p1}"
    );
    // KubeVirt calls Shutdown once QEMU is gone: the sidecar ended with the migration.
    rt.block_on(c.shutdown()).unwrap();
    assert!(
        !Path::new("/proc").join(sidecar_pid.to_string()).exists(),
        "the sidecar outlived Shutdown"
    );

    // b1 dies with the guest; b2's replica is the guest's RAM at its committed epoch, by pmemsave.
    drop(on_b1);
    if let Some(q) = pid_naming(&d1.display().to_string()) {
        // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
        unsafe { libc::kill(q, libc::SIGKILL) };
    }
    b2.kill();
    let vm_dir = d2.join(vm);
    let e = checkpoint(&vm_dir);
    let h = ram_hashes(&hashes);
    let (want, in_replica) = replica_hash_and_counter(&vm_dir, MEM_MIB << 20);
    assert_eq!(
        Some(&want),
        h.get(&e),
        "b2's replica against pmemsave, epoch {e}"
    );

    // b2's replica comes back through libvirt.
    restore_export(&d2, vm, &migratable, &dom, &want, in_replica);
}

/// A stand-in for a virt-launcher pod with the hook sidecar: the hook binary in its socket directory
/// (`<dir>/hooks/hook-sidecar-0`, which is also the compute side's view), collected as virt-launcher does.
struct Pod {
    rt: tokio::runtime::Runtime,
    hook: collector::Collected,
    dir: PathBuf,
    _proc: Proc,
}

impl Pod {
    fn start(hook_exe: &Path, dir: &Path, certs: &Path) -> Self {
        // virt-launcher's /var/run/kubevirt-hooks; the hook container's emptyDir is its hook-sidecar-0.
        let hooks = dir.join("hooks");
        let mine = hooks.join("hook-sidecar-0");
        std::fs::create_dir_all(&mine).unwrap();
        let proc = Proc {
            child: Command::new(hook_exe)
                .args(["--socket-dir", &mine.display().to_string()])
                .args(["--compute-dir", &mine.display().to_string()])
                .args(["--endophyte", EXE])
                .args(["--certs", &certs.display().to_string()])
                .args(["--qemu-uid", &qemu_uid().to_string()])
                .env("RUST_LOG", log_level())
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
            name: "hook".into(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut found = rt
            .block_on(collector::collect(&hooks, 1, Duration::from_secs(30)))
            .unwrap();
        Self {
            rt,
            hook: found.remove(0),
            dir: mine,
            _proc: proc,
        }
    }
}

#[test]
fn shutdown_stops_the_hooks_sidecar_with_a_final_epoch() {
    if !kvm_available() || !libvirtd() {
        return;
    }
    let (hook_exe, tmp, _reaper) = setup();
    let vm = VM;
    let certs = certs(tmp.path(), "test", &[vm, "b1"]);
    let a1 = free_udp();
    let d1 = tmp.path().join("d1");
    let _b1 = backup(&certs, "b1", a1, &d1, &[]);
    let (elf, run) = prepare(tmp.path());
    let pod = Pod::start(&hook_exe, tmp.path(), &certs);
    let name = unique_name("shutdown");
    let hashes = tmp.path().join("hashes.jsonl");
    let defined = pod
        .rt
        .block_on(pod.hook.on_define_domain(
            domain_xml(&name, &elf, &run, 2000, false).as_bytes(),
            &vmi(&[("b1", a1)], &hashes),
        ))
        .unwrap();
    let xml = tmp.path().join("defined.xml");
    std::fs::write(&xml, &defined).unwrap();
    let (dom, mut probe) = create(&xml, &name, &run);
    let ctl = pod.dir.join("endophyte/control.sock");
    status_until(&ctl, Duration::from_secs(120), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(3)
    });
    let sidecar = pid_naming(&ctl.display().to_string()).expect("the sidecar the hook started");
    let before = pages(&mut probe);
    // While QEMU runs (a pod deleted before its VM stopped): the sidecar's final epoch, cut paused and
    // hashed from QEMU's pmemsave, then its exit.
    pod.rt.block_on(pod.hook.shutdown()).unwrap();
    assert!(
        !Path::new("/proc").join(sidecar.to_string()).exists(),
        "the sidecar outlived Shutdown"
    );
    let (_, _, in_replica) = final_epoch_is_pmemsave(&hashes, &d1.join(vm), MEM_MIB << 20);
    assert!(in_replica >= before, "{in_replica} < {before}");
    // The guest runs on, no longer replicated.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        pages(&mut probe) > in_replica,
        "the guest stopped with its sidecar"
    );
    assert_eq!(domstate(&dom.name), "running");
}

/// The first process (not this one) whose command line contains `needle`.
fn pid_naming(needle: &str) -> Option<i32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| p.file_name() != me.as_str())
        .find(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .and_then(|p| p.file_name().to_string_lossy().parse().ok())
}
