//! A domain that a real libvirtd runs, replicated by the sidecar through the extra QMP monitor its XML
//! adds, checked against QEMU's own `pmemsave`; its replica exported as a libvirt save image and brought
//! back with `virsh restore`, whose guest has the replica's RAM (by `pmemsave` again, restored paused)
//! and goes on counting from the replica's value once `virsh resume` runs it.

mod common;

use std::time::Duration;

use common::libvirt::*;
use common::qemu::{final_epoch_is_pmemsave, sidecar_args};
use common::*;

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
    let mut args = sidecar_args(&dom.sidecar_qmp, &certs, &ctl);
    args.push(format!("--backup=name=b1,addr={a1}"));
    args.push(format!("--ram-hashes={}", hashes.display()));
    let sidecar = sidecar_start(&args);
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
    let vm_dir = d1.join("vm1");
    let (last, want, in_replica) = final_epoch_is_pmemsave(&hashes, &vm_dir, MEM_MIB << 20);

    // The domain goes away (its XML kept, as libvirt's own save keeps it) and so does the backup
    // daemon, which holds the replica while it serves it.
    let xml = tmp.path().join("migratable.xml");
    std::fs::write(&xml, virsh_ok(&["dumpxml", "--migratable", &dom.name])).unwrap();
    virsh_ok(&["destroy", &dom.name]);
    drop(probe);
    b1.kill();

    let said = restore_export(&d1, "vm1", &xml, &dom, &want, in_replica);
    assert_eq!(said["epoch"].as_u64(), Some(last), "{said}");
}
