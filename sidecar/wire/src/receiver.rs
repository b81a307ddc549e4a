//! The receiving side of epoch replication: one VM's replica on one backup.
//!
//! Sans-IO. The driver passes in messages from the VM's paths; the state machine checks them and asks the
//! driver, through [`Action`]s, to store chunks (journal), to commit a complete and verified epoch (journal
//! durable, apply to the replica, mark committed), or to discard an abandoned one. Replies (acks, Committed,
//! errors) come out of [`Receiver::poll_transmit`].
//!
//! Guarantees, given a driver that does what the actions say:
//! - nothing of an epoch is applied before all its chunks arrived, each passed its content hash, and the
//!   chunk count, page count and epoch hash of its end marker match;
//! - epochs commit in order, each on top of the base it names;
//! - an epoch at or below the committed one, offered by a session other than the one that sent it, is
//!   refused as a replay.

use std::collections::{BTreeMap, VecDeque};

use crate::chunk::PageChunk;
use crate::msg::{epoch_hash, EpochEnd, ErrorCode, Hello, Message, Welcome};

/// Index of a path, as the driver numbers them.
pub type PathKey = u64;

/// Why a message was refused. The driver sends the matching Error message (already queued) and closes the path.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ReceiverError {
    /// The Hello does not match this VM's replica.
    #[error("Hello for VM {vm_id:?} refused: {why}")]
    BadHello {
        /// VM named by the Hello.
        vm_id: String,
        /// Why.
        why: String,
    },
    /// A chunk failed its checks.
    #[error("corrupted chunk {seq} of epoch {epoch}: {why}")]
    Corrupt {
        /// Epoch.
        epoch: u64,
        /// Chunk.
        seq: u32,
        /// The check that failed.
        why: String,
    },
    /// An already committed epoch was offered by another session.
    #[error("replayed epoch {epoch}: epoch {committed} is already committed here")]
    Replay {
        /// Offered epoch.
        epoch: u64,
        /// Committed epoch.
        committed: u64,
    },
    /// An epoch's end marker did not match its chunks, or its base does not match the replica.
    #[error("epoch {epoch} refused: {why}")]
    BadEpoch {
        /// Epoch.
        epoch: u64,
        /// Why.
        why: String,
    },
    /// Too many epochs staged at once.
    #[error(
        "epoch {epoch} refused: {staged} epochs already staged above committed epoch {committed}"
    )]
    TooManyEpochs {
        /// Offered epoch.
        epoch: u64,
        /// Staged count.
        staged: usize,
        /// Committed epoch.
        committed: u64,
    },
    /// A message a sidecar never sends, or sent before Hello.
    #[error("unexpected {msg} message")]
    Unexpected {
        /// Message name.
        msg: &'static str,
    },
}

impl ReceiverError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::BadHello { .. } => ErrorCode::BadHello,
            Self::Corrupt { .. } => ErrorCode::Corrupt,
            Self::Replay { .. } => ErrorCode::Replay,
            Self::BadEpoch { .. } => ErrorCode::BaseMismatch,
            Self::TooManyEpochs { .. } => ErrorCode::TooManyEpochs,
            Self::Unexpected { .. } => ErrorCode::Protocol,
        }
    }
}

/// What the driver must do.
#[derive(Debug)]
pub enum Action {
    /// Persist this verified chunk (append it to the epoch's journal), then call [`Receiver::chunk_stored`].
    Store {
        /// Epoch.
        epoch: u64,
        /// Chunk position.
        seq: u32,
        /// The chunk, as received.
        chunk: PageChunk,
    },
    /// The epoch is complete and verified: make its journal durable, apply its chunks to the replica in seq
    /// order, mark it committed, then call [`Receiver::epoch_committed`] (or [`Receiver::commit_failed`]).
    Commit {
        /// The end marker, to write into the journal.
        end: EpochEnd,
    },
    /// Forget everything staged for this epoch (it was abandoned or refused).
    Discard {
        /// Epoch.
        epoch: u64,
    },
}

#[derive(Debug)]
struct StagedChunk {
    hash: [u8; 32],
    n_pages: u32,
    stored: bool,
    path: PathKey,
}

#[derive(Debug, Default)]
struct Staged {
    chunks: BTreeMap<u32, StagedChunk>,
    end: Option<(EpochEnd, PathKey)>,
}

/// Receiver for one VM's replica. See the module docs.
#[derive(Debug)]
pub struct Receiver {
    vm_id: String,
    page_size: u64,
    mem_bytes: u64,
    welcome: Welcome,
    committed: u64,
    committed_session: u64,
    session: Option<u64>,
    session_base: u64,
    staged: BTreeMap<u64, Staged>,
    committing: Option<u64>,
    max_staged: usize,
    out: VecDeque<(PathKey, Message)>,
    actions: VecDeque<Action>,
}

impl Receiver {
    /// A receiver for VM `vm_id` of `mem_bytes` bytes in `page_size`-byte pages whose replica holds epoch
    /// `committed`, sent by session `committed_session` (0: unknown). `instance` and `node` go into every
    /// Welcome. At most `max_staged` epochs stage at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm_id: String,
        page_size: u64,
        mem_bytes: u64,
        committed: u64,
        committed_session: u64,
        instance: u64,
        node: String,
        max_staged: usize,
    ) -> Self {
        Self {
            vm_id,
            page_size,
            mem_bytes,
            welcome: Welcome {
                instance,
                committed_epoch: committed,
                committed_session,
                node,
                lease_ms: crate::lease::DEFAULT_LEASE.as_millis() as u32,
            },
            committed,
            committed_session,
            session: None,
            session_base: committed,
            staged: BTreeMap::new(),
            committing: None,
            max_staged: max_staged.max(1),
            out: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// Announces `lease` (whole ms, at most `u32::MAX`) in every Welcome instead of
    /// [`crate::lease::DEFAULT_LEASE`]: the backup's lease on its primaries.
    pub fn with_lease(mut self, lease: std::time::Duration) -> Self {
        self.welcome.lease_ms = lease.as_millis().min(u128::from(u32::MAX)) as u32;
        self
    }

    /// Newest committed epoch.
    pub fn committed_epoch(&self) -> u64 {
        self.committed
    }

    /// Session that sent the committed epoch (0: unknown).
    pub fn committed_session(&self) -> u64 {
        self.committed_session
    }

    /// Session of the sidecar currently connected (the last Hello), if any.
    pub fn session(&self) -> Option<u64> {
        self.session
    }

    /// Guest page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Guest RAM size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// A message arrived on `path`.
    ///
    /// # Errors
    /// Any [`ReceiverError`]; the matching Error reply is already queued for `path`, nothing was staged or
    /// applied from the message, and the driver should close the path once the reply is out.
    pub fn handle_message(&mut self, path: PathKey, msg: Message) -> Result<(), ReceiverError> {
        let r = self.handle(path, msg);
        match &r {
            // An end marker that completed an epoch failing verification: `try_commit` already queued
            // the refusal (on the end marker's path, which may be another).
            Err(ReceiverError::BadEpoch { .. }) | Ok(()) => {}
            Err(e) => self.out.push_back((
                path,
                Message::Error {
                    code: e.code(),
                    message: e.to_string(),
                },
            )),
        }
        r
    }

    fn handle(&mut self, path: PathKey, msg: Message) -> Result<(), ReceiverError> {
        match msg {
            Message::Hello(h) => self.hello(path, h),
            Message::Chunk { seq, chunk } => self.chunk(path, seq, chunk),
            Message::EpochEnd(end) => self.end(path, end),
            Message::Ping { token } => {
                self.out.push_back((path, Message::Pong { token }));
                Ok(())
            }
            Message::Pong { .. } => Ok(()),
            other => Err(ReceiverError::Unexpected { msg: other.name() }),
        }
    }

    fn hello(&mut self, path: PathKey, h: Hello) -> Result<(), ReceiverError> {
        let bad = |why: String| ReceiverError::BadHello {
            vm_id: h.vm_id.clone(),
            why,
        };
        if h.vm_id != self.vm_id {
            return Err(bad(format!("this replica is of VM {:?}", self.vm_id)));
        }
        if u64::from(h.page_size) != self.page_size || h.mem_bytes != self.mem_bytes {
            return Err(bad(format!(
                "geometry {} bytes in {}-byte pages, replica has {} bytes in {}-byte pages",
                h.mem_bytes, h.page_size, self.mem_bytes, self.page_size
            )));
        }
        if self.session != Some(h.session) {
            // A new sidecar run: whatever an older one left staged will never complete.
            self.session = Some(h.session);
            self.session_base = self.committed;
            let abandoned: Vec<u64> = self
                .staged
                .keys()
                .copied()
                .filter(|&e| Some(e) != self.committing)
                .collect();
            for epoch in abandoned {
                self.staged.remove(&epoch);
                self.actions.push_back(Action::Discard { epoch });
            }
        }
        self.welcome.committed_epoch = self.committed;
        self.welcome.committed_session = self.committed_session;
        self.out
            .push_back((path, Message::Welcome(self.welcome.clone())));
        Ok(())
    }

    fn check_session(&self, epoch: u64, what: &'static str) -> Result<(), ReceiverError> {
        if self.session.is_none() {
            return Err(ReceiverError::Unexpected { msg: what });
        }
        // Epochs this session itself committed may come again (a retransmission that crossed the ack).
        if epoch <= self.committed && epoch <= self.session_base {
            return Err(ReceiverError::Replay {
                epoch,
                committed: self.committed,
            });
        }
        Ok(())
    }

    fn chunk(&mut self, path: PathKey, seq: u32, chunk: PageChunk) -> Result<(), ReceiverError> {
        let epoch = chunk.epoch;
        self.check_session(epoch, "Chunk")?;
        if epoch <= self.committed {
            self.out.push_back((path, Message::ChunkAck { epoch, seq }));
            return Ok(());
        }
        self.make_room(epoch)?;
        if let Some(c) = self.staged.get(&epoch).and_then(|s| s.chunks.get(&seq)) {
            if c.stored {
                self.out.push_back((path, Message::ChunkAck { epoch, seq }));
            }
            return Ok(());
        }
        chunk
            .decode(self.page_size, self.mem_bytes)
            .map_err(|e| ReceiverError::Corrupt {
                epoch,
                seq,
                why: e.to_string(),
            })?;
        let staged = self.staged.entry(epoch).or_default();
        staged.chunks.insert(
            seq,
            StagedChunk {
                hash: chunk.content_hash,
                n_pages: chunk.n_pages,
                stored: false,
                path,
            },
        );
        self.actions.push_back(Action::Store { epoch, seq, chunk });
        Ok(())
    }

    fn end(&mut self, path: PathKey, end: EpochEnd) -> Result<(), ReceiverError> {
        let epoch = end.epoch;
        self.check_session(epoch, "EpochEnd")?;
        if epoch <= self.committed {
            self.out.push_back((path, Message::Committed { epoch }));
            return Ok(());
        }
        self.make_room(epoch)?;
        let staged = self.staged.entry(epoch).or_default();
        if staged.end.is_none() {
            staged.end = Some((end, path));
        }
        self.try_commit()
    }

    /// Makes room to stage `epoch`. A sender keeps at most as many epochs open as a receiver stages, so
    /// when staging is full and a newer epoch arrives, the oldest staged epochs were abandoned (the sender
    /// resynced this replica) and are discarded. An epoch older than everything staged is refused.
    fn make_room(&mut self, epoch: u64) -> Result<(), ReceiverError> {
        if self.staged.contains_key(&epoch) || self.staged.len() < self.max_staged {
            return Ok(());
        }
        let newest = *self.staged.keys().next_back().expect("staging is full");
        if epoch < newest {
            return Err(ReceiverError::TooManyEpochs {
                epoch,
                staged: self.staged.len(),
                committed: self.committed,
            });
        }
        while self.staged.len() >= self.max_staged {
            let Some(oldest) = self
                .staged
                .keys()
                .copied()
                .find(|&e| Some(e) != self.committing)
            else {
                break;
            };
            self.staged.remove(&oldest);
            self.actions.push_back(Action::Discard { epoch: oldest });
        }
        Ok(())
    }

    /// The driver stored chunk `seq` of `epoch`: acknowledge it, and commit the epoch if it is complete.
    ///
    /// # Errors
    /// A [`ReceiverError::BadEpoch`] if this completed an epoch that fails verification (the epoch is
    /// discarded; the error is queued for the path that sent the end marker).
    pub fn chunk_stored(&mut self, epoch: u64, seq: u32) -> Result<(), ReceiverError> {
        let Some(entry) = self
            .staged
            .get_mut(&epoch)
            .and_then(|s| s.chunks.get_mut(&seq))
        else {
            return Ok(());
        };
        entry.stored = true;
        let path = entry.path;
        self.out.push_back((path, Message::ChunkAck { epoch, seq }));
        self.try_commit()
    }

    fn try_commit(&mut self) -> Result<(), ReceiverError> {
        if self.committing.is_some() {
            return Ok(());
        }
        // The newest complete epoch whose base we hold wins; older staged ones were abandoned by the sender.
        let ready = self.staged.iter().rev().find_map(|(&epoch, s)| {
            let (end, path) = s.end.as_ref()?;
            let complete = (0..end.chunk_count).all(|q| s.chunks.get(&q).is_some_and(|c| c.stored));
            (complete && end.base_epoch <= self.committed).then(|| (epoch, end.clone(), *path))
        });
        let Some((epoch, end, path)) = ready else {
            return Ok(());
        };
        let staged = &self.staged[&epoch];
        let fail = |why: String| ReceiverError::BadEpoch { epoch, why };
        // An epoch on base B carries every page changed after B, so it applies exactly on any replica
        // holding an epoch in [B, epoch): pages it does not carry are the same in all of them.
        let verdict = if let Some((&extra, _)) = staged.chunks.range(end.chunk_count..).next() {
            Err(fail(format!(
                "chunk {extra} arrived but the end marker says {} chunks",
                end.chunk_count
            )))
        } else {
            let pages: u64 = staged.chunks.values().map(|c| u64::from(c.n_pages)).sum();
            let hashes: Vec<[u8; 32]> = staged.chunks.values().map(|c| c.hash).collect();
            if pages != end.page_count {
                Err(fail(format!(
                    "end marker says {} pages, chunks carry {pages}",
                    end.page_count
                )))
            } else if epoch_hash(pages, hashes.iter()) != end.epoch_hash {
                Err(fail(
                    "epoch hash mismatch: chunks differ from the sender's".into(),
                ))
            } else {
                Ok(())
            }
        };
        if let Err(e) = verdict {
            self.staged.remove(&epoch);
            self.actions.push_back(Action::Discard { epoch });
            self.out.push_back((
                path,
                Message::Error {
                    code: e.code(),
                    message: e.to_string(),
                },
            ));
            return Err(e);
        }
        let abandoned: Vec<u64> = self.staged.range(..epoch).map(|(&e, _)| e).collect();
        for e in abandoned {
            self.staged.remove(&e);
            self.actions.push_back(Action::Discard { epoch: e });
        }
        self.committing = Some(epoch);
        self.actions.push_back(Action::Commit { end });
        Ok(())
    }

    /// The driver committed `epoch`: the replica now holds it durably.
    ///
    /// # Errors
    /// As [`Receiver::chunk_stored`], for a following epoch that completes and fails verification.
    pub fn epoch_committed(&mut self, epoch: u64) -> Result<(), ReceiverError> {
        assert_eq!(
            self.committing,
            Some(epoch),
            "committed an epoch not being committed"
        );
        self.committing = None;
        self.committed = epoch;
        self.committed_session = self.session.unwrap_or(0);
        if let Some(s) = self.staged.remove(&epoch) {
            if let Some((_, path)) = s.end {
                self.out.push_back((path, Message::Committed { epoch }));
            }
        }
        self.try_commit()
    }

    /// The driver could not commit `epoch` (I/O error, disk full): it is discarded, the replica keeps the
    /// previous epoch, and the sender is told why.
    pub fn commit_failed(&mut self, epoch: u64, why: &str) {
        assert_eq!(
            self.committing,
            Some(epoch),
            "failed an epoch not being committed"
        );
        self.committing = None;
        if let Some(s) = self.staged.remove(&epoch) {
            if let Some((_, path)) = s.end {
                self.out.push_back((
                    path,
                    Message::Error {
                        code: ErrorCode::Internal,
                        message: format!("commit of epoch {epoch} failed: {why}"),
                    },
                ));
            }
        }
        self.actions.push_back(Action::Discard { epoch });
    }

    /// The driver could not store chunk `seq` of `epoch` (disk full, I/O error): the epoch is discarded and
    /// the sender that sent the chunk is told why, so that it starts over from the committed epoch.
    pub fn store_failed(&mut self, epoch: u64, seq: u32, why: &str) {
        let path = self
            .staged
            .get(&epoch)
            .and_then(|s| s.chunks.get(&seq))
            .map(|c| c.path);
        if self.committing != Some(epoch) && self.staged.remove(&epoch).is_some() {
            self.actions.push_back(Action::Discard { epoch });
        }
        if let Some(path) = path {
            self.out.push_back((
                path,
                Message::Error {
                    code: ErrorCode::Internal,
                    message: format!("storing chunk {seq} of epoch {epoch} failed: {why}"),
                },
            ));
        }
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next reply to send, with the path to send it on.
    pub fn poll_transmit(&mut self) -> Option<(PathKey, Message)> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkBuilder;

    const PS: u64 = 4096;

    fn receiver() -> Receiver {
        let mut rx = Receiver::new("vm".into(), PS, 1 << 20, 0, 0, 1, "b".into(), 4);
        rx.handle_message(
            0,
            Message::Hello(Hello {
                session: 5,
                path: 0,
                page_size: PS as u32,
                mem_bytes: 1 << 20,
                vm_id: "vm".into(),
                generation: 0,
            }),
        )
        .unwrap();
        assert!(matches!(rx.poll_transmit(), Some((0, Message::Welcome(_)))));
        rx
    }

    #[test]
    fn a_bad_end_marker_is_refused_once() {
        let mut rx = receiver();
        let mut b = ChunkBuilder::new(1, PS as usize, 4);
        b.push(0, &[3u8; PS as usize]);
        let chunk = b.finish(true);
        rx.handle_message(0, Message::Chunk { seq: 0, chunk })
            .unwrap();
        while let Some(a) = rx.poll_action() {
            if let Action::Store { epoch, seq, .. } = a {
                rx.chunk_stored(epoch, seq).unwrap();
            }
        }
        assert!(matches!(
            rx.poll_transmit(),
            Some((0, Message::ChunkAck { .. }))
        ));
        let end = EpochEnd {
            epoch: 1,
            base_epoch: 0,
            chunk_count: 1,
            page_count: 1,
            epoch_hash: [0; 32],
            state: None,
            contributions: vec![],
        };
        let e = rx.handle_message(0, Message::EpochEnd(end)).unwrap_err();
        assert!(matches!(e, ReceiverError::BadEpoch { .. }), "{e}");
        let replies: Vec<_> = std::iter::from_fn(|| rx.poll_transmit()).collect();
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert!(matches!(
            &replies[0],
            (
                0,
                Message::Error {
                    code: ErrorCode::BaseMismatch,
                    ..
                }
            )
        ));
    }
}
