//! A domain that a real libvirtd runs, replicated by the sidecar through the extra QMP monitor its XML
//! adds, checked against QEMU's own `pmemsave`; its replica exported as a libvirt save image and brought
//! back with `virsh restore`, whose guest has the replica's RAM (by `pmemsave` again, restored paused)
//! and goes on counting from the replica's value once `virsh resume` runs it.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::libvirt::*;
use common::qemu::{connect, pages};
use common::*;
use endophyte_qemu::source::hash::masked_ram_hash;
use serde_json::{json, Value};

fn export(args: &[&str]) -> Output {
    Command::new(EXE)
        .arg("export")
        .args(args)
        .env("RUST_LOG", log_level())
        .output()
        .unwrap()
}

#[test]
fn a_libvirt_domain_is_replicated_and_its_replica_comes_back_with_virsh_restore() {
    if !kvm_available() || !libvirtd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = Reaper(tmp.path().to_owned());
    let certs = certs(tmp.path(), "test", &["primary", "b1"]);
    let a1 = free_udp();
    let d1 = tmp.path().join("d1");
    let mut b1 = backup(&certs, "b1", a1, &d1, &[]);
    let (dom, mut probe) = start(tmp.path(), "restore", 2000);

    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let sidecar = sidecar_start(&[
        "--vm-id=vm1".into(),
        format!("--qmp={}", dom.sidecar_qmp.display()),
        format!("--certs={}", certs.display()),
        "--node=primary".into(),
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
        format!("--ram-hashes={}", hashes.display()),
    ]);
    status_until(&ctl, Duration::from_secs(90), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(3)
    });
    // libvirt still sees and controls the domain it started: a pause and resume through virsh while
    // epochs run.
    assert_eq!(domstate(&dom.name), "running");
    suspend_and_resume(&dom.name, &mut probe);

    // The final epoch is cut with the guest paused and hashed from QEMU's pmemsave.
    let report = sidecar_stop(sidecar);
    assert_eq!(report["tracking"], "full_snapshot", "{report}");
    let h = ram_hashes(&hashes);
    let (&last, qemu_hash) = h.last_key_value().expect("the final epoch's hash");
    let vm_dir = d1.join("vm1");
    assert_eq!(checkpoint_reaching(&vm_dir, last), last);
    let (want, in_replica) = replica_hash_and_counter(&vm_dir);
    assert_eq!(&want, qemu_hash, "replica against pmemsave, epoch {last}");

    // The domain goes away (its XML kept, as libvirt's own save keeps it) and so does the backup
    // daemon, which holds the replica while it serves it.
    let xml = tmp.path().join("migratable.xml");
    std::fs::write(&xml, virsh_ok(&["dumpxml", "--migratable", &dom.name])).unwrap();
    virsh_ok(&["destroy", &dom.name]);
    drop(probe);
    b1.kill();

    let image = dom.run.join("vm1.save");
    let o = export(&[
        "--data-dir",
        &d1.display().to_string(),
        "--vm",
        "vm1",
        "--format",
        "libvirt",
        "--domain-xml",
        &xml.display().to_string(),
        "--paused",
        "--output",
        &image.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(said["epoch"].as_u64(), Some(last), "{said}");

    // libvirtd reads the image, defines the domain from its XML and feeds QEMU the stream.
    virsh_ok(&["restore", &image.display().to_string()]);
    assert_eq!(domstate(&dom.name), "paused", "restored as the image says");
    let mut probe = connect(&dom.probe_qmp);
    let dump = dom.run.join("restored.pmem");
    probe
        .execute(
            "pmemsave",
            json!({"val": 0, "size": MEM_MIB << 20, "filename": dump.display().to_string()}),
        )
        .unwrap();
    let mut restored = std::fs::read(&dump).unwrap();
    assert_eq!(
        masked_ram_hash(&mut restored),
        want,
        "the restored guest's RAM against the replica"
    );
    assert_eq!(
        pages(&mut probe),
        in_replica,
        "paused at the replica's count"
    );
    virsh_ok(&["resume", &dom.name]);
    std::thread::sleep(Duration::from_millis(500));
    let now = pages(&mut probe);
    assert!(
        now > in_replica,
        "the restored guest goes on: {in_replica} then {now}"
    );
    assert_eq!(domstate(&dom.name), "running");
}
