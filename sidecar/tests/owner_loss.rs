//! A sidecar that dies (SIGKILL: it cannot clean up) or hangs (SIGSTOP) leaves its guest paused, by the
//! VMM's run guard, not running unguarded where a backup may promote it (fail closed); and what it set up
//! ends with it: the VMM resets the throttle and ends the console hold when the connection that set them
//! goes away. Checked on the guest's own page counter and rate, and on the console lines the guest itself
//! prints. (Output the sidecar had already taken and not yet released dies with it: it was handed over.)

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
fn a_killed_sidecar_leaves_its_guest_paused_and_what_it_set_up_undone() {
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
    let killed = std::time::Instant::now();

    // The guard paused the guest (the connection closed): its own counter stands still.
    std::thread::sleep(Duration::from_millis(500));
    let stopped = guest_pages(&probe);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        guest_pages(&probe),
        stopped,
        "the guest of a dead sidecar still runs"
    );
    eprintln!(
        "guest paused {} pages after the kill (within {:?})",
        stopped - at_kill,
        killed.elapsed()
    );
    // And nobody resumes it without arming the guard again: the probe is refused, naming the guard.
    let e = probe.resume().unwrap_err().to_string();
    assert!(e.contains("run guard"), "{e}");
    // The hold ended with its holder: what the VMM still buffered is printed.
    assert!(
        printed(&console).len() > before_kill,
        "the output held when the sidecar died was not printed"
    );

    // A new owner (here the probe, arming the guard as a sidecar would) resumes it, unthrottled.
    probe.arm_guard(Duration::from_secs(30), 0).unwrap();
    probe.resume().unwrap();
    let after = rate(&probe, Duration::from_secs(2));
    eprintln!(
        "guest: {free:.0} pages/s free, {throttled:.0} throttled, {after:.0} once resumed after the sidecar was killed"
    );
    // Unthrottled, it runs well above its throttled rate and near its free one (on two shared cores, the
    // VMM competes with the test and the backup, so not exactly at it).
    assert!(
        after > throttled * 1.25 && after > free * 0.7,
        "the guest stayed throttled after its sidecar died: {after:.0} pages/s against {throttled:.0} throttled, {free:.0} free"
    );
    // And every line since goes straight to the console.
    let lines = printed(&console);
    assert!(
        lines.last().copied().unwrap_or(0) > at_kill,
        "the console stays held after the sidecar died: last line {:?}, counter {at_kill} at the kill",
        lines.last()
    );
    probe.disarm_guard().unwrap();
}

#[test]
fn a_hung_sidecar_leaves_its_guest_paused_and_cannot_resume_it_when_it_wakes() {
    if !kvm_available() {
        return;
    }
    let OneBackup {
        tmp,
        certs,
        a1,
        b1: _b1,
        sock,
        vmm: _vm,
        ..
    } = one_backup_with(&[], "32MiB", "hotset:size=16M,rate=2000", &[], false);
    let probe = AttachClient::connect(&sock, "probe").unwrap();
    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
        "--guard-ms=1000".into(),
    ]);
    let mut sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(60), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(5)
    });
    assert!(rate(&probe, Duration::from_millis(500)) > 0.0);
    // SIGSTOP: the sidecar hangs with its connection open.
    // SAFETY: kill(2) on the pid of a child we own and have not waited for.
    assert_eq!(unsafe { libc::kill(sidecar.id() as i32, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_millis(2000));
    let stopped = guest_pages(&probe);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        guest_pages(&probe),
        stopped,
        "the guest of a hung sidecar still runs"
    );
    // It wakes: without an authority to vouch for it, it must not resume the guest; it ends, naming the
    // guard, and the guest stays paused.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(sidecar.id() as i32, libc::SIGCONT) }, 0);
    let status = exit_within(&mut sidecar, Duration::from_secs(30), "the woken sidecar");
    assert!(!status.success(), "a sidecar whose guard tripped exited 0");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        guest_pages(&probe),
        stopped,
        "the woken sidecar resumed its guest"
    );
}
