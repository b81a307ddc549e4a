//! Self-fencing under a real partition: the sidecar and the backup run in two network namespaces
//! joined by the bench's user-space link emulator, which then drops every packet both ways while both
//! processes keep running. The primary must fence (pause) its guest before the backup's lease ends; the
//! backup promotes after the lease; and the two guests' own page counters must show the old one
//! stopped before the new one was even asked to start. When the partition heals, the old primary
//! learns that the VM runs elsewhere under a newer generation and exits non-zero, its guest still
//! paused.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use endophyte_attach::client::AttachClient;
use endophyte_bench::link::LinkProfile;
use endophyte_bench::netns::{self, EmulatedLink, Namespace};

/// A child killed when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest's page counter, sampled every 20 ms on its own thread: `(when, pages)`.
struct Counter {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
}

impl Counter {
    fn watch(sock: &Path) -> Self {
        let c = AttachClient::connect(sock, "partition-probe").unwrap();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if let Ok(p) = endophyte_demo::probe::guest_pages_written(&c) {
                    s.lock().unwrap().push((Instant::now(), p));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { samples, stop }
    }

    /// When the counter last changed, and its last value.
    fn last_change(&self) -> (Instant, u64) {
        let s = self.samples.lock().unwrap();
        let last = s.last().expect("no samples").1;
        let at = s.iter().find(|(_, p)| *p == last).map(|(t, _)| *t).unwrap();
        (at, last)
    }

    fn latest(&self) -> u64 {
        self.samples.lock().unwrap().last().map_or(0, |s| s.1)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn backup_status(ctl: &Path) -> serde_json::Value {
    endophyte_engine::control::request(ctl, "GET", "/v1/status", None).unwrap()
}

/// A primary (sidecar in one namespace, its VMM on the host) replicating to backup b1 in another
/// namespace, through the bench's link emulator, past its initial copy.
struct Harness {
    // Dropped in this order: processes, then the link, then the namespaces, then the directory's
    // stragglers.
    sidecar: Kill,
    _vm: Proc,
    _b1: Kill,
    link: EmulatedLink,
    _ns: (Namespace, Namespace),
    ctl: std::path::PathBuf,
    bctl: std::path::PathBuf,
    sock: std::path::PathBuf,
    stderr: std::path::PathBuf,
    _reaper: Reaper,
    _tmp: tempfile::TempDir,
}

impl Harness {
    /// `None` where namespaces cannot be made (not root, outside CI).
    fn start(ns_tag: &str) -> Option<Self> {
        if !netns::available() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run as root with /dev/net/tun and ip"
            );
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let reaper = Reaper(tmp.path().to_owned());
        let tag = std::process::id() % 10_000;
        let subnet = (std::process::id() % 100) as u8 + if ns_tag == "s" { 0 } else { 100 };
        let (ns_p, ns_b) = (
            Namespace::create(&format!("endo-{ns_tag}p{tag}")).unwrap(),
            Namespace::create(&format!("endo-{ns_tag}b{tag}")).unwrap(),
        );
        let lan = LinkProfile::lan();
        let link = EmulatedLink::join(&ns_p, &ns_b, subnet, lan.clone(), lan).unwrap();
        let certs = certs(tmp.path(), "test", &["primary", "b1"]);
        let b_addr = format!("{}:7400", link.addr_b);
        let bctl = tmp.path().join("b1.ctl");
        let b1 = Kill(
            ns_b.command(EXE)
                .args(["backup", "--listen", &b_addr, "--node", "b1", "--certs"])
                .arg(&certs)
                .arg("--data-dir")
                .arg(tmp.path().join("d1"))
                .arg(format!("--control-socket={}", bctl.display()))
                .env("RUST_LOG", log_level())
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let sock = tmp.path().join("vm.sock");
        let vm = vmm(&sock, "32MiB", "hotset:size=4M,rate=3000");
        let ctl = tmp.path().join("sidecar.ctl");
        let stderr = tmp.path().join("sidecar.err");
        let mut args = base_args(&sock, &certs, &tmp.path().join("hashes.jsonl"));
        args.extend([
            format!("--backup=name=b1,addr={b_addr}"),
            format!("--control-socket={}", ctl.display()),
        ]);
        let sidecar = Kill(
            ns_p.command(EXE)
                .arg("sidecar")
                .args(&args)
                .env("RUST_LOG", log_level())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .unwrap(),
        );
        status_until(&ctl, Duration::from_secs(120), "replication", |s| {
            s["backups"][0]["committed_epoch"].as_u64() > Some(5)
        });
        Some(Self {
            sidecar,
            _vm: vm,
            _b1: b1,
            link,
            _ns: (ns_p, ns_b),
            ctl,
            bctl,
            sock,
            stderr,
            _reaper: reaper,
            _tmp: tmp,
        })
    }

    /// Waits (up to `limit`) for the sidecar to exit; its status and stderr.
    fn sidecar_exit(&mut self, limit: Duration) -> Option<(std::process::ExitStatus, String)> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.sidecar.0.try_wait().unwrap() {
                return Some((s, std::fs::read_to_string(&self.stderr).unwrap()));
            }
            if t.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_partitioned_primary_fences_before_the_backup_promotes_and_never_runs_again() {
    if !kvm_available() {
        return;
    }
    let Some(mut h) = Harness::start("p") else {
        return;
    };
    let (ctl, bctl, link) = (h.ctl.clone(), h.bctl.clone(), &h.link);
    let old = Counter::watch(&h.sock);
    std::thread::sleep(Duration::from_millis(500));
    assert!(old.latest() > 0, "the old guest does not count");

    // The partition: both sides keep running, nothing gets through.
    link.set_partitioned(true);
    let cut = Instant::now();
    let s = status_until(&ctl, Duration::from_secs(10), "the self-fence", |s| {
        s["fence"]["fenced"] == true
    });
    let fenced = cut.elapsed();
    eprintln!("fenced {fenced:?} after the cut: {}", s["fence"]);

    // The backup's lease ends; only then does it promote.
    let promote = serde_json::json!({ "vm": "vm1", "force": false, "verify": false });
    let asked = loop {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "the lease never ended"
        );
        let t = Instant::now();
        match endophyte_engine::control::request(&bctl, "POST", "/v1/promote", Some(&promote)) {
            Ok(r) => break (t, r),
            Err(e) => {
                assert!(e.to_string().contains("lease"), "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let (promote_asked, reply) = asked;
    eprintln!("promoted {:?} after the cut: {reply}", promote_asked - cut);
    let (old_stopped, old_pages) = old.last_change();
    assert!(
        old_stopped < promote_asked,
        "the old guest counted until {:?} after the cut, the promote was asked at {:?}",
        old_stopped - cut,
        promote_asked - cut
    );
    // The new guest runs, from the replica: its counter starts near where the old one stood.
    let new = Counter::watch(Path::new(reply["vmm_socket"].as_str().unwrap()));
    std::thread::sleep(Duration::from_secs(1));
    let n0 = new.latest();
    std::thread::sleep(Duration::from_secs(1));
    assert!(new.latest() > n0, "the promoted guest does not run");
    assert!(n0 <= old_pages + 3000 * 3, "new {n0}, old {old_pages}");
    assert_eq!(old.latest(), old_pages, "the old guest ran again");

    // The partition heals: the old primary meets the newer generation and exits non-zero.
    link.set_partitioned(false);
    let (status, err) = h
        .sidecar_exit(Duration::from_secs(30))
        .expect("the old sidecar did not exit");
    assert!(!status.success(), "the superseded sidecar exited 0: {err}");
    assert!(err.contains("newer generation"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        old.latest(),
        old_pages,
        "the old guest ran again after the heal"
    );
    assert!(backup_status(&bctl)["vms"][0]["runs_here"] == true);
}

/// When each guest's counter first and last changed: `(first, last)`; `None` if it never did.
fn ran(c: &Counter) -> Option<(Instant, Instant)> {
    let s = c.samples.lock().unwrap();
    let mut changes = s.windows(2).filter(|w| w[1].1 != w[0].1).map(|w| w[1].0);
    let first = changes.next()?;
    Some((first, changes.next_back().unwrap_or(first)))
}

#[test]
fn a_partition_during_switchover_never_leaves_two_copies_running() {
    if !kvm_available() {
        return;
    }
    let Some(mut h) = Harness::start("s") else {
        return;
    };
    let old = Counter::watch(&h.sock);
    let req = serde_json::json!({
        "to": "b1", "downtime_ms": 300, "deadline_ms": 60000, "force": true, "verify": false
    });
    endophyte_engine::control::request(&h.ctl, "POST", "/v1/migrate", Some(&req)).unwrap();
    // Cut the link the moment the switchover starts.
    let t = Instant::now();
    loop {
        let m = endophyte_engine::control::request(&h.ctl, "GET", "/v1/migration", None);
        if let Ok(m) = m {
            if m["phase"] != "converging" {
                h.link.set_partitioned(true);
                eprintln!("cut in phase {}", m["phase"]);
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no switchover");
        std::thread::sleep(Duration::from_millis(2));
    }
    let cut = Instant::now();
    // Whatever the cut hit (before the commit: the source aborts; after it: the source stays in
    // doubt, paused), the guest may run on the target only once the old one stopped for good.
    let new_sock = h._tmp.path().join("d1/vm1/vmm.sock");
    let mut new: Option<Counter> = None;
    while cut.elapsed() < Duration::from_secs(12) {
        if new.is_none() && new_sock.exists() {
            new = AttachClient::connect(&new_sock, "probe")
                .ok()
                .map(|_| Counter::watch(&new_sock));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let old_ran = ran(&old).expect("the old guest never ran");
    eprintln!(
        "old guest last counted {:?} after the cut",
        old_ran.1.checked_duration_since(cut)
    );
    // The partition heals; the sides settle (the target gives up an uncommitted switchover within a
    // minute; the source learns the outcome).
    h.link.set_partitioned(false);
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_secs(75) {
        if new.is_none() && new_sock.exists() {
            new = AttachClient::connect(&new_sock, "probe")
                .ok()
                .map(|_| Counter::watch(&new_sock));
        }
        let new_runs = new.as_ref().and_then(ran).is_some();
        let old_again = ran(&old).is_some_and(|(_, l)| l > settled + Duration::from_secs(1));
        if new_runs || old_again {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let old_ran = ran(&old).unwrap();
    match new.as_ref().and_then(ran) {
        Some((new_first, _)) => {
            eprintln!("the VM moved: the target runs it");
            assert!(
                old_ran.1 < new_first,
                "both ran: old until {:?}, new from {:?} (after the cut)",
                old_ran.1.checked_duration_since(cut),
                new_first.checked_duration_since(cut)
            );
            let b = backup_status(&h.bctl);
            assert_eq!(b["vms"][0]["runs_here"], true, "{b}");
        }
        None => {
            eprintln!("the switchover was undone: the source runs it");
            assert!(old_ran.1 > settled, "neither guest runs after the heal");
            let b = backup_status(&h.bctl);
            assert_eq!(b["vms"][0]["runs_here"], false, "{b}");
        }
    }
    let _ = h.sidecar_exit(Duration::from_secs(1));
}
