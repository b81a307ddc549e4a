//! The authority against a real etcd (Debian's etcd-server, started by the test on loopback): concurrent
//! promotes, refusals naming the holder, a hold that fences when etcd stops answering, a migration's
//! hand-over. What is asserted is what etcd itself holds afterwards, read by a separate client.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use endophyte_authority::local::LocalEtcd;
use endophyte_authority::{
    claim, hand_over, promote, Authority, AuthorityConfig, EtcdAuthority, Fencer, Hold,
    RecordState, Refusal,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn etcd() -> (tempfile::TempDir, LocalEtcd) {
    let dir = tempfile::tempdir().unwrap();
    let e = LocalEtcd::start(dir.path()).expect("etcd starts (apt-get install etcd-server)");
    (dir, e)
}

const TTL: Duration = Duration::from_secs(5);

#[test]
fn of_two_simultaneous_promotes_exactly_one_wins_ten_times_out_of_ten() {
    let (_d, e) = etcd();
    let rt = rt();
    let cfg = e.config();
    rt.block_on(async {
        let primary = EtcdAuthority::connect(&cfg).unwrap();
        // Each backup has its own client (its own connection), as separate processes would.
        let b1 = EtcdAuthority::connect(&cfg).unwrap();
        let b2 = EtcdAuthority::connect(&cfg).unwrap();
        let reader = EtcdAuthority::connect(&cfg).unwrap();
        for round in 0..10 {
            let vm = format!("vm-{round}");
            let c = claim(&primary, &vm, "a", TTL, None, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(c.generation, 1);
            // The primary dies: its lease goes (revoked here; expiry is the next test's).
            primary.revoke(c.lease).await.unwrap();
            let (r1, r2) = tokio::join!(promote(&b1, &vm, "b1", TTL), promote(&b2, &vm, "b2", TTL));
            let seen = reader.observe(&vm).await.unwrap();
            let (record, _) = seen.record.clone().unwrap();
            let lease = seen.lease.clone().expect("the winner's lease key");
            match (&r1, &r2) {
                (Ok(w), Err(l)) | (Err(l), Ok(w)) => {
                    assert_eq!(w.generation, 2);
                    assert_eq!(record.generation, 2);
                    assert_eq!(
                        lease.lease_id, w.lease,
                        "the winner's lease guards the record"
                    );
                    assert_eq!(lease.node, record.holder);
                    let msg = l.to_string();
                    assert!(
                        msg.contains(&format!("{:?}", record.holder)),
                        "the loser names the winner: {msg}"
                    );
                    assert!(l.is_permanent());
                }
                other => panic!("round {round}: not exactly one winner: {other:?}"),
            }
        }
    });
}

#[test]
fn a_promote_waits_for_the_holders_lease_to_expire_at_the_server() {
    let (_d, e) = etcd();
    let rt = rt();
    let cfg = e.config();
    rt.block_on(async {
        let a = EtcdAuthority::connect(&cfg).unwrap();
        let b = EtcdAuthority::connect(&cfg).unwrap();
        let c = claim(&a, "vm1", "a", Duration::from_secs(3), None, Duration::ZERO)
            .await
            .unwrap();
        // No keep-alives: the lease expires on its own, at the server.
        let e = promote(&b, "vm1", "b", TTL).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e.refusal(), Some(Refusal::HolderLive { .. }))
                && msg.contains("\"a\"")
                && msg.contains("left"),
            "{msg}"
        );
        let t0 = Instant::now();
        let won = loop {
            match promote(&b, "vm1", "b", TTL).await {
                Ok(w) => break w,
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    assert!(
                        matches!(e.refusal(), Some(Refusal::HolderLive { .. })),
                        "{e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the lease never expired: {e}"),
            }
        };
        assert_eq!(won.generation, c.generation + 1);
        // etcd expires a 3 s lease no sooner than 3 s after its grant.
        assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
        // The old primary cannot claim back: the record names b.
        let e = claim(&a, "vm1", "a", TTL, Some(1), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains("\"b\""), "{e}");
    });
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(Instant, String)>>,
}

impl Fencer for Recorder {
    fn fence(&self, why: &str) {
        self.calls
            .lock()
            .unwrap()
            .push((Instant::now(), format!("fence: {why}")));
    }
    fn unfence(&self) {
        self.calls
            .lock()
            .unwrap()
            .push((Instant::now(), "unfence".into()));
    }
    fn superseded(&self, why: &str) {
        self.calls
            .lock()
            .unwrap()
            .push((Instant::now(), format!("superseded: {why}")));
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the etcd child this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn a_hold_fences_before_its_lease_can_expire_when_etcd_stops_answering_and_reclaims_after() {
    let (_d, e) = etcd();
    let rt = rt();
    let cfg = AuthorityConfig {
        timeout_ms: 500,
        ..e.config()
    };
    let auth: Arc<dyn Authority> = {
        let _in = rt.enter();
        Arc::new(EtcdAuthority::connect(&cfg).unwrap())
    };
    let c = rt
        .block_on(claim(&*auth, "vm1", "a", cfg.ttl(), None, Duration::ZERO))
        .unwrap();
    let rec = Arc::new(Recorder::default());
    let hold = Hold::spawn(
        rt.handle(),
        auth.clone(),
        ("vm1".into(), "a".into()),
        cfg.timing(),
        c,
        rec.clone(),
    );
    // Healthy for a few TTLs: no fence.
    std::thread::sleep(Duration::from_secs(6));
    assert!(rec.calls.lock().unwrap().is_empty(), "{:?}", rec.calls);
    let s = hold.status();
    assert_eq!(s.state, "held");
    assert!(s.keepalives_acked >= 4, "{s:?}");
    // etcd stops answering (SIGSTOP): the hold must fence before the 5 s lease could expire.
    let acked_before = s.keepalives_acked;
    let stopped = Instant::now();
    signal(e.pid(), libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(7));
    let fenced_at = {
        let calls = rec.calls.lock().unwrap();
        let f = calls
            .iter()
            .find(|c| c.1.starts_with("fence:"))
            .unwrap_or_else(|| panic!("never fenced: {calls:?}"));
        f.0
    };
    // The last acknowledged keep-alive was sent at most one period (1 s) before the stop.
    assert!(
        fenced_at.duration_since(stopped) < cfg.ttl() - Duration::from_millis(500),
        "fenced {:?} after etcd stopped",
        fenced_at.duration_since(stopped)
    );
    assert_eq!(hold.status().keepalives_acked, acked_before);
    signal(e.pid(), libc::SIGCONT);
    // Nobody promoted: the hold comes back (by keep-alive or by reclaim) and the guest may run.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) && hold.status().state != "held" {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(hold.status().state, "held", "{:?}", hold.status());
    assert_eq!(rec.calls.lock().unwrap().last().unwrap().1, "unfence");
    rt.block_on(hold.release());
    let seen = rt.block_on(auth.observe("vm1")).unwrap();
    assert!(seen.lease.is_none(), "a released hold leaves no lease key");
    assert_eq!(seen.record.unwrap().0.generation, 1);
}

#[test]
fn a_hand_over_keeps_promotes_out_and_the_target_takes_the_next_generation() {
    let (_d, e) = etcd();
    let rt = rt();
    let cfg = e.config();
    rt.block_on(async {
        let a = EtcdAuthority::connect(&cfg).unwrap();
        let b1 = EtcdAuthority::connect(&cfg).unwrap();
        let b2 = EtcdAuthority::connect(&cfg).unwrap();
        let c = claim(&a, "vm1", "a", TTL, None, Duration::ZERO)
            .await
            .unwrap();
        // A node that is not the holder cannot hand over.
        let e = hand_over(&b2, "vm1", "b2", 1, c.lease, "b2")
            .await
            .unwrap_err();
        assert!(
            matches!(e.refusal(), Some(Refusal::NotHolder { .. })),
            "{e}"
        );
        let g = hand_over(&a, "vm1", "a", 1, c.lease, "b1").await.unwrap();
        assert_eq!(g, 2);
        let (r, _) = a.observe("vm1").await.unwrap().record.unwrap();
        assert_eq!(
            (r.generation, r.holder.as_str(), r.state),
            (2, "b1", RecordState::Handover)
        );
        // No promote while a's lease guards the hand-over.
        assert!(promote(&b2, "vm1", "b2", TTL).await.is_err());
        // A target expecting another generation is refused; the right one takes it.
        assert!(claim(&b1, "vm1", "b1", TTL, Some(3), Duration::ZERO)
            .await
            .is_err());
        let t = claim(&b1, "vm1", "b1", TTL, Some(2), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(t.generation, 2);
        a.revoke(c.lease).await.unwrap();
        let seen = b2.observe("vm1").await.unwrap();
        assert_eq!(seen.lease.unwrap().lease_id, t.lease);
        assert_eq!(seen.record.unwrap().0.state, RecordState::Running);
        let e = promote(&b2, "vm1", "b2", TTL).await.unwrap_err();
        assert!(e.to_string().contains("\"b1\""), "{e}");
    });
}

#[test]
fn garbage_at_the_record_key_is_refused_naming_the_key() {
    let (_d, e) = etcd();
    let rt = rt();
    rt.block_on(async {
        let a = EtcdAuthority::connect(&e.config()).unwrap();
        // Someone else's tool wrote the key.
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &e.url,
                "put",
                "/endophyte/vms/vm1/record",
                "{nope",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            // Debian's etcd-client package may not be installed; the record test needs it.
            other => panic!("etcdctl put failed (apt-get install etcd-client): {other:?}"),
        }
        let e = a.observe("vm1").await.unwrap_err();
        assert!(
            e.is_permanent() && e.to_string().contains("/endophyte/vms/vm1/record"),
            "{e}"
        );
        let e = claim(&a, "vm1", "a", TTL, None, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(e.is_permanent(), "{e}");
    });
}
