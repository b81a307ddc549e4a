//! A frame on the attach socket as a VMM agent (or anything that connects) could send it: the header is
//! checked before anything is allocated, and a body decodes as a request or a response, or is refused.
#![no_main]

use endophyte_attach::proto::{decode_body, parse_header, Request, Response, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_BYTES {
        let _ = decode_body::<Request>(data);
        let _ = decode_body::<Response>(data);
        return;
    }
    let (head, body) = data.split_at(HEADER_BYTES);
    if let Ok(len) = parse_header(head.try_into().unwrap()) {
        assert!(len <= endophyte_attach::proto::MAX_BODY_BYTES);
    }
    let _ = decode_body::<Request>(body);
    let _ = decode_body::<Response>(body);
});
