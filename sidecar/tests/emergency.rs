//! The `discard` emergency policy against a real guest: with the path capped at run time far below the
//! guest's dirty rate, the guest keeps its own speed while the replica falls behind (the RPO grows); once
//! the cap is lifted through the control API, the replica catches up and equals guest RAM.

mod common;

use std::time::{Duration, Instant};

use common::*;
use endophyte_attach::client::AttachClient;

fn guest_rate(c: &AttachClient, over: Duration) -> f64 {
    let p0 = guest_pages(c);
    let t = Instant::now();
    std::thread::sleep(over);
    let p1 = guest_pages(c);
    (p1 - p0) as f64 / t.elapsed().as_secs_f64()
}

fn set_cap(ctl: &std::path::Path, bytes_per_s: Option<u64>) {
    let v = endophyte_engine::control::request(
        ctl,
        "PUT",
        "/v1/max-bandwidth",
        Some(&serde_json::json!({ "bytes_per_s": bytes_per_s })),
    )
    .unwrap();
    assert_eq!(v["bytes_per_s"].as_u64(), bytes_per_s);
}

#[test]
fn discard_keeps_the_guest_at_speed_while_the_rpo_grows_then_catches_up_when_the_cap_lifts() {
    if !kvm_available() {
        return;
    }
    // Paced at 3000 pages/s (12 MB/s) over a 16 MiB hot set. Uncapped, a 100 ms epoch dirties about 1.2 MiB
    // and fits the 2 MiB staging buffer; capped at 4 MB/s, every pre-copy round is paced by the drain and
    // the guest dirties three pages for each one sent, so no pause fits until the cap goes.
    let OneBackup {
        tmp,
        certs,
        a1,
        d1,
        b1: _b1,
        sock,
        vmm: _vm,
    } = one_backup(&[], "32MiB", "hotset:size=16M,rate=3000");
    let probe = AttachClient::connect(&sock, "probe").unwrap();
    let free = guest_rate(&probe, Duration::from_secs(2));

    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
        "--staging=2MiB".into(),
        // Never throttle: under `discard` the guest's speed is what this policy protects.
        "--curve=linear:max=0".into(),
        "--emergency=discard".into(),
    ]);
    let sidecar = sidecar_start(&args);

    // Uncapped, the replica keeps up.
    let s = status_until(&ctl, Duration::from_secs(60), "steady replication", |s| {
        s["durable_epoch"].as_u64() > Some(3) && s["rpo_ms"].as_f64().is_some_and(|r| r < 1000.0)
    });
    eprintln!("uncapped: {s}");

    set_cap(&ctl, Some(4_000_000));
    // The epochs already in flight (up to the 16 MiB budget) drain first; then pauses start to overflow.
    status_until(&ctl, Duration::from_secs(30), "an emergency", |s| {
        s["emergency_events"].as_u64() > Some(0)
    });
    // Epochs cut before the first overflow may still be draining (slower on a loaded machine): the
    // window starts once the durable epoch held still for 1.5 s.
    let t = std::time::Instant::now();
    let mut early = status(&ctl);
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = status(&ctl);
        if now["durable_epoch"] == early["durable_epoch"] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "epochs keep becoming durable: {now}"
        );
        early = now;
    }
    let capped = guest_rate(&probe, Duration::from_secs(5));
    let late = status(&ctl);
    eprintln!("capped: guest {capped:.0} pages/s (free {free:.0}); {early} -> {late}");
    // The guest keeps its speed...
    assert!(
        capped > 0.8 * free,
        "guest at {capped:.0} pages/s capped against {free:.0} free"
    );
    assert_eq!(late["throttle"].as_f64(), Some(0.0), "{late}");
    // ...while the replica falls behind: no new durable epoch, an RPO growing with the wall clock.
    let (r0, r1) = (
        early["rpo_ms"].as_f64().unwrap(),
        late["rpo_ms"].as_f64().unwrap(),
    );
    assert_eq!(early["durable_epoch"], late["durable_epoch"], "{late}");
    assert!(r1 > r0 + 4000.0, "RPO {r0:.0} ms -> {r1:.0} ms");
    let behind = late["durable_epoch"].as_u64().unwrap();

    // Lift the cap: epochs complete again and the RPO comes back down.
    set_cap(&ctl, None);
    let caught = status_until(&ctl, Duration::from_secs(30), "catch-up", |s| {
        s["durable_epoch"].as_u64() > Some(behind + 3)
            && s["rpo_ms"].as_f64().is_some_and(|r| r < 1000.0)
    });
    eprintln!("caught up: {caught}");

    let report = sidecar_stop(sidecar);
    assert!(report["discarded_pauses"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["overflow_epochs"].as_u64(), Some(0), "{report}");
    assert!(report["final_epoch_durable"].as_bool().unwrap(), "{report}");
    // The replica is exactly guest RAM at the last epoch's pause.
    assert_replica_exact(&report, &hashes, &d1);
    assert!(!ctl.exists(), "the control socket outlived the sidecar");
}
