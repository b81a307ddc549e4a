//! A sidecar killed with SIGKILL (it cannot clean up) must not leave its guest slowed down or its console
//! silent: the VMM side resets the throttle and ends the console hold when the connection that set them
//! goes away. Checked on the guest's own page rate and on the console lines the guest itself prints.
//! (Output the sidecar had already taken and not yet released dies with it: it was handed over.)

mod common;

use std::time::Duration;

use common::*;
use endophyte_attach::client::AttachClient;

/// The `pages=` values the guest printed so far (hex, one line each), from the VMM's console log.
fn printed(log: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once("pages=").map(|(_, v)| v.trim()))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .collect()
}

fn rate(probe: &AttachClient, over: Duration) -> f64 {
    let p0 = guest_pages(probe);
    std::thread::sleep(over);
    (guest_pages(probe) - p0) as f64 / over.as_secs_f64()
}

#[test]
fn a_killed_sidecar_leaves_its_guest_unthrottled_and_its_console_flowing() {
    if !kvm_available() {
        return;
    }
    // Unpaced, so that only the throttle limits it; a progress line every 2000 pages.
    let OneBackup {
        tmp,
        certs,
        a1,
        b1: _b1,
        sock,
        vmm: _vm,
        ..
    } = one_backup_with(&[], "32MiB", "hotset:size=16M,rate=0,print=2000", &[], true);
    let console = tmp.path().join("console.log");
    let probe = AttachClient::connect(&sock, "probe").unwrap();
    let free = rate(&probe, Duration::from_secs(2));

    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
        // Below the guest's dirty rate: the throttle rises along the curve.
        "--max-bandwidth=8MB/s".into(),
        "--curve=linear:start=0,max=0.9".into(),
    ]);
    let mut sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(60), "the throttle", |s| {
        s["throttle"].as_f64() > Some(0.3)
    });
    let throttled = rate(&probe, Duration::from_secs(2));
    assert!(
        throttled < free * 0.8,
        "not throttled: {throttled:.0} pages/s against {free:.0} free"
    );

    // While the sidecar holds the console, the guest's lines go to it (and out once durable), not to the
    // VMM's own console.
    let before_kill = printed(&console).len();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        printed(&console).len(),
        before_kill,
        "the console is not held while replicating: the test proves nothing"
    );

    // SIGKILL: no final epoch, no clean-up.
    let at_kill = guest_pages(&probe);
    sidecar.kill().unwrap();
    let _ = sidecar.wait();

    std::thread::sleep(Duration::from_millis(500));
    let after = rate(&probe, Duration::from_secs(2));
    eprintln!(
        "guest: {free:.0} pages/s free, {throttled:.0} throttled, {after:.0} after the sidecar was killed"
    );
    // Unthrottled, it runs well above its throttled rate and near its free one (on two shared cores, the
    // VMM competes with the test and the backup, so not exactly at it).
    assert!(
        after > throttled * 1.25 && after > free * 0.7,
        "the guest stayed throttled after its sidecar died: {after:.0} pages/s against {throttled:.0} throttled, {free:.0} free"
    );
    // The hold ended with its holder: what the VMM still buffered, and every line since, is printed.
    let lines = printed(&console);
    assert!(
        lines.len() > before_kill && lines.last().copied().unwrap_or(0) > at_kill,
        "the console stays held after the sidecar died: last line {:?}, counter {at_kill} at the kill",
        lines.last()
    );
}
