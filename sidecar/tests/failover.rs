//! Failover: the primary (VMM and sidecar) dies; the backup refuses to promote while the primary's lease
//! is live, then starts the VM from its last committed epoch. Checked on the guest RAM hash the source
//! VMM took at that epoch's pause and on the guest's own counter.

mod common;

use std::time::{Duration, Instant};

use common::*;
use endophyte_attach::client::AttachClient;

fn promote(ctl: &std::path::Path, force: bool) -> Result<serde_json::Value, String> {
    let body = serde_json::json!({ "vm": "vm1", "force": force, "verify": true });
    endophyte_engine::control::request(ctl, "POST", "/v1/promote", Some(&body))
        .map_err(|e| e.to_string())
}

#[test]
fn a_backup_promotes_its_last_committed_epoch_once_the_primary_is_gone() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path(), "test", &["primary", "b1"]);
    let a1 = free_udp();
    let d1 = tmp.path().join("d1");
    let bctl = tmp.path().join("b1.ctl");
    let _b1 = backup(
        &certs,
        "b1",
        a1,
        &d1,
        &[&format!("--control-socket={}", bctl.display())],
    );
    let sock = tmp.path().join("vm.sock");
    let mut vm = vmm(&sock, "64MiB", "hotset:size=16M,rate=5000");
    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
    ]);
    let mut sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(60), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(5)
    });

    // The primary node dies: VMM and sidecar at once.
    sidecar.kill().unwrap();
    vm.kill();
    let _ = sidecar.wait();
    let died = Instant::now();

    // Within the lease the backup refuses, naming the lease.
    let e = promote(&bctl, false).unwrap_err();
    assert!(e.contains("lease"), "{e}");
    // Once it expires (3 s), it promotes.
    let started = loop {
        match promote(&bctl, false) {
            Ok(v) => break v,
            Err(e) if died.elapsed() < Duration::from_secs(10) => {
                assert!(e.contains("lease"), "{e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("promote still refused after 10 s: {e}"),
        }
    };
    eprintln!("promoted: {started}");
    let epoch = started["epoch"].as_u64().unwrap();
    // The VM started from exactly the committed epoch: its RAM is what the source VMM hashed at that
    // epoch's pause.
    let h = ram_hashes(&hashes);
    assert_eq!(
        started["ram_hash"].as_str(),
        Some(h[&epoch].as_str()),
        "epoch {epoch}"
    );
    // And it runs: the guest's own counter advances.
    let vm2 = AttachClient::connect(started["vmm_socket"].as_str().unwrap(), "test").unwrap();
    let p0 = guest_pages(&vm2);
    std::thread::sleep(Duration::from_millis(500));
    assert!(guest_pages(&vm2) > p0);
    // A second promote is refused: the VM runs here.
    let e = promote(&bctl, true).unwrap_err();
    assert!(e.contains("already runs"), "{e}");
    let st = endophyte_engine::control::request(&bctl, "GET", "/v1/status", None).unwrap();
    assert_eq!(st["vms"][0]["fence"]["state"], "running", "{st}");
    vm2.shutdown().unwrap();
}
