//! Services that take part: the example key-value service (`examples/kv-service`, run as
//! `endophyte example-kv`) next to a real sidecar and real backups. Checked on the service's own data:
//! what its twin holds after a migration or a promote (read through the twin's own API) against what
//! the service contributed to the epoch the VM resumed from (its own log). And the policies: a slow
//! service, a failing one, a crashing one, one that holds or vetoes the switchover, and one that asks
//! for an API version the node does not serve.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kv::{contributed, kv};
use common::*;
use endophyte_attach::client::AttachClient;
use endophyte_demo::kv::store::{read_log, Event, State};

/// One command on the service's API socket; its answer.
fn ask(api: &Path, line: &str) -> String {
    wait_path(api);
    try_ask(api, line).expect("the service answers")
}

/// One command; `None` when the service went away meanwhile (it exits once its VM migrated away, and may
/// reset a connection it never read).
fn try_ask(api: &Path, line: &str) -> Option<String> {
    let c = UnixStream::connect(api).ok()?;
    writeln!(&c, "{line}").ok()?;
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer).ok()?;
    Some(answer.trim_end().to_string())
}

/// The state the service holds now, as a client reads it.
fn dump(api: &Path) -> State {
    serde_json::from_str(&ask(api, "DUMP")).unwrap()
}

/// Writes to the service until dropped.
struct Writer(Arc<AtomicBool>, Option<std::thread::JoinHandle<u64>>);

impl Writer {
    fn start(api: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        Self(
            stop,
            Some(std::thread::spawn(move || {
                let mut n = 0u64;
                while !s.load(Ordering::Relaxed) {
                    wait_path(&api);
                    if try_ask(&api, &format!("SET key-{} {n}", n % 31)).as_deref() != Some("OK") {
                        break;
                    }
                    n += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
                n
            })),
        )
    }

    fn stop(mut self) -> u64 {
        self.0.store(true, Ordering::Relaxed);
        self.1.take().unwrap().join().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn migrate(ctl: &Path, to: &str) -> (bool, serde_json::Value) {
    migrate_cli(ctl, to, &["--downtime", "200ms", "--deadline", "30s"])
}

fn service<'a>(st: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
}

#[test]
fn the_twins_restore_exactly_the_committed_epochs_state_after_a_migration_and_a_promote() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let certs = certs(t, "test", &["primary", "b1", "b2"]);
    let (a1, a2) = (free_udp(), free_udp());
    let (d1, d2) = (t.join("d1"), t.join("d2"));
    let sockets = |n: &str| (t.join(format!("{n}.svc")), t.join(format!("{n}.ctl")));
    let ((s1, c1), (s2, c2)) = (sockets("b1"), sockets("b2"));
    let flags = |s: &Path, c: &Path| {
        [
            format!("--services-socket={}", s.display()),
            format!("--control-socket={}", c.display()),
        ]
    };
    let (f1, f2) = (flags(&s1, &c1), flags(&s2, &c2));
    let _b1 = backup(&certs, "b1", a1, &d1, &[&f1[0], &f1[1]]);
    let _b2 = backup(&certs, "b2", a2, &d2, &[&f2[0], &f2[1]]);
    let twin = |svc: &Path, n: &str| {
        let api = t.join(format!("kv-{n}.api"));
        let p = kv(
            svc,
            &["--hooks=restore", &format!("--api={}", api.display())],
        );
        (p, api)
    };
    let ((_t1, api1), (_t2, api2)) = (twin(&s1, "b1"), twin(&s2, "b2"));
    let sock = t.join("vm.sock");
    let _vm = vmm(&sock, "64MiB", "hotset:size=8M,rate=2000");
    let (ctl, svc) = (t.join("sidecar.ctl"), t.join("sidecar.svc"));
    let mut args = base_args(&sock, &certs, &t.join("hashes.jsonl"));
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--backup=name=b2,addr={a2}"),
        format!("--control-socket={}", ctl.display()),
        format!("--services-socket={}", svc.display()),
        "--quorum=2".into(),
    ]);
    let sidecar = sidecar_start(&args);
    let (api, log) = (t.join("kv.api"), t.join("kv.jsonl"));
    let _kv = kv(
        &svc,
        &[
            &format!("--api={}", api.display()),
            &format!("--log={}", log.display()),
        ],
    );
    let writer = Writer::start(api.clone());
    status_until(
        &ctl,
        Duration::from_secs(60),
        "epochs with the service",
        |s| service(s, "kv").is_some_and(|k| k["contributions"].as_u64() > Some(10)),
    );
    let (ok, st) = migrate(&ctl, "b2");
    assert!(ok, "{st}");
    let writes = writer.stop();
    let epoch = st["report"]["epoch"].as_u64().unwrap();
    let out = sidecar.into_child().wait_with_output().unwrap();
    assert!(out.status.success());

    // The service's state moved along: distinct states over the epochs, so restoring any other
    // epoch's would show.
    let hashes: std::collections::BTreeSet<String> = read_log(&log)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Contributed { hash, .. } => Some(hash),
            _ => None,
        })
        .collect();
    assert!(hashes.len() > 5, "{} distinct states", hashes.len());
    // On the target, the twin serves exactly what the service contributed to the final epoch.
    let want = contributed(&log, epoch);
    assert!(want.writes > 0 && want.writes <= writes, "{want:?}");
    assert_eq!(dump(&api2), want, "the target's twin, epoch {epoch}");
    let phases: Vec<String> = read_log(&log)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e {
            Event::Phase { phase, .. } => Some(phase),
            _ => None,
        })
        .collect();
    assert_eq!(phases, ["converge", "prepared", "committed"]);

    // The VM dies on b2; b1 promotes its committed epoch and its twin serves that epoch's state.
    AttachClient::connect(d2.join("vm1").join("vmm.sock"), "test")
        .unwrap()
        .shutdown()
        .unwrap();
    let body = serde_json::json!({ "vm": "vm1", "force": false, "verify": false });
    let t0 = Instant::now();
    let promoted = loop {
        match endophyte_engine::control::request(&c1, "POST", "/v1/promote", Some(&body)) {
            Ok(v) => break v,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(15), "{e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let p = promoted["epoch"].as_u64().unwrap();
    assert_eq!(dump(&api1), contributed(&log, p), "b1's twin, epoch {p}");
    let vm = AttachClient::connect(promoted["vmm_socket"].as_str().unwrap(), "test").unwrap();
    vm.shutdown().unwrap();
}

/// A sidecar with one backup, the service policy `policy` and the service started with `kv_flags`.
struct Run {
    _one: OneBackup,
    ctl: PathBuf,
    svc: PathBuf,
    hashes: PathBuf,
    sidecar: Sidecar,
}

fn run(policy: &str) -> Run {
    let one = one_backup(&[], "32MiB", "hotset:size=4M,rate=1000");
    let t = one.tmp.path();
    let (ctl, svc, hashes) = (t.join("s.ctl"), t.join("s.svc"), t.join("hashes.jsonl"));
    let mut args = base_args(&one.sock, &one.certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={}", one.a1),
        format!("--control-socket={}", ctl.display()),
        format!("--services-socket={}", svc.display()),
        format!("--service-policy={policy}"),
        "--service-deadline-ms=50".into(),
        "--epoch-ms=100".into(),
    ]);
    let sidecar = sidecar_start(&args);
    Run {
        _one: one,
        ctl,
        svc,
        hashes,
        sidecar,
    }
}

fn committed(ctl: &Path) -> u64 {
    status(ctl)["backups"][0]["committed_epoch"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_slow_service_is_skipped_and_reported_and_replication_goes_on() {
    if !kvm_available() {
        return;
    }
    let r = run("skip");
    let _kv = kv(&r.svc, &["--slow-ms=300"]);
    let st = status_until(&r.ctl, Duration::from_secs(60), "late contributions", |s| {
        service(s, "kv").is_some_and(|k| k["failures"].as_u64() > Some(3))
    });
    let k = service(&st, "kv").unwrap();
    assert!(
        k["last_error"]
            .as_str()
            .unwrap()
            .contains("deadline of 50 ms"),
        "{k}"
    );
    // Skipped, not waited for: none of its (always late) answers made it into an epoch, as they would
    // under `pause`.
    assert_eq!(k["contributions"], 0, "{k}");
    let before = committed(&r.ctl);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        committed(&r.ctl) > before + 2,
        "epochs stalled behind a slow service"
    );
    let report = sidecar_stop(r.sidecar);
    assert!(report["service_failures"].as_u64() > Some(3), "{report}");
    assert_replica_exact(&report, &r.hashes, &r._one.d1);
}

#[test]
fn a_failing_service_holds_the_replica_back_under_the_fail_policy_until_it_goes() {
    if !kvm_available() {
        return;
    }
    let r = run("fail");
    status_until(&r.ctl, Duration::from_secs(60), "the initial copy", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(2)
    });
    let mut failing = kv(&r.svc, &["--fail"]);
    status_until(&r.ctl, Duration::from_secs(30), "failed asks", |s| {
        service(s, "kv").is_some_and(|k| k["failures"].as_u64() > Some(1))
    });
    // No cut commits while it fails (one already cut when it registered may still land).
    let stalled = committed(&r.ctl);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        committed(&r.ctl) <= stalled + 1,
        "epochs committed past a failing service"
    );
    let st = status(&r.ctl);
    let e = service(&st, "kv").unwrap()["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.contains("--fail"), "{e}");
    // Once it is gone, epochs commit again.
    failing.kill();
    let resumed = committed(&r.ctl);
    status_until(
        &r.ctl,
        Duration::from_secs(30),
        "epochs after the service left",
        |s| s["backups"][0]["committed_epoch"].as_u64() > Some(resumed + 3),
    );
    let report = sidecar_stop(r.sidecar);
    assert!(
        report["service_abandoned_cuts"].as_u64() > Some(0),
        "{report}"
    );
    assert_replica_exact(&report, &r.hashes, &r._one.d1);
}

#[test]
fn under_the_pause_policy_the_guest_waits_for_a_slow_service_but_not_for_a_crashed_one() {
    if !kvm_available() {
        return;
    }
    let r = run("pause");
    let t = r._one.tmp.path();
    let log = t.join("kv.jsonl");
    let mut slow = kv(
        &r.svc,
        &[
            "--slow-ms=200",
            "--crash-after=6",
            &format!("--log={}", log.display()),
        ],
    );
    // It answers 200 ms late six times, then exits on the seventh request without answering.
    let status_code = slow
        .wait_exit(Duration::from_secs(60))
        .expect("the service did not crash");
    assert_eq!(status_code.code(), Some(3));
    let after_crash = committed(&r.ctl);
    status_until(
        &r.ctl,
        Duration::from_secs(30),
        "epochs after the crash",
        |s| {
            s["backups"][0]["committed_epoch"].as_u64() > Some(after_crash + 3)
                && service(s, "kv").is_none()
        },
    );
    let report = sidecar_stop(r.sidecar);
    // The epochs it took part in kept the guest paused until its late answer: 200 ms and more.
    let contributed = read_log(&log)
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::Contributed { .. }))
        .count();
    assert_eq!(contributed, 6);
    assert!(
        report["epoch_pause_ms_max"].as_f64() > Some(190.0),
        "{report}"
    );
    assert_replica_exact(&report, &r.hashes, &r._one.d1);
}

#[test]
fn a_service_holds_the_switchover_within_its_bound_and_vetoes_it_with_a_reason() {
    if !kvm_available() {
        return;
    }
    let one = one_backup(&[], "32MiB", "hotset:size=4M,rate=1000");
    let t = one.tmp.path();
    let (ctl, svc) = (t.join("s.ctl"), t.join("s.svc"));
    let mut args = base_args(&one.sock, &one.certs, &t.join("hashes.jsonl"));
    args.extend([
        format!("--backup=name=b1,addr={}", one.a1),
        format!("--control-socket={}", ctl.display()),
        format!("--services-socket={}", svc.display()),
        "--service-hold-ms=1000".into(),
    ]);
    let sidecar = sidecar_start(&args);
    let source = AttachClient::connect(&one.sock, "test").unwrap();
    status_until(&ctl, Duration::from_secs(60), "replication", |s| {
        s["backups"][0]["committed_epoch"].as_u64() > Some(3)
    });

    // A version this node does not serve: the service is refused, and says why.
    let out = Command::new(EXE)
        .args(["example-kv", "--api-version=2"])
        .arg(format!("--services={}", svc.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("version 2 is not served"), "{err}");

    // Holding past the bound fails the migration, naming the service and the bound.
    let mut holder = kv(&svc, &["--hold-ms=3000"]);
    status_until(&ctl, Duration::from_secs(10), "kv", |s| {
        service(s, "kv").is_some()
    });
    let (ok, st) = migrate(&ctl, "b1");
    assert!(!ok, "{st}");
    let why = st["error"].as_str().unwrap();
    assert!(
        why.contains("\"kv\"") && why.contains("past its bound of 1000 ms"),
        "{why}"
    );
    holder.kill();

    // A veto fails it with the service's reason; the guest runs on here.
    let log = t.join("veto.jsonl");
    let mut vetoer = kv(
        &svc,
        &[
            "--veto=the disk journal is not flushed",
            &format!("--log={}", log.display()),
        ],
    );
    status_until(&ctl, Duration::from_secs(10), "kv", |s| {
        service(s, "kv").is_some()
    });
    let (ok, st) = migrate(&ctl, "b1");
    assert!(!ok, "{st}");
    let why = st["error"].as_str().unwrap();
    assert!(
        why.contains("vetoed") && why.contains("the disk journal is not flushed"),
        "{why}"
    );
    let aborted = read_log(&log).unwrap().into_iter().any(|e| {
        matches!(e, Event::Phase { phase, reason } if phase == "aborted" && reason.contains("flushed"))
    });
    assert!(aborted, "the service was not told of the abort");
    let p0 = guest_pages(&source);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guest_pages(&source) > p0,
        "the guest does not run on the source"
    );
    vetoer.kill();

    // A hold within the bound: the switchover waits for it, then goes ahead.
    let log = t.join("hold.jsonl");
    let _ok = kv(
        &svc,
        &["--hold-ms=400", &format!("--log={}", log.display())],
    );
    status_until(&ctl, Duration::from_secs(10), "kv", |s| {
        service(s, "kv").is_some()
    });
    let (ok, st) = migrate(&ctl, "b1");
    assert!(ok, "{st}");
    assert!(st["report"]["converge_ms"].as_f64() > Some(400.0), "{st}");
    let verdicts = read_log(&log)
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e, Event::Verdict { veto, .. } if veto.is_empty()))
        .count();
    assert_eq!(verdicts, 1);
    let out = sidecar.into_child().wait_with_output().unwrap();
    assert!(out.status.success());
    AttachClient::connect(one.d1.join("vm1").join("vmm.sock"), "test")
        .unwrap()
        .shutdown()
        .unwrap();
}

#[test]
fn demo_services_reports_the_twins_state_matching_on_the_target_and_after_promote() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(EXE)
        .args(["demo", "services", "--replicate-for=1s", "--output=json"])
        .env("RUST_LOG", log_level())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["service_state_matches"], true, "{s}");
    assert!(s["on_target"]["writes"].as_u64() > Some(0), "{s}");
    assert!(s["contribution_ms_p99"].as_f64() > Some(0.0), "{s}");
    assert_eq!(
        s["phases"],
        serde_json::json!(["converge", "prepared", "committed"])
    );
}
