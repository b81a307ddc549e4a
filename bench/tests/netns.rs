//! The link emulator between two network namespaces, checked with real sockets: the round-trip time of
//! UDP echoes and the throughput of a TCP stream must follow the profile.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use endophyte_bench::link::LinkProfile;
use endophyte_bench::netns::{available, EmulatedLink, Namespace};

#[test]
fn an_emulated_link_delays_and_shapes_real_udp_and_tcp() {
    if !available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs root, iproute2 and /dev/net/tun for the link emulator"
        );
        eprintln!("skipped: needs root, iproute2 and /dev/net/tun");
        return;
    }
    let a = Namespace::create("ephy-test-a").unwrap();
    let b = Namespace::create("ephy-test-b").unwrap();
    // 20 ms one way, 20 Mbit/s, a 256 KiB queue.
    let p = LinkProfile {
        name: "test".into(),
        one_way_delay: Duration::from_millis(20),
        jitter: Duration::ZERO,
        loss: 0.0,
        rate_bits_per_s: Some(20_000_000),
        queue_bytes: 256 << 10,
    };
    let link = EmulatedLink::join(&a, &b, 201, p.clone(), p).unwrap();
    let (addr_a, addr_b) = (link.addr_a, link.addr_b);

    // UDP echo: the RTT is two one-way delays plus two small packets' serialization.
    let server = b.run(move || Ok(UdpSocket::bind((addr_b, 9000))?)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let client = a.run(move || Ok(UdpSocket::bind((addr_a, 0))?)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut rtts = vec![];
    for i in 0..10u8 {
        let t = Instant::now();
        client.send_to(&[i; 64], (addr_b, 9000)).unwrap();
        let mut buf = [0u8; 64];
        client.recv_from(&mut buf).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let min = rtts.iter().copied().fold(f64::MAX, f64::min);
    eprintln!("UDP echo RTT ms: {rtts:?}");
    assert!((40.0..50.0).contains(&min), "RTT {min:.2} ms for 2 x 20 ms");

    // TCP from a to b for 3 s: about 20 Mbit/s of payload (headers take a few percent).
    let listener = b
        .run(move || Ok(TcpListener::bind((addr_b, 9001))?))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let t = Instant::now();
        let mut at_1s = None;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
            if at_1s.is_none() && t.elapsed() >= Duration::from_secs(1) {
                at_1s = Some((total, Instant::now()));
            }
        }
        let (b1, t1) = at_1s.expect("the stream lasted a second");
        // Skip slow start: the rate from the first second on.
        (total - b1) as f64 * 8.0 / t1.elapsed().as_secs_f64()
    });
    let mut s = a
        .run(move || Ok(TcpStream::connect((addr_b, 9001))?))
        .unwrap();
    let chunk = vec![7u8; 64 << 10];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        s.write_all(&chunk).unwrap();
    }
    drop(s);
    let bps = reader.join().unwrap();
    let st = link.stats();
    eprintln!("TCP: {:.2} Mbit/s; link stats {st:?}", bps / 1e6);
    assert!(
        (14e6..21e6).contains(&bps),
        "TCP at {:.2} Mbit/s through a 20 Mbit/s link",
        bps / 1e6
    );
    assert!(st[0].delivered > 1000, "{st:?}");
}
