//! Unit tests of the parent module.

use super::*;
use crate::chunk::ChunkBuilder;

fn welcome() -> Welcome {
    Welcome {
        instance: 1,
        committed_epoch: 0,
        committed_session: 0,
        node: "b".into(),
        lease_ms: 3000,
    }
}

#[test]
fn a_chunk_that_timed_out_goes_again_on_another_path() {
    let t = Instant::now();
    let mut s = Sender::new(SenderConfig::default(), &[3]);
    for p in 0..3 {
        s.handle_path_up(0, p, &welcome(), t);
    }
    while s.poll_transmit(t).is_some() {}
    assert_eq!(
        s.begin_epoch(0, 1),
        EpochStart::Resync {
            from: 0,
            from_session: 0
        }
    );
    // Three chunks, one per path; the round-robin comes back to path 0 after them.
    for i in 0..3u64 {
        let mut b = ChunkBuilder::new(1, 4096, 4);
        b.push(i * 4096, &[1u8 + i as u8; 4096]);
        s.push_chunk(0, b.finish(false));
    }
    let first: Vec<(u32, PathId)> = std::iter::from_fn(|| s.poll_transmit(t))
        .filter_map(|x| match x.msg {
            Message::Chunk { seq, .. } => Some((seq, x.path)),
            _ => None,
        })
        .collect();
    assert_eq!(first.len(), 3);
    let later = t + Duration::from_millis(2500);
    s.handle_timeout(later);
    let again: Vec<(u32, PathId)> = std::iter::from_fn(|| s.poll_transmit(later))
        .filter_map(|x| match x.msg {
            Message::Chunk { seq, .. } => Some((seq, x.path)),
            _ => None,
        })
        .collect();
    assert_eq!(again.len(), 3, "{again:?}");
    for (seq, path) in again {
        let (_, old) = first.iter().find(|(s, _)| *s == seq).unwrap();
        assert_ne!(path, *old, "chunk {seq} resent on the path that lost it");
    }
}

#[test]
fn with_one_path_left_a_timed_out_chunk_goes_again_on_it() {
    let t = Instant::now();
    let mut s = Sender::new(SenderConfig::default(), &[2]);
    s.handle_path_up(0, 0, &welcome(), t);
    while s.poll_transmit(t).is_some() {}
    s.begin_epoch(0, 1);
    let mut b = ChunkBuilder::new(1, 4096, 4);
    b.push(0, &[1u8; 4096]);
    s.push_chunk(0, b.finish(false));
    let first = s.poll_transmit(t).unwrap();
    let later = t + Duration::from_millis(2500);
    s.handle_timeout(later);
    let again = std::iter::from_fn(|| s.poll_transmit(later))
        .find(|x| matches!(x.msg, Message::Chunk { .. }))
        .expect("sent again");
    assert_eq!(again.path, first.path);
}
