//! Paths: QUIC connections that carry replication frames, one bidirectional stream each.
//!
//! Every path has its own quinn endpoint and UDP socket, so the runtime can drive each on its own core.
//! A path connects either to the backup directly or to a relay that forwards its datagrams (the TLS session
//! is end to end either way: the server name checked is always the backup's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use endophyte_wire::frame::{FrameHeader, DEFAULT_MAX_PAYLOAD_BYTES, HEADER_BYTES};
use endophyte_wire::{EncodedFrame, Message, MessageError};
use tokio::sync::mpsc;

/// Errors of one path.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The QUIC connection could not be set up (includes TLS refusals, with rustls's reason).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// quinn's error.
        source: quinn::ConnectError,
    },
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the stream failed.
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Writing the stream failed.
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    /// The peer sent a frame we refuse.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] MessageError),
    /// The peer refused the session at its Hello and said why.
    #[error("peer refused: {message}")]
    Refused {
        /// Its code.
        code: endophyte_wire::ErrorCode,
        /// Its words.
        message: String,
    },
    /// The peer ended a running session with an error (it restarts from what it holds).
    #[error("peer ended the session: {0}")]
    Aborted(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Local socket trouble.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

impl PathError {
    /// Whether retrying cannot help: the TLS handshake failed (a QUIC CRYPTO_ERROR, codes 0x100..=0x1ff
    /// of RFC 9000 section 20.1: one side refused the other's certificate), or the backup refused the
    /// Hello itself (another VM's replica, another geometry). Timeouts, resets and closes are transient.
    pub fn is_permanent(&self) -> bool {
        let crypto = |code: quinn::TransportErrorCode| (0x100..=0x1ff).contains(&u64::from(code));
        match self {
            Self::Connection(quinn::ConnectionError::TransportError(e)) => crypto(e.code),
            Self::Connection(quinn::ConnectionError::ConnectionClosed(c)) => crypto(c.error_code),
            Self::Refused { .. } => true,
            _ => false,
        }
    }

    /// The error with its whole chain of causes on one line. A TLS refusal between networks comes out as
    /// the verifier's message (see [`crate::tls`]), e.g. "... was issued by network "b", not by this node's
    /// network "a": refusing a peer from another network", on whichever side reads it.
    pub fn explain(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            let t = e.to_string();
            if !s.contains(&t) {
                s.push_str(": ");
                s.push_str(&t);
            }
            src = e.source();
        }
        s
    }
}

/// Reads one frame from `recv`, checking the size cap before allocating and the CRC before decoding.
///
/// Cancel safety: not cancel safe (a partly read frame is lost); run it in its own task.
///
/// # Errors
/// [`PathError::Read`] on stream errors, [`PathError::Frame`] on a refused frame.
pub async fn read_message(recv: &mut quinn::RecvStream) -> Result<Message, PathError> {
    let mut head = [0u8; HEADER_BYTES];
    recv.read_exact(&mut head).await?;
    let header =
        FrameHeader::parse(&head, DEFAULT_MAX_PAYLOAD_BYTES).map_err(MessageError::from)?;
    let mut payload = BytesMut::zeroed(header.len as usize);
    recv.read_exact(&mut payload).await?;
    Ok(Message::from_parts(&head, &header, payload.freeze())?)
}

/// Writes one encoded frame without copying its body.
///
/// # Errors
/// [`PathError::Write`].
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: EncodedFrame,
) -> Result<(), PathError> {
    let mut parts = [frame.head, frame.body];
    let n = if parts[1].is_empty() { 1 } else { 2 };
    send.write_all_chunks(&mut parts[..n]).await?;
    Ok(())
}

/// Makes a client endpoint on its own UDP socket.
///
/// # Errors
/// [`PathError::Io`] if the socket cannot be bound.
pub fn client_endpoint(
    cfg: quinn::ClientConfig,
    remote: SocketAddr,
) -> Result<quinn::Endpoint, PathError> {
    let bind: SocketAddr = if remote.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Where an up path's frames go: its stream, and a lane for pings and pongs that travels as QUIC
/// datagrams, so that liveness never queues behind megabytes of chunks in the stream (or its flow-control
/// window). A datagram the peer cannot take goes on the stream instead.
#[derive(Clone, Debug)]
pub struct PathTx {
    stream: mpsc::UnboundedSender<EncodedFrame>,
    control: mpsc::UnboundedSender<EncodedFrame>,
}

impl PathTx {
    /// Queues `f` on the path's stream.
    ///
    /// # Errors
    /// The path is gone.
    pub fn send(&self, f: EncodedFrame) -> Result<(), mpsc::error::SendError<EncodedFrame>> {
        self.stream.send(f)
    }

    /// Queues `msg` where it belongs: a Ping or Pong as a datagram, anything else on the stream.
    ///
    /// # Errors
    /// The path is gone.
    pub fn send_message(&self, msg: &Message) -> Result<(), mpsc::error::SendError<EncodedFrame>> {
        match msg {
            Message::Ping { .. } | Message::Pong { .. } => self.control.send(msg.encode()),
            _ => self.stream.send(msg.encode()),
        }
    }
}

/// Decodes one datagram as one frame; `None` for anything else (a datagram is dropped, never fatal).
pub fn decode_datagram(d: &[u8]) -> Option<Message> {
    let mut dec = endophyte_wire::FrameDecoder::new(64 << 10);
    dec.push(d);
    Message::decode(dec.next_frame().ok()??).ok()
}

/// Sends the control frames queued on `rx` as datagrams on `conn`; one the peer cannot take (datagrams off,
/// too large) goes to `fallback`, the stream. Ends when the queue closes.
async fn send_datagrams(
    conn: &quinn::Connection,
    mut rx: mpsc::UnboundedReceiver<EncodedFrame>,
    fallback: mpsc::UnboundedSender<EncodedFrame>,
) -> Result<(), PathError> {
    while let Some(f) = rx.recv().await {
        if conn.send_datagram(bytes::Bytes::from(f.to_vec())).is_err() {
            let _ = fallback.send(f);
        }
    }
    Ok(())
}

/// Events a client path reports to its owner.
#[derive(Debug)]
pub enum PathEvent {
    /// Handshake done; frames for this connection go into `tx`.
    Up {
        /// The backup's Welcome.
        welcome: endophyte_wire::Welcome,
        /// Where to put frames to send on this connection.
        tx: PathTx,
    },
    /// A message from the peer.
    Message(Message),
    /// The connection ended (the path task reconnects by itself).
    Down(String),
    /// The connection was refused in a way no retry fixes ([`PathError::is_permanent`]); the path task
    /// still retries with its backoff, in case an operator fixes it.
    Refused {
        /// The whole reason.
        why: String,
        /// The backup's error code, when it refused the Hello with one.
        code: Option<endophyte_wire::ErrorCode>,
    },
}

/// Where a path goes.
#[derive(Clone, Debug)]
pub struct PathTarget {
    /// Address to send to: the backup, or a relay in front of it.
    pub addr: SocketAddr,
    /// The backup's node name (TLS server name).
    pub server_name: String,
    /// Relay address when the path goes through one (for logs).
    pub via: Option<SocketAddr>,
}

/// Runs one client path forever: connect, Hello, Welcome, then pump frames both ways; on failure report
/// Down and reconnect with exponential backoff (100 ms doubling to 5 s).
/// Events are tagged with `tag` (the owner's backup and path indexes).
pub async fn run_client_path(
    cfg: quinn::ClientConfig,
    target: PathTarget,
    hello: endophyte_wire::Hello,
    tag: (usize, usize),
    events: mpsc::UnboundedSender<((usize, usize), PathEvent)>,
    stop: Arc<tokio::sync::Notify>,
) {
    let endpoint = match client_endpoint(cfg, target.addr) {
        Ok(e) => e,
        Err(e) => {
            let _ = events.send((tag, PathEvent::Down(format!("no socket for path: {e}"))));
            return;
        }
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let r = tokio::select! {
            r = client_session(&endpoint, &target, &hello, tag, &events) => r,
            _ = stop.notified() => return,
        };
        let ev = match r {
            Ok(()) => PathEvent::Down("closed by peer".to_string()),
            Err(e) if e.is_permanent() => PathEvent::Refused {
                why: e.explain(),
                code: match &e {
                    PathError::Refused { code, .. } => Some(*code),
                    _ => None,
                },
            },
            Err(e) => PathEvent::Down(e.explain()),
        };
        if events.send((tag, ev)).is_err() {
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.notified() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn client_session(
    endpoint: &quinn::Endpoint,
    target: &PathTarget,
    hello: &endophyte_wire::Hello,
    tag: (usize, usize),
    events: &mpsc::UnboundedSender<((usize, usize), PathEvent)>,
) -> Result<(), PathError> {
    let conn = endpoint
        .connect(target.addr, &target.server_name)
        .map_err(|source| PathError::Connect {
            addr: target.addr,
            source,
        })?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, Message::Hello(hello.clone()).encode()).await?;
    let welcome = match read_message(&mut recv).await? {
        Message::Welcome(w) => w,
        Message::Error { code, message } => return Err(PathError::Refused { code, message }),
        other => {
            return Err(PathError::Protocol(format!(
                "expected Welcome, got {}",
                other.name()
            )))
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<EncodedFrame>();
    let (control, control_rx) = mpsc::unbounded_channel::<EncodedFrame>();
    let path_tx = PathTx {
        stream: tx.clone(),
        control,
    };
    if events
        .send((
            tag,
            PathEvent::Up {
                welcome,
                tx: path_tx,
            },
        ))
        .is_err()
    {
        return Ok(());
    }
    let datagrams_out = send_datagrams(&conn, control_rx, tx);
    let datagrams_in = async {
        loop {
            let d = conn.read_datagram().await?;
            if let Some(m @ (Message::Pong { .. } | Message::Ping { .. })) = decode_datagram(&d) {
                if events.send((tag, PathEvent::Message(m))).is_err() {
                    return Ok(());
                }
            }
        }
    };
    let writer = async {
        while let Some(f) = rx.recv().await {
            write_frame(&mut send, f).await?;
        }
        Ok::<(), PathError>(())
    };
    let reader = async {
        loop {
            let m = read_message(&mut recv).await?;
            if let Message::Error { message, .. } = &m {
                let _ = events.send((tag, PathEvent::Message(m.clone())));
                return Err(PathError::Aborted(message.clone()));
            }
            if events.send((tag, PathEvent::Message(m))).is_err() {
                return Ok(());
            }
        }
    };
    let r = tokio::select! {
        r = writer => r,
        r = reader => r,
        r = datagrams_out => r,
        r = datagrams_in => r,
    };
    conn.close(0u32.into(), b"path closed");
    r
}
