//! The sending side of epoch replication: one VM's epochs to several backups, each over several paths.
//!
//! Sans-IO, in the manner of quinn-proto: the driver feeds in what happened (`handle_*`, with `now`), and
//! takes out what to do (`poll_transmit`, `poll_event`, `poll_timeout`). The driver owns sockets, clocks and
//! guest memory; this state machine owns the bookkeeping:
//!
//! - per backup, a stream of epochs, each a list of chunks numbered by `seq` and closed by an end marker
//!   (page count, epoch hash, base epoch);
//! - chunks striped over the backup's paths that are up, at most `window_chunks_per_path` unacknowledged per
//!   path, so a faster path carries more;
//! - a chunk acknowledged by nobody within `retransmit_after` is sent again on another path; a path that
//!   goes down hands its unacknowledged chunks back to the queue at once;
//! - an epoch is durable once `quorum` backups committed it (or a later epoch);
//! - a migration's switchover ([`crate::switchover::source`]) runs inside it: its messages go out on the
//!   target's paths like any other, and the target's commits, answers and lost paths reach it from here.
//!
//! A backup that loses its last path, or comes back as a new instance (it restarted and lost whatever it had
//! staged), is dropped from streaming and reported with [`Event::NeedsResync`]: the driver then starts the next
//! epoch for it on top of the epoch it holds committed, adding every page changed since then.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::chunk::PageChunk;
use crate::contrib::Contribution;
use crate::msg::{ErrorCode, Message, Welcome};
use crate::switchover::{SourcePhase, SourceSwitchover, SwitchoverOutcome};
use crate::vmstate::VmState;

mod stream;
mod switch;

use stream::{Backup, Slot, StreamEpoch};

/// Index of a backup, in the order given to [`Sender::new`].
pub type BackupId = usize;
/// Index of a path among one backup's paths.
pub type PathId = usize;

/// Tuning of the sender.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Unacknowledged chunks allowed per path.
    pub window_chunks_per_path: usize,
    /// A chunk unacknowledged this long is sent again on another path.
    pub retransmit_after: Duration,
    /// An end marker not answered by Committed this long is sent again.
    pub end_retransmit_after: Duration,
    /// Interval of Ping probes per path (liveness and RTT).
    pub ping_interval: Duration,
    /// Backups that must commit an epoch before it counts as durable.
    pub quorum: usize,
    /// Epochs a backup may have open (sent but not committed); chunks of later epochs wait. Must not exceed
    /// what receivers stage.
    pub max_epochs_in_flight: usize,
    /// This sender's session (the one in its Hellos): epochs it commits on a backup are of this session.
    pub session: u64,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            window_chunks_per_path: 16,
            retransmit_after: Duration::from_secs(2),
            end_retransmit_after: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
            quorum: 1,
            max_epochs_in_flight: 4,
            session: 0,
        }
    }
}

/// What [`Sender::begin_epoch`] asks of the driver for one backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochStart {
    /// The backup is not streaming (no path up); send it nothing.
    NotStreaming,
    /// Send the epoch's shared delta.
    Delta,
    /// Send every page changed after epoch `from` first, then the shared delta. When `from_session` is
    /// not this sender's session, the driver cannot know what changed: it must send all of RAM.
    Resync {
        /// Epoch the backup holds.
        from: u64,
        /// Session that sent that epoch (0: unknown).
        from_session: u64,
    },
}

/// A message to send on one path of one backup.
#[derive(Clone, Debug)]
pub struct Transmit {
    /// Backup.
    pub backup: BackupId,
    /// Path of that backup.
    pub path: PathId,
    /// The message.
    pub msg: Message,
}

/// Something the driver must know or act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The backup (re)joined and holds `committed` (0: empty replica). Its next epoch must carry every page
    /// changed since `committed` (every page when the driver cannot tell), on base `committed`.
    NeedsResync {
        /// Backup.
        backup: BackupId,
        /// Epoch it holds.
        committed: u64,
    },
    /// The backup lost its last path; everything not committed there is forgotten.
    BackupLost {
        /// Backup.
        backup: BackupId,
    },
    /// The backup committed `epoch`.
    BackupCommitted {
        /// Backup.
        backup: BackupId,
        /// Epoch.
        epoch: u64,
    },
    /// `quorum` backups hold `epoch` (or later): it survives the loss of the primary.
    Durable {
        /// Epoch.
        epoch: u64,
    },
    /// The backup refused something and said why; the driver should close that path.
    PeerError {
        /// Backup.
        backup: BackupId,
        /// Path.
        path: PathId,
        /// Code.
        code: ErrorCode,
        /// The backup's message.
        message: String,
    },
    /// A migration target's standby VMM is as ready as it gets (the answer to a warm-up).
    StandbyReady {
        /// Backup.
        backup: BackupId,
        /// The coming switchover's generation.
        generation: u64,
        /// It loaded the replica ahead of the switchover.
        preloaded: bool,
    },
    /// The switchover begun with [`Sender::begin_switchover`] ended; the driver acts on the guest.
    Switchover(SwitchoverOutcome),
    /// The switchover's target is ready: ask the fencing authority to hand `generation` to `target`, and
    /// answer with [`Sender::handle_switchover_authority`].
    HandOver {
        /// The generation to hand over.
        generation: u64,
        /// The target's name.
        target: String,
    },
}

/// Why a message from a backup was not accepted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SenderError {
    /// The message makes no sense from a backup at this point.
    #[error("backup {backup} path {path}: unexpected {msg} message")]
    Unexpected {
        /// Backup.
        backup: BackupId,
        /// Path.
        path: PathId,
        /// Message name.
        msg: &'static str,
    },
}

/// Replication sender for one VM. See the module docs.
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    backups: Vec<Backup>,
    durable: u64,
    events: VecDeque<Event>,
    control: VecDeque<Transmit>,
    /// Messages for a backup on whichever of its paths is up (see [`Sender::queue_message`]).
    pending: VecDeque<(BackupId, Message)>,
    /// The switchover in progress (or the last one), with its target.
    switchover: Option<(BackupId, SourceSwitchover)>,
    /// Served first (see [`Sender::set_priority`]).
    priority: Option<BackupId>,
    /// Served alone until it commits the epoch (see [`Sender::serve_alone_until`]).
    alone: Option<(BackupId, u64)>,
    next_token: u64,
}

impl Sender {
    /// A sender to backups with `paths_per_backup[i]` paths each, all down.
    pub fn new(cfg: SenderConfig, paths_per_backup: &[usize]) -> Self {
        let backups = paths_per_backup.iter().map(|&n| Backup::new(n)).collect();
        Self {
            cfg,
            backups,
            durable: 0,
            events: VecDeque::new(),
            control: VecDeque::new(),
            pending: VecDeque::new(),
            switchover: None,
            priority: None,
            alone: None,
            next_token: 1,
        }
    }

    /// Queues `msg` for backup `b`, to go out on the first of its paths that is up (now or later). For
    /// messages outside the epoch streams, such as `SwitchoverWarmup`.
    pub fn queue_message(&mut self, b: BackupId, msg: Message) {
        self.pending.push_back((b, msg));
    }

    /// Number of backups.
    pub fn backups(&self) -> usize {
        self.backups.len()
    }

    /// Newest epoch known durable (0: none yet).
    pub fn durable_epoch(&self) -> u64 {
        self.durable
    }

    /// Newest epoch backup `b` reported committed.
    pub fn committed(&self, b: BackupId) -> u64 {
        self.backups[b].committed
    }

    /// Whether backup `b` currently takes epochs (it is up and was resynced).
    pub fn is_streaming(&self, b: BackupId) -> bool {
        self.backups[b].streaming
    }

    /// Paths of backup `b` that are up.
    pub fn paths_up(&self, b: BackupId) -> usize {
        self.backups[b].paths.iter().filter(|p| p.up).count()
    }

    /// Smoothed round-trip time of backup `b`'s paths (the smallest), if measured.
    pub fn rtt(&self, b: BackupId) -> Option<Duration> {
        self.backups[b].paths.iter().filter_map(|p| p.rtt).min()
    }

    /// The lowest RTT sample on any of backup `b`'s paths (QUIC's `min_rtt`, RFC 9002 section 5.2): a
    /// round trip that does not queue behind this sender's chunks, as a switchover's few messages.
    pub fn min_rtt(&self, b: BackupId) -> Option<Duration> {
        self.backups[b].paths.iter().filter_map(|p| p.min_rtt).min()
    }

    /// When the newest ping backup `b` answered was sent: the backup heard this sender at that instant
    /// or later, so its lease on this primary runs from no earlier than this ([`crate::lease`]).
    pub fn answered_at(&self, b: BackupId) -> Option<Instant> {
        self.backups[b].answered
    }

    /// Chunk body bytes held for backup `b` and not yet acknowledged by it.
    pub fn unacked_bytes(&self, b: BackupId) -> usize {
        self.backups[b].unacked_bytes
    }

    /// Chunk body bytes backup `b` has acknowledged since the sender started (its drain, cumulative).
    pub fn acked_bytes(&self, b: BackupId) -> u64 {
        self.backups[b].acked_bytes
    }

    /// Pages (zero pages included) in chunks backup `b` has acknowledged since the sender started: its
    /// drain in the unit of dirty pages, whatever compression and zero-page elision did on the wire.
    pub fn acked_pages(&self, b: BackupId) -> u64 {
        self.backups[b].acked_pages
    }

    /// The most unacknowledged bytes any streaming backup holds: what back-pressure should watch.
    pub fn max_unacked_bytes(&self) -> usize {
        self.backups
            .iter()
            .filter(|b| b.streaming)
            .map(|b| b.unacked_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Whether a new epoch can be opened: no streaming backup has `max_epochs_in_flight` epochs open.
    /// When false, the driver should let the current epoch run longer (its dirty pages keep accumulating).
    pub fn can_begin_epoch(&self) -> bool {
        self.backups
            .iter()
            .filter(|b| b.streaming)
            .all(|b| b.epochs.len() < self.cfg.max_epochs_in_flight)
    }

    /// Path `p` of backup `b` finished its handshake and got `welcome`.
    pub fn handle_path_up(&mut self, b: BackupId, p: PathId, welcome: &Welcome, now: Instant) {
        let backup = &mut self.backups[b];
        let restarted = backup.instance.is_some_and(|i| i != welcome.instance);
        backup.instance = Some(welcome.instance);
        let path = &mut backup.paths[p];
        path.up = true;
        path.inflight = 0;
        path.pings.clear();
        path.min_rtt = None;
        path.next_ping = Some(now);
        if restarted && backup.streaming {
            // A new instance lost whatever it had staged: start it over from what it holds, even though its
            // other paths (to the old instance) have not timed out yet.
            backup.drop_streams();
            backup.streaming = false;
        }
        if !backup.streaming {
            backup.committed = welcome.committed_epoch;
            backup.committed_session = welcome.committed_session;
            backup.planned = welcome.committed_epoch;
            backup.streaming = true;
            backup.resync_from = Some((welcome.committed_epoch, welcome.committed_session));
            self.events.push_back(Event::NeedsResync {
                backup: b,
                committed: welcome.committed_epoch,
            });
        } else if welcome.committed_epoch > backup.committed {
            self.note_commit(b, welcome.committed_epoch, now);
        }
        self.update_durable();
    }

    /// Path `p` of backup `b` failed or closed. Its unacknowledged chunks go back to the queue.
    pub fn handle_path_down(&mut self, b: BackupId, p: PathId, now: Instant) {
        let backup = &mut self.backups[b];
        if !backup.paths[p].up {
            return;
        }
        backup.paths[p].up = false;
        backup.paths[p].inflight = 0;
        backup.paths[p].pings.clear();
        if backup.paths.iter().all(|p| !p.up) {
            if backup.streaming {
                backup.drop_streams();
                backup.streaming = false;
                self.events.push_back(Event::BackupLost { backup: b });
            }
            if let Some((t, m)) = &mut self.switchover {
                if *t == b {
                    m.handle_target_lost(now);
                }
            }
            return;
        }
        let mut requeue = vec![];
        for e in &mut backup.epochs {
            for (seq, s) in e.slots.iter_mut().enumerate() {
                if s.chunk.is_some() && s.sent.is_some_and(|(sp, _)| sp == p) && !s.queued {
                    s.sent = None;
                    s.queued = true;
                    requeue.push((e.epoch, seq as u32));
                }
            }
        }
        for item in requeue.into_iter().rev() {
            backup.queue.push_front(item);
        }
    }

    /// Opens `epoch` on backup `b`'s stream, on top of what it will hold by then.
    ///
    /// Returns [`EpochStart::Resync`] when the backup (re)joined since its last epoch: the driver must then
    /// push, before the epoch's shared chunks, chunks with every page changed after epoch `from` (all of
    /// guest RAM when it cannot tell), read at or after the previous epoch's pause.
    ///
    /// # Panics
    /// If `epoch` does not follow the epochs already opened for the backup, or the last one is not ended.
    pub fn begin_epoch(&mut self, b: BackupId, epoch: u64) -> EpochStart {
        let backup = &mut self.backups[b];
        if !backup.streaming {
            return EpochStart::NotStreaming;
        }
        assert!(
            epoch > backup.planned,
            "epoch {epoch} opened after {}",
            backup.planned
        );
        if let Some(last) = backup.epochs.back() {
            assert!(
                last.ended,
                "epoch {epoch} opened before epoch {} ended",
                last.epoch
            );
        }
        backup.epochs.push_back(StreamEpoch {
            epoch,
            base: backup.planned,
            slots: vec![],
            acked: 0,
            ended: false,
            end_sent: None,
            state: None,
            contributions: Vec::new(),
        });
        match backup.resync_from.take() {
            Some((from, from_session)) => EpochStart::Resync { from, from_session },
            None => EpochStart::Delta,
        }
    }

    /// Appends `chunk` to the open epoch of backup `b`. Returns false (chunk dropped) when the backup has no
    /// open epoch with that number, e.g. because it was lost meanwhile.
    pub fn push_chunk(&mut self, b: BackupId, chunk: PageChunk) -> bool {
        let backup = &mut self.backups[b];
        let Some(e) = backup.epochs.back_mut() else {
            return false;
        };
        if e.epoch != chunk.epoch || e.ended {
            return false;
        }
        let seq = e.slots.len() as u32;
        backup.unacked_bytes += chunk.body.len();
        e.slots.push(Slot {
            hash: chunk.content_hash,
            n_pages: chunk.n_pages,
            body_bytes: chunk.body.len(),
            chunk: Some(chunk),
            sent: None,
            queued: true,
        });
        backup.queue.push_back((e.epoch, seq));
        true
    }

    /// Closes the open epoch of backup `b`: no more chunks; the end marker goes out once every chunk was sent.
    pub fn end_epoch(&mut self, b: BackupId, epoch: u64) -> bool {
        self.end_epoch_with(b, epoch, None, Vec::new())
    }

    /// Like [`Sender::end_epoch`], with the VM's vCPU and device state at the epoch's pause and the
    /// services' contributions, which the end marker carries (see [`EpochEnd::state`],
    /// [`EpochEnd::contributions`]; the contributions must pass [`crate::contrib::check`]).
    pub fn end_epoch_with(
        &mut self,
        b: BackupId,
        epoch: u64,
        state: Option<VmState>,
        contributions: Vec<Contribution>,
    ) -> bool {
        let backup = &mut self.backups[b];
        let Some(e) = backup.epochs.back_mut() else {
            return false;
        };
        if e.epoch != epoch || e.ended {
            return false;
        }
        e.ended = true;
        e.state = state;
        e.contributions = contributions;
        backup.planned = epoch;
        true
    }

    /// A message arrived from backup `b` on path `p`.
    ///
    /// # Errors
    /// [`SenderError::Unexpected`] for messages a backup never sends (the driver closes the path).
    pub fn handle_message(
        &mut self,
        b: BackupId,
        p: PathId,
        msg: Message,
        now: Instant,
    ) -> Result<(), SenderError> {
        let switchover = self
            .switchover
            .as_mut()
            .filter(|(t, _)| *t == b)
            .map(|(_, m)| m);
        match (&msg, switchover) {
            (Message::SwitchoverReady(r), Some(m)) => {
                m.handle_ready(r.clone(), now);
                return Ok(());
            }
            (
                Message::SwitchedOver {
                    generation,
                    resume_us,
                },
                Some(m),
            ) => {
                m.handle_switched(*generation, *resume_us, now);
                return Ok(());
            }
            // Late answers to a switchover that ended (or of another sidecar run): nothing to do.
            (Message::SwitchoverReady(_) | Message::SwitchedOver { .. }, None) => return Ok(()),
            (
                Message::SwitchoverStandby {
                    generation,
                    preloaded,
                },
                _,
            ) => {
                self.events.push_back(Event::StandbyReady {
                    backup: b,
                    generation: *generation,
                    preloaded: *preloaded,
                });
                return Ok(());
            }
            (Message::Error { code, message }, Some(m)) if m.phase() != SourcePhase::Finished => {
                let preparing = m.phase() != SourcePhase::AwaitingFinalCommit;
                m.handle_error(*code, message, now);
                // The target refused the switchover itself: its replica is intact, replication goes on.
                if preparing && matches!(code, ErrorCode::SwitchoverFailed | ErrorCode::Fenced) {
                    return Ok(());
                }
            }
            _ => {}
        }
        match msg {
            Message::ChunkAck { epoch, seq } => {
                let backup = &mut self.backups[b];
                let mut freed = 0;
                let mut pages = 0;
                let mut path_of = None;
                if let Some(e) = backup.epoch_mut(epoch) {
                    if let Some(s) = e.slots.get_mut(seq as usize) {
                        if s.chunk.take().is_some() {
                            freed = s.body_bytes;
                            pages = u64::from(s.n_pages);
                            path_of = s.sent.map(|(sp, _)| sp);
                            e.acked += 1;
                            s.queued = false;
                        }
                    }
                }
                backup.unacked_bytes -= freed;
                backup.acked_bytes += freed as u64;
                backup.acked_pages += pages;
                if let Some(sp) = path_of {
                    let path = &mut backup.paths[sp];
                    path.inflight = path.inflight.saturating_sub(1);
                }
            }
            Message::Committed { epoch } => {
                self.note_commit(b, epoch, now);
                self.update_durable();
            }
            Message::Pong { token } => {
                let backup = &mut self.backups[b];
                let path = &mut backup.paths[p];
                if let Some(i) = path.pings.iter().position(|&(t, _)| t == token) {
                    let sent = path.pings[i].1;
                    path.pings.drain(..=i);
                    let sample = now.saturating_duration_since(sent);
                    path.rtt = Some(match path.rtt {
                        None => sample,
                        Some(old) => (old * 7 + sample) / 8,
                    });
                    path.min_rtt = Some(path.min_rtt.map_or(sample, |m| m.min(sample)));
                    backup.answered = Some(backup.answered.map_or(sent, |a| a.max(sent)));
                }
            }
            Message::Ping { token } => self.control.push_back(Transmit {
                backup: b,
                path: p,
                msg: Message::Pong { token },
            }),
            Message::Error { code, message } => {
                // The backup refused something and discarded what it staged: start it over from what it
                // holds committed.
                self.events.push_back(Event::PeerError {
                    backup: b,
                    path: p,
                    code,
                    message,
                });
                let backup = &mut self.backups[b];
                if backup.streaming {
                    backup.drop_streams();
                    backup.planned = backup.committed;
                    backup.resync_from = Some((backup.committed, backup.committed_session));
                    self.events.push_back(Event::NeedsResync {
                        backup: b,
                        committed: backup.committed,
                    });
                }
            }
            other => {
                return Err(SenderError::Unexpected {
                    backup: b,
                    path: p,
                    msg: other.name(),
                })
            }
        }
        Ok(())
    }

    fn note_commit(&mut self, b: BackupId, epoch: u64, now: Instant) {
        let session = self.cfg.session;
        if let Some((t, m)) = &mut self.switchover {
            if *t == b {
                m.handle_committed(epoch, now);
            }
        }
        let backup = &mut self.backups[b];
        if epoch <= backup.committed {
            return;
        }
        backup.committed = epoch;
        backup.committed_session = session;
        while backup.epochs.front().is_some_and(|e| e.epoch <= epoch) {
            let e = backup.epochs.pop_front().expect("front");
            for s in e.slots {
                if s.chunk.is_some() {
                    backup.unacked_bytes -= s.body_bytes;
                    if let Some((sp, _)) = s.sent {
                        let path = &mut backup.paths[sp];
                        path.inflight = path.inflight.saturating_sub(1);
                    }
                }
            }
        }
        backup.queue.retain(|&(e, _)| e > epoch);
        self.events
            .push_back(Event::BackupCommitted { backup: b, epoch });
    }

    fn update_durable(&mut self) {
        let mut committed: Vec<u64> = self.backups.iter().map(|b| b.committed).collect();
        committed.sort_unstable_by(|a, b| b.cmp(a));
        let q = self.cfg.quorum.clamp(1, committed.len().max(1));
        let Some(&d) = committed.get(q - 1) else {
            return;
        };
        if d > self.durable {
            self.durable = d;
            self.events.push_back(Event::Durable { epoch: d });
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let (_, m) = self.switchover.as_mut()?;
        if let Some((generation, target)) = m.poll_authority() {
            return Some(Event::HandOver { generation, target });
        }
        m.poll_outcome().map(Event::Switchover)
    }

    /// The first path of backup `b` that is up.
    fn up_path(&self, b: BackupId) -> Option<PathId> {
        self.backups[b].paths.iter().position(|p| p.up)
    }

    /// The next message to send, if any path has room for it.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(t) = self.control.pop_front() {
            return Some(t);
        }
        if let Some((target, _)) = self.switchover {
            if let Some(path) = self.up_path(target) {
                let (_, m) = self.switchover.as_mut().expect("checked");
                if let Some(msg) = m.poll_transmit() {
                    return Some(Transmit {
                        backup: target,
                        path,
                        msg,
                    });
                }
            }
        }
        if let Some(i) = self
            .pending
            .iter()
            .position(|(b, _)| self.up_path(*b).is_some())
        {
            let (backup, msg) = self.pending.remove(i).expect("found");
            let path = self.up_path(backup).expect("checked");
            return Some(Transmit { backup, path, msg });
        }
        // A migration's target goes first (see `set_priority`); the others take what its paths leave,
        // and nothing while the final epoch goes to it alone (see `serve_alone_until`).
        if let Some((b, e)) = self.alone {
            if self.backups[b].committed >= e || !self.backups[b].streaming {
                self.alone = None;
            }
        }
        let first = self.alone.map(|(b, _)| b).or(self.priority);
        let alone = self.alone.is_some();
        let order = first
            .into_iter()
            .chain((0..self.backups.len()).filter(|b| !alone && Some(*b) != first));
        for bi in order {
            let b = &mut self.backups[bi];
            if let Some(t) = b.poll_transmit(bi, now, &self.cfg, &mut self.next_token) {
                return Some(t);
            }
        }
        None
    }

    /// When [`Sender::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Some(t) = self.switchover.as_ref().and_then(|(_, m)| m.poll_timeout()) {
            consider(t);
        }
        for b in &self.backups {
            for p in &b.paths {
                if p.up {
                    if let Some(t) = p.next_ping {
                        consider(t);
                    }
                }
            }
            for e in &b.epochs {
                if let Some(t) = e.end_sent {
                    consider(t + self.cfg.end_retransmit_after);
                }
                for s in e.slots.iter().filter(|s| !s.queued) {
                    if let (Some(_), Some((_, t))) = (&s.chunk, s.sent) {
                        consider(t + self.cfg.retransmit_after);
                    }
                }
            }
        }
        next
    }

    /// Time passed: chunks unacknowledged for `retransmit_after` go back to the queue; the switchover
    /// repeats or gives up a step.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((_, m)) = &mut self.switchover {
            m.handle_timeout(now);
        }
        let rto = self.cfg.retransmit_after;
        for backup in &mut self.backups {
            let mut requeue = vec![];
            for e in &mut backup.epochs {
                for (seq, s) in e.slots.iter_mut().enumerate() {
                    if s.chunk.is_some() && !s.queued && s.sent.is_some_and(|(_, t)| now >= t + rto)
                    {
                        s.queued = true;
                        requeue.push((e.epoch, seq as u32));
                    }
                }
            }
            for item in requeue.into_iter().rev() {
                backup.queue.push_front(item);
            }
        }
    }
}

#[cfg(test)]
mod tests;
