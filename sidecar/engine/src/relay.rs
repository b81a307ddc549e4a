//! `endophyte relay`: a semi-node that adds paths. It forwards a path's UDP datagrams to a backup and the
//! backup's answers back, without decrypting anything: the QUIC/TLS session stays end to end between sidecar
//! and backup, so a relay holds no key and sees only ciphertext.
//!
//! Each route listens on one UDP address and forwards to one upstream address. Each client (source address)
//! gets its own upstream socket, so the backup sees one peer per path; a client silent for 60 s is forgotten.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::RecvMeta;
use tokio::io::Interest;
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
        type Clients = HashMap<SocketAddr, (Arc<Batched>, Arc<Mutex<Instant>>)>;
        let listen = Arc::new(Batched::new(self.socket.clone())?);
        let mut clients: Clients = HashMap::new();
        let mut rx = RecvBatch::new();
        let mut last_sweep = Instant::now();
        loop {
            let n = listen.recv(&mut rx).await?;
            for i in 0..n {
                let (meta, data) = rx.get(i);
                let from = meta.addr;
                let up = match clients.get(&from) {
                    Some((s, seen)) => {
                        *seen.lock().await = Instant::now();
                        s.clone()
                    }
                    None => {
                        let s = self.open_client(from).await?;
                        let seen = Arc::new(Mutex::new(Instant::now()));
                        self.spawn_downstream(from, s.clone(), listen.clone(), seen.clone());
                        clients.insert(from, (s.clone(), seen));
                        s
                    }
                };
                self.stats
                    .up_datagrams
                    .fetch_add(datagrams(meta), Ordering::Relaxed);
                self.stats
                    .up_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                // A send error (upstream unreachable) is like a lost datagram: QUIC recovers or times out.
                let _ = up.send(self.upstream, data, meta).await;
            }
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

    /// The upstream socket of a new client `from`.
    async fn open_client(&self, from: SocketAddr) -> std::io::Result<Arc<Batched>> {
        let bind: SocketAddr = if self.upstream.is_ipv6() {
            "[::]:0".parse().expect("literal")
        } else {
            "0.0.0.0:0".parse().expect("literal")
        };
        let s = Arc::new(UdpSocket::bind(bind).await?);
        s.connect(self.upstream).await?;
        tracing::info!(client = %from, upstream = %self.upstream, "relaying a new path");
        Ok(Arc::new(Batched::new(s)?))
    }

    /// Forwards what the backup sends on `up` back to client `from` through the listening socket, until
    /// the client has been silent for 60 s.
    fn spawn_downstream(
        &self,
        from: SocketAddr,
        up: Arc<Batched>,
        back: Arc<Batched>,
        seen: Arc<Mutex<Instant>>,
    ) {
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let mut rx = RecvBatch::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(60), up.recv(&mut rx)).await {
                    Ok(Ok(n)) => {
                        for i in 0..n {
                            let (meta, data) = rx.get(i);
                            stats
                                .down_datagrams
                                .fetch_add(datagrams(meta), Ordering::Relaxed);
                            stats
                                .down_bytes
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                            let _ = back.send(from, data, meta).await;
                        }
                    }
                    Ok(Err(_)) => continue,
                    Err(_) => {
                        if seen.lock().await.elapsed() > Duration::from_secs(60) {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Datagrams in a received buffer (several with GRO, each `stride` bytes but the last).
fn datagrams(meta: &RecvMeta) -> u64 {
    meta.len.div_ceil(meta.stride.max(1)) as u64
}

/// A UDP socket read and written in batches: `recvmmsg` with GRO (the kernel hands over runs of
/// same-sized datagrams from one sender as one buffer) and `sendmsg` with GSO (such a run goes out as one
/// call), through quinn-udp. A run is forwarded as it came, so QUIC's datagram boundaries are kept.
struct Batched {
    socket: Arc<UdpSocket>,
    state: quinn_udp::UdpSocketState,
}

/// Buffers for one batched receive.
struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl RecvBatch {
    fn new() -> Self {
        // With GRO a buffer holds up to 64 datagrams of one run.
        Self {
            bufs: vec![vec![0u8; 65536]; quinn_udp::BATCH_SIZE],
            meta: vec![RecvMeta::default(); quinn_udp::BATCH_SIZE],
        }
    }

    fn get(&self, i: usize) -> (&RecvMeta, &[u8]) {
        (&self.meta[i], &self.bufs[i][..self.meta[i].len])
    }
}

impl Batched {
    fn new(socket: Arc<UdpSocket>) -> std::io::Result<Self> {
        let state = quinn_udp::UdpSocketState::new((&*socket).into())?;
        Ok(Self { socket, state })
    }

    /// Receives one batch; returns how many buffers it filled.
    async fn recv(&self, b: &mut RecvBatch) -> std::io::Result<usize> {
        loop {
            self.socket.readable().await?;
            let mut slices: Vec<IoSliceMut<'_>> =
                b.bufs.iter_mut().map(|v| IoSliceMut::new(v)).collect();
            match self.socket.try_io(Interest::READABLE, || {
                self.state
                    .recv((&*self.socket).into(), &mut slices, &mut b.meta)
            }) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `data` (one datagram, or a run of `meta.stride`-sized ones) to `to`, as one GSO call where
    /// the socket can take that many segments, else datagram by datagram.
    async fn send(&self, to: SocketAddr, data: &[u8], meta: &RecvMeta) -> std::io::Result<()> {
        let stride = meta.stride.max(1);
        let segments = data.len().div_ceil(stride);
        if segments > 1 && segments > self.state.max_gso_segments() {
            for d in data.chunks(stride) {
                self.send_one(to, d, None, meta).await?;
            }
            return Ok(());
        }
        self.send_one(to, data, (segments > 1).then_some(stride), meta)
            .await
    }

    async fn send_one(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
        meta: &RecvMeta,
    ) -> std::io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: to,
            ecn: meta.ecn,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            self.socket.writable().await?;
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state.send((&*self.socket).into(), &t)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
