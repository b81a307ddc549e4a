//! One frame's payload of any type, with a valid CRC (so decoding, not the checksum, is what is fuzzed):
//! a message decodes or is refused, and a decoded message encodes back to a frame that decodes to it.
#![no_main]

use endophyte_wire::frame::encode_header;
use endophyte_wire::{FrameHeader, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&msg_type, payload)) = data.split_first() else {
        return;
    };
    let head = encode_header(msg_type, &[payload]);
    let Ok(h) = FrameHeader::parse(&head, u32::MAX) else {
        return;
    };
    let Ok(msg) = Message::from_parts(&head, &h, bytes::Bytes::copy_from_slice(payload)) else {
        return;
    };
    let again = msg.encode().to_vec();
    let head2: [u8; endophyte_wire::frame::HEADER_BYTES] =
        again[..endophyte_wire::frame::HEADER_BYTES].try_into().unwrap();
    let h2 = FrameHeader::parse(&head2, u32::MAX).expect("our own header");
    let back = Message::from_parts(
        &head2,
        &h2,
        bytes::Bytes::copy_from_slice(&again[endophyte_wire::frame::HEADER_BYTES..]),
    )
    .expect("our own encoding decodes");
    assert_eq!(back, msg, "a decoded message re-encodes to itself");
});
