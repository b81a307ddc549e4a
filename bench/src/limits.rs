//! What this machine can do at all, measured in the same run as the scenarios, so that every figure in a
//! report can be read against it: memory copy, raw UDP and TCP over loopback, lz4 on guest-like pages.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

/// One measured figure with its unit.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// How it was measured.
    pub how: String,
}

fn figure(name: &str, value: f64, unit: &str, how: &str) -> Figure {
    Figure {
        name: name.into(),
        value,
        unit: unit.into(),
        how: how.into(),
    }
}

/// Fills `buf` with the testvm fill's kind of data: a PRNG stream (incompressible).
fn prng_fill(buf: &mut [u8], mut x: u64) {
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// Copies a 256 MiB buffer until `budget` passes; GB/s (10^9 bytes).
pub fn memcpy_gb_per_s(budget: Duration) -> Figure {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src); // touch both first
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < budget {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        bytes += n as u64;
    }
    figure(
        "memcpy",
        bytes as f64 / t.elapsed().as_secs_f64() / 1e9,
        "GB/s",
        "copy_from_slice of a 256 MiB buffer, one thread",
    )
}

/// Sends 1452-byte datagrams (a QUIC packet's size on a 1500-byte MTU) over loopback from one thread to
/// another for `budget`; MB/s received (10^6 bytes).
///
/// # Errors
/// Sockets could not be set up.
pub fn udp_loopback_mb_per_s(budget: Duration) -> std::io::Result<Figure> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let addr = rx.local_addr()?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(addr)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let sender = std::thread::spawn(move || {
        let pkt = [7u8; 1452];
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = tx.send(&pkt);
        }
    });
    let mut buf = [0u8; 2048];
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < budget {
        if let Ok(n) = rx.recv(&mut buf) {
            bytes += n as u64;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sender.join();
    Ok(figure(
        "udp_loopback",
        bytes as f64 / secs / 1e6,
        "MB/s",
        "1452-byte datagrams, one sending and one receiving thread, received bytes",
    ))
}

/// Streams 128 KiB writes over a loopback TCP connection for `budget`; MB/s received.
///
/// # Errors
/// Sockets could not be set up.
pub fn tcp_loopback_mb_per_s(budget: Duration) -> std::io::Result<Figure> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![7u8; 128 << 10];
        let t = Instant::now();
        while t.elapsed() < budget + Duration::from_millis(100) {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
        Ok(())
    });
    let (mut c, _) = l.accept()?;
    let mut buf = vec![0u8; 128 << 10];
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < budget {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes += n as u64,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    drop(c);
    let _ = sender.join();
    Ok(figure(
        "tcp_loopback",
        bytes as f64 / secs / 1e6,
        "MB/s",
        "128 KiB writes on one connection, one sending and one receiving thread",
    ))
}

/// lz4 (block format, lz4_flex, as the chunk codec uses) on 1 MiB blocks of guest-like pages: PRNG
/// pages (the testvm fill) and "structured" pages (small integers, as program data often is). Returns
/// compress and decompress GB/s for each, and the ratios.
pub fn lz4_figures(budget: Duration) -> Vec<Figure> {
    let mut out = vec![];
    let block = 1 << 20;
    let mut prng = vec![0u8; block];
    prng_fill(&mut prng, 0x1234_5678);
    let structured: Vec<u8> = (0..block / 8)
        .flat_map(|i| ((i as u64 % 977) * 3).to_le_bytes())
        .collect();
    for (kind, data) in [("prng", &prng), ("structured", &structured)] {
        let compressed = lz4_flex::block::compress(data);
        let ratio = data.len() as f64 / compressed.len() as f64;
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < budget / 2 {
            std::hint::black_box(lz4_flex::block::compress(data));
            n += data.len() as u64;
        }
        out.push(figure(
            &format!("lz4_compress_{kind}"),
            n as f64 / t.elapsed().as_secs_f64() / 1e9,
            "GB/s",
            "lz4_flex block compress, 1 MiB blocks, one thread",
        ));
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < budget / 2 {
            std::hint::black_box(
                lz4_flex::block::decompress(&compressed, data.len()).expect("round trip"),
            );
            n += data.len() as u64;
        }
        out.push(figure(
            &format!("lz4_decompress_{kind}"),
            n as f64 / t.elapsed().as_secs_f64() / 1e9,
            "GB/s",
            "lz4_flex block decompress, 1 MiB blocks, one thread",
        ));
        out.push(figure(
            &format!("lz4_ratio_{kind}"),
            ratio,
            "x",
            "input bytes / compressed bytes",
        ));
    }
    out
}

/// Every limit, each measured for about `budget`.
///
/// # Errors
/// A socket could not be set up.
pub fn measure_all(budget: Duration) -> std::io::Result<Vec<Figure>> {
    let mut v = vec![memcpy_gb_per_s(budget)];
    v.push(udp_loopback_mb_per_s(budget)?);
    v.push(tcp_loopback_mb_per_s(budget)?);
    v.extend(lz4_figures(budget));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_measures_count_bytes_that_arrived() {
        // Not a timing assertion: a broken measurement reports zero bytes.
        let u = udp_loopback_mb_per_s(Duration::from_millis(200)).unwrap();
        let t = tcp_loopback_mb_per_s(Duration::from_millis(200)).unwrap();
        assert!(u.value > 0.0 && t.value > 0.0, "{u:?} {t:?}");
        let lz = lz4_figures(Duration::from_millis(100));
        let ratio = |k: &str| lz.iter().find(|f| f.name == k).unwrap().value;
        // PRNG data does not compress; the structured pages do.
        assert!(ratio("lz4_ratio_prng") < 1.01, "{lz:?}");
        assert!(ratio("lz4_ratio_structured") > 2.0, "{lz:?}");
    }
}
