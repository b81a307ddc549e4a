//! The fencing authority with real processes: a real etcd (started here), a testvm guest, its sidecar and
//! two backups. The primary cut from etcd pauses its guest before its lease can expire (the guest's own
//! counter stops); once the primary is dead, two backups promote at the same instant and exactly one wins,
//! the other naming the winner; the winner's guest runs on from its committed epoch; and the old node's
//! sidecar can no longer claim the VM. Asserted on the guest's counters and on what etcd holds.

mod common;

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

#[test]
fn a_primary_cut_from_etcd_stops_its_guest_and_exactly_one_of_two_backups_promotes() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let etcd =
        LocalEtcd::start(&tmp.path().join("etcd")).expect("etcd (apt-get install etcd-server)");
    let url = etcd.url.clone();
    let certs = certs(tmp.path(), "test", &["primary", "b1", "b2"]);
    let (a1, a2) = (free_udp(), free_udp());
    let (c1, c2) = (tmp.path().join("b1.ctl"), tmp.path().join("b2.ctl"));
    let etcd_flag = format!("--etcd={url}");
    let _b1 = backup(
        &certs,
        "b1",
        a1,
        &tmp.path().join("d1"),
        &[&format!("--control-socket={}", c1.display()), &etcd_flag],
    );
    let _b2 = backup(
        &certs,
        "b2",
        a2,
        &tmp.path().join("d2"),
        &[&format!("--control-socket={}", c2.display()), &etcd_flag],
    );
    let sock = tmp.path().join("vm.sock");
    let mut vm = vmm(&sock, "64MiB", "hotset:size=16M,rate=5000");
    let probe = AttachClient::connect(&sock, "probe").unwrap();
    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--backup=name=b2,addr={a2}"),
        format!("--control-socket={}", ctl.display()),
        etcd_flag.clone(),
    ]);
    let mut sidecar = sidecar_start(&args);
    let s = status_until(&ctl, Duration::from_secs(60), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(5)
            && s["backups"][1]["committed_epoch"].as_u64() > Some(5)
    });
    assert_eq!(s["authority"]["state"], "held", "{s}");
    assert_eq!(s["authority"]["generation"], 1, "{s}");
    // Healthy: no fence, the guest runs.
    assert_eq!(s["fence"]["fences"], 0, "{s}");
    assert!(advances(&probe, Duration::from_millis(500)));

    // The primary loses etcd (SIGSTOP: no answer at all). Its guest must stop before the 5 s lease can
    // have expired at the server; replication to the backups goes on meanwhile.
    signal(etcd.pid(), libc::SIGSTOP);
    let cut = Instant::now();
    let s = status_until(&ctl, Duration::from_secs(10), "the authority fence", |s| {
        s["fence"]["fenced"] == true
    });
    let fenced_after = cut.elapsed();
    assert!(
        fenced_after < Duration::from_millis(4500),
        "fenced {fenced_after:?} after the cut: {s}"
    );
    assert_eq!(s["authority"]["state"], "fenced", "{s}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !advances(&probe, Duration::from_secs(1)),
        "the fenced guest still runs"
    );

    // The primary node dies (its sidecar at once; its paused guest is left as it is).
    sidecar.kill().unwrap();
    let _ = sidecar.wait();
    signal(etcd.pid(), libc::SIGCONT);

    // Both backups promote at the same instant, again and again until the primary's lease has expired
    // at etcd: then exactly one wins.
    let t0 = Instant::now();
    let (winner, loser_err, won) = loop {
        let (r1, r2) = std::thread::scope(|sc| {
            let h1 = sc.spawn(|| promote(&c1));
            let h2 = sc.spawn(|| promote(&c2));
            (h1.join().unwrap(), h2.join().unwrap())
        });
        match (r1, r2) {
            (Ok(v), Err(e)) => break ("b1", e, v),
            (Err(e), Ok(v)) => break ("b2", e, v),
            (Ok(_), Ok(_)) => panic!("both backups promoted"),
            (Err(e1), Err(e2)) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(15),
                    "no promote within 15 s: {e1} / {e2}"
                );
                assert!(e1.contains("lease") && e2.contains("lease"), "{e1} / {e2}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    eprintln!("{winner} promoted: {won}; the other said: {loser_err}");
    assert!(
        loser_err.contains(&format!("{winner:?}")),
        "the loser names the winner: {loser_err}"
    );
    assert_eq!(won["generation"], 2, "{won}");
    // etcd itself names the winner at generation 2, guarded by its lease.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = rt.block_on(async {
        let a = endophyte_authority::EtcdAuthority::connect(&etcd.config()).unwrap();
        a.observe("vm1").await.unwrap()
    });
    let (record, _) = seen.record.expect("a record");
    assert_eq!((record.generation, record.holder.as_str()), (2, winner));
    assert_eq!(seen.lease.expect("the winner's lease").node, winner);
    // The winner runs the guest from its committed epoch (the source VMM hashed that epoch's RAM), and
    // the old guest stays paused.
    let epoch = won["epoch"].as_u64().unwrap();
    assert_eq!(
        won["ram_hash"].as_str(),
        Some(ram_hashes(&hashes)[&epoch].as_str())
    );
    let vm2 = AttachClient::connect(won["vmm_socket"].as_str().unwrap(), "test").unwrap();
    assert!(advances(&vm2, Duration::from_millis(500)));
    assert!(
        !advances(&probe, Duration::from_millis(500)),
        "the old guest runs again"
    );

    // The old node's sidecar cannot take the VM back: the authority names the winner.
    let mut again = sidecar_start(&args);
    let status = again.wait().unwrap();
    assert!(!status.success(), "a sidecar of the old node started");
    assert!(
        !advances(&probe, Duration::from_millis(500)),
        "the old guest runs again"
    );
    vm2.shutdown().unwrap();
    vm.kill();
}
