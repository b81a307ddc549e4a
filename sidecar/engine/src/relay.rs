//! `endophyte relay`: a semi-node that adds paths. It forwards a path's UDP datagrams to a backup and the
//! backup's answers back, without decrypting anything: the QUIC/TLS session stays end to end between sidecar
//! and backup, so a relay holds no key and sees only ciphertext.
//!
//! Each route listens on one UDP address and forwards to one upstream address. Each client (source address)
//! gets its own upstream socket, so the backup sees one peer per path; a client silent for 60 s is forgotten.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::Mutex;

/// Counters of one relay route.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Datagrams forwarded towards the backup.
    pub up_datagrams: AtomicU64,
    /// Bytes forwarded towards the backup.
    pub up_bytes: AtomicU64,
    /// Datagrams forwarded back to clients.
    pub down_datagrams: AtomicU64,
    /// Bytes forwarded back to clients.
    pub down_bytes: AtomicU64,
}

/// One bound route.
pub struct Route {
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    /// Its counters.
    pub stats: Arc<RelayStats>,
}

impl Route {
    /// Binds `listen`, forwarding to `upstream`.
    ///
    /// # Errors
    /// If the socket cannot be bound.
    pub async fn bind(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            socket: Arc::new(UdpSocket::bind(listen).await?),
            upstream,
            stats: Arc::default(),
        })
    }

    /// The address clients send to.
    ///
    /// # Errors
    /// If the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Forwards until the process ends.
    ///
    /// # Errors
    /// If the listening socket fails.
    pub async fn run(self) -> std::io::Result<()> {
        type Clients = HashMap<SocketAddr, (Arc<UdpSocket>, Arc<Mutex<Instant>>)>;
        let mut clients: Clients = HashMap::new();
        let mut buf = vec![0u8; 65536];
        let mut last_sweep = Instant::now();
        loop {
            let (n, from) = self.socket.recv_from(&mut buf).await?;
            let up = match clients.get(&from) {
                Some((s, seen)) => {
                    *seen.lock().await = Instant::now();
                    s.clone()
                }
                None => {
                    let bind: SocketAddr = if self.upstream.is_ipv6() {
                        "[::]:0".parse().expect("literal")
                    } else {
                        "0.0.0.0:0".parse().expect("literal")
                    };
                    let s = Arc::new(UdpSocket::bind(bind).await?);
                    s.connect(self.upstream).await?;
                    let seen = Arc::new(Mutex::new(Instant::now()));
                    tracing::info!(client = %from, upstream = %self.upstream, "relaying a new path");
                    let (down, back, stats, seen2) = (
                        s.clone(),
                        self.socket.clone(),
                        self.stats.clone(),
                        seen.clone(),
                    );
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let r =
                                tokio::time::timeout(Duration::from_secs(60), down.recv(&mut buf))
                                    .await;
                            match r {
                                Ok(Ok(n)) => {
                                    stats.down_datagrams.fetch_add(1, Ordering::Relaxed);
                                    stats.down_bytes.fetch_add(n as u64, Ordering::Relaxed);
                                    let _ = back.send_to(&buf[..n], from).await;
                                }
                                Ok(Err(_)) => continue,
                                Err(_) => {
                                    if seen2.lock().await.elapsed() > Duration::from_secs(60) {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                    clients.insert(from, (s.clone(), seen));
                    s
                }
            };
            self.stats.up_datagrams.fetch_add(1, Ordering::Relaxed);
            self.stats.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
            // A send error (upstream unreachable) is like a lost datagram: QUIC recovers or times out.
            let _ = up.send(&buf[..n]).await;
            if last_sweep.elapsed() > Duration::from_secs(30) {
                last_sweep = Instant::now();
                let mut stale = vec![];
                for (addr, (_, seen)) in &clients {
                    if seen.lock().await.elapsed() > Duration::from_secs(60) {
                        stale.push(*addr);
                    }
                }
                for a in stale {
                    clients.remove(&a);
                }
            }
        }
    }
}
