//! QEMU VMs started on backups: a replica promoted into a new QEMU once its primary died, and a guest
//! migrated there and back between two nodes' QEMUs. Checked on QEMU's own view of guest RAM (`pmemsave`
//! hashes, computed by the QEMUs) against the replica's bytes, and on the guest's own counter read
//! through each QEMU's monitor.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::*;
use common::*;
use serde_json::{json, Value};

/// A sidecar for the QEMU behind `qmp` on node `node`, replicating to `backup` (name, address).
fn sidecar_for(
    qmp: &Path,
    node: &str,
    certs: &Path,
    ctl: &Path,
    backup: (&str, std::net::SocketAddr),
    gen: u64,
) -> Sidecar {
    sidecar_start(&[
        "--vm-id=vm1".into(),
        format!("--qmp={}", qmp.display()),
        format!("--certs={}", certs.display()),
        format!("--node={node}"),
        format!("--backup=name={},addr={}", backup.0, backup.1),
        format!("--control-socket={}", ctl.display()),
        format!("--generation={gen}"),
    ])
}

/// A backup daemon whose VMs start as QEMUs from the guest's target command line.
fn qemu_backup(
    certs: &Path,
    node: &str,
    addr: std::net::SocketAddr,
    data: &Path,
    elf: &Path,
    ctl: Option<&Path>,
) -> Proc {
    let mut extra = vec![format!("--target-qemu={}", target_template(elf))];
    if let Some(c) = ctl {
        extra.push(format!("--control-socket={}", c.display()));
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    backup(certs, node, addr, data, &extra)
}

/// The guest's counter, through the test monitor of the QEMU a backup started for the VM in `vm_dir`,
/// checked to advance.
fn runs_on(vm_dir: &Path) -> (u64, u64) {
    let mut q = connect(&vm_dir.join("probe.qmp"));
    let p0 = pages(&mut q);
    std::thread::sleep(Duration::from_millis(500));
    let p1 = pages(&mut q);
    assert!(
        p1 > p0,
        "the guest in {} does not run: {p0} then {p1}",
        vm_dir.display()
    );
    (p0, p1)
}

#[test]
fn a_replica_is_promoted_into_a_new_qemu_whose_guest_goes_on() {
    if !kvm_available() || !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = Reaper(tmp.path().to_owned());
    let certs = certs(tmp.path(), "test", &["primary", "b1"]);
    let elf = guest_elf(tmp.path());
    let a1 = free_udp();
    let d1 = tmp.path().join("d1");
    let bctl = tmp.path().join("b1.ctl");
    let _b1 = qemu_backup(&certs, "b1", a1, &d1, &elf, Some(&bctl));
    let mut vm = boot(tmp.path(), 2000, true);
    let ctl = tmp.path().join("sidecar.ctl");
    let mut sidecar = sidecar_for(&vm.sidecar_qmp, "primary", &certs, &ctl, ("b1", a1), 0);
    status_until(&ctl, Duration::from_secs(90), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(5)
    });
    // The primary dies: QEMU and sidecar at once.
    let last_seen = pages(&mut vm.test);
    sidecar.kill().unwrap();
    let _ = sidecar.wait();
    let _ = vm.child.kill();
    let _ = vm.child.wait();
    let died = Instant::now();
    let body = json!({ "vm": "vm1", "force": false, "verify": true });
    let started = loop {
        match endophyte_engine::control::request(&bctl, "POST", "/v1/promote", Some(&body)) {
            Ok(v) => break v,
            Err(e) if died.elapsed() < Duration::from_secs(15) => {
                assert!(e.to_string().contains("lease"), "{e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("promote refused after 15 s: {e}"),
        }
    };
    eprintln!("promoted: {started}");
    // The new QEMU's RAM, as its own pmemsave saw it before it ran, is the replica's on disk.
    let vm_dir = d1.join("vm1");
    let (want, in_replica) = replica_hash_and_counter(&vm_dir, MEM_MIB << 20);
    assert_eq!(
        started["ram_hash"].as_str(),
        Some(want.as_str()),
        "{started}"
    );
    assert!(
        in_replica <= last_seen + 20_000,
        "the replica is from this run"
    );
    // The guest goes on from the replica's counter.
    let (p0, _) = runs_on(&vm_dir);
    assert!(p0 >= in_replica, "{p0} < {in_replica}");
    let st = endophyte_engine::control::request(&bctl, "GET", "/v1/status", None).unwrap();
    assert_eq!(st["vms"][0]["fence"]["state"], "running", "{st}");
}

/// `endophyte migrate vm1 --to <to> --verify` through the sidecar's control socket; its JSON status.
fn migrate(ctl: &Path, to: &str) -> Value {
    let out = Command::new(EXE)
        .args(["migrate", "vm1", "--to", to, "--verify", "--output", "json"])
        .arg("--control")
        .arg(ctl)
        .env("RUST_LOG", log_level())
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "migrate failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_qemu_guest_migrates_there_and_back() {
    if !kvm_available() || !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _reaper = Reaper(tmp.path().to_owned());
    let certs = certs(tmp.path(), "test", &["sa", "na", "sb", "nb"]);
    let elf = guest_elf(tmp.path());
    let (aa, ab) = (free_udp(), free_udp());
    let (da, db) = (tmp.path().join("da"), tmp.path().join("db"));
    let _na = qemu_backup(&certs, "na", aa, &da, &elf, None);
    let _nb = qemu_backup(&certs, "nb", ab, &db, &elf, None);
    let mut vm = boot(tmp.path(), 2000, true);

    // One move: a sidecar on `node` replicates the QEMU behind `qmp` to `to`, then migrates it there.
    let move_vm = |node: &str, qmp: &Path, to: (&str, std::net::SocketAddr), gen: u64| {
        let ctl = tmp.path().join(format!("{node}.ctl"));
        let sidecar = sidecar_for(qmp, node, &certs, &ctl, to, gen);
        status_until(&ctl, Duration::from_secs(90), "replication", |s| {
            s["backups"][0]["committed_epoch"].as_u64() > Some(3)
        });
        let st = migrate(&ctl, to.0);
        let r = st["report"].clone();
        eprintln!("{node} -> {}: {r}", to.0);
        assert_eq!(r["generation"], gen + 1);
        // Both QEMUs' own pmemsave hashes of guest RAM at the switchover.
        assert!(
            r["source_ram_hash"].as_str().is_some_and(|h| h.len() == 64),
            "{r}"
        );
        assert_eq!(r["target_ram_hash"], r["source_ram_hash"], "{r}");
        assert!(sidecar
            .into_child()
            .wait_with_output()
            .unwrap()
            .status
            .success());
        r
    };

    // A -> B: the source QEMU quits once the guest runs on B.
    let at_a = pages(&mut vm.test);
    move_vm("sa", &vm.sidecar_qmp, ("nb", ab), 0);
    let t = Instant::now();
    while vm.child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the source QEMU outlived the move"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (on_b, _) = runs_on(&db.join("vm1"));
    assert!(on_b > at_a, "{on_b} <= {at_a}");

    // B -> A: a sidecar on B attaches to the QEMU backup nb started.
    move_vm("sb", &db.join("vm1").join("qmp.sock"), ("na", aa), 1);
    let (on_a, _) = runs_on(&da.join("vm1"));
    assert!(on_a > on_b, "{on_a} <= {on_b}");
    let fence: Value =
        serde_json::from_slice(&std::fs::read(da.join("vm1").join("fence.json")).unwrap()).unwrap();
    assert_eq!(
        (fence["state"].as_str(), fence["generation"].as_u64()),
        (Some("running"), Some(2)),
        "{fence}"
    );
}
