//! The fencing authority with real processes: a real etcd (started here), a testvm guest, its sidecar and
//! two backups. The sidecar reaches etcd through a TCP proxy the test can cut (the backups reach it
//! directly), so the primary alone loses the authority.
//!
//! - Cut: the old guest's own counter stops before the first promote is even asked; of two backups
//!   promoting at the same instant exactly one wins, the other naming it; the winner's guest runs from its
//!   committed epoch; healed, the old sidecar learns it was superseded and exits, its guest still paused.
//! - etcd stopped: replication goes on, no promote commits, the primary fences; etcd back, it runs again.
//! - Migration: the switchover's commit point is the hand-over at etcd; the target holds generation 2
//!   on its own lease, and promotes over it are refused.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use endophyte_attach::client::AttachClient;
use endophyte_authority::local::LocalEtcd;
use endophyte_authority::Authority;

fn promote(ctl: &std::path::Path) -> Result<serde_json::Value, String> {
    let body = serde_json::json!({ "vm": "vm1", "force": false, "verify": true });
    endophyte_engine::control::request(ctl, "POST", "/v1/promote", Some(&body))
        .map_err(|e| e.to_string())
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child this test started and has not waited for.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// The guest's pages-written counter advances over `over`.
fn advances(probe: &AttachClient, over: Duration) -> bool {
    let p0 = guest_pages(probe);
    std::thread::sleep(over);
    guest_pages(probe) > p0
}

/// A TCP forwarder on loopback whose traffic can be cut both ways (a partition: bytes are dropped,
/// connections stay open) and healed.
struct CutProxy {
    url: String,
    cut: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(down) = conn else { return };
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if !c.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                }
            }
        });
        Self { url, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

/// etcd, two backups on it, a testvm guest and its sidecar (on etcd through a [`CutProxy`]), replicating.
struct Cluster {
    tmp: tempfile::TempDir,
    etcd: LocalEtcd,
    proxy: CutProxy,
    c1: std::path::PathBuf,
    c2: std::path::PathBuf,
    d1: std::path::PathBuf,
    vm: Proc,
    probe: AttachClient,
    ctl: std::path::PathBuf,
    hashes: std::path::PathBuf,
    sidecar: Sidecar,
    /// The backups' processes (bind them, or they die with the pattern's temporary).
    _b: [Proc; 2],
}

fn cluster() -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let etcd =
        LocalEtcd::start(&tmp.path().join("etcd")).expect("etcd (apt-get install etcd-server)");
    let proxy = CutProxy::start(&etcd.url);
    let certs = certs(tmp.path(), "test", &["primary", "b1", "b2"]);
    let (a1, a2) = (free_udp(), free_udp());
    let (c1, c2) = (tmp.path().join("b1.ctl"), tmp.path().join("b2.ctl"));
    let d1 = tmp.path().join("d1");
    let etcd_flag = format!("--etcd={}", etcd.url);
    let b1 = backup(
        &certs,
        "b1",
        a1,
        &d1,
        &[&format!("--control-socket={}", c1.display()), &etcd_flag],
    );
    let b2 = backup(
        &certs,
        "b2",
        a2,
        &tmp.path().join("d2"),
        &[&format!("--control-socket={}", c2.display()), &etcd_flag],
    );
    let sock = tmp.path().join("vm.sock");
    let vm = vmm(&sock, "64MiB", "hotset:size=16M,rate=5000");
    let probe = AttachClient::connect(&sock, "probe").unwrap();
    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--backup=name=b2,addr={a2}"),
        format!("--control-socket={}", ctl.display()),
        format!("--etcd={}", proxy.url),
    ]);
    let sidecar = sidecar_start(&args);
    let s = status_until(&ctl, Duration::from_secs(60), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(5)
            && s["backups"][1]["committed_epoch"].as_u64() > Some(5)
    });
    assert_eq!(s["authority"]["state"], "held", "{s}");
    assert_eq!(s["authority"]["generation"], 1, "{s}");
    assert_eq!(s["fence"]["fences"], 0, "{s}");
    Cluster {
        tmp,
        etcd,
        proxy,
        c1,
        c2,
        d1,
        vm,
        probe,
        ctl,
        hashes,
        sidecar,
        _b: [b1, b2],
    }
}

fn observe(etcd: &LocalEtcd) -> endophyte_authority::Observed {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = endophyte_authority::EtcdAuthority::connect(&etcd.config()).unwrap();
        a.observe("vm1").await.unwrap()
    })
}

#[test]
fn a_primary_cut_from_etcd_stops_its_guest_before_one_of_two_racing_backups_promotes() {
    if !kvm_available() {
        return;
    }
    let Cluster {
        tmp: _tmp,
        etcd,
        proxy,
        c1,
        c2,
        vm: _vm,
        probe,
        ctl,
        hashes,
        mut sidecar,
        _b,
        ..
    } = cluster();
    assert!(advances(&probe, Duration::from_millis(500)));
    // The old guest's counter, sampled every 10 ms: when it last moved.
    let last_moved = Arc::new(Mutex::new(Instant::now()));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (last_moved, stop) = (last_moved.clone(), stop_sampling.clone());
        let sock = _tmp.path().join("vm.sock");
        std::thread::spawn(move || {
            let probe = AttachClient::connect(&sock, "sampler").unwrap();
            let mut prev = guest_pages(&probe);
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                let p = guest_pages(&probe);
                if p != prev {
                    *last_moved.lock().unwrap() = Instant::now();
                    prev = p;
                }
            }
        })
    };

    // The primary alone loses etcd. Both backups promote at the same instant, every 100 ms, from the
    // moment of the cut; the first to be let through by etcd (once the primary's lease expired there)
    // wins, the other is refused naming it.
    proxy.set_cut(true);
    let t0 = Instant::now();
    let (winner, loser_err, won, asked_at) = loop {
        let asked_at = Instant::now();
        let (r1, r2) = std::thread::scope(|sc| {
            let h1 = sc.spawn(|| promote(&c1));
            let h2 = sc.spawn(|| promote(&c2));
            (h1.join().unwrap(), h2.join().unwrap())
        });
        match (r1, r2) {
            (Ok(v), Err(e)) => break ("b1", e, v, asked_at),
            (Err(e), Ok(v)) => break ("b2", e, v, asked_at),
            (Ok(_), Ok(_)) => panic!("both backups promoted"),
            (Err(e1), Err(e2)) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "no promote within 20 s: {e1} / {e2}"
                );
                assert!(e1.contains("lease") && e2.contains("lease"), "{e1} / {e2}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    eprintln!(
        "{winner} promoted {:?} after the cut: {won}; the other said: {loser_err}",
        asked_at - t0
    );
    // The old guest had stopped before the winning promote was even asked: no instant with two running.
    let old_last = *last_moved.lock().unwrap();
    assert!(
        old_last < asked_at,
        "the old guest moved {:?} after the winning promote was asked",
        old_last - asked_at
    );
    let s = status(&ctl);
    assert_eq!(s["fence"]["fenced"], true, "{s}");
    assert_eq!(s["authority"]["state"], "fenced", "{s}");
    assert!(
        loser_err.contains(&format!("{winner:?}")),
        "the loser names the winner: {loser_err}"
    );
    assert_eq!(won["generation"], 2, "{won}");
    // etcd itself names the winner at generation 2, guarded by its lease.
    let seen = observe(&etcd);
    let (record, _) = seen.record.expect("a record");
    assert_eq!((record.generation, record.holder.as_str()), (2, winner));
    assert_eq!(seen.lease.expect("the winner's lease").node, winner);
    // The winner runs the guest from its committed epoch (the source VMM hashed that epoch's RAM).
    let epoch = won["epoch"].as_u64().unwrap();
    assert_eq!(
        won["ram_hash"].as_str(),
        Some(ram_hashes(&hashes)[&epoch].as_str())
    );
    let vm2 = AttachClient::connect(won["vmm_socket"].as_str().unwrap(), "test").unwrap();
    assert!(advances(&vm2, Duration::from_millis(500)));

    // Healed: the old sidecar learns from etcd that another node holds the VM, and exits non-zero; its
    // guest never ran again.
    proxy.set_cut(false);
    let status = exit_within(
        &mut sidecar,
        Duration::from_secs(20),
        "the superseded sidecar",
    );
    assert!(!status.success(), "a superseded sidecar exited 0");
    stop_sampling.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(
        *last_moved.lock().unwrap(),
        old_last,
        "the old guest ran again"
    );
    assert!(!advances(&probe, Duration::from_millis(300)));
    vm2.shutdown().unwrap();
}

#[test]
fn with_etcd_stopped_replication_goes_on_no_promote_commits_and_the_primary_fences_until_it_returns(
) {
    if !kvm_available() {
        return;
    }
    let Cluster {
        tmp: _tmp,
        etcd,
        c1,
        vm: _vm,
        probe,
        ctl,
        sidecar,
        _b,
        ..
    } = cluster();
    signal(etcd.pid(), libc::SIGSTOP);
    let d0 = status(&ctl)["durable_epoch"].as_u64().unwrap();
    // No promote commits while etcd is away (the backup says why, naming etcd).
    let e = promote(&c1).unwrap_err();
    assert!(e.contains("etcd"), "{e}");
    // The primary fences once its hold can no longer be shown alive.
    let s = status_until(&ctl, Duration::from_secs(15), "the authority fence", |s| {
        s["fence"]["fenced"] == true
    });
    assert_eq!(s["authority"]["state"], "fenced", "{s}");
    assert!(!advances(&probe, Duration::from_millis(500)));
    // Replication went on all along: epochs became durable after etcd stopped.
    let d1 = s["durable_epoch"].as_u64().unwrap();
    assert!(d1 > d0 + 5, "durable epoch {d0} -> {d1}");
    assert!(promote(&c1).is_err());
    // etcd is back, nobody promoted: the hold returns and the guest runs again.
    signal(etcd.pid(), libc::SIGCONT);
    let s = status_until(&ctl, Duration::from_secs(20), "the hold back", |s| {
        s["fence"]["fenced"] == false && s["authority"]["state"] == "held"
    });
    assert_eq!(s["authority"]["generation"], 1, "{s}");
    assert!(advances(&probe, Duration::from_millis(500)));
    let report = sidecar_stop(sidecar);
    assert!(report["epochs"].as_u64() > Some(0), "{report}");
    // A stopped sidecar leaves its guest paused and its hold released.
    assert!(!advances(&probe, Duration::from_millis(500)));
    assert!(observe(&etcd).lease.is_none());
}

#[test]
fn a_migration_under_etcd_hands_the_next_generation_to_the_target_which_claims_it() {
    if !kvm_available() {
        return;
    }
    let Cluster {
        tmp: _tmp,
        etcd,
        c1,
        c2,
        d1,
        vm: _vm,
        ctl,
        sidecar,
        _b,
        ..
    } = cluster();
    let (ok, st) = migrate_cli(&ctl, "b1", &["--verify"]);
    assert!(ok, "{st}");
    let r = &st["report"];
    assert_eq!(r["generation"], 2, "{st}");
    assert_eq!(r["target_ram_hash"], r["source_ram_hash"], "{st}");
    // The sidecar ends with the VM gone (and its lease released).
    let out = sidecar.into_child().wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    // etcd: generation 2 held by b1, on b1's own lease.
    let seen = observe(&etcd);
    let (record, _) = seen.record.expect("a record");
    assert_eq!(
        (record.generation, record.holder.as_str(), record.state),
        (2, "b1", endophyte_authority::RecordState::Running)
    );
    let lease = seen.lease.expect("b1's lease key");
    assert_eq!((lease.node.as_str(), lease.generation), ("b1", 2));
    // The guest runs on b1 (its fence names the VMM), and b2 cannot promote over it: b1's lease is live.
    let fence: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d1.join("vm1").join("fence.json")).unwrap()).unwrap();
    assert_eq!(
        (fence["generation"].as_u64(), fence["state"].as_str()),
        (Some(2), Some("running"))
    );
    // b1's status shows the hold it keeps on the VM it runs.
    let st = endophyte_engine::control::request(&c1, "GET", "/v1/status", None).unwrap();
    let hold = &st["vms"][0]["authority"];
    assert_eq!(
        (hold["state"].as_str(), hold["generation"].as_u64()),
        (Some("held"), Some(2)),
        "{st}"
    );
    let moved = AttachClient::connect(fence["vmm_endpoint"].as_str().unwrap(), "test").unwrap();
    assert!(advances(&moved, Duration::from_millis(500)));
    std::thread::sleep(Duration::from_secs(6));
    let e = promote(&c2).unwrap_err();
    assert!(e.contains("\"b1\"") && e.contains("lease"), "{e}");
    assert!(
        advances(&moved, Duration::from_millis(500)),
        "b1 stopped the VM it runs"
    );
    moved.shutdown().unwrap();
}

#[test]
fn a_hung_sidecar_under_etcd_leaves_its_guest_paused_a_promote_follows_and_waking_resumes_nothing()
{
    if !kvm_available() {
        return;
    }
    let Cluster {
        tmp: _tmp,
        etcd,
        c1,
        vm: _vm,
        probe,
        mut sidecar,
        _b,
        ..
    } = cluster();
    assert!(advances(&probe, Duration::from_millis(300)));
    // The sidecar hangs (SIGSTOP): it renews nothing and pauses nothing itself.
    signal(sidecar.id(), libc::SIGSTOP);
    let hung = Instant::now();
    // The VMM's guard pauses the guest (1.5 s of silence), before the lease can end at etcd (5 s): the
    // guest's counter, sampled before each promote attempt, last moved before the winning attempt.
    let mut prev = guest_pages(&probe);
    let mut last_moved = Instant::now();
    let (promoted, asked) = loop {
        let p = guest_pages(&probe);
        if p != prev {
            (prev, last_moved) = (p, Instant::now());
        }
        let asked = Instant::now();
        match promote(&c1) {
            Ok(v) => break (v, asked),
            Err(e) => {
                assert!(e.contains("lease"), "{e}");
                assert!(hung.elapsed() < Duration::from_secs(20), "no promote: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(
        last_moved < asked && guest_pages(&probe) == prev,
        "the hung sidecar's guest ran until the promote"
    );
    eprintln!(
        "guest last moved {:?} after the hang, promoted {:?} after it",
        last_moved.duration_since(hung),
        asked.duration_since(hung)
    );
    assert_eq!(promoted["generation"], 2, "{promoted}");
    // The sidecar wakes: its hold lapsed, the reclaim is refused (b1 holds generation 2), it exits, and
    // the old guest never runs again.
    signal(sidecar.id(), libc::SIGCONT);
    let status = exit_within(&mut sidecar, Duration::from_secs(20), "the woken sidecar");
    assert!(!status.success(), "a superseded sidecar exited 0");
    assert!(
        !advances(&probe, Duration::from_millis(500)),
        "the woken sidecar resumed its guest"
    );
    let (record, _) = observe(&etcd).record.unwrap();
    assert_eq!((record.generation, record.holder.as_str()), (2, "b1"));
    let vm2 = AttachClient::connect(promoted["vmm_socket"].as_str().unwrap(), "test").unwrap();
    assert!(advances(&vm2, Duration::from_millis(500)));
    vm2.shutdown().unwrap();
}
