//! A chunk's metadata and body as a peer could send them, checked as a backup checks its own journal
//! (structure, bounds, lz4; the content hash is fuzzed by `messages`): a chunk that passes yields exactly
//! its page count of page-aligned, in-bounds pages of one page each.
#![no_main]

use endophyte_wire::PageChunk;
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
const MEM: u64 = 1 << 24;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let n_pages = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let raw_len = u32::from_le_bytes(data[4..8].try_into().unwrap());
    let chunk = PageChunk {
        epoch: 1,
        n_pages,
        raw_len,
        compressed: data[8] & 1 == 1,
        content_hash: [0; 32],
        body: bytes::Bytes::copy_from_slice(&data[9..]),
    };
    let Ok(d) = chunk.decode_verified_earlier(PAGE, MEM) else {
        return;
    };
    assert_eq!(d.len() as u64, u64::from(n_pages));
    for (gpa, page) in d.pages() {
        assert_eq!(gpa % PAGE, 0, "page-aligned");
        assert!(gpa < MEM, "in the guest");
        if let Some(p) = page {
            assert_eq!(p.len() as u64, PAGE);
        }
    }
});
