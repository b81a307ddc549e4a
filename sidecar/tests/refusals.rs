//! Bad input against a real backup process: a corrupted chunk, an oversized frame, a replayed epoch and
//! certificates from another network are each refused with an error that says what was wrong, and nothing
//! is applied to the replica (checked on disk).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use endophyte_engine::tls::Identity;
use endophyte_engine::transport::{client_endpoint, read_message, write_frame, PathError};
use endophyte_wire::frame::{encode_header, HEADER_BYTES};
use endophyte_wire::msg::epoch_hash;
use endophyte_wire::{ChunkBuilder, EncodedFrame, EpochEnd, ErrorCode, Hello, Message, PageChunk};

const MEM: u64 = 1 << 20;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

struct Path1 {
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _ep: quinn::Endpoint,
}

async fn connect(
    id: &Identity,
    addr: SocketAddr,
    session: u64,
) -> Result<(Path1, Message), PathError> {
    connect_vm(id, addr, session, "vm1", MEM).await
}

async fn connect_vm(
    id: &Identity,
    addr: SocketAddr,
    session: u64,
    vm_id: &str,
    mem_bytes: u64,
) -> Result<(Path1, Message), PathError> {
    connect_at(id, addr, session, vm_id, mem_bytes, 0).await
}

/// A path whose Hello carries `generation` (the sender's fencing token).
async fn connect_at(
    id: &Identity,
    addr: SocketAddr,
    session: u64,
    vm_id: &str,
    mem_bytes: u64,
    generation: u64,
) -> Result<(Path1, Message), PathError> {
    let ep = client_endpoint(id.client_config().unwrap(), addr)?;
    let conn = ep
        .connect(addr, "b1")
        .map_err(|source| PathError::Connect { addr, source })?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(
        &mut send,
        Message::Hello(Hello {
            session,
            path: 0,
            page_size: page_size() as u32,
            mem_bytes,
            vm_id: vm_id.into(),
            generation,
        })
        .encode(),
    )
    .await?;
    let welcome = read_message(&mut recv).await?;
    Ok((
        Path1 {
            _conn: conn,
            send,
            recv,
            _ep: ep,
        },
        welcome,
    ))
}

fn one_page_chunk(epoch: u64, fill: u8) -> PageChunk {
    let ps = page_size();
    let mut b = ChunkBuilder::new(epoch, ps, 4);
    b.push(ps as u64, &vec![fill; ps]);
    b.finish(true)
}

async fn expect_error(p: &mut Path1) -> (ErrorCode, String) {
    match tokio::time::timeout(Duration::from_secs(10), read_message(&mut p.recv))
        .await
        .expect("no answer in 10 s")
    {
        Ok(Message::Error { code, message }) => (code, message),
        other => panic!("expected an Error, got {other:?}"),
    }
}

fn replica_is_zero(vm_dir: &Path) -> bool {
    std::fs::read(vm_dir.join("replica.img"))
        .map(|b| b.iter().all(|&x| x == 0))
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path(), "net-a", &["client", "b1"]);
    let addr = free_udp();
    let data = tmp.path().join("data");
    let _b1 = backup(&certs, "b1", addr, &data, &[]);
    let id = Identity::load(&certs, "client").unwrap();
    let vm_dir = data.join("vm1");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A chunk whose content does not match its hash (frame CRC recomputed, so only the chunk check sees it).
    let (mut p, w) = connect(&id, addr, 1).await.unwrap();
    assert!(
        matches!(w, Message::Welcome(ref w) if w.committed_epoch == 0),
        "{w:?}"
    );
    let mut c = one_page_chunk(1, 0x5a);
    let mut body = c.body.to_vec();
    let last = body.len() - 1;
    body[last] ^= 1;
    c.body = Bytes::from(body);
    write_frame(&mut p.send, Message::Chunk { seq: 0, chunk: c }.encode())
        .await
        .unwrap();
    let (code, msg) = expect_error(&mut p).await;
    assert_eq!(code, ErrorCode::Corrupt, "{msg}");
    assert!(msg.contains("corrupted chunk 0 of epoch 1"), "{msg}");
    assert!(
        replica_is_zero(&vm_dir),
        "a corrupted chunk reached the replica"
    );

    // A frame announcing 1 GiB: refused from its header.
    let (mut p, _) = connect(&id, addr, 2).await.unwrap();
    let mut head = encode_header(3, &[b""]);
    head[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    write_frame(
        &mut p.send,
        EncodedFrame {
            head: Bytes::copy_from_slice(&head[..HEADER_BYTES]),
            body: Bytes::new(),
        },
    )
    .await
    .unwrap();
    let (code, msg) = expect_error(&mut p).await;
    assert_eq!(code, ErrorCode::TooLarge, "{msg}");
    assert!(msg.contains("exceeds the cap"), "{msg}");

    // A valid epoch 1 commits...
    let (mut p, _) = connect(&id, addr, 3).await.unwrap();
    commit_one_page_epoch(&mut p, 0x77).await;
    let img = std::fs::read(vm_dir.join("replica.img")).unwrap();
    let ps = page_size();
    assert!(
        img[ps..2 * ps].iter().all(|&b| b == 0x77),
        "epoch 1's page is not in the replica"
    );
    let before = hash_file(&vm_dir.join("replica.img"));

    // The same backup serves another VM at the same time, in its own replica.
    let (mut p2, w) = connect_vm(&id, addr, 9, "vm2", 2 * MEM).await.unwrap();
    assert!(
        matches!(w, Message::Welcome(ref w) if w.committed_epoch == 0),
        "{w:?}"
    );
    commit_one_page_epoch(&mut p2, 0x33).await;
    let img2 = std::fs::read(data.join("vm2/replica.img")).unwrap();
    assert_eq!(img2.len() as u64, 2 * MEM);
    assert!(
        img2[ps..2 * ps].iter().all(|&b| b == 0x33),
        "vm2's page is not in its replica"
    );
    assert_eq!(
        hash_file(&vm_dir.join("replica.img")),
        before,
        "vm2's epoch touched vm1's replica"
    );

    // ...and offered again by another session, it is a replay.
    let (mut p, w) = connect(&id, addr, 4).await.unwrap();
    assert!(
        matches!(w, Message::Welcome(ref w) if w.committed_epoch == 1),
        "{w:?}"
    );
    write_frame(
        &mut p.send,
        Message::Chunk {
            seq: 0,
            chunk: one_page_chunk(1, 0x11),
        }
        .encode(),
    )
    .await
    .unwrap();
    let (code, msg) = expect_error(&mut p).await;
    assert_eq!(code, ErrorCode::Replay, "{msg}");
    assert!(msg.contains("replayed epoch 1"), "{msg}");
    assert_eq!(
        hash_file(&vm_dir.join("replica.img")),
        before,
        "a replay changed the replica"
    );

    // A client whose certificate comes from another network: the backup refuses it at the handshake.
    let other = certs_other(tmp.path());
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(certs.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(other.join("client.pem"), mixed.join("client.pem")).unwrap();
    std::fs::copy(other.join("client.key"), mixed.join("client.key")).unwrap();
    let intruder = Identity::load(&mixed, "client").unwrap();
    let e = match connect(&intruder, addr, 5).await {
        Err(e) => e,
        Ok((mut p, m)) => {
            // TLS 1.3 clients learn of a refused certificate on their first read.
            match read_message(&mut p.recv).await {
                Err(e) => e,
                Ok(m2) => panic!("an intruder was welcomed: {m:?} {m2:?}"),
            }
        }
    };
    let text = e.explain();
    eprintln!("intruder sees: {text}");
    assert!(
        text.contains("another network") && text.contains("net-b"),
        "{text}"
    );

    // And a backup whose certificate comes from another network is refused by the sidecar's side.
    let foreign = Identity::load(&other, "client").unwrap();
    let e = connect(&foreign, addr, 6)
        .await
        .err()
        .expect("connected across networks");
    let text = e.explain();
    assert!(
        text.contains("another network") && text.contains("net-a") && text.contains("net-b"),
        "{text}"
    );
    assert_eq!(
        hash_file(&vm_dir.join("replica.img")),
        before,
        "the replica changed"
    );
}

/// Sends epoch 1 (one page of `fill` at the second page) on `p` and waits for its Committed.
async fn commit_one_page_epoch(p: &mut Path1, fill: u8) {
    let c = one_page_chunk(1, fill);
    let h = c.content_hash;
    write_frame(&mut p.send, Message::Chunk { seq: 0, chunk: c }.encode())
        .await
        .unwrap();
    write_frame(
        &mut p.send,
        Message::EpochEnd(EpochEnd {
            epoch: 1,
            base_epoch: 0,
            chunk_count: 1,
            page_count: 1,
            epoch_hash: epoch_hash(1, [&h]),
            state: Default::default(),
            contributions: vec![],
        })
        .encode(),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        if let Message::Committed { epoch: 1 } = read_message(&mut p.recv).await.unwrap() {
            return;
        }
    }
    panic!("epoch 1 was not committed");
}

fn certs_other(dir: &Path) -> std::path::PathBuf {
    certs(dir, "net-b", &["client"])
}

fn fence_of(vm_dir: &Path) -> Option<serde_json::Value> {
    let b = std::fs::read(vm_dir.join("fence.json")).ok()?;
    serde_json::from_slice(b.trim_ascii_end()).ok()
}

/// Without an authority a path still acts only for its own generation: a `SwitchoverAbort` or a
/// `Switchover` for another generation is refused and the fence is untouched (an abort of `u64::MAX`
/// used to record that generation as aborted, so that no switchover could ever happen again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_message_for_another_generation_poisons_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path(), "net-a", &["client", "b1"]);
    let addr = free_udp();
    let data = tmp.path().join("data");
    let _b1 = backup(&certs, "b1", addr, &data, &[]);
    let id = Identity::load(&certs, "client").unwrap();
    let (mut p, welcome) = connect_at(&id, addr, 1, "vm1", MEM, 3).await.unwrap();
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    write_frame(
        &mut p.send,
        Message::SwitchoverAbort {
            generation: u64::MAX,
        }
        .encode(),
    )
    .await
    .unwrap();
    let (code, message) = expect_error(&mut p).await;
    assert_eq!(code, ErrorCode::PermissionDenied, "{message}");
    assert!(
        message.contains("generation 3") && message.contains("4"),
        "{message}"
    );
    let fence = fence_of(&data.join("vm1"));
    assert!(
        fence
            .as_ref()
            .is_none_or(|f| f["generation"] == 0 && f["state"] == "none"),
        "the fence changed: {fence:?}"
    );
    // A stale primary (below the newest generation this backup has seen) is refused.
    let (mut stale, welcome) = connect_at(&id, addr, 2, "vm1", MEM, 2).await.unwrap();
    match welcome {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::Fenced, "{message}");
            assert!(message.contains("stale"), "{message}");
        }
        other => panic!("a stale primary was welcomed: {other:?}"),
    }
    let _ = &mut stale;
}

/// Under a fencing authority only the VM's holder, at its generation, may open a path: another node
/// with a valid certificate of the network is refused at its Hello, naming node and VM, whatever
/// generation it claims, and nothing of the VM is created on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_etcd_a_node_that_does_not_hold_the_vm_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Started off the test's runtime: it waits for etcd on a runtime of its own.
    let dir = tmp.path().join("etcd");
    let etcd = std::thread::spawn(move || endophyte_authority::local::LocalEtcd::start(&dir))
        .join()
        .unwrap()
        .expect("etcd (apt-get install etcd-server)");
    let certs = certs(tmp.path(), "net-a", &["primary", "mallory", "b1"]);
    let addr = free_udp();
    let data = tmp.path().join("data");
    let _b1 = backup(
        &certs,
        "b1",
        addr,
        &data,
        &[&format!("--etcd={}", etcd.url)],
    );
    // "primary" holds vm1 at generation 1.
    let auth = endophyte_authority::EtcdAuthority::connect(&etcd.config()).unwrap();
    let held = endophyte_authority::claim(
        &auth,
        "vm1",
        "primary",
        Duration::from_secs(30),
        None,
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(held.generation, 1);
    let mallory = Identity::load(&certs, "mallory").unwrap();
    for generation in [0, 1, 2, u64::MAX] {
        let (_p, answer) = connect_at(&mallory, addr, 7, "vm1", MEM, generation)
            .await
            .unwrap();
        match answer {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::PermissionDenied, "{message}");
                assert!(
                    message.contains("\"mallory\"")
                        && message.contains("\"vm1\"")
                        && message.contains("\"primary\""),
                    "{message}"
                );
            }
            other => panic!("mallory was let in at generation {generation}: {other:?}"),
        }
    }
    // A VM nobody claimed is refused too.
    let (_p, answer) = connect_at(&mallory, addr, 7, "vm2", MEM, 0).await.unwrap();
    assert!(
        matches!(&answer, Message::Error { code: ErrorCode::PermissionDenied, message } if message.contains("no record")),
        "{answer:?}"
    );
    assert!(
        !data.join("vm1").exists() && !data.join("vm2").exists(),
        "the refusals touched the disk"
    );
    // The holder, at its generation, is welcomed; at another one it is refused.
    let primary = Identity::load(&certs, "primary").unwrap();
    let (_p, answer) = connect_at(&primary, addr, 8, "vm1", MEM, 2).await.unwrap();
    assert!(
        matches!(
            answer,
            Message::Error {
                code: ErrorCode::PermissionDenied,
                ..
            }
        ),
        "{answer:?}"
    );
    let (_p, answer) = connect_at(&primary, addr, 8, "vm1", MEM, 1).await.unwrap();
    assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
}
