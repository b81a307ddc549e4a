//! The migration stream parser and writer against streams a real QEMU wrote: every page it holds is the
//! page in guest RAM (a file the test filled), a truncated or corrupted stream is refused with where and
//! why, and a stream rebuilt from the pages restores the VM in a new QEMU, byte for byte (QEMU's own
//! `pmemsave` of the new VM against the RAM the old one had).

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use endophyte_qemu::qmp::{MigrationInfo, Qmp};
use endophyte_qemu::stream::parse::Parser;
use endophyte_qemu::stream::{Record, StreamError, TARGET_PAGE_SIZE};
use endophyte_qemu::QemuState;
use serde_json::json;

const MEM_MIB: u64 = 64;

/// Runs one migration of the VM into this process and returns the stream.
fn capture(q: &mut Qmp, background: bool) -> Vec<u8> {
    q.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "background-snapshot", "state": background }] }),
    )
    .unwrap();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    q.execute_with_fd("getfd", json!({ "fdname": "t" }), Some(theirs.as_raw_fd()))
        .unwrap();
    drop(theirs);
    q.execute("migrate", json!({ "uri": "fd:t" })).unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = vec![];
        ours.read_to_end(&mut v).unwrap();
        v
    });
    let t = Instant::now();
    loop {
        let m: MigrationInfo = q.query("query-migrate").unwrap();
        match m.status.as_deref() {
            Some("completed") => break,
            Some("failed") => panic!("migration failed: {:?}", m.error_desc),
            _ => assert!(t.elapsed() < Duration::from_secs(60), "{m:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    reader.join().unwrap()
}

/// Parses `bytes` fed in pieces of `piece` bytes; returns the records and the tail, or the error.
fn parse(bytes: &[u8], piece: usize) -> Result<(Vec<Record>, bytes::Bytes), StreamError> {
    let mut p = Parser::new();
    let mut out = vec![];
    for part in bytes.chunks(piece.max(1)) {
        p.push(part);
        while let Some(r) = p.poll()? {
            out.push(r);
        }
    }
    let tail = p.finish()?;
    Ok((out, tail))
}

struct Vm {
    _dir: tempfile::TempDir,
    ram: RamFile,
    _qemu: Qemu,
    qmp: Qmp,
}

/// A VM that never ran (`-S`): its RAM is exactly the file the test filled.
fn stopped_vm(tag: &str) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let ram = ram_file(tag, MEM_MIB);
    let mut args = vm_args(MEM_MIB, &ram.0);
    args.push("-S".into());
    let qemu = start(dir.path(), "src", &args);
    let qmp = qemu.qmp();
    Vm {
        _dir: dir,
        ram,
        _qemu: qemu,
        qmp,
    }
}

/// Checks every page of the main block against `ram` (guest RAM when the stream was cut); returns how
/// many pages of it the stream held.
fn check_pages(records: &[Record], ram: &[u8]) -> u64 {
    let mut n = 0;
    for r in records {
        if let Record::Page {
            block: 0,
            offset,
            data,
        } = r
        {
            n += 1;
            let page = &ram[*offset as usize..*offset as usize + TARGET_PAGE_SIZE];
            match data {
                Some(d) => assert!(
                    d[..] == page[..],
                    "page at {offset:#x} differs from guest RAM"
                ),
                None => assert!(
                    page.iter().all(|&b| b == 0),
                    "zero page at {offset:#x} is not zero in RAM"
                ),
            }
        }
    }
    n
}

/// The state a stream's records and tail make (as the source keeps it).
fn state_of(records: &[Record], tail: &bytes::Bytes) -> QemuState {
    let (mut prefix, mut machine, mut ram) = (None, String::new(), None);
    for r in records {
        match r {
            Record::Prefix { bytes, machine: m } => {
                prefix = Some(bytes.clone());
                machine = m.clone();
            }
            Record::RamStart {
                bytes,
                section_id,
                blocks,
            } => ram = Some((bytes.clone(), *section_id, blocks.clone())),
            _ => {}
        }
    }
    let (ram_start, section_id, blocks) = ram.expect("a RAM section");
    QemuState {
        qemu_version: String::new(),
        machine,
        prefix: prefix.expect("a prefix"),
        ram_start,
        section_id,
        blocks,
        tail: tail.clone(),
    }
}

#[test]
fn every_page_qemu_streams_is_the_page_in_guest_ram() {
    if !have_qemu() {
        return;
    }
    let mut vm = stopped_vm("parse");
    // The VM never ran: its RAM is the file as the test filled it.
    let ram = std::fs::read(&vm.ram.0).unwrap();
    // An ordinary migration of the stopped VM: each page exactly once.
    let plain = capture(&mut vm.qmp, false);
    for piece in [1 << 20, 4093] {
        let (records, tail) = parse(&plain, piece).unwrap();
        let Record::Prefix { machine, .. } = &records[0] else {
            panic!("no prefix first")
        };
        assert!(machine.starts_with("pc-i440fx-"), "{machine}");
        let Record::RamStart { blocks, .. } = &records[1] else {
            panic!("no RAM start")
        };
        assert_eq!(
            (blocks[0].name.as_str(), blocks[0].used_bytes),
            ("mem0", MEM_MIB << 20)
        );
        assert_eq!(
            check_pages(&records, &ram),
            (MEM_MIB << 20) / TARGET_PAGE_SIZE as u64
        );
        assert!(tail.len() > 1000, "a device tail of {} bytes", tail.len());
        assert_eq!(
            state_of(&records, &tail).runstate().as_deref(),
            Some("prelaunch")
        );
    }
    // A background snapshot: QEMU starts the VM once it saved the device state, and its firmware then
    // writes RAM while pages still stream; each page must still be as it was at the cut (the VM had not run
    // yet, so: the file as filled).
    // (A VM an ordinary migration left stopped cannot migrate again until resumed, and QEMU 7.2 aborts
    // on a background snapshot of a VM that never ran: a fresh VM, run a moment, then paused.)
    drop(vm);
    let mut vm = stopped_vm("parse-bg");
    vm.qmp.execute("cont", serde_json::Value::Null).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vm.qmp.execute("stop", serde_json::Value::Null).unwrap();
    let ram = std::fs::read(&vm.ram.0).unwrap();
    let bg = capture(&mut vm.qmp, true);
    let (records, tail) = parse(&bg, 1 << 16).unwrap();
    let pages = check_pages(&records, &ram);
    assert_eq!(pages, (MEM_MIB << 20) / TARGET_PAGE_SIZE as u64);
    // The run state the snapshot recorded: paused, as the test left it.
    assert_eq!(
        state_of(&records, &tail).runstate().as_deref(),
        Some("paused")
    );
}

#[test]
fn truncated_and_corrupted_streams_are_refused_saying_where_and_why() {
    if !have_qemu() {
        return;
    }
    let mut vm = stopped_vm("corrupt");
    let s = capture(&mut vm.qmp, false);
    let (records, tail) = parse(&s, 1 << 20).unwrap();
    let Record::RamStart { bytes: start, .. } = &records[1] else {
        panic!()
    };
    let Record::Prefix { bytes: prefix, .. } = &records[0] else {
        panic!()
    };
    let ram_at = prefix.len();
    let pages_at = ram_at + start.len();
    let tail_at = s.len() - tail.len();
    // Cut anywhere: never accepted, never a panic.
    let mut cuts = vec![
        0,
        3,
        8,
        9,
        20,
        ram_at - 1,
        ram_at + 10,
        pages_at + 5,
        pages_at + 15,
        pages_at + 100,
    ];
    cuts.extend([tail_at - 1, tail_at, tail_at + 7, s.len() - 1]);
    let mut x = 12345u64;
    for _ in 0..40 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        cuts.push((x >> 33) as usize % s.len());
    }
    for cut in cuts {
        let e =
            parse(&s[..cut], 1 << 16).expect_err(&format!("a stream cut at {cut} was accepted"));
        assert!(
            e.offset <= cut as u64 + 8,
            "cut at {cut}: error at {}: {e}",
            e.offset
        );
    }
    // Corrupted headers and records, each refused with what and where.
    let corrupt = |at: usize, byte: u8| {
        let mut c = s.clone();
        c[at] = byte;
        parse(&c, 1 << 20).unwrap_err()
    };
    let e = corrupt(0, b'X');
    assert!(
        e.to_string().contains("not a QEMU migration stream") && e.offset == 0,
        "{e}"
    );
    let e = corrupt(7, 9);
    assert!(e.to_string().contains("version 9"), "{e}");
    let e = corrupt(ram_at, 0x42);
    assert!(e.to_string().contains("unknown section type 0x42"), "{e}");
    assert_eq!(e.offset, ram_at as u64);
    // The RAM section's name ("ram" at start + 6).
    let e = corrupt(ram_at + 6, b'x');
    assert!(e.to_string().contains("\"xam\" is not supported"), "{e}");
    // The first page record's flags (low byte of its u64): XBZRLE.
    let first = pages_at + 5;
    let e = corrupt(first + 7, s[first + 7] | 0x40);
    assert!(
        e.to_string().contains("XBZRLE") && e.section == "ram",
        "{e}"
    );
    // The first page record's block name.
    let e = corrupt(first + 9, b'Q');
    assert!(e.to_string().contains("does not name"), "{e}");
}

#[test]
fn a_stream_rebuilt_from_the_pages_restores_the_vm_in_a_new_qemu() {
    if !have_qemu() {
        return;
    }
    let mut vm = stopped_vm("rebuild");
    let s = capture(&mut vm.qmp, false);
    let (records, tail) = parse(&s, 1 << 20).unwrap();
    // The backup's side: a replica laid out block after block, and the state.
    let dir = tempfile::tempdir().unwrap();
    let replica_path = dir.path().join("replica.img");
    let mut state = None;
    let mut prefix = None;
    let mut machine = String::new();
    let replica = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&replica_path)
        .unwrap();
    let mut layout = None;
    for r in &records {
        match r {
            Record::Prefix { bytes, machine: m } => {
                prefix = Some(bytes.clone());
                machine = m.clone();
            }
            Record::RamStart {
                bytes,
                section_id,
                blocks,
            } => {
                let l = endophyte_qemu::layout::RamLayout::new(blocks.clone());
                replica.set_len(l.geometry().mem_bytes()).unwrap();
                layout = Some(l);
                state = Some((bytes.clone(), *section_id, blocks.clone()));
            }
            Record::Page {
                block,
                offset,
                data: Some(d),
            } => {
                let addr = layout.as_ref().unwrap().addr(*block, *offset);
                replica.write_all_at(d, addr).unwrap();
            }
            _ => {}
        }
    }
    let (ram_start, section_id, blocks) = state.unwrap();
    let st = QemuState {
        qemu_version: vm.qmp.version().to_string(),
        machine,
        prefix: prefix.unwrap(),
        ram_start,
        section_id,
        blocks,
        tail,
    };
    // The new QEMU, same machine and devices, empty RAM, waiting for its stream.
    let target_ram = RamFile(std::path::PathBuf::from(format!(
        "/dev/shm/endophyte-test-target-{}.ram",
        std::process::id()
    )));
    std::fs::File::create(&target_ram.0)
        .unwrap()
        .set_len(MEM_MIB << 20)
        .unwrap();
    let mut args = vm_args(MEM_MIB, &target_ram.0);
    args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
    let target = start(dir.path(), "target", &args);
    let mut tq = target.qmp();
    let (ours, theirs) = UnixStream::pair().unwrap();
    tq.execute_with_fd("getfd", json!({ "fdname": "r" }), Some(theirs.as_raw_fd()))
        .unwrap();
    drop(theirs);
    tq.execute("migrate-incoming", json!({ "uri": "fd:r" }))
        .unwrap();
    let replica_for_writer = replica.try_clone().unwrap();
    let writer =
        std::thread::spawn(move || endophyte_qemu::rebuild(&st, &replica_for_writer, ours));
    let t = Instant::now();
    loop {
        let m: MigrationInfo = tq.query("query-migrate").unwrap();
        match m.status.as_deref() {
            Some("completed") => break,
            Some("failed") => panic!(
                "the restore failed: {:?}: {}",
                m.error_desc,
                std::fs::read_to_string(dir.path().join("target.err")).unwrap_or_default()
            ),
            _ => assert!(t.elapsed() < Duration::from_secs(60), "{m:?}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.join().unwrap().unwrap();
    // The new VM's RAM (its memory backend's file, which QEMU loaded the pages into) is the old VM's.
    let a = std::fs::read(&target_ram.0).unwrap();
    let b = std::fs::read(&vm.ram.0).unwrap();
    assert_eq!(a.len(), b.len());
    let differing = a
        .chunks(TARGET_PAGE_SIZE)
        .zip(b.chunks(TARGET_PAGE_SIZE))
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(differing, 0, "{differing} pages differ after the restore");
}
