//! Faults of the fault matrix (docs/reliability.md) not covered elsewhere: garbage datagrams at a
//! backup's port during replication, and a backup whose disk cannot hold the replica. Each is checked
//! on independent evidence: the replica's bytes against the RAM hash the VMM computed at the epoch's
//! pause, and what a real client (`endophyte status`'s JSON) shows.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn garbage_datagrams_at_a_backups_port_change_nothing() {
    if !kvm_available() {
        return;
    }
    let OneBackup {
        tmp,
        certs,
        a1,
        d1,
        mut b1,
        sock,
        vmm: _vm,
    } = one_backup(&[], "32MiB", "hotset:size=4M,rate=2000");
    let hashes = tmp.path().join("hashes.jsonl");
    let ctl = tmp.path().join("sidecar.ctl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--control-socket={}", ctl.display()),
    ]);
    let sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(120), "the initial copy", |s| {
        s["durable_epoch"].as_u64() >= Some(3)
    });
    // Datagrams of every size up to 1500 bytes: random bytes, and ones shaped as QUIC long-header
    // Initials (first byte 0xc0..), short headers and version negotiation, from several sources.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let senders: Vec<UdpSocket> = (0..4)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let before = status(&ctl)["durable_epoch"].as_u64().unwrap();
    for i in 0..20_000u32 {
        let len = (next() % 1500) as usize + 1;
        let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        match i % 4 {
            0 => d[0] = 0xc0 | (d[0] & 0x3f),
            1 => d[0] = 0x40 | (d[0] & 0x3f),
            2 if len > 5 => d[1..5].copy_from_slice(&[0, 0, 0, 0]),
            _ => {}
        }
        let _ = senders[i as usize % 4].send_to(&d, a1);
    }
    // Replication goes on through it.
    status_until(
        &ctl,
        Duration::from_secs(30),
        "epochs after the garbage",
        |s| s["durable_epoch"].as_u64() > Some(before + 5),
    );
    assert!(b1.child.try_wait().unwrap().is_none(), "the backup died");
    let report = sidecar_stop(sidecar);
    assert_replica_exact(&report, &hashes, &d1);
}

/// A tmpfs of `size` at `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root: mount must work"
            );
            return None;
        }
        Some(Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_backup_whose_disk_is_full_is_reported_and_the_other_keeps_everything() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(_full) = Tmpfs::mount(&tmp.path().join("d1"), "8m") else {
        return;
    };
    let certs = certs(tmp.path(), "test", &["primary", "b1", "b2"]);
    let (a1, a2) = (free_udp(), free_udp());
    let (d1, d2) = (tmp.path().join("d1"), tmp.path().join("d2"));
    let mut b1 = backup(&certs, "b1", a1, &d1, &[]);
    let _b2 = backup(&certs, "b2", a2, &d2, &[]);
    let sock = tmp.path().join("vm.sock");
    let _vm = vmm(&sock, "32MiB", "hotset:size=4M,rate=2000");
    let hashes = tmp.path().join("hashes.jsonl");
    let ctl = tmp.path().join("sidecar.ctl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--backup=name=b2,addr={a2}"),
        format!("--control-socket={}", ctl.display()),
    ]);
    let sidecar = sidecar_start(&args);
    // b1 cannot hold a 32 MiB replica on 8 MiB: its refusal says so, b2 replicates on.
    let s = status_until(
        &ctl,
        Duration::from_secs(120),
        "b2 replicating, b1's error",
        |s| {
            s["backups"][1]["committed_epoch"].as_u64() > Some(5)
                && s["backups"][0]["last_error"].is_string()
        },
    );
    let e = s["backups"][0]["last_error"].as_str().unwrap();
    assert!(
        e.contains("cannot hold the replica") || e.contains("No space left"),
        "{e}"
    );
    assert_eq!(s["backups"][0]["committed_epoch"].as_u64(), Some(0), "{s}");
    assert!(
        b1.child.try_wait().unwrap().is_none(),
        "b1 died of its full disk"
    );
    let report = sidecar_stop(sidecar);
    assert_replica_exact(&report, &hashes, &d2);
}
