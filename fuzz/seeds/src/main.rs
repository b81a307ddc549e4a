//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/`: frames and messages from the
//! wire's own encoders (what a sidecar sends), a real replica store's files, attach frames as the attach
//! crate sends them, a real QEMU's migration stream (when `qemu-system-x86_64` is installed) and the hook
//! tests' domain XML. Run: `cargo run --manifest-path fuzz/Cargo.toml -p endophyte-fuzz-seeds`.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use endophyte_attach::proto::{self, Request, Response};
use endophyte_engine::fence;
use endophyte_engine::store::{CrashPoint, ReplicaStore};
use endophyte_wire::frame::HEADER_BYTES;
use endophyte_wire::msg::{epoch_hash, ErrorCode};
use endophyte_wire::{ChunkBuilder, EpochEnd, Fence, FenceState, Hello, Message, VmState, Welcome};

const PAGE: u64 = 4096;
const MEM: u64 = 64 * PAGE;

fn corpus(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(name), bytes).unwrap();
}

/// An epoch as a sidecar sends it to one backup: Hello, its chunks, its end marker.
fn epoch(epoch: u64, base: u64, with_state: bool) -> Vec<Message> {
    let mut msgs = vec![Message::Hello(Hello {
        session: 11,
        path: 0,
        page_size: PAGE as u32,
        mem_bytes: MEM,
        vm_id: "vm".into(),
        generation: 0,
    })];
    let mut hashes = Vec::new();
    let mut pages = 0u64;
    for seq in 0..3u32 {
        let mut cb = ChunkBuilder::new(epoch, PAGE as usize, 8);
        for i in 0..4u64 {
            let fill = if i == 0 { 0 } else { (seq as u8) * 16 + i as u8 };
            let mut page = vec![fill; PAGE as usize];
            page[..8].copy_from_slice(&(epoch * 100 + i).to_le_bytes());
            cb.push((u64::from(seq) * 4 + i) * PAGE, &page);
        }
        let chunk = cb.finish(seq % 2 == 0);
        hashes.push(chunk.content_hash);
        pages += u64::from(chunk.n_pages);
        msgs.push(Message::Chunk { seq, chunk });
    }
    let state = with_state.then(|| VmState::new("testvm", 1, vec![7u8; 300]).unwrap());
    msgs.push(Message::EpochEnd(EpochEnd {
        epoch,
        base_epoch: base,
        chunk_count: 3,
        page_count: pages,
        epoch_hash: epoch_hash(pages, hashes.iter()),
        state,
        // The services' contributions ride in the end marker: seed the decoder with some.
        contributions: if with_state {
            vec![
                endophyte_wire::Contribution {
                    service: "kv".into(),
                    data: bytes::Bytes::from_static(br#"{"map":{"a":"1"},"writes":1}"#),
                },
                endophyte_wire::Contribution {
                    service: "disk-journal".into(),
                    data: bytes::Bytes::new(),
                },
            ]
        } else {
            vec![]
        },
    }));
    msgs
}

fn replies() -> Vec<Message> {
    vec![
        Message::Welcome(Welcome {
            instance: 5,
            committed_epoch: 3,
            committed_session: 11,
            node: "b1".into(),
            lease_ms: 3000,
        }),
        Message::ChunkAck { epoch: 4, seq: 1 },
        Message::Committed { epoch: 4 },
        Message::Error {
            code: ErrorCode::Replay,
            message: "epoch 2 was sent by another session".into(),
        },
        Message::Ping { token: 9 },
        Message::Pong { token: 9 },
    ]
}

fn wire_seeds() {
    let mut stream = Vec::new();
    for (i, m) in epoch(4, 3, true).into_iter().chain(replies()).enumerate() {
        let f = m.encode().to_vec();
        let mut typed = vec![f[0]];
        typed.extend_from_slice(&f[HEADER_BYTES..]);
        // The frame's type byte sits in its header; `messages` takes it first, then the payload.
        typed[0] = m.msg_type();
        put("messages", &format!("{i:02}-{}", m.name()), &typed);
        if let Message::Chunk { chunk, .. } = &m {
            let mut c = chunk.n_pages.to_le_bytes().to_vec();
            c.extend_from_slice(&chunk.raw_len.to_le_bytes());
            c.push(u8::from(chunk.compressed));
            c.extend_from_slice(&chunk.body);
            put("chunks", &format!("{i:02}-chunk"), &c);
        }
        stream.extend_from_slice(&f);
    }
    for cut in [1u8, 7, 255] {
        let mut s = vec![cut];
        s.extend_from_slice(&stream);
        put("frames", &format!("epoch-cut-{cut}"), &s);
    }
    // The receiver's ops are `[kind, a, b, c]` (fuzz_targets/receiver.rs): Hello on three paths, then
    // epochs 1 and 2 of two chunks each, each ended on the base before it.
    let mut ops = vec![];
    for p in 0..3u8 {
        ops.extend_from_slice(&[0, 0, 0, p]);
    }
    for (e, base) in [(1u8, 0u8), (2, 1)] {
        ops.extend_from_slice(&[1, e, 0, 1]);
        ops.extend_from_slice(&[2, e, 1, 2]);
        ops.extend_from_slice(&[3, e, base, 0]);
    }
    ops.extend_from_slice(&[4, 0, 42, 1]);
    put("receiver", "two-epochs", &ops);
}

fn attach_seeds() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let requests = [
        Request::Hello {
            versions: vec![1],
            client: "endophyte 0.1.0".into(),
        },
        Request::StartDirtyLog,
        Request::Harvest,
        Request::SetThrottle { fraction: 0.25 },
        Request::Status,
    ];
    for (i, r) in requests.iter().enumerate() {
        proto::send(&a, r, &[]).unwrap();
        put("attach", &format!("request-{i}"), &read_frame(&mut b));
    }
    let responses = [
        Response::Ok,
        Response::Harvested {
            seq: 3,
            dirty_pages: 120,
            harvest_us: 40,
            console: b"hello\n".to_vec(),
        },
    ];
    for (i, r) in responses.iter().enumerate() {
        proto::send(&a, r, &[]).unwrap();
        put("attach", &format!("response-{i}"), &read_frame(&mut b));
    }
}

fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut head = [0u8; proto::HEADER_BYTES];
    s.read_exact(&mut head).unwrap();
    let len = proto::parse_header(&head).unwrap() as usize;
    let mut f = head.to_vec();
    f.resize(head.len() + len, 0);
    s.read_exact(&mut f[head.len()..]).unwrap();
    f
}

fn part(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A replica store's own files after one committed epoch with a VM state, its fence, and the journal of
/// the next epoch as a crash between its commit and its apply would leave it.
fn replica_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut store = ReplicaStore::open(d, "vm", MEM, PAGE, CrashPoint::default()).unwrap();
    let msgs = epoch(1, 0, true);
    for m in &msgs {
        match m {
            Message::Chunk { seq, chunk } => store.store_chunk(*seq, chunk, 11).unwrap(),
            Message::EpochEnd(end) => {
                store.commit(end, 11).unwrap();
            }
            _ => {}
        }
    }
    store.checkpoint_now().unwrap();
    drop(store);
    let state = std::fs::read(d.join("state.json")).unwrap();
    let vm_state = std::fs::read(d.join("vmstate-00000000000000000001.bin")).unwrap_or_default();
    fence::ensure_file(d).unwrap();
    let rec = fence::FenceRecord {
        fence: Fence {
            generation: 3,
            state: FenceState::Running,
            epoch: 1,
            session: 11,
            vmm_pid: 4242,
        },
        vmm_endpoint: "/run/endophyte/vm.ctl".into(),
    };
    fence::record(d, &rec, false).unwrap();
    let fence_bytes = std::fs::read(d.join("fence.json")).unwrap();
    let mut seed = Vec::new();
    part(&mut seed, &state);
    part(&mut seed, &vm_state);
    part(&mut seed, &fence_bytes);
    let head_only = seed.clone();
    for m in epoch(2, 1, false) {
        let f = m.encode().to_vec();
        seed.push(m.msg_type());
        seed.extend_from_slice(&((f.len() - HEADER_BYTES) as u16).to_le_bytes());
        seed.extend_from_slice(&f[HEADER_BYTES..]);
    }
    put("replica_files", "committed-then-journal", &seed);
    put("replica_files", "committed", &head_only);
}

/// A real QEMU's migration stream of a small VM that never ran, and the VM state it leaves.
fn qemu_seeds() {
    let Ok(dir) = tempfile::tempdir() else { return };
    let out = dir.path().join("stream");
    let script = format!(
        "{{\"execute\":\"qmp_capabilities\"}}\n{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"exec:cat > {}\"}}}}\n",
        out.display()
    );
    let child = Command::new("qemu-system-x86_64")
        .args(["-M", "pc", "-m", "4", "-nodefaults", "-display", "none", "-S", "-accel", "tcg"])
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("seeds: no qemu-system-x86_64; the qemu_stream corpus keeps what it has");
        return;
    };
    use std::io::Write;
    child.stdin.as_mut().unwrap().write_all(script.as_bytes()).unwrap();
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let done = std::fs::read(&out).is_ok_and(|b| b.len() > 1000 && b.ends_with(b"}"));
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let stream = std::fs::read(&out).unwrap_or_default();
    if stream.is_empty() {
        eprintln!("seeds: QEMU wrote no migration stream");
        return;
    }
    let mut s = vec![0u8];
    s.extend_from_slice(&stream);
    put("qemu_stream", "qemu-4m-prelaunch", &s);
    let mut cut = vec![0x20u8];
    cut.extend_from_slice(&stream[..stream.len() / 2]);
    put("qemu_stream", "qemu-4m-truncated", &cut);
    let mut p = endophyte_qemu::stream::parse::Parser::new();
    p.push(&stream);
    let (mut prefix, mut machine, mut ram_start, mut section_id, mut blocks) =
        (bytes::Bytes::new(), String::new(), bytes::Bytes::new(), 0, vec![]);
    while let Ok(Some(r)) = p.poll() {
        use endophyte_qemu::stream::Record;
        match r {
            Record::Prefix { bytes, machine: m } => (prefix, machine) = (bytes, m),
            Record::RamStart { bytes, section_id: s, blocks: b } => (ram_start, section_id, blocks) = (bytes, s, b),
            _ => {}
        }
    }
    let Ok(tail) = p.finish() else {
        eprintln!("seeds: the parser refused QEMU's stream");
        return;
    };
    let q = endophyte_qemu::QemuState {
        qemu_version: "7.2.0".into(),
        machine,
        prefix,
        ram_start,
        section_id,
        blocks,
        tail,
    };
    let mut b = bytes::BytesMut::new();
    endophyte_wire::vmstate::encode_opt(&mut b, Some(&q.to_vm_state()));
    let mut s = vec![1u8];
    s.extend_from_slice(&b);
    put("qemu_stream", "qemu-vm-state", &s);
}

fn hook_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kubevirt-hooks/tests/domains");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        put("hook_xml", p.file_name().unwrap().to_str().unwrap(), &std::fs::read(&p).unwrap());
    }
}

fn main() {
    wire_seeds();
    attach_seeds();
    replica_seeds();
    qemu_seeds();
    hook_seeds();
    println!("seeds written under {}", corpus("").display());
}
