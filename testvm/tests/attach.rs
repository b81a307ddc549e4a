//! The attach protocol across processes: the `testvm serve` binary as the VMM, this test process as the
//! sidecar.

mod common;
use common::kvm_available;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_attach::{AttachClient, ErrorCode};
use testvm::guest;

struct Vmm {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_vmm(args: &[&str]) -> Vmm {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("attach.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_testvm"))
        .arg("serve")
        .arg("--attach-socket")
        .arg(&socket)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "testvm serve did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Vmm {
        child,
        socket,
        _dir: dir,
    }
}

fn read_u64(c: &AttachClient, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    c.read(gpa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn a_second_process_sees_the_same_guest_ram_and_drives_the_vm() {
    if !kvm_available() {
        return;
    }
    let vmm = spawn_vmm(&[
        "--mem",
        "64M",
        "--fill",
        "--workload",
        "hotset:size=8M,rate=5000",
    ]);
    let c = AttachClient::connect(&vmm.socket, "test").unwrap();
    assert_eq!(c.info().vcpus, 1);
    assert_eq!(
        c.info().regions.iter().map(|r| r.size_bytes).sum::<u64>(),
        64 << 20
    );

    // Hashing needs a paused VM.
    let e = c.vmm_hash().unwrap_err();
    assert!(
        matches!(
            e,
            endophyte_attach::ClientError::Refused {
                code: ErrorCode::BadState,
                ..
            }
        ),
        "{e}"
    );

    c.pause().unwrap();
    assert_eq!(
        c.local_hash(),
        c.vmm_hash().unwrap(),
        "sidecar mapping and VMM disagree on guest RAM"
    );

    // The guest's own status record, read through the sidecar's mapping: find vCPU 0's record by its magic.
    let page = c.info().page_size;
    let status_gpa = (0..64u64 * 1024 * 1024 / page)
        .map(|p| p * page)
        .find(|&g| read_u64(&c, g + guest::status::MAGIC as u64) == guest::STATUS_MAGIC)
        .expect("the guest's status record is visible through the sidecar's mapping");
    let before = read_u64(&c, status_gpa + guest::status::PAGES_WRITTEN as u64);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        read_u64(&c, status_gpa + guest::status::PAGES_WRITTEN as u64),
        before,
        "paused guest wrote"
    );
    c.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = read_u64(&c, status_gpa + guest::status::PAGES_WRITTEN as u64);
    assert!(
        after > before + 100,
        "resumed guest must write: {before} -> {after}"
    );
}

#[test]
fn a_harvest_lost_with_its_client_is_reported_again() {
    if !kvm_available() {
        return;
    }
    let vmm = spawn_vmm(&["--mem", "64M", "--workload", "hotset:size=4M,rate=5000"]);
    let a = AttachClient::connect(&vmm.socket, "a").unwrap();
    a.start_dirty_log().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    a.pause().unwrap();
    let taken = a.harvest().unwrap();
    let n = taken.bitmaps[0].count();
    assert!(n > 50, "the guest should have dirtied pages: {n}");
    assert!(matches!(
        a.harvest(),
        Err(endophyte_attach::ClientError::Refused {
            code: ErrorCode::BadState,
            ..
        })
    ));
    // While `a` owns the dirty log, another consumer is refused, with a message that names the owner.
    let b = AttachClient::connect(&vmm.socket, "b").unwrap();
    let refused = b.harvest().unwrap_err().to_string();
    assert!(refused.contains("belongs to \"a\""), "{refused}");

    drop(a); // the sidecar dies without releasing its harvest

    let t0 = Instant::now();
    let again = loop {
        // `a`'s connection winds down in the agent, then the log is free to take over.
        let h = match b.harvest() {
            Ok(h) => h,
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                assert!(e.to_string().contains("belongs to"), "{e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        if h.bitmaps[0].count() > 0 || t0.elapsed() > Duration::from_secs(5) {
            break h;
        }
        b.release(h.seq, true).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    };
    for p in taken.bitmaps[0].iter_pages() {
        assert!(
            again.bitmaps[0].is_set(p),
            "page {p:#x} of the lost harvest was not reported again"
        );
    }
    b.release(again.seq, false).unwrap();
    let third = b.harvest().unwrap();
    assert_eq!(
        third.bitmaps[0], again.bitmaps[0],
        "a harvest released as not consumed comes back whole"
    );
    b.release(third.seq, true).unwrap();
    b.shutdown().unwrap();
}
