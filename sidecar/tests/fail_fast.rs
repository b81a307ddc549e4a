//! Permanent errors fail fast, transient ones are retried: a sidecar that every backup refuses (its
//! certificate is from another network), whose own certificate cannot be read, or whose self-fence bound
//! a backup's lease does not safely exceed, exits non-zero within seconds naming the reason; one that
//! only some backups refuse keeps replicating to the others, and `endophyte status` shows the refusing
//! backup's last error.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `endophyte sidecar ARGS` to its end (at most `limit`); returns its output and how long it ran.
fn sidecar_until_exit(args: &[String], limit: Duration) -> (Output, Duration) {
    let t = Instant::now();
    let mut child = Command::new(EXE)
        .arg("sidecar")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), t.elapsed());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the sidecar still ran after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn args_for(sock: &Path, certs: &Path, tmp: &Path, backups: &[String]) -> Vec<String> {
    let mut a = base_args(sock, certs, &tmp.join("hashes.jsonl"));
    a.extend(backups.iter().map(|b| format!("--backup={b}")));
    a
}

#[test]
fn a_sidecar_every_backup_refuses_exits_within_seconds_naming_why() {
    if !kvm_available() {
        return;
    }
    let OneBackup {
        tmp,
        a1,
        sock,
        vmm: _vm,
        b1: _b1,
        ..
    } = one_backup(&[], "16MiB", "hotset:size=1M,rate=500");
    // The sidecar's certificate comes from another network's CA.
    let foreign = certs(tmp.path(), "other", &["primary"]);
    let args = args_for(&sock, &foreign, tmp.path(), &[format!("name=b1,addr={a1}")]);
    let (out, took) = sidecar_until_exit(&args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited 0: {err}");
    assert!(
        err.contains("every backup refused") && err.contains("b1"),
        "{err}"
    );
    eprintln!("refused in {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}: {err}");
}

#[test]
fn an_unreadable_certificate_fails_the_start_naming_the_file() {
    if !kvm_available() {
        return;
    }
    let OneBackup {
        tmp,
        certs,
        a1,
        sock,
        vmm: _vm,
        b1: _b1,
        ..
    } = one_backup(&[], "16MiB", "hotset:size=1M,rate=500");
    std::fs::write(certs.join("primary.pem"), "not a certificate\n").unwrap();
    let args = args_for(&sock, &certs, tmp.path(), &[format!("name=b1,addr={a1}")]);
    let (out, took) = sidecar_until_exit(&args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited 0: {err}");
    assert!(err.contains("primary.pem"), "{err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_lease_not_safely_above_the_fence_bound_is_refused() {
    if !kvm_available() {
        return;
    }
    // The backup's lease equals the sidecar's bound: a promote could come before the fence.
    let OneBackup {
        tmp,
        certs,
        a1,
        sock,
        vmm: _vm,
        b1: _b1,
        ..
    } = one_backup(&["--lease-ms=2000"], "16MiB", "hotset:size=1M,rate=500");
    let mut args = args_for(&sock, &certs, tmp.path(), &[format!("name=b1,addr={a1}")]);
    args.push("--fence-after-ms=2000".into());
    let (out, _) = sidecar_until_exit(&args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited 0: {err}");
    assert!(
        err.contains("not safely below") && err.contains("\"b1\""),
        "{err}"
    );
}

#[test]
fn one_refusing_backup_leaves_the_others_replicating_and_status_names_its_error() {
    if !kvm_available() {
        return;
    }
    let OneBackup {
        tmp,
        certs,
        a1,
        sock,
        vmm: _vm,
        b1: _b1,
        ..
    } = one_backup(&[], "16MiB", "hotset:size=1M,rate=500");
    // b2 is from another network: it refuses the sidecar, and the sidecar refuses it.
    let other = common::certs(tmp.path(), "other", &["b2"]);
    let a2 = free_udp();
    let _b2 = backup(&other, "b2", a2, &tmp.path().join("d2"), &[]);
    let ctl = tmp.path().join("sidecar.ctl");
    let mut args = args_for(
        &sock,
        &certs,
        tmp.path(),
        &[format!("name=b1,addr={a1}"), format!("name=b2,addr={a2}")],
    );
    args.push(format!("--control-socket={}", ctl.display()));
    let sidecar = sidecar_start(&args);
    let s = status_until(
        &ctl,
        Duration::from_secs(60),
        "b1 replicating, b2's error",
        |s| {
            s["backups"][0]["committed_epoch"].as_u64() > Some(3)
                && s["backups"][1]["last_error"].is_string()
        },
    );
    let e = s["backups"][1]["last_error"].as_str().unwrap();
    assert!(e.contains("another network"), "{e}");
    // The table `endophyte status` prints says it too.
    let out = Command::new(EXE)
        .args(["status", "--control"])
        .arg(&ctl)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("last error") && table.contains("another network"),
        "{table}"
    );
    let report = sidecar_stop(sidecar);
    assert!(report["epochs"].as_u64() > Some(3), "{report}");
}
