//! System benchmarks of the sidecar against a real testvm guest (needs /dev/kvm). Prints, never asserts.
//!
//! 1. **Epoch pause against dirty bytes.** A 1 GiB guest runs hotset (256 MiB) as fast as it can; the bench
//!    lets epochs of 10 to 1600 ms accumulate dirty pages, then does exactly what the sidecar does in the pause
//!    (pause, harvest, copy the dirty ranges into a staging buffer, resume) and prints each step's time and
//!    the pause per 10 MB dirty (target: <= 2 ms per 10 MB, memcpy-bound).
//! 2. **Sidecar resident memory.** A real `endophyte sidecar` process with a 32 MiB staging buffer
//!    replicates that guest to two backups for 15 s; the bench samples its /proc status every 100 ms and
//!    prints the peaks of VmRSS and its parts (anonymous, file, shared). Target: <= 64 MiB.
//!
//! Run: `cargo bench -p endophyte --bench epoch`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_vmm::attach::AttachSource;
use endophyte_vmm::{SourceVmm, Tracking};

const EXE: &str = env!("CARGO_BIN_EXE_endophyte");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Kill {
    Kill(
        Command::new(EXE)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vmm(dir: &Path, workload: &str) -> (Kill, std::path::PathBuf) {
    let sock = dir.join("vm.sock");
    let k = spawn(&[
        "testvm-serve",
        "--fill",
        "--mem",
        "1GiB",
        "--workload",
        workload,
        "--attach-socket",
        sock.to_str().unwrap(),
    ]);
    wait_for(&sock);
    (k, sock)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn memcpy_gbps() -> f64 {
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![2u8; 256 << 20];
    let t = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    }
    (4u64 * (256 << 20)) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// GB/s copying 32768 random 4 KiB pages out of a 512 MiB buffer, with the buffer on 4 KiB pages or
/// (`huge`) on transparent huge pages: separates memcpy cost from TLB-miss cost.
fn random_page_copy_gbps(huge: bool) -> f64 {
    let len = 512usize << 20;
    let mut src = memmap2::MmapMut::map_anon(len).unwrap();
    if huge {
        let _ = src.advise(memmap2::Advice::HugePage);
    }
    for i in (0..len).step_by(4096) {
        src[i] = 1;
    }
    let mut dst = vec![0xa5u8; 32768 * 4096];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let idx: Vec<usize> = (0..32768)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as usize % (len / 4096)) * 4096
        })
        .collect();
    let t = Instant::now();
    for (n, &i) in idx.iter().enumerate() {
        dst[n * 4096..(n + 1) * 4096].copy_from_slice(&src[i..i + 4096]);
    }
    std::hint::black_box(&dst);
    (32768.0 * 4096.0) / t.elapsed().as_secs_f64() / 1e9
}

fn epoch_pause(dir: &Path) {
    println!(
        "machine limit: sequential memcpy {:.2} GB/s (256 MiB buffers)",
        memcpy_gbps()
    );
    println!(
        "machine limit: random 4 KiB page copies {:.2} GB/s on 4 KiB pages, {:.2} GB/s on transparent huge pages",
        random_page_copy_gbps(false),
        random_page_copy_gbps(true)
    );
    let (_vm, sock) = vmm(dir, "hotset:size=256M,rate=0");
    // Through the engine's VMM boundary, as the sidecar does.
    let src = AttachSource::connect(&sock, Tracking::DirtyLog).unwrap();
    let log = src.dirty_log().unwrap();
    let page_size = src.geometry().page_size;
    let mut staging = vec![0xa5u8; 256 << 20];
    log.start().unwrap();
    println!("epoch pause against dirty bytes (1 GiB guest, hotset 256 MiB at full speed)");
    println!("epoch_ms  threads  dirty_MB  pause_rpc_ms  harvest_ms  copy_ms  resume_ms  total_ms  ms_per_10MB  copy_GB/s");
    for (epoch_ms, threads) in [10u64, 50, 100, 200, 400, 800, 1600]
        .into_iter()
        .flat_map(|e| [(e, 1usize), (e, 2)])
    {
        let mut rows = vec![];
        for _ in 0..5 {
            let h = log.harvest().unwrap();
            log.release(h.seq, true).unwrap();
            std::thread::sleep(Duration::from_millis(epoch_ms));
            let t0 = Instant::now();
            src.pause().unwrap();
            let t1 = Instant::now();
            let h = log.harvest().unwrap();
            let t2 = Instant::now();
            let pages: u64 = h.bitmaps.iter().map(|b| b.count()).sum();
            let bytes = pages * page_size;
            endophyte_engine::primary::stage_dirty(log, &h.bitmaps, &mut staging, threads).unwrap();
            let t3 = Instant::now();
            src.resume().unwrap();
            let t4 = Instant::now();
            log.release(h.seq, true).unwrap();
            rows.push((bytes, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0));
        }
        rows.sort_by_key(|r| r.5);
        let r = rows[rows.len() / 2];
        let mb = r.0 as f64 / 1e6;
        println!(
            "{epoch_ms:>8}  {threads:>7}  {mb:>8.1}  {:>12.3}  {:>10.3}  {:>7.3}  {:>9.3}  {:>8.3}  {:>11.3}  {:>9.2}",
            ms(r.1),
            ms(r.2),
            ms(r.3),
            ms(r.4),
            ms(r.5),
            if mb > 0.0 { ms(r.5) / mb * 10.0 } else { 0.0 },
            if r.3.as_secs_f64() > 0.0 { r.0 as f64 / r.3.as_secs_f64() / 1e9 } else { 0.0 },
        );
    }
    println!("(median of 5 per row)");
    let _ = src.shutdown();
}

/// `[Rss, Anonymous (private), guest RAM mapping Rss]` in KiB, from /proc/<pid>/smaps.
fn rss_kb(pid: u32) -> Option<[u64; 3]> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut rss, mut anon, mut guest) = (0u64, 0u64, 0u64);
    let mut in_guest = false;
    for l in s.lines() {
        let mut it = l.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        if k.contains('-')
            && k.chars().next().is_some_and(|c| c.is_ascii_hexdigit())
            && !k.ends_with(':')
        {
            in_guest = l.contains("endophyte-guest-ram");
            continue;
        }
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "Rss:" => {
                rss += v;
                if in_guest {
                    guest += v;
                }
            }
            "Anonymous:" => anon += v,
            _ => {}
        }
    }
    Some([rss, anon, guest])
}

fn free_udp() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn sidecar_rss(dir: &Path) {
    let certs = dir.join("certs");
    endophyte_engine::tls::init_network(&certs, "bench").unwrap();
    for n in ["p", "b1", "b2"] {
        endophyte_engine::tls::issue_node(&certs, n).unwrap();
    }
    let (a1, a2) = (free_udp(), free_udp());
    let c = certs.to_str().unwrap();
    let d1 = dir.join("d1");
    let d2 = dir.join("d2");
    let _b1 = spawn(&[
        "backup",
        "--listen",
        &a1.to_string(),
        "--node",
        "b1",
        "--certs",
        c,
        "--data-dir",
        d1.to_str().unwrap(),
    ]);
    let _b2 = spawn(&[
        "backup",
        "--listen",
        &a2.to_string(),
        "--node",
        "b2",
        "--certs",
        c,
        "--data-dir",
        d2.to_str().unwrap(),
    ]);
    let (_vm, sock) = vmm(dir, "hotset:size=256M,rate=12800");
    let sc = spawn(&[
        "sidecar",
        "--vm-id",
        "bench",
        "--attach-socket",
        sock.to_str().unwrap(),
        "--certs",
        c,
        "--node",
        "p",
        "--staging",
        "32MiB",
        "--quorum",
        "2",
        "--backup",
        &format!("name=b1,addr={a1}"),
        "--backup",
        &format!("name=b2,addr={a2}"),
        "--duration",
        "15s",
    ]);
    let pid = sc.0.id();
    let mut peak = [0u64; 3];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(25) {
        match rss_kb(pid) {
            Some(v) if v[0] > 0 => {
                for i in 0..3 {
                    peak[i] = peak[i].max(v[i]);
                }
            }
            _ => break,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!();
    println!("sidecar resident memory (32 MiB staging, 1 GiB guest, 2 backups x 4 paths, 15 s), peak MiB:");
    println!(
        "Rss {:.1}  = guest RAM mapping {:.1} + own {:.1}, of which private anonymous {:.1}",
        peak[0] as f64 / 1024.0,
        peak[2] as f64 / 1024.0,
        (peak[0] - peak[2]) as f64 / 1024.0,
        peak[1] as f64 / 1024.0
    );
    println!("(the guest RAM mapping is the VMM's memfd, shared: its pages are charged to the VMM's memory cgroup, which created them)");
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("no /dev/kvm: the epoch benchmarks need a real guest");
        return;
    }
    let dir = std::env::temp_dir().join(format!("endophyte-bench-epoch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    epoch_pause(&dir);
    sidecar_rss(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}
