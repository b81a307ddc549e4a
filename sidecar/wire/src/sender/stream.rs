//! One backup's side of the sender: its paths, its stream of epochs (chunks by seq, each with the path it
//! went out on), the queue of chunks to send, and what goes out next.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{BackupId, PathId, SenderConfig, Transmit};
use crate::chunk::PageChunk;
use crate::contrib::Contribution;
use crate::msg::{epoch_hash, EpochEnd, Message};
use crate::vmstate::VmState;

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) chunk: Option<PageChunk>,
    pub(super) hash: [u8; 32],
    pub(super) n_pages: u32,
    pub(super) body_bytes: usize,
    /// The path it went out on last, and when; kept when it is queued again after a timeout, so that the
    /// resend goes on another path.
    pub(super) sent: Option<(PathId, Instant)>,
    pub(super) queued: bool,
}

#[derive(Debug)]
pub(super) struct StreamEpoch {
    pub(super) epoch: u64,
    pub(super) base: u64,
    pub(super) slots: Vec<Slot>,
    pub(super) acked: usize,
    pub(super) ended: bool,
    pub(super) end_sent: Option<Instant>,
    /// vCPU and device state at the epoch's pause, carried by its end marker.
    pub(super) state: Option<VmState>,
    /// The services' contributions at the epoch's pause, carried by its end marker.
    pub(super) contributions: Vec<Contribution>,
}

/// Unanswered pings remembered per path: a Pong slower than the ping interval (queued behind chunks)
/// still proves when the backup last heard this sender.
pub(super) const PINGS_KEPT: usize = 16;

#[derive(Debug, Default)]
pub(super) struct PathState {
    pub(super) up: bool,
    pub(super) inflight: usize,
    pub(super) next_ping: Option<Instant>,
    /// Pings sent and not yet answered, oldest first (token, sent at); at most [`PINGS_KEPT`].
    pub(super) pings: VecDeque<(u64, Instant)>,
    pub(super) rtt: Option<Duration>,
    /// The lowest RTT sample, as QUIC's `min_rtt` (RFC 9002, section 5.2): the path without queueing.
    pub(super) min_rtt: Option<Duration>,
}

#[derive(Debug)]
pub(super) struct Backup {
    pub(super) paths: Vec<PathState>,
    /// When the newest ping this backup answered (on any path) was sent: it heard this sender then or
    /// later.
    pub(super) answered: Option<Instant>,
    pub(super) instance: Option<u64>,
    pub(super) committed: u64,
    /// Epoch the backup will hold once everything streamed so far commits.
    pub(super) planned: u64,
    pub(super) streaming: bool,
    /// Set when the backup (re)joined: its next epoch must carry every page changed since this epoch
    /// (and the session that sent it).
    pub(super) resync_from: Option<(u64, u64)>,
    /// Session that sent the backup's committed epoch.
    pub(super) committed_session: u64,
    pub(super) epochs: VecDeque<StreamEpoch>,
    pub(super) queue: VecDeque<(u64, u32)>,
    pub(super) rr: usize,
    pub(super) unacked_bytes: usize,
    pub(super) acked_bytes: u64,
    pub(super) acked_pages: u64,
}

impl Backup {
    /// A backup with `n` paths, all down, not streaming.
    pub(super) fn new(n: usize) -> Self {
        Self {
            paths: (0..n).map(|_| PathState::default()).collect(),
            answered: None,
            instance: None,
            committed: 0,
            planned: 0,
            streaming: false,
            resync_from: None,
            committed_session: 0,
            epochs: VecDeque::new(),
            queue: VecDeque::new(),
            rr: 0,
            unacked_bytes: 0,
            acked_bytes: 0,
            acked_pages: 0,
        }
    }

    /// Forgets every epoch in flight (the backup lost its state or its paths).
    pub(super) fn drop_streams(&mut self) {
        self.epochs.clear();
        self.queue.clear();
        self.unacked_bytes = 0;
        for p in &mut self.paths {
            p.inflight = 0;
        }
    }

    pub(super) fn epoch_mut(&mut self, epoch: u64) -> Option<&mut StreamEpoch> {
        self.epochs.iter_mut().find(|e| e.epoch == epoch)
    }

    /// The next message for this backup, if any path has room: a due Ping, a queued chunk (striped
    /// round-robin over the paths with window room), or the end marker of an epoch whose chunks all went
    /// out at least once.
    pub(super) fn poll_transmit(
        &mut self,
        bi: BackupId,
        now: Instant,
        cfg: &SenderConfig,
        next_token: &mut u64,
    ) -> Option<Transmit> {
        let ping_interval = cfg.ping_interval;
        let window = cfg.window_chunks_per_path;
        let backup = self;
        // Pings first: they are tiny and keep RTT current.
        for (pi, path) in backup.paths.iter_mut().enumerate() {
            if path.up && path.next_ping.is_some_and(|t| t <= now) {
                let token = *next_token;
                *next_token += 1;
                path.pings.push_back((token, now));
                if path.pings.len() > PINGS_KEPT {
                    path.pings.pop_front();
                }
                path.next_ping = Some(now + ping_interval);
                return Some(Transmit {
                    backup: bi,
                    path: pi,
                    msg: Message::Ping { token },
                });
            }
        }
        if !backup.streaming {
            return None;
        }
        // Chunks, striped round-robin over paths with window room.
        while let Some(&(epoch, seq)) = backup.queue.front() {
            let Some(pos) = backup.epochs.iter().position(|e| e.epoch == epoch) else {
                backup.queue.pop_front();
                continue;
            };
            if pos >= cfg.max_epochs_in_flight {
                break;
            }
            // A chunk that timed out goes again on another path when there is one up (the one it went on
            // may be the problem); it waits for that path's window rather than reuse the old path.
            let avoid = backup.epochs[pos].slots[seq as usize].sent.map(|(p, _)| p);
            let n = backup.paths.len();
            let others_up = backup
                .paths
                .iter()
                .enumerate()
                .any(|(i, p)| p.up && Some(i) != avoid);
            let Some(pi) = (0..n).map(|i| (backup.rr + i) % n).find(|&i| {
                backup.paths[i].up
                    && backup.paths[i].inflight < window
                    && !(others_up && Some(i) == avoid)
            }) else {
                break;
            };
            backup.queue.pop_front();
            let e = &mut backup.epochs[pos];
            let slot = &mut e.slots[seq as usize];
            slot.queued = false;
            let Some(chunk) = slot.chunk.clone() else {
                continue;
            };
            if let Some((old, _)) = slot.sent {
                let old = &mut backup.paths[old];
                old.inflight = old.inflight.saturating_sub(1);
            }
            slot.sent = Some((pi, now));
            backup.paths[pi].inflight += 1;
            backup.rr = (pi + 1) % n;
            return Some(Transmit {
                backup: bi,
                path: pi,
                msg: Message::Chunk { seq, chunk },
            });
        }
        // End markers of epochs whose chunks all went out at least once.
        let up_path = backup.paths.iter().position(|p| p.up)?;
        let end_every = cfg.end_retransmit_after;
        for e in &mut backup.epochs {
            if !e.ended
                || e.slots
                    .iter()
                    .any(|s| s.chunk.is_some() && s.sent.is_none())
            {
                continue;
            }
            if e.end_sent.is_some_and(|t| now < t + end_every) {
                continue;
            }
            e.end_sent = Some(now);
            let page_count = e.slots.iter().map(|s| u64::from(s.n_pages)).sum();
            return Some(Transmit {
                backup: bi,
                path: up_path,
                msg: Message::EpochEnd(EpochEnd {
                    epoch: e.epoch,
                    base_epoch: e.base,
                    chunk_count: e.slots.len() as u32,
                    page_count,
                    epoch_hash: epoch_hash(page_count, e.slots.iter().map(|s| &s.hash)),
                    state: e.state.clone(),
                    contributions: e.contributions.clone(),
                }),
            });
        }
        None
    }
}
