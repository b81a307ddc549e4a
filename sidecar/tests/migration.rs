//! Live migration end to end: a running hotset guest moves to a backup that holds its replica. Checked on
//! independent evidence: the RAM hashes the source and target VMMs compute themselves, the replica file on
//! the other backup, and the guest's own page counter before and after.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use endophyte_attach::client::AttachClient;

fn migrate(ctl: &Path, to: &str, extra: &[&str]) -> (bool, serde_json::Value) {
    migrate_cli(ctl, to, &[&["--verify"], extra].concat())
}

/// A guest replicated by a sidecar to backups b1 and b2 (b2 started with `b2_flags`), past its first
/// few epochs on both.
struct Setup {
    tmp: tempfile::TempDir,
    certs: std::path::PathBuf,
    a2: std::net::SocketAddr,
    d1: std::path::PathBuf,
    d2: std::path::PathBuf,
    b: [Proc; 2],
    source_vmm: Proc,
    sock: std::path::PathBuf,
    ctl: std::path::PathBuf,
    hashes: std::path::PathBuf,
    sidecar: Sidecar,
}

fn setup(b2_flags: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path(), "test", &["primary", "b1", "b2"]);
    let (a1, a2) = (free_udp(), free_udp());
    let (d1, d2) = (tmp.path().join("d1"), tmp.path().join("d2"));
    let b = [
        backup(&certs, "b1", a1, &d1, &[]),
        backup(&certs, "b2", a2, &d2, b2_flags),
    ];
    let sock = tmp.path().join("vm.sock");
    let source_vmm = vmm(&sock, "64MiB", "hotset:size=16M,rate=5000");
    let ctl = tmp.path().join("sidecar.ctl");
    let hashes = tmp.path().join("hashes.jsonl");
    let mut args = base_args(&sock, &certs, &hashes);
    args.extend([
        format!("--backup=name=b1,addr={a1}"),
        format!("--backup=name=b2,addr={a2}"),
        format!("--control-socket={}", ctl.display()),
    ]);
    let sidecar = sidecar_start(&args);
    status_until(&ctl, Duration::from_secs(60), "replication", |s| {
        s["backups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["committed_epoch"].as_u64() > Some(3))
    });
    Setup {
        tmp,
        certs,
        a2,
        d1,
        d2,
        b,
        source_vmm,
        sock,
        ctl,
        hashes,
        sidecar,
    }
}

#[test]
fn a_running_guest_moves_to_its_backup_and_carries_on_there() {
    if !kvm_available() {
        return;
    }
    let Setup {
        tmp: _tmp,
        d1,
        d2,
        b: [_b1, _b2],
        mut source_vmm,
        sock,
        ctl,
        sidecar,
        ..
    } = setup(&[]);
    // The test's own view of the source guest's RAM: its mapping outlives the source VMM, which stays
    // paused from the final pause until it exits.
    let source = AttachClient::connect(&sock, "probe").unwrap();

    let (ok, st) = migrate(&ctl, "b2", &[]);
    assert!(ok, "{st}");
    let r = &st["report"];
    eprintln!("{st}");
    assert_eq!(st["phase"], "done");
    // The source VMM hashed its RAM at the final pause, the target VMM its RAM before resuming.
    let source_hash = r["source_ram_hash"].as_str().unwrap();
    assert_eq!(source_hash.len(), 64, "{r}");
    assert_eq!(r["target_ram_hash"].as_str().unwrap(), source_hash);

    // The source is gone: its VMM and the sidecar exit on their own.
    assert!(
        source_vmm.wait_exit(Duration::from_secs(10)).is_some(),
        "the source VMM still runs"
    );
    let out = sidecar.into_child().wait_with_output().unwrap();
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let epoch = r["epoch"].as_u64().unwrap();
    assert_eq!(report["migration"]["epoch"].as_u64(), Some(epoch));

    // The guest continues on the target from the source's last counter.
    let target = AttachClient::connect(d2.join("vm1").join("vmm.sock"), "test").unwrap();
    let last = guest_pages(&source);
    let p0 = guest_pages(&target);
    std::thread::sleep(Duration::from_secs(1));
    let p1 = guest_pages(&target);
    eprintln!("guest pages: source stopped at {last}, target {p0} then {p1}");
    assert!(
        p0 >= last,
        "the target's counter {p0} is behind the source's {last}"
    );
    assert!(p1 > p0, "the guest does not run on the target");
    assert!(
        p0 < last + 5000 * 5,
        "the target's counter {p0} did not continue from {last}"
    );

    // The other backup committed the same final epoch: its replica is the guest at the switchover.
    let other = d1.join("vm1");
    assert_eq!(checkpoint_reaching(&other, epoch), epoch);
    assert_eq!(hash_file(&other.join("replica.img")), source_hash);
    // The target's fence says the VM runs there, under the new generation.
    let fence: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d2.join("vm1").join("fence.json")).unwrap()).unwrap();
    assert_eq!(fence["state"], "running");
    assert_eq!(fence["generation"], r["generation"]);
    target.shutdown().unwrap();
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['R', 'S', 'D', 'T', 't']))
        })
        .unwrap_or(false)
}

#[test]
fn a_target_killed_during_switchover_never_runs_the_guest_and_the_source_carries_on() {
    if !kvm_available() {
        return;
    }
    let Setup {
        tmp: _tmp,
        certs,
        a2,
        d1,
        d2,
        b: [_b1, mut b2],
        source_vmm: _vmm,
        sock,
        ctl,
        hashes,
        sidecar,
    } = setup(&["--crash-during-switchover"]);
    let probe = AttachClient::connect(&sock, "probe").unwrap();

    // b2 aborts with the VM restored (paused) in its new VMM, before answering.
    let (ok, st) = migrate(&ctl, "b2", &[]);
    assert!(!ok, "the migration succeeded: {st}");
    assert!(
        b2.wait_exit(Duration::from_secs(5)).is_some(),
        "b2 did not crash"
    );
    let mig = endophyte_engine::control::request(&ctl, "GET", "/v1/migration", None).unwrap();
    assert_eq!(mig["phase"], "failed", "{mig}");
    let why = mig["error"].as_str().unwrap();
    assert!(why.contains("b2"), "{why}");

    // The source resumed: the guest's own counter advances, and replication to b1 goes on.
    let p0 = guest_pages(&probe);
    std::thread::sleep(Duration::from_millis(500));
    assert!(guest_pages(&probe) > p0, "the source guest does not run");
    let s = status(&ctl);
    let e = s["epoch"].as_u64().unwrap();
    status_until(
        &ctl,
        Duration::from_secs(20),
        "replication after the failure",
        |s| s["backups"][0]["committed_epoch"].as_u64() > Some(e),
    );

    // The VM b2 prepared never ran: its VMM (left behind by the crash) holds it paused.
    let fence: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d2.join("vm1").join("fence.json")).unwrap()).unwrap();
    assert_eq!(fence["state"], "prepared", "{fence}");
    let leftover = fence["vmm_pid"].as_i64().unwrap() as i32;
    let target = AttachClient::connect(d2.join("vm1").join("vmm.sock"), "test").unwrap();
    let t0 = guest_pages(&target);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        guest_pages(&target),
        t0,
        "the guest runs on the target that never got the commit"
    );
    drop(target);

    // Restarted, b2 stops that VMM, records the generation as aborted, and is a backup again.
    let _b2 = backup(&certs, "b2", a2, &d2, &[]);
    status_until(&ctl, Duration::from_secs(30), "b2 catching up", |s| {
        s["backups"][1]["committed_epoch"].as_u64() > Some(e)
    });
    let fence: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d2.join("vm1").join("fence.json")).unwrap()).unwrap();
    assert_eq!(fence["state"], "aborted", "{fence}");
    let t = std::time::Instant::now();
    while pid_alive(leftover) && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !pid_alive(leftover),
        "the prepared VMM outlived b2's recovery"
    );

    let report = sidecar_stop(sidecar);
    for d in [&d1, &d2] {
        assert_replica_exact(&report, &hashes, d);
    }
}

#[test]
fn a_guest_migrates_there_back_and_there_again_under_rising_generations() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Node A runs the VM first and a backup daemon; node B the same. Each node's sidecar and backup
    // have their own certificates.
    let certs = certs(tmp.path(), "test", &["sa", "na", "sb", "nb"]);
    let (aa, ab) = (free_udp(), free_udp());
    let (da, db) = (tmp.path().join("da"), tmp.path().join("db"));
    let _na = backup(&certs, "na", aa, &da, &[]);
    let _nb = backup(&certs, "nb", ab, &db, &[]);
    let sock = tmp.path().join("vm.sock");
    let mut vm_a = vmm(&sock, "64MiB", "hotset:size=16M,rate=5000");

    // One move: a sidecar on `node` replicates the VM behind `attach` to `to` under generation `gen`, then
    // migrates it there; the move is checked (the next generation, equal RAM hashes, the sidecar exits
    // cleanly) and its report returned.
    let move_vm = |node: &str, attach: &Path, to: (&str, std::net::SocketAddr), gen: u64| {
        let ctl = tmp.path().join(format!("{node}.ctl"));
        let args = vec![
            "--vm-id=vm1".to_string(),
            format!("--attach-socket={}", attach.display()),
            format!("--certs={}", certs.display()),
            format!("--node={node}"),
            format!("--backup=name={},addr={}", to.0, to.1),
            format!("--control-socket={}", ctl.display()),
            format!("--generation={gen}"),
        ];
        let child = sidecar_start(&args);
        status_until(&ctl, Duration::from_secs(60), "replication", |s| {
            s["backups"][0]["committed_epoch"].as_u64() > Some(3)
        });
        let source = AttachClient::connect(attach, "probe").unwrap();
        let (ok, st) = migrate(&ctl, to.0, &[]);
        assert!(ok, "{st}");
        let r = st["report"].clone();
        assert_eq!(r["generation"], gen + 1);
        assert_eq!(r["target_ram_hash"], r["source_ram_hash"]);
        assert!(child
            .into_child()
            .wait_with_output()
            .unwrap()
            .status
            .success());
        // The guest's counter at the final pause, through the mapping that outlived the source VMM.
        (r, guest_pages(&source))
    };

    // A -> B.
    let (_, g1) = move_vm("sa", &sock, ("nb", ab), 0);
    assert!(vm_a.wait_exit(Duration::from_secs(10)).is_some());

    // B -> A: a sidecar on B attaches to the VM running there, under generation 1.
    let on_b = db.join("vm1").join("vmm.sock");
    let (_, g2) = move_vm("sb", &on_b, ("na", aa), 1);
    // The guest's counter went on through both moves, and it runs on A again.
    let back = AttachClient::connect(da.join("vm1").join("vmm.sock"), "test").unwrap();
    let p0 = guest_pages(&back);
    std::thread::sleep(Duration::from_millis(500));
    let p1 = guest_pages(&back);
    eprintln!("guest pages: {g1} at A's pause, {g2} at B's, {p0} then {p1} on A");
    assert!(g1 < g2 && g2 <= p0 && p0 < p1, "{g1} {g2} {p0} {p1}");
    let fence: serde_json::Value =
        serde_json::from_slice(&std::fs::read(da.join("vm1").join("fence.json")).unwrap()).unwrap();
    assert_eq!(
        (fence["state"].as_str(), fence["generation"].as_u64()),
        (Some("running"), Some(2))
    );
    drop(back);
    // B's VMM exited when the guest left: B records that and is a backup for it again.
    let fence_b = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(db.join("vm1").join("fence.json")).unwrap()).unwrap()
    };
    let t = std::time::Instant::now();
    while fence_b()["state"] != "departed" && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        (
            fence_b()["state"].as_str(),
            fence_b()["generation"].as_u64()
        ),
        (Some("departed"), Some(1))
    );

    // A -> B again: B takes the replica back (resynced whole: its contents are those of the epoch the VM
    // started from there) and the guest moves a third time.
    let on_a = da.join("vm1").join("vmm.sock");
    let (_, g3) = move_vm("sa", &on_a, ("nb", ab), 2);
    let on_b = AttachClient::connect(db.join("vm1").join("vmm.sock"), "test").unwrap();
    let p2 = guest_pages(&on_b);
    std::thread::sleep(Duration::from_millis(500));
    let p3 = guest_pages(&on_b);
    assert!(p1 <= g3 && g3 <= p2 && p2 < p3, "{p1} {g3} {p2} {p3}");
    assert_eq!(fence_b()["state"], "running");
    on_b.shutdown().unwrap();
}

#[test]
fn a_migration_to_a_target_that_stopped_committing_fails_at_its_deadline() {
    if !kvm_available() {
        return;
    }
    // b2's replica thread hangs at the commit of epoch 30 and after, its process and paths still up (as
    // a write that never completes left a backup in a bench run): the sidecar's epochs wait on it.
    let Setup {
        tmp: _tmp,
        b: [_b1, _b2],
        source_vmm: _vmm,
        sock,
        ctl,
        sidecar,
        ..
    } = setup(&["--hang-at-commit", "30"]);
    status_until(&ctl, Duration::from_secs(60), "b2 reaching epoch 29", |s| {
        s["backups"][1]["committed_epoch"].as_u64() >= Some(29)
    });
    // Before the fix the migration waited for the back-pressure to end, that is for ever: the command is
    // given 30 s.
    let ctl_arg = ctl.display().to_string();
    let mut cmd = Proc::spawn(
        "migrate",
        &[
            "migrate",
            "vm1",
            "--to",
            "b2",
            "--deadline",
            "3s",
            "--control",
            &ctl_arg,
        ],
    );
    let status = cmd
        .wait_exit(Duration::from_secs(30))
        .expect("the migration still ran after 30 s");
    assert!(!status.success(), "the migration succeeded");
    let mig = endophyte_engine::control::request(&ctl, "GET", "/v1/migration", None).unwrap();
    assert_eq!(mig["phase"], "failed", "{mig}");
    let why = mig["error"].as_str().unwrap();
    assert!(why.contains("not current"), "{why}");
    // The guest still runs on the source (throttled, maybe: a backup still holds every epoch back).
    let probe = AttachClient::connect(&sock, "probe").unwrap();
    let p0 = guest_pages(&probe);
    std::thread::sleep(Duration::from_millis(500));
    assert!(guest_pages(&probe) > p0, "the source guest does not run");
    drop(sidecar);
}
