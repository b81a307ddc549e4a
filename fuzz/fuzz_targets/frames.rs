//! A byte stream from a peer, cut at fuzzer-chosen points, into the frame decoder: it must return frames or
//! an error, never panic, and never hand out a payload over its limit.
#![no_main]

use endophyte_wire::FrameDecoder;
use libfuzzer_sys::fuzz_target;

const LIMIT: u32 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(cut).max(1);
    let mut d = FrameDecoder::new(LIMIT);
    for piece in stream.chunks(step) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => assert!(f.payload.len() <= LIMIT as usize),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
