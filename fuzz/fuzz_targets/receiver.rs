//! The backup's replication state machine driven by a fuzzer-chosen sequence of messages from several
//! paths: real chunks and end markers (valid hashes, so epochs can commit), deliberately wrong ones, and
//! raw payloads. A driver does what its actions say; the test checks what the module promises: nothing
//! commits before all its chunks were stored, epochs commit in order on a base the replica holds, and the
//! committed epoch never goes back.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use endophyte_wire::frame::encode_header;
use endophyte_wire::msg::epoch_hash;
use endophyte_wire::{Action, ChunkBuilder, EpochEnd, FrameHeader, Hello, Message, Receiver};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
const MEM: u64 = 64 * PAGE;
const VM: &str = "vm";

#[derive(Default)]
struct Built {
    hashes: BTreeMap<u32, [u8; 32]>,
    pages: u64,
}

fuzz_target!(|data: &[u8]| {
    let mut r = Receiver::new(VM.into(), PAGE, MEM, 0, 0, 7, "b".into(), 3);
    let mut built: BTreeMap<u64, Built> = BTreeMap::new();
    let mut stored: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
    let mut committed = 0u64;
    let page = vec![0xa5u8; PAGE as usize];
    let mut ops = data.chunks(4);
    while let Some(op) = ops.next() {
        let [kind, a, b, c] = *op else { break };
        let path = u64::from(c % 3);
        let epoch = u64::from(a % 8);
        let msg = match kind % 6 {
            0 => Message::Hello(Hello {
                session: u64::from(b % 3) + 1,
                path: u32::from(c % 3),
                page_size: if b & 0x80 == 0 { PAGE as u32 } else { 512 },
                mem_bytes: MEM,
                vm_id: if b & 0x40 == 0 { VM.into() } else { "other".into() },
                generation: 0,
            }),
            1 | 2 => {
                let seq = u32::from(b % 4);
                let mut cb = ChunkBuilder::new(epoch, PAGE as usize, 4);
                for i in 0..=u64::from(c % 4) {
                    cb.push(((u64::from(b) + i) % 64) * PAGE, &page);
                }
                let chunk = cb.finish(kind & 1 == 0);
                let e = built.entry(epoch).or_default();
                if e.hashes.insert(seq, chunk.content_hash).is_none() {
                    e.pages += u64::from(chunk.n_pages);
                }
                Message::Chunk { seq, chunk }
            }
            3 => {
                let e = built.entry(epoch).or_default();
                let mut end = EpochEnd {
                    epoch,
                    base_epoch: u64::from(b % 8),
                    chunk_count: e.hashes.len() as u32,
                    page_count: e.pages,
                    epoch_hash: epoch_hash(e.pages, e.hashes.values()),
                    state: None,
                    contributions: vec![],
                };
                if c & 0x80 != 0 {
                    end.page_count += 1;
                }
                Message::EpochEnd(end)
            }
            4 => Message::Ping { token: u64::from(b) },
            _ => {
                let n = usize::from(b);
                let raw: Vec<u8> = ops.by_ref().take(n).flatten().copied().collect();
                let head = encode_header(c, &[&raw]);
                let h = FrameHeader::parse(&head, u32::MAX).unwrap();
                match Message::from_parts(&head, &h, raw.into()) {
                    Ok(m) => m,
                    Err(_) => continue,
                }
            }
        };
        let _ = r.handle_message(path, msg);
        while let Some(action) = r.poll_action() {
            match action {
                Action::Store { epoch, seq, chunk } => {
                    chunk.decode(PAGE, MEM).expect("a chunk the receiver stores is valid");
                    stored.entry(epoch).or_default().insert(seq);
                    let _ = r.chunk_stored(epoch, seq);
                }
                Action::Commit { end } => {
                    assert!(end.epoch > committed, "epoch {} after {committed}", end.epoch);
                    assert!(end.base_epoch <= committed, "epoch {} on base {} over {committed}", end.epoch, end.base_epoch);
                    let have = stored.get(&end.epoch).cloned().unwrap_or_default();
                    assert!(
                        (0..end.chunk_count).all(|s| have.contains(&s)),
                        "epoch {} commits with chunks {have:?} of {}",
                        end.epoch,
                        end.chunk_count
                    );
                    committed = end.epoch;
                    let _ = r.epoch_committed(end.epoch);
                }
                Action::Discard { epoch } => {
                    stored.remove(&epoch);
                }
            }
        }
        while r.poll_transmit().is_some() {}
        assert_eq!(r.committed_epoch(), committed, "the receiver's committed epoch is the driver's");
    }
});
