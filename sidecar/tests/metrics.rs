//! Prometheus exposition checked by Prometheus itself: `promtool check metrics` on a scrape of each
//! control socket (taken by curl, a real client), and a real Prometheus server scraping a running
//! sidecar and backup over TCP, whose queries must return the series with the values the processes
//! report about each other (the sidecar's view of the backup's committed epoch against the backup's own).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whether Prometheus and promtool are installed; under CI their absence is a failure.
fn prometheus_available() -> bool {
    let ok = ["prometheus", "promtool"].iter().all(|b| {
        Command::new(b)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok && std::env::var_os("CI").is_some() {
        panic!("CI must install prometheus (Debian package prometheus)");
    }
    ok
}

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `GET /metrics` on a control socket, by curl.
fn scrape_socket(ctl: &Path) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--unix-socket"])
        .arg(ctl)
        .arg("http://localhost/metrics")
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `promtool check metrics` on `text`: Prometheus' own parser and naming lint.
fn promtool_check(text: &str, what: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on the {what}'s scrape: {said}\n{text}"
    );
}

/// `GET path` on Prometheus' HTTP API: the status code and the body.
fn http_get(prom: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(prom).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {prom}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (code, body.to_owned())
}

/// A query against Prometheus' HTTP API: the `data.result` vector.
fn query(prom: SocketAddr, q: &str) -> Vec<serde_json::Value> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = http_get(prom, &format!("/api/v1/query?query={enc}"));
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: {code} {e}: {body}"));
    assert_eq!(v["status"], "success", "{q}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The value of a single-series query result.
fn value(r: &serde_json::Value) -> f64 {
    r["value"][1].as_str().unwrap().parse().unwrap()
}

/// Polls `q` until `ok` holds on its result (up to `limit`).
fn query_until(
    prom: SocketAddr,
    q: &str,
    limit: Duration,
    ok: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let t = Instant::now();
    loop {
        let r = query(prom, q);
        if ok(&r) {
            return r;
        }
        assert!(t.elapsed() < limit, "{q}: not after {limit:?}: {r:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_a_running_sidecar_and_backup_and_promtool_accepts_both() {
    if !kvm_available() || !prometheus_available() {
        return;
    }
    let (m_sidecar, m_backup, web) = (free_tcp(), free_tcp(), free_tcp());
    let tmp = tempfile::tempdir().unwrap();
    let b1_ctl = tmp.path().join("b1.ctl");
    let b1_flags = [
        format!("--control-socket={}", b1_ctl.display()),
        format!("--metrics-listen={m_backup}"),
    ];
    let b1_flags: Vec<&str> = b1_flags.iter().map(String::as_str).collect();
    let OneBackup {
        tmp: vmtmp,
        certs,
        a1,
        b1: _b1,
        sock,
        vmm: _vm,
        ..
    } = one_backup(&b1_flags, "32MiB", "hotset:size=1M,rate=2000");
    let ctl = vmtmp.path().join("sidecar.ctl");
    let mut args = base_args(&sock, &certs, &vmtmp.path().join("hashes.jsonl"));
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        "--paths=2".into(),
        format!("--control-socket={}", ctl.display()),
        format!("--metrics-listen={m_sidecar}"),
    ]);
    let sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(120), "the initial copy", |s| {
        s["durable_epoch"].as_u64() >= Some(3)
    });

    // Prometheus' own parser and lint, on a scrape of each control socket.
    let primary_text = scrape_socket(&ctl);
    promtool_check(&primary_text, "sidecar");
    assert!(
        primary_text.contains("endophyte_epoch_pause_seconds_bucket{"),
        "{primary_text}"
    );
    promtool_check(&scrape_socket(&b1_ctl), "backup");

    // A real Prometheus, scraping both every second over TCP.
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: sidecar\n    static_configs:\n      - targets: ['{m_sidecar}']\n  \
             - job_name: backup\n    static_configs:\n      - targets: ['{m_backup}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    struct KillOnDrop<'a>(&'a mut std::process::Child);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = KillOnDrop(&mut prom);
    let t = Instant::now();
    // It listens before its storage is up (503 until then): wait until it says it is ready.
    while TcpStream::connect(web).is_err() || http_get(web, "/-/ready").0 != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "prometheus did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let limit = Duration::from_secs(60);
    let up = query_until(web, "up", limit, |r| {
        r.len() == 2 && r.iter().all(|s| value(s) == 1.0)
    });
    assert_eq!(up.len(), 2, "{up:?}");
    // The backup's own committed epoch, and the sidecar's view of it, in the same evaluation.
    let theirs = query_until(
        web,
        r#"endophyte_replica_committed_epoch{job="backup",vm="vm1",node="b1"}"#,
        limit,
        |r| r.len() == 1 && value(&r[0]) >= 3.0,
    );
    let ours = query(
        web,
        r#"endophyte_backup_committed_epoch{job="sidecar",vm="vm1",backup="b1"}"#,
    );
    assert_eq!(ours.len(), 1, "{ours:?}");
    // Scraped up to a second apart at 10 epochs/s: within 30 epochs of each other.
    assert!(
        (value(&ours[0]) - value(&theirs[0])).abs() <= 30.0,
        "sidecar says b1 committed {ours:?}, b1 says {theirs:?}"
    );
    let paths = query(web, r#"endophyte_backup_paths_up{backup="b1"}"#);
    assert_eq!(paths.len(), 1, "{paths:?}");
    assert_eq!(value(&paths[0]), 2.0, "{paths:?}");
    query_until(web, "endophyte_epochs_committed_total", limit, |r| {
        r.len() == 1 && value(&r[0]) >= 3.0
    });
    // Every epoch paused the guest once: the pause histogram counted them.
    query_until(web, "endophyte_epoch_pause_seconds_count", limit, |r| {
        r.len() == 1 && value(&r[0]) >= 3.0
    });
    query_until(
        web,
        r#"endophyte_replica_lease_live{vm="vm1"} == 1 and ignoring(state) endophyte_replica_fence_state{vm="vm1",state="none"} == 1"#,
        limit,
        |r| r.len() == 1,
    );
    query_until(
        web,
        r#"endophyte_migration_phase{phase="none"}"#,
        limit,
        |r| r.len() == 1 && value(&r[0]) == 1.0,
    );
    let report = sidecar_stop(sidecar);
    assert!(report["epochs"].as_u64().unwrap() >= 3, "{report}");
}
