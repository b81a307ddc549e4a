//! The KubeVirt hook end to end, on one machine standing in for a virt-launcher pod: the hook binary in
//! its socket directory, a collector that calls it as virt-launcher does, and a real libvirtd that
//! defines and starts the domain the hook returned. The hook runs the Endophyte sidecar against the
//! monitor it added, which replicates the guest to a backup; `virsh` pauses and resumes the domain
//! meanwhile; Shutdown stops the sidecar with its final epoch, whose replica is QEMU's own `pmemsave`; the
//! replica, exported as a libvirt save image, comes back with `virsh restore` and the guest's counter
//! goes on from it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::libvirt::*;
use common::qemu::{connect, pages};
use common::*;
use endophyte_kubevirt_hooks::collector;
use endophyte_qemu::source::hash::masked_ram_hash;
use serde_json::json;

/// The hook binary, built by cargo beside this test's binaries (another package's binary is not given
/// to this one's tests).
fn hook_binary() -> PathBuf {
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

fn vmi(backup: std::net::SocketAddr, hashes: &Path) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "vm-e2e",
            "namespace": "default",
            "annotations": {
                "hooks.kubevirt.io/hookSidecars": "[{\"image\": \"endophyte-kubevirt-hook\"}]",
                "endophyte.io/backups": format!("name=b1,addr={backup}"),
                "endophyte.io/sidecar-args": format!("--ram-hashes {}", hashes.display()),
            }
        },
        "spec": {"domain": {"devices": {}}}
    }))
    .unwrap()
}

#[test]
fn a_vm_the_hook_defined_is_replicated_and_comes_back_from_its_replica() {
    if !kvm_available() || !libvirtd() {
        return;
    }
    let hook_exe = hook_binary();
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = Reaper(tmp.path().to_owned());
    // The VM id the hook derives from the VMI, which is also its node name.
    let certs = certs(tmp.path(), "test", &["default-vm-e2e", "b1"]);
    let a1 = free_udp();
    let d1 = tmp.path().join("d1");
    let mut b1 = backup(&certs, "b1", a1, &d1, &[]);
    let (elf, run) = prepare(tmp.path());

    // virt-launcher's /var/run/kubevirt-hooks; the hook container's emptyDir is its hook-sidecar-0.
    let hooks = tmp.path().join("hooks");
    let mine = hooks.join("hook-sidecar-0");
    std::fs::create_dir_all(&mine).unwrap();
    let mut hook = Proc {
        child: Command::new(&hook_exe)
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
    let found = rt
        .block_on(collector::collect(&hooks, 1, Duration::from_secs(30)))
        .unwrap();
    let c = &found[0];

    // The domain virt-launcher would define, through the hook.
    let name = unique_name("kubevirt");
    let original = domain_xml(&name, &elf, &run, 2000, false);
    let hashes = tmp.path().join("hashes.jsonl");
    let defined = rt
        .block_on(c.on_define_domain(original.as_bytes(), &vmi(a1, &hashes)))
        .unwrap();
    let xml = tmp.path().join("defined.xml");
    std::fs::write(&xml, &defined).unwrap();
    let (dom, mut probe) = create(&xml, &name, &run);

    // The hook started the sidecar on the monitor it added.
    let ctl = mine.join("endophyte/control.sock");
    status_until(&ctl, Duration::from_secs(120), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(3)
    });
    let sidecar_pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|p| {
            std::fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*ctl.display().to_string()))
        })
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .expect("the sidecar the hook started");
    assert_eq!(domstate(&dom.name), "running");
    suspend_and_resume(&dom.name, &mut probe);
    // A second define (virt-launcher defines again on changes) adds nothing and keeps the sidecar.
    let again = rt
        .block_on(c.on_define_domain(&defined, &vmi(a1, &hashes)))
        .unwrap();
    assert_eq!(again, defined);

    // Shutdown: the sidecar's final epoch, cut paused and hashed from QEMU's pmemsave, then its exit.
    rt.block_on(c.shutdown()).unwrap();
    assert!(
        !Path::new("/proc").join(&sidecar_pid).exists(),
        "the sidecar outlived Shutdown"
    );
    let h = ram_hashes(&hashes);
    let (&last, qemu_hash) = h.last_key_value().expect("epoch hashes");
    let vm_dir = d1.join("default-vm-e2e");
    assert_eq!(checkpoint_reaching(&vm_dir, last), last);
    let mut main = std::fs::read(vm_dir.join("replica.img")).unwrap();
    main.truncate((MEM_MIB << 20) as usize);
    let want = masked_ram_hash(&mut main);
    assert_eq!(&want, qemu_hash, "replica against pmemsave, epoch {last}");
    let (_, in_replica) = testvm::qemu_guest::status_in_file(&vm_dir.join("replica.img"))
        .unwrap()
        .unwrap();

    // The node is lost: the domain and the backup daemon stop; the replica comes back through libvirt.
    let migratable = tmp.path().join("migratable.xml");
    std::fs::write(
        &migratable,
        virsh_ok(&["dumpxml", "--migratable", &dom.name]),
    )
    .unwrap();
    virsh_ok(&["destroy", &dom.name]);
    drop(probe);
    b1.kill();
    let image = run.join("vm.save");
    let o = Command::new(EXE)
        .args(["export", "--data-dir", &d1.display().to_string()])
        .args(["--vm", "default-vm-e2e", "--format", "libvirt", "--paused"])
        .args(["--domain-xml", &migratable.display().to_string()])
        .args(["--output", &image.display().to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    virsh_ok(&["restore", &image.display().to_string()]);
    assert_eq!(domstate(&dom.name), "paused");
    let mut probe = connect(&dom.probe_qmp);
    assert_eq!(pages(&mut probe), in_replica);
    virsh_ok(&["resume", &dom.name]);
    std::thread::sleep(Duration::from_millis(500));
    let now = pages(&mut probe);
    assert!(
        now > in_replica,
        "the restored guest goes on: {in_replica} then {now}"
    );
    hook.kill();
}
