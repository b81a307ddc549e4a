//! A backup's replica of one VM: the replica file, the per-epoch journals and the committed-epoch record.
//!
//! Layout of a VM's directory:
//!
//! | file | what |
//! |---|---|
//! | `replica.img` | guest RAM as of the committed epoch, `mem_bytes` long, allocated at open |
//! | `state.json` | the epoch `replica.img` holds durably and where its VM state is ([`checkpoint`]); replaced atomically |
//! | `vmstate-<epoch>.bin` | that epoch's vCPU and device state, as its end marker carried it |
//! | `services-<epoch>.bin` | the services' committed contributions as of that epoch ([`services`]) |
//! | `journal/<epoch>.ejl` | the epoch's frames: a Hello naming the sending session, the Chunk frames as received, then its EpochEnd frame ([`journal`]) |
//! | `fence.json` | the VM's fence on this node ([`crate::fence`]) |
//! | `lock` | held by the one process using the directory ([`DirLock`]) |
//!
//! Write-ahead logging with checkpoints, as databases do:
//! - chunks are appended to the epoch's journal as they arrive;
//! - at commit the EpochEnd frame is appended and the journal fsynced: **the commit point**;
//! - the chunks, verified on arrival and held in memory since, are then written into `replica.img` in seq
//!   order ([`apply`]), without waiting for the disk (a redo after a crash reads them back from the journal);
//! - a checkpoint (every 2 s, or when the VM is idle for 300 ms) fdatasyncs the replica in a background
//!   thread, records its epoch in `state.json`, and deletes the journals it covers.
//!
//! Recovery starts from the checkpoint, redoes every complete, verifiable journal above it in order (each
//! rewrites whole pages, so pages written after the checkpoint end up as the newest committed epoch has
//! them), and deletes incomplete ones. A backup killed at any moment thus restarts with the last committed
//! epoch. Syncing the replica per epoch instead would cost a random write per dirty page per epoch (measured
//! here: 200-370 ms per 5 MB epoch, against about 1 ms for the sequential journal fsync).

mod apply;
pub mod checkpoint;
mod journal;
mod lock;
pub mod services;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use endophyte_wire::{EncodedFrame, EpochEnd, Hello, Message, PageChunk, VmState};

use journal::Appender;
pub use lock::DirLock;
pub use services::{ServiceState, ServiceStates};

/// Errors of the replica store. Each names the file and what failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call failed (disk full shows up here as `No space left on device`).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The directory belongs to a VM of another geometry.
    #[error("{path}: replica is of VM {have_vm:?} ({have_bytes} bytes, {have_page}-byte pages), not {want_vm:?} ({want_bytes} bytes, {want_page}-byte pages)")]
    Mismatch {
        /// state.json.
        path: PathBuf,
        /// VM on disk.
        have_vm: String,
        /// Size on disk.
        have_bytes: u64,
        /// Page size on disk.
        have_page: u64,
        /// VM asked for.
        want_vm: String,
        /// Size asked for.
        want_bytes: u64,
        /// Page size asked for.
        want_page: u64,
    },
    /// state.json or the VM state file is unreadable.
    #[error("{path}: {why}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Another process holds the directory ([`DirLock`]): a backup serving this VM, or an export.
    #[error("{path} is locked by another process (a backup serving this VM, or an export); stop it first")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A journaled chunk failed its check on apply.
    #[error("journal {path}: {why}")]
    Journal {
        /// The journal.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Which VM a replica directory belongs to, from its `state.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaId {
    /// The VM.
    pub vm_id: String,
    /// Its page size in bytes.
    pub page_size: u64,
    /// Its guest RAM in bytes.
    pub mem_bytes: u64,
}

/// The VM whose replica `dir` holds; `None` when it has no `state.json`.
///
/// # Errors
/// An unreadable `state.json`.
pub fn identify(dir: &Path) -> Result<Option<ReplicaId>, StoreError> {
    Ok(checkpoint::read_json(dir)?.map(|s| ReplicaId {
        vm_id: s.vm_id,
        page_size: s.page_size,
        mem_bytes: s.mem_bytes,
    }))
}

/// When a backup acknowledges an epoch as committed (`endophyte backup --durability`).
///
/// - `Disk`: once its journal is on disk (fdatasync). Survives the loss of the backup host.
/// - `Memory`: once its journal is written to the backup's page cache, verified, without waiting for the
///   disk (as Remus acknowledges from the backup's RAM). Survives a crash of the backup process, which is
///   what the kernel keeps written data through. A crash of the backup host may lose the epochs since the
///   last checkpoint (every 2 s) whose journals had not reached the disk; recovery then starts from an
///   older complete epoch and the primary resyncs the backup from there, so the replica stays consistent.
///   Every committed epoch is lost only if a quorum of backup hosts crash within that window.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge from the page cache.
    Memory,
    /// Acknowledge once on disk.
    #[default]
    Disk,
}

/// Test hooks: abort the process at a chosen point (see `endophyte backup --crash-during-apply`).
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashPoint {
    /// Abort while applying the first epoch with pages at or above this one.
    pub during_apply: Option<u64>,
    /// Abort with a switchover prepared (VMM started, VM restored, not yet answered).
    pub during_switchover: bool,
    /// Hang for good at the commit of the first epoch at or above this one, as a write that never
    /// completes would: the process and its paths stay up, no commit follows.
    pub hang_at_commit: Option<u64>,
}

/// One VM's replica on a backup. See the module docs.
pub struct ReplicaStore {
    dir: PathBuf,
    image: PathBuf,
    vm_id: String,
    mem_bytes: u64,
    page_size: u64,
    committed: u64,
    committed_session: u64,
    checkpoint: u64,
    file: File,
    journals: BTreeMap<u64, Appender>,
    /// Journals of committed epochs newer than the checkpoint: needed by recovery until the next one.
    applied: Vec<PathBuf>,
    last_checkpoint: std::time::Instant,
    checkpointing: Option<std::thread::JoinHandle<Result<u64, StoreError>>>,
    crash: CrashPoint,
    durability: Durability,
    /// Chunk bytes an epoch keeps in memory for its commit ([`journal::HELD_BYTES_MAX`]).
    held_max: usize,
    /// vCPU and device state of the committed epoch, when its end marker carried one.
    vm_state: Option<VmState>,
    /// The services' newest contributions among the committed epochs.
    services: ServiceStates,
}

impl ReplicaStore {
    /// Opens (or creates) the replica of `vm_id` under `dir`, recovering from any interrupted commit.
    ///
    /// # Errors
    /// [`StoreError`] on I/O failure or when the directory holds a VM of another geometry.
    pub fn open(
        dir: &Path,
        vm_id: &str,
        mem_bytes: u64,
        page_size: u64,
        crash: CrashPoint,
    ) -> Result<Self, StoreError> {
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir.join("journal")).map_err(io("creating", dir))?;
        let found = checkpoint::read(dir)?;
        let (committed, committed_session, vm_state, services) = match found {
            Some(checkpoint::Checkpointed {
                state: s,
                vm_state,
                services,
            }) => {
                if s.vm_id != vm_id || s.mem_bytes != mem_bytes || s.page_size != page_size {
                    return Err(StoreError::Mismatch {
                        path: dir.join("state.json"),
                        have_vm: s.vm_id,
                        have_bytes: s.mem_bytes,
                        have_page: s.page_size,
                        want_vm: vm_id.into(),
                        want_bytes: mem_bytes,
                        want_page: page_size,
                    });
                }
                (s.checkpoint_epoch, s.checkpoint_session, vm_state, services)
            }
            None => (0, 0, None, ServiceStates::new()),
        };
        let fresh = !dir.join("state.json").exists();
        let img = dir.join("replica.img");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&img)
            .map_err(io("opening", &img))?;
        file.set_len(mem_bytes).map_err(io("sizing", &img))?;
        // Allocate every block now. On a sparse file each first write allocates, and (ext4, data=ordered)
        // every later fsync on the filesystem, journal commits included, waits for those data blocks:
        // commit fsyncs of 1-70 ms here instead of about 1. Where fallocate is unsupported, it stays sparse.
        // SAFETY: fallocate(2) on an fd we own, over the file's own length; no memory is involved.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, mem_bytes as libc::off_t) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSPC) {
            return Err(StoreError::Io {
                op: "allocating (the disk cannot hold the replica)",
                path: img.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        if rc != 0 {
            tracing::warn!(
                path = %img.display(),
                "fallocate failed ({}); the replica stays sparse and commits may be slower",
                std::io::Error::last_os_error()
            );
        }
        let mut store = Self {
            dir: dir.to_owned(),
            image: img.clone(),
            vm_id: vm_id.into(),
            mem_bytes,
            page_size,
            committed,
            committed_session,
            checkpoint: committed,
            file,
            journals: BTreeMap::new(),
            applied: Vec::new(),
            last_checkpoint: std::time::Instant::now(),
            checkpointing: None,
            crash,
            durability: Durability::Disk,
            held_max: journal::HELD_BYTES_MAX,
            vm_state,
            services,
        };
        if fresh {
            store.checkpoint_now()?;
        }
        store.recover()?;
        store.checkpoint_now()?;
        Ok(store)
    }

    /// Epoch the replica holds.
    pub fn committed_epoch(&self) -> u64 {
        self.committed
    }

    /// Session that sent the committed epoch (0: unknown).
    pub fn committed_session(&self) -> u64 {
        self.committed_session
    }

    /// The replica file's path.
    pub fn image_path(&self) -> &Path {
        &self.image
    }

    /// The VM's vCPU and device state at the committed epoch's pause, if its end marker carried one:
    /// with `replica.img`, what starting the VM from this epoch needs (promote).
    pub fn vm_state(&self) -> Option<&VmState> {
        self.vm_state.as_ref()
    }

    /// The services' contributions as of the committed epoch: what each service's twin restores when
    /// the VM resumes from this epoch (a migration's target, a promote).
    pub fn service_states(&self) -> &ServiceStates {
        &self.services
    }

    fn journal_path(&self, epoch: u64) -> PathBuf {
        self.dir.join("journal").join(format!("{epoch:020}.ejl"))
    }

    fn open_journal(&mut self, epoch: u64, session: u64) -> Result<(), StoreError> {
        if !self.journals.contains_key(&epoch) {
            let mut a = Appender::create(self.journal_path(epoch))?;
            let hello = Message::Hello(Hello {
                session,
                path: 0,
                page_size: self.page_size as u32,
                mem_bytes: self.mem_bytes,
                vm_id: self.vm_id.clone(),
                generation: 0,
            })
            .encode();
            a.append(&[&hello.head])?;
            a.session = session;
            tracing::trace!(epoch, dir = %self.dir.display(), "journal opened: the epoch's first chunk");
            self.journals.insert(epoch, a);
        }
        Ok(())
    }

    /// Appends a verified chunk, sent by session `session`, to its epoch's journal.
    ///
    /// # Errors
    /// [`StoreError::Io`] (for example a full disk); nothing is applied.
    pub fn store_chunk(
        &mut self,
        seq: u32,
        chunk: &PageChunk,
        session: u64,
    ) -> Result<(), StoreError> {
        let epoch = chunk.epoch;
        self.open_journal(epoch, session)?;
        let frame = Message::Chunk {
            seq,
            chunk: chunk.clone(),
        }
        .encode();
        let j = self.journals.get_mut(&epoch).expect("just inserted");
        let offset = j.len;
        j.append(&[&frame.head, &frame.body])?;
        // A retransmitted chunk journaled twice: the later copy is as good as the first.
        j.index.insert(seq, (offset, frame.len()));
        if !j.spilled {
            j.held_bytes += chunk.body.len();
            if let Some(old) = j.chunks.insert(seq, chunk.clone()) {
                j.held_bytes -= old.body.len();
            }
            if j.held_bytes > self.held_max {
                j.chunks.clear();
                j.spilled = true;
            }
        }
        Ok(())
    }

    /// Acknowledges commits as `d` says from now on (the default is [`Durability::Disk`]).
    pub fn set_durability(&mut self, d: Durability) {
        self.durability = d;
    }

    /// Commits an epoch whose chunks are all journaled and verified (by the [`endophyte_wire::Receiver`]):
    /// journal the end marker and fsync it (the commit point; with [`Durability::Memory`] the write alone),
    /// then write the chunks into the replica. The journal stays until a checkpoint covers the epoch.
    ///
    /// Returns the guest addresses of the pages it rewrote, in the order written.
    ///
    /// # Errors
    /// [`StoreError`]; if it fails before the fsync the replica still holds the previous epoch.
    pub fn commit(&mut self, end: &EpochEnd, session: u64) -> Result<Vec<u64>, StoreError> {
        let epoch = end.epoch;
        if self.crash.hang_at_commit.is_some_and(|h| epoch >= h) {
            tracing::error!(epoch, "test hook: hanging at this commit for good");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let path = self.journal_path(epoch);
        // An epoch with no dirty pages has no chunks, hence no journal yet.
        self.open_journal(epoch, session)?;
        let mut j = self.journals.remove(&epoch).expect("just opened");
        let frame: EncodedFrame = Message::EpochEnd(end.clone()).encode();
        j.append(&[&frame.head])?;
        let t0 = std::time::Instant::now();
        if self.durability == Durability::Disk {
            j.sync()?;
        }
        let synced = t0.elapsed();
        let session = j.session;
        let chunks: Vec<PageChunk> = if j.spilled {
            apply::read_chunks(&path, &j.index)?
        } else {
            std::mem::take(&mut j.chunks).into_values().collect()
        };
        drop(j);
        let pages = self.apply(&path, end, &chunks, session)?;
        tracing::debug!(epoch, ?synced, total = ?t0.elapsed(), dir = %self.dir.display(), "epoch committed");
        Ok(pages)
    }

    /// Forgets a staged epoch.
    pub fn discard(&mut self, epoch: u64) {
        self.journals.remove(&epoch);
        let _ = std::fs::remove_file(self.journal_path(epoch));
    }

    /// The replica file was a running VM's RAM and that VM is gone (it migrated away or stopped): the file
    /// no longer holds any epoch. Records it as holding none (so the next sidecar resyncs it whole and
    /// promote refuses it), with no VM state.
    ///
    /// # Errors
    /// Recording it failed.
    pub fn forget(&mut self) -> Result<(), StoreError> {
        self.reap_checkpoint(true);
        self.journals.clear();
        // No journal may ever be redone over this file: every one of them is of an epoch it no longer holds.
        let jdir = self.dir.join("journal");
        if let Ok(entries) = std::fs::read_dir(&jdir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.applied.clear();
        self.committed = 0;
        self.committed_session = 0;
        self.vm_state = None;
        self.services.clear();
        self.checkpoint_now()
    }

    fn apply(
        &mut self,
        journal: &Path,
        end: &EpochEnd,
        chunks: &[PageChunk],
        session: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let image = apply::Image {
            file: &self.file,
            path: self.image.clone(),
            page_size: self.page_size,
            mem_bytes: self.mem_bytes,
        };
        let pages = apply::apply_chunks(&image, journal, end, chunks, self.crash)?;
        self.committed = end.epoch;
        self.committed_session = session;
        self.vm_state = end.state.clone();
        services::merge(&mut self.services, end.epoch, &end.contributions);
        self.applied.push(journal.to_owned());
        Ok(pages)
    }

    /// Epoch `replica.img` holds durably (the last checkpoint).
    pub fn checkpoint_epoch(&self) -> u64 {
        self.checkpoint
    }

    fn state(&self) -> checkpoint::State {
        checkpoint::State::new(
            &self.vm_id,
            self.mem_bytes,
            self.page_size,
            self.committed,
            self.committed_session,
        )
    }

    /// Collects a finished background checkpoint.
    fn reap_checkpoint(&mut self, wait: bool) {
        if let Some(h) = self.checkpointing.take() {
            if !wait && !h.is_finished() {
                self.checkpointing = Some(h);
                return;
            }
            match h.join().expect("checkpoint thread panicked") {
                Ok(epoch) => self.checkpoint = epoch,
                Err(e) => tracing::error!(
                    "checkpoint failed; the journals since epoch {} stay for recovery: {e}",
                    self.checkpoint
                ),
            }
        }
    }

    /// Starts a background checkpoint when 2 s passed since the last one (or at once when `idle`) and
    /// there is something to checkpoint. Returns immediately.
    pub fn maybe_checkpoint(&mut self, idle: bool) {
        self.reap_checkpoint(false);
        let due = idle || self.last_checkpoint.elapsed() >= std::time::Duration::from_secs(2);
        if self.checkpointing.is_some() || self.committed == self.checkpoint || !due {
            return;
        }
        let file = match self.file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("checkpoint: cannot clone the replica's fd: {e}");
                return;
            }
        };
        let (dir, state, vm_state, services, journals) = (
            self.dir.clone(),
            self.state(),
            self.vm_state.clone(),
            self.services.clone(),
            std::mem::take(&mut self.applied),
        );
        let img = self.image.clone();
        self.last_checkpoint = std::time::Instant::now();
        self.checkpointing = Some(std::thread::spawn(move || {
            checkpoint::write(
                &file,
                &img,
                &dir,
                state,
                vm_state.as_ref(),
                &services,
                &journals,
            )
        }));
    }

    /// Checkpoints now and waits: the replica file holds the committed epoch durably when this returns.
    ///
    /// # Errors
    /// [`StoreError::Io`] if syncing or recording fails (the journals are kept).
    pub fn checkpoint_now(&mut self) -> Result<(), StoreError> {
        self.reap_checkpoint(true);
        let journals = std::mem::take(&mut self.applied);
        let r = checkpoint::write(
            &self.file,
            &self.image,
            &self.dir,
            self.state(),
            self.vm_state.as_ref(),
            &self.services,
            &journals,
        );
        match r {
            Ok(epoch) => {
                self.checkpoint = epoch;
                self.last_checkpoint = std::time::Instant::now();
                Ok(())
            }
            Err(e) => {
                self.applied = journals;
                Err(e)
            }
        }
    }

    /// Redoes complete journals above the committed epoch, in order; deletes the rest.
    fn recover(&mut self) -> Result<(), StoreError> {
        let jdir = self.dir.join("journal");
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&jdir)
            .map_err(|source| StoreError::Io {
                op: "listing",
                path: jdir.clone(),
                source,
            })?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let epoch = p.file_stem()?.to_str()?.parse::<u64>().ok()?;
                Some((epoch, p))
            })
            .collect();
        found.sort();
        for (epoch, path) in found {
            if epoch > self.committed {
                if let Some((end, chunks, session)) = journal::read_journal(&path)? {
                    if end.base_epoch <= self.committed {
                        tracing::info!(epoch, "redoing a committed journal left by a crash");
                        let chunks = apply::read_chunks(&path, &chunks)?;
                        self.apply(&path, &end, &chunks, session)?;
                        continue;
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endophyte_wire::msg::epoch_hash;
    use endophyte_wire::ChunkBuilder;

    const PS: u64 = 4096;

    fn epoch(e: u64, fill: u8, state: Option<VmState>) -> (PageChunk, EpochEnd) {
        let mut b = ChunkBuilder::new(e, PS as usize, 4);
        b.push(PS, &[fill; PS as usize]);
        let c = b.finish(true);
        let end = EpochEnd {
            epoch: e,
            base_epoch: e - 1,
            chunk_count: 1,
            page_count: 1,
            epoch_hash: epoch_hash(1, [&c.content_hash]),
            state,
            contributions: vec![],
        };
        (c, end)
    }

    #[test]
    fn an_epoch_applied_from_its_journal_writes_what_one_held_in_memory_does() {
        // held_max 0: every epoch spills to its journal, as a resync epoch does; the default holds them.
        let mut images = vec![];
        for held_max in [journal::HELD_BYTES_MAX, 0] {
            let dir = tempfile::tempdir().unwrap();
            let mut s =
                ReplicaStore::open(dir.path(), "vm", 1 << 20, PS, CrashPoint::default()).unwrap();
            s.held_max = held_max;
            for e in 1..=3u64 {
                let mut chunks = vec![];
                for seq in 0..3u32 {
                    let mut b = ChunkBuilder::new(e, PS as usize, 4);
                    for i in 0..4u64 {
                        let page = u64::from(seq) * 4 + i + e;
                        b.push(page * PS, &[(e as u8) * 16 + page as u8; PS as usize]);
                    }
                    let c = b.finish(true);
                    s.store_chunk(seq, &c, 9).unwrap();
                    chunks.push(c);
                }
                let end = EpochEnd {
                    epoch: e,
                    base_epoch: e - 1,
                    chunk_count: 3,
                    page_count: 12,
                    epoch_hash: epoch_hash(12, chunks.iter().map(|c| &c.content_hash)),
                    state: None,
                    contributions: vec![],
                };
                s.commit(&end, 9).unwrap();
            }
            assert_eq!(s.committed_epoch(), 3);
            drop(s);
            let img = std::fs::read(dir.path().join("replica.img")).unwrap();
            // Epoch e writes pages e..e+12: page 1 only in epoch 1, page 3 last in epoch 3, page 14 only
            // in epoch 3, page 15 never.
            assert_eq!(img[PS as usize], 16 + 1);
            assert_eq!(img[(3 * PS) as usize], 48 + 3);
            assert_eq!(img[(14 * PS) as usize], 48 + 14);
            assert_eq!(img[(15 * PS) as usize], 0);
            images.push(img);
        }
        assert!(
            images[0] == images[1],
            "the two ways wrote different replicas"
        );
    }

    #[test]
    fn the_committed_epochs_state_survives_a_checkpoint_and_a_reopen_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut s =
            ReplicaStore::open(dir.path(), "vm", 1 << 20, PS, CrashPoint::default()).unwrap();
        // Not JSON, and not UTF-8: kept as it came.
        let state = VmState::new("qemu-7.2", 3, vec![0xff, 0x00, 0x9c, 0x7b]).unwrap();
        let (c, end) = epoch(1, 5, Some(state.clone()));
        s.store_chunk(0, &c, 9).unwrap();
        s.commit(&end, 9).unwrap();
        s.checkpoint_now().unwrap();
        drop(s);
        let s = ReplicaStore::open(dir.path(), "vm", 1 << 20, PS, CrashPoint::default()).unwrap();
        assert_eq!((s.committed_epoch(), s.committed_session()), (1, 9));
        assert_eq!(s.vm_state(), Some(&state));
    }

    #[test]
    fn a_damaged_state_file_fails_the_open_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s =
            ReplicaStore::open(dir.path(), "vm", 1 << 20, PS, CrashPoint::default()).unwrap();
        let (c, end) = epoch(
            1,
            5,
            Some(VmState::new("testvm", 1, b"{}".to_vec()).unwrap()),
        );
        s.store_chunk(0, &c, 9).unwrap();
        s.commit(&end, 9).unwrap();
        s.checkpoint_now().unwrap();
        drop(s);
        let f = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("vmstate-"))
            .unwrap()
            .path();
        let mut b = std::fs::read(&f).unwrap();
        *b.last_mut().unwrap() ^= 1;
        std::fs::write(&f, b).unwrap();
        let e = ReplicaStore::open(dir.path(), "vm", 1 << 20, PS, CrashPoint::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("vmstate-") && e.contains("damaged"), "{e}");
    }

    #[test]
    fn a_forgotten_replica_holds_no_epoch_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s =
            ReplicaStore::open(dir.path(), "vm", 1 << 20, PS, CrashPoint::default()).unwrap();
        let (c, end) = epoch(
            1,
            5,
            Some(VmState::new("testvm", 1, b"{}".to_vec()).unwrap()),
        );
        s.store_chunk(0, &c, 9).unwrap();
        s.commit(&end, 9).unwrap();
        s.forget().unwrap();
        drop(s);
        let s = ReplicaStore::open(dir.path(), "vm", 1 << 20, PS, CrashPoint::default()).unwrap();
        assert_eq!((s.committed_epoch(), s.vm_state()), (0, None));
    }

    #[test]
    fn a_state_json_naming_a_file_outside_the_directory_fails_the_open() {
        let outside = tempfile::tempdir().unwrap();
        let inner = outside.path().join("replica");
        std::fs::create_dir(&inner).unwrap();
        let mut s = ReplicaStore::open(&inner, "vm", 1 << 20, PS, CrashPoint::default()).unwrap();
        let (c, end) = epoch(
            1,
            5,
            Some(VmState::new("testvm", 1, b"{}".to_vec()).unwrap()),
        );
        s.store_chunk(0, &c, 9).unwrap();
        s.commit(&end, 9).unwrap();
        s.checkpoint_now().unwrap();
        drop(s);
        // A real VM state file one level up, with the hash state.json records: only the name is wrong.
        let sj = inner.join("state.json");
        let json = std::fs::read_to_string(&sj).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let name = v["vm_state"]["file"].as_str().unwrap().to_owned();
        std::fs::copy(inner.join(&name), outside.path().join(&name)).unwrap();
        let json = json.replace(&format!("\"{name}\""), &format!("\"../{name}\""));
        std::fs::write(&sj, json).unwrap();
        let e = ReplicaStore::open(&inner, "vm", 1 << 20, PS, CrashPoint::default())
            .err()
            .expect("a name with ../ was followed")
            .to_string();
        assert!(e.contains("not a plain file name"), "{e}");
        assert!(outside.path().join(&name).exists());
    }
}
