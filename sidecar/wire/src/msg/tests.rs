//! Unit tests of the parent module.

use super::*;
use crate::chunk::ChunkBuilder;
use crate::frame::FrameDecoder;

fn all() -> Vec<Message> {
    let mut b = ChunkBuilder::new(5, 4096, 4);
    b.push(4096, &[7u8; 4096]);
    b.push(8192, &[0u8; 4096]);
    vec![
        Message::Hello(Hello {
            session: 1,
            path: 2,
            page_size: 4096,
            mem_bytes: 1 << 30,
            vm_id: "vm-a".into(),
            generation: 7,
        }),
        Message::Welcome(Welcome {
            instance: 9,
            committed_epoch: 4,
            committed_session: 3,
            node: "b1".into(),
            lease_ms: 2500,
        }),
        Message::Chunk {
            seq: 3,
            chunk: b.finish(true),
        },
        Message::ChunkAck { epoch: 5, seq: 3 },
        Message::EpochEnd(EpochEnd {
            epoch: 5,
            base_epoch: 4,
            chunk_count: 1,
            page_count: 2,
            epoch_hash: [1; 32],
            state: Some(VmState::new("testvm", 1, Bytes::from_static(b"{\"regs\":1}")).unwrap()),
            contributions: vec![],
        }),
        Message::EpochEnd(EpochEnd {
            epoch: 6,
            base_epoch: 5,
            chunk_count: 0,
            page_count: 0,
            epoch_hash: [2; 32],
            state: None,
            contributions: vec![
                crate::Contribution {
                    service: "kv".into(),
                    data: Bytes::from_static(b"a=1"),
                },
                crate::Contribution {
                    service: "console".into(),
                    data: Bytes::new(),
                },
            ],
        }),
        Message::Committed { epoch: 5 },
        Message::Error {
            code: ErrorCode::Replay,
            message: "no".into(),
        },
        Message::Ping { token: 77 },
        Message::Pong { token: 77 },
        Message::Switchover(Switchover {
            generation: 3,
            session: 11,
            epoch: 42,
            verify: true,
            state: VmState::new("qemu-7.2", 3, Bytes::from_static(b"{\"vcpus\":[]}")).unwrap(),
        }),
        Message::SwitchoverReady(SwitchoverReady {
            generation: 3,
            epoch: 42,
            settle_us: 1,
            spawn_us: 2,
            restore_us: 3,
            verify_us: 4,
            ram_hash: "ab12".into(),
        }),
        Message::SwitchoverCommit { generation: 3 },
        Message::SwitchedOver {
            generation: 3,
            resume_us: 9,
        },
        Message::SwitchoverAbort { generation: 3 },
        Message::SwitchoverWarmup { generation: 3 },
        Message::SwitchoverStandby {
            generation: 3,
            preloaded: true,
        },
    ]
}

#[test]
fn every_message_round_trips_through_a_stream() {
    let msgs = all();
    let mut d = FrameDecoder::new(1 << 20);
    for m in &msgs {
        d.push(&m.encode().to_vec());
    }
    for m in &msgs {
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(&Message::decode(f).unwrap(), m);
    }
    assert!(d.next_frame().unwrap().is_none());
}

#[test]
fn truncated_payloads_are_malformed_not_panics() {
    for m in all() {
        let bytes = m.encode().to_vec();
        let payload = Bytes::copy_from_slice(&bytes[HEADER_BYTES..]);
        for cut in 0..payload.len() {
            let r = Message::decode(RawFrame {
                msg_type: m.msg_type(),
                payload: payload.slice(..cut),
            });
            match (r, &m) {
                (Err(_), _) => {}
                // A chunk with a shorter body can still parse; its chunk check refuses it.
                (Ok(Message::Chunk { chunk, .. }), _) => {
                    assert!(chunk.decode(4096, 1 << 30).is_err())
                }
                // An end marker cut right after its VM state is the encoding from before services
                // (journals may hold it): the same marker without contributions, and only there.
                (Ok(Message::EpochEnd(got)), Message::EpochEnd(want))
                    if !want.contributions.is_empty()
                        && got.contributions.is_empty()
                        && got.state == want.state
                        && cut
                            == payload.len() - crate::contrib::encoded_len(&want.contributions) => {
                }
                // A Hello cut right before its generation is an older sidecar's: generation 0, and only
                // there.
                (Ok(Message::Hello(got)), Message::Hello(want))
                    if got.generation == 0
                        && want.generation != 0
                        && got.vm_id == want.vm_id
                        && cut == payload.len() - 8 => {}
                (Ok(_), _) => panic!("{} cut at {cut} decoded", m.name()),
            }
        }
    }
}

#[test]
fn long_strings_are_cut_on_a_character_boundary() {
    // 3-byte characters after one ASCII byte: the 65,535-byte cap lands inside a character.
    let message = format!("x{}", "\u{20ac}".repeat(30_000));
    let m = Message::Error {
        code: ErrorCode::Internal,
        message: message.clone(),
    };
    let mut d = FrameDecoder::new(1 << 20);
    d.push(&m.encode().to_vec());
    let Message::Error { message: got, .. } =
        Message::decode(d.next_frame().unwrap().unwrap()).unwrap()
    else {
        panic!("not an error")
    };
    assert!(got.len() <= u16::MAX as usize && got.len() > 65_000);
    assert!(message.starts_with(&got));
}

#[test]
fn type_zero_is_invalid() {
    let r = Message::decode(RawFrame {
        msg_type: 0,
        payload: Bytes::new(),
    });
    assert_eq!(r, Err(MessageError::UnknownType(0)));
}

#[test]
fn a_hello_without_a_generation_reads_as_generation_zero() {
    let h = Message::Hello(Hello {
        session: 1,
        path: 0,
        page_size: 4096,
        mem_bytes: 1 << 20,
        vm_id: "vm".into(),
        generation: 9,
    })
    .encode()
    .to_vec();
    // An older sidecar's Hello: the same fields without the trailing generation, in a frame of its own.
    let body = &h[crate::frame::HEADER_BYTES..h.len() - 8];
    let mut old = crate::frame::encode_header(1, &[body]).to_vec();
    old.extend_from_slice(body);
    let mut d = FrameDecoder::new(1 << 20);
    d.push(&old);
    match Message::decode(d.next_frame().unwrap().unwrap()).unwrap() {
        Message::Hello(h) => assert_eq!((h.vm_id.as_str(), h.generation), ("vm", 0)),
        other => panic!("{other:?}"),
    }
}
