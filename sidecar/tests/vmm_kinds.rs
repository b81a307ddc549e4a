//! The engine adapts to what the VMM can do: a VMM that only hands over full snapshots (no dirty log) is
//! replicated and migrated exactly, sending only the pages that changed; a VMM without a throttle meets
//! the emergency policy instead of a throttle that does nothing. Checked on the RAM hashes the VMMs
//! compute, the replica files, and the guest's own counter.

mod common;

use std::time::Duration;

use common::*;
use endophyte_attach::client::AttachClient;

#[test]
fn a_vmm_that_only_hands_over_snapshots_is_replicated_exactly_sending_only_changed_pages() {
    if !kvm_available() {
        return;
    }
    let OneBackup {
        tmp,
        certs,
        a1,
        d1,
        b1: _b1,
        sock,
        vmm: _vm,
    } = one_backup(&[], "32MiB", "hotset:size=4M,rate=2000");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        "--tracking=full-snapshot".into(),
        "--duration=6s".into(),
    ]);
    let report = sidecar(&args);
    eprintln!("{report}");
    assert_eq!(report["tracking"], "full_snapshot");
    let epochs = report["epochs"].as_u64().unwrap();
    assert!(epochs >= 10, "{report}");
    // Every epoch's snapshot covers all 32 MiB; only the first (unknown pages) and the hot set's changes
    // may go out.
    let mem = 32u64 << 20;
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(
        wire < mem + epochs * (4 << 20) + (8 << 20),
        "{wire} bytes sent for {epochs} snapshots of {mem}: unchanged pages were sent"
    );
    assert_replica_exact(&report, &hashes, &d1);
}

#[test]
fn a_guest_replicated_by_snapshots_migrates_and_carries_on() {
    if !kvm_available() {
        return;
    }
    let OneBackup {
        tmp,
        certs,
        a1,
        d1,
        b1: _b1,
        sock,
        vmm: mut source_vmm,
    } = one_backup(&[], "32MiB", "hotset:size=4M,rate=2000");
    let source = AttachClient::connect(&sock, "probe").unwrap();
    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
        "--tracking=full-snapshot".into(),
    ]);
    let sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(60), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(3)
    });
    // Each snapshot reads all of RAM with the guest paused, so the budget is a snapshot's time.
    let out = std::process::Command::new(EXE)
        .args([
            "migrate", "vm1", "--to", "b1", "--verify", "--output", "json",
        ])
        .args(["--downtime", "1s", "--deadline", "60s"])
        .arg("--control")
        .arg(&ctl)
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "{st} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = &st["report"];
    assert_eq!(r["target_ram_hash"], r["source_ram_hash"], "{r}");
    assert!(source_vmm.wait_exit(Duration::from_secs(10)).is_some());
    assert!(sidecar
        .into_child()
        .wait_with_output()
        .unwrap()
        .status
        .success());
    let last = guest_pages(&source);
    let target = AttachClient::connect(d1.join("vm1").join("vmm.sock"), "test").unwrap();
    let p0 = guest_pages(&target);
    std::thread::sleep(Duration::from_millis(500));
    let p1 = guest_pages(&target);
    assert!(
        last <= p0 && p0 < p1,
        "source {last}, target {p0} then {p1}"
    );
    target.shutdown().unwrap();
}

#[test]
fn a_vmm_without_a_throttle_meets_the_emergency_policy_and_the_replica_stays_exact() {
    if !kvm_available() {
        return;
    }
    // Unpaced over a 16 MiB hot set: each pause finds far more than the 2 MiB of staging.
    let OneBackup {
        tmp,
        certs,
        a1,
        d1,
        b1: _b1,
        sock,
        vmm: _vm,
    } = one_backup_with(
        &[],
        "32MiB",
        "hotset:size=16M,rate=0",
        &["--no-throttle"],
        false,
    );
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        "--max-bandwidth=8MB/s".into(),
        "--staging=2MiB".into(),
        "--curve=linear:start=0,max=0.9".into(),
        "--emergency=pause".into(),
        "--duration=10s".into(),
    ]);
    let report = sidecar(&args);
    eprintln!("{report}");
    assert_eq!(report["throttle_supported"], false, "{report}");
    assert_eq!(report["throttle_pct_max"].as_f64(), Some(0.0), "{report}");
    assert!(
        report["emergency_events"].as_u64() > Some(0),
        "the pressure never met the emergency policy: {report}"
    );
    assert_replica_exact(&report, &hashes, &d1);
}
