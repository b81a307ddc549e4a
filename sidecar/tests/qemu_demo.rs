//! `endophyte demo qemu` end to end on a small guest: its JSON summary's checks (each made on the guests'
//! own counters, QEMU's pmemsave and the processes, see `endophyte_demo::qemu`) hold, and its figures are
//! there and plausible.

mod common;

use std::process::Command;

use common::qemu::have_qemu;
use common::*;
use serde_json::Value;

#[test]
fn the_qemu_demo_replicates_migrates_and_promotes() {
    if !kvm_available() || !have_qemu() {
        return;
    }
    let out = Command::new(EXE)
        .args([
            "demo",
            "qemu",
            "--mem=64MiB",
            "--hot=8MiB",
            "--rate=2000",
            "--replicate-for=3s",
            "--output=json",
        ])
        .env("RUST_LOG", log_level())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed: {stderr}");
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{s}");
    for check in [
        "replica_matches_guest",
        "target_guest_continued",
        "promoted_guest_continued",
        "target_preloaded",
    ] {
        assert_eq!(s[check], true, "{check}: {s}");
    }
    assert_eq!(s["epoch_mode"], "background-snapshot", "{s}");
    assert!(s["epochs_committed"].as_u64() > Some(1), "{s}");
    let pages = s["guest_pages"].as_array().unwrap();
    assert!(pages[1].as_u64() >= pages[0].as_u64(), "{s}");
    for f in [
        "epoch_pause_ms_p50",
        "epoch_pause_ms_p99",
        "epoch_period_ms_p50",
        "rpo_ms_p99",
        "migration_downtime_ms",
    ] {
        assert!(s[f].as_f64().is_some_and(|v| v > 0.0), "{f}: {s}");
    }
    // Every changed page goes to each backup about once (framing adds a little, resyncs more).
    let w = s["wire_bytes_per_changed_byte"].as_f64().unwrap();
    assert!((0.9..3.0).contains(&w), "{s}");
    assert!(s["migration_wire_bytes"].as_u64() > Some(0), "{s}");
}
