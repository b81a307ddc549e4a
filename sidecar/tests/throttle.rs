//! Adaptive throttling against a real guest: with the sidecar's bandwidth capped below the guest's dirty
//! rate, the guest's own page counter must show it slowing down as the curve says, while the replica stays
//! exact (pause policy).

mod common;

use std::time::Duration;

use common::*;
use endophyte_attach::client::AttachClient;

#[test]
fn a_capped_path_slows_the_guest_along_the_curve_and_the_replica_stays_exact() {
    if !kvm_available() {
        return;
    }
    // Unpaced, so that only the throttle limits it: tens of MB/s of dirty pages; the sidecar may send 8 MB/s.
    let OneBackup {
        tmp,
        certs,
        a1,
        d1,
        b1: _b1,
        sock,
        vmm: _vm,
    } = one_backup(&[], "32MiB", "hotset:size=16M,rate=0");
    let probe = AttachClient::connect(&sock, "probe").unwrap();
    let p0 = guest_pages(&probe);
    std::thread::sleep(Duration::from_secs(2));
    let free_rate = (guest_pages(&probe) - p0) as f64 / 2.0;

    let hashes = tmp.path().join("hashes.jsonl");
    let ctl = tmp.path().join("sidecar.ctl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        "--max-bandwidth=8MB/s".into(),
        "--curve=linear:start=0,max=0.9".into(),
        "--emergency=pause".into(),
        format!("--control-socket={}", ctl.display()),
    ]);
    let sidecar = sidecar_start(&args);
    // Let the initial copy finish (its length depends on the machine's load: 15 s and more under a
    // loaded CI) and the controller settle, then measure the guest's own rate.
    status_until(&ctl, Duration::from_secs(120), "the initial copy", |s| {
        s["backups"][0]["committed_epoch"].as_u64() >= Some(2)
    });
    std::thread::sleep(Duration::from_secs(3));
    let q0 = guest_pages(&probe);
    std::thread::sleep(Duration::from_secs(4));
    let throttled_rate = (guest_pages(&probe) - q0) as f64 / 4.0;
    let report = sidecar_stop(sidecar);

    let throttle = report["throttle_pct_p50"].as_f64().unwrap() / 100.0;
    assert!(throttle > 0.3, "the controller did not throttle: {report}");
    // The guest sleeps `throttle` of each slice, so it runs at about (1 - throttle) of its free rate.
    let ratio = throttled_rate / free_rate;
    eprintln!(
        "guest: {free_rate:.0} pages/s free, {throttled_rate:.0} throttled (ratio {ratio:.2}); throttle p50 {throttle:.2}"
    );
    assert!(
        (ratio - (1.0 - throttle)).abs() < 0.3,
        "guest at {throttled_rate:.0} pages/s against {free_rate:.0} free (ratio {ratio:.2}) with throttle {throttle:.2}: {report}"
    );
    assert!(throttled_rate > 0.0, "the guest stopped altogether");
    assert_eq!(report["overflow_epochs"].as_u64().unwrap(), 0, "{report}");
    // And the replica is exactly guest RAM at the last epoch.
    assert_replica_exact(&report, &hashes, &d1);
}
