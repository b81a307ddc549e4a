//! Send throughput over 1, 2, 4 and 8 QUIC paths on loopback, mutual TLS on, with Endophyte's framing.
//!
//! The bench re-runs itself as a separate sink process (so the two sides' CPU time can be told apart): the
//! sink accepts paths, reads every frame (CRC checked) and acknowledges each chunk, as a backup does, but
//! stores nothing. The sender pushes 256 KiB chunks of incompressible pages, at most 16 unacknowledged per
//! path, for a few seconds per setting. It prints MB/s, the CPU cores each side used, and MB/s per sender
//! core (the number read against the 1 GB/s-per-core target).
//!
//! Run: `cargo bench -p endophyte --bench paths` (add `-- --secs 5` to change the duration per setting).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use endophyte_engine::tls::Identity;
use endophyte_engine::transport::{client_endpoint, read_message, write_frame};
use endophyte_wire::{ChunkBuilder, Hello, Message, Welcome};

fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / hz
}

async fn sink(certs: std::path::PathBuf, addr_file: std::path::PathBuf) {
    let id = Identity::load(&certs, "sink").unwrap();
    let ep = quinn::Endpoint::server(id.server_config().unwrap(), "127.0.0.1:0".parse().unwrap())
        .unwrap();
    std::fs::write(&addr_file, ep.local_addr().unwrap().to_string()).unwrap();
    while let Some(inc) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = inc.await else { return };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let _ = read_message(&mut recv).await;
            let w = Message::Welcome(Welcome {
                instance: 1,
                committed_epoch: 0,
                committed_session: 0,
                node: "sink".into(),
                lease_ms: 3000,
            });
            if write_frame(&mut send, w.encode()).await.is_err() {
                return;
            }
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    let m: Message = m;
                    if write_frame(&mut send, m.encode()).await.is_err() {
                        return;
                    }
                }
            });
            while let Ok(m) = read_message(&mut recv).await {
                if let Message::Chunk { seq, chunk } = m {
                    let _ = tx.send(Message::ChunkAck {
                        epoch: chunk.epoch,
                        seq,
                    });
                }
            }
        });
    }
}

async fn run_paths(id: Arc<Identity>, addr: SocketAddr, paths: usize, secs: u64) -> (f64, f64) {
    let ps = {
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
    };
    let mut b = ChunkBuilder::new(1, ps, 64);
    let mut x = 0x1234_5678_9abc_def1u64;
    for i in 0..64 {
        let page: Vec<u8> = (0..ps / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        b.push((i * ps) as u64, &page);
    }
    let chunk = b.finish(false);
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for p in 0..paths {
        let (id, acked, chunk) = (id.clone(), acked.clone(), chunk.clone());
        tasks.push(tokio::spawn(async move {
            let ep = client_endpoint(id.client_config().unwrap(), addr).unwrap();
            let conn = ep.connect(addr, "sink").unwrap().await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let hello = Message::Hello(Hello {
                session: 1,
                path: p as u32,
                page_size: ps as u32,
                mem_bytes: 1 << 30,
                vm_id: "bench".into(),
                generation: 0,
            });
            write_frame(&mut send, hello.encode()).await.unwrap();
            let _ = read_message(&mut recv).await.unwrap();
            let window = Arc::new(tokio::sync::Semaphore::new(16));
            let w2 = window.clone();
            let body = chunk.body.len() as u64;
            let reader = tokio::spawn(async move {
                while let Ok(Message::ChunkAck { .. }) = read_message(&mut recv).await {
                    acked.fetch_add(body, Ordering::Relaxed);
                    w2.add_permits(1);
                }
            });
            let mut seq = 0u32;
            while Instant::now() < deadline {
                window.acquire().await.unwrap().forget();
                let m = Message::Chunk {
                    seq,
                    chunk: chunk.clone(),
                };
                seq = seq.wrapping_add(1);
                if write_frame(&mut send, m.encode()).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            reader.abort();
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
        }));
    }
    let t0 = Instant::now();
    let cpu0 = cpu_seconds_of(std::process::id());
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds_of(std::process::id()) - cpu0;
    (acked.load(Ordering::Relaxed) as f64 / wall, cpu / wall)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--sink") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(sink(args[2].clone().into(), args[3].clone().into()));
        return;
    }
    let secs: u64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("endophyte-bench-paths-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let certs = dir.join("certs");
    endophyte_engine::tls::init_network(&certs, "bench").unwrap();
    endophyte_engine::tls::issue_node(&certs, "sink").unwrap();
    endophyte_engine::tls::issue_node(&certs, "sender").unwrap();
    let addr_file = dir.join("addr");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--sink")
        .arg(&certs)
        .arg(&addr_file)
        .spawn()
        .unwrap();
    while !addr_file.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    let addr: SocketAddr = std::fs::read_to_string(&addr_file)
        .unwrap()
        .parse()
        .unwrap();
    let id = Arc::new(Identity::load(&certs, "sender").unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("paths  MB/s     sender_cores  sink_cores  MB/s_per_sender_core  (mTLS, 256 KiB chunks, {secs} s each)");
    for paths in [1usize, 2, 4, 8] {
        let sink0 = cpu_seconds_of(child.id());
        let t0 = Instant::now();
        let (bps, cores) = rt.block_on(run_paths(id.clone(), addr, paths, secs));
        let sink_cores = (cpu_seconds_of(child.id()) - sink0) / t0.elapsed().as_secs_f64();
        println!(
            "{paths:>5}  {:>7.1}  {cores:>12.2}  {sink_cores:>10.2}  {:>20.1}",
            bps / 1e6,
            bps / 1e6 / cores.max(0.01)
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
