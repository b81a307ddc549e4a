//! A backup's replica directory as a crash, a full disk or a hand could leave it: `state.json`, the VM state
//! file it names, `fence.json` and a journal of frames (with valid CRCs, so their contents are what is
//! fuzzed). Opening the replica recovers or refuses with a reason; an opened replica is the VM's size; a fence
//! record that parses is written back and read back unchanged.
//!
//! Input: `[u16 LE len][state.json][u16 LE len][vm state file][u16 LE len][fence.json]` then frames, each
//! `[type u8][u16 LE len][payload]`.
#![no_main]

use std::io::Write;

use endophyte_engine::fence;
use endophyte_engine::store::{CrashPoint, ReplicaStore};
use endophyte_wire::frame::encode_header;
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
const MEM: u64 = 64 * PAGE;

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::from(u16::from_le_bytes(data.get(..2)?.try_into().ok()?));
    let part = data.get(2..2 + len)?;
    *data = &data[2 + len..];
    Some(part)
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let (Some(state), Some(vm_state), Some(fence_bytes)) =
        (take(&mut rest), take(&mut rest), take(&mut rest))
    else {
        return;
    };
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("journal")).unwrap();
    if !state.is_empty() {
        std::fs::write(d.join("state.json"), state).unwrap();
    }
    std::fs::write(d.join("vmstate-00000000000000000001.bin"), vm_state).unwrap();
    let mut journal = std::fs::File::create(d.join("journal/00000000000000000001.ejl")).unwrap();
    while let [msg_type, a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
        let payload = &tail[..len];
        journal.write_all(&encode_header(*msg_type, &[payload])).unwrap();
        journal.write_all(payload).unwrap();
        rest = &tail[len..];
    }
    drop(journal);

    if let Ok(record) = fence::parse(fence_bytes) {
        fence::ensure_file(d).unwrap();
        fence::record(d, &record, false).unwrap();
        assert_eq!(fence::load(d).unwrap(), Some(record), "a fence record reads back as written");
    } else {
        std::fs::write(d.join("fence.json"), fence_bytes).unwrap();
        assert!(fence::load(d).is_err(), "a fence that does not parse is refused on load");
    }
    if let Ok(store) = ReplicaStore::open(d, "vm", MEM, PAGE, CrashPoint::default()) {
        let len = std::fs::metadata(store.image_path()).unwrap().len();
        assert_eq!(len, MEM, "the replica is the VM's size");
    }
});
