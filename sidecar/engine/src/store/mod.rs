//! A backup's replica of one VM: the replica file, the per-epoch journals and the committed-epoch record.
//!
//! Layout of a VM's directory:
//!
//! | file | what |
//! |---|---|
//! | `replica.img` | guest RAM as of the committed epoch, `mem_bytes` long (sparse where never written) |
//! | `state.json` | `{vm_id, mem_bytes, page_size, checkpoint_epoch, checkpoint_session}`: the epoch `replica.img` holds durably; replaced atomically (write, fsync, rename) |
//! | `journal/<epoch>.ejl` | the epoch's frames: a Hello naming the sending session, the Chunk frames as received, then its EpochEnd frame |
//!
//! Write-ahead logging with checkpoints, as databases do:
//! - chunks are appended to the epoch's journal as they arrive;
//! - at commit the EpochEnd frame is appended and the journal fsynced: **the commit point**;
//! - the chunks are then written into `replica.img` in seq order (pwrite, runs of pages coalesced), without
//!   waiting for the disk;
//! - a checkpoint (every 2 s, or when the VM is idle for 300 ms) fdatasyncs the replica in a background
//!   thread, records its epoch in `state.json`, and deletes the journals it covers.
//!
//! Recovery starts from the checkpoint, redoes every complete, verifiable journal above it in order (each
//! rewrites whole pages, so pages written after the checkpoint end up as the newest committed epoch has
//! them), and deletes incomplete ones. A backup killed at any moment thus restarts with the last committed
//! epoch. Syncing the replica per epoch instead would cost a random write per dirty page per epoch (measured
//! here: 200-370 ms per 5 MB epoch, against about 1 ms for the sequential journal fsync).
//!
//! Journal writes go through io_uring (writev and fdatasync submitted to the kernel's ring); when the kernel
//! refuses io_uring the store falls back to pwritev/fdatasync and says so in the log.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use endophyte_wire::frame::{FrameHeader, DEFAULT_MAX_PAYLOAD_BYTES, HEADER_BYTES};
use endophyte_wire::msg::epoch_hash;
use endophyte_wire::{EncodedFrame, EpochEnd, Hello, Message, PageChunk};
use serde::{Deserialize, Serialize};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;

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
    /// state.json is unreadable.
    #[error("{path}: {why}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
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

#[derive(Debug, Serialize, Deserialize)]
struct State {
    vm_id: String,
    mem_bytes: u64,
    page_size: u64,
    checkpoint_epoch: u64,
    #[serde(default)]
    checkpoint_session: u64,
    /// The VM's vCPU and device state at the checkpointed epoch's pause (what its end marker carried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vcpu_state: Option<serde_json::Value>,
}

/// Appends to a file through io_uring, or pwritev when io_uring is unavailable.
struct Appender {
    file: File,
    path: PathBuf,
    len: u64,
    /// Where each chunk frame lies: seq -> (offset, length).
    index: BTreeMap<u32, (u64, usize)>,
    session: u64,
    ring: Option<io_uring::IoUring>,
}

impl Appender {
    fn create(path: PathBuf, use_uring: bool) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                op: "creating journal",
                path: path.clone(),
                source,
            })?;
        let ring = if use_uring {
            io_uring::IoUring::new(8).ok()
        } else {
            None
        };
        Ok(Self {
            file,
            path,
            len: 0,
            index: BTreeMap::new(),
            session: 0,
            ring,
        })
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Submits one SQE and waits for its completion; returns the CQE result.
    fn submit(&mut self, sqe: io_uring::squeue::Entry) -> std::io::Result<i32> {
        let ring = self.ring.as_mut().expect("ring present");
        // SAFETY: the buffers the SQE names (iovecs and their data) are borrowed by our caller for this whole call, and we return only after the completion arrived (below), so the kernel never touches freed memory.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        // An interrupted wait leaves the SQE in flight: keep waiting for its completion. Other errors of
        // io_uring_enter (EFAULT, EINVAL, ...) come before anything is submitted.
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ResourceBusy
                    ) || e.raw_os_error() == Some(libc::EBUSY) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| std::io::Error::other("io_uring completion missing"))?;
        if cqe.result() < 0 {
            return Err(std::io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(cqe.result())
    }

    fn append(&mut self, parts: &[&[u8]]) -> Result<(), StoreError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0usize;
        while done < total {
            // Rebuild the iovecs past what was written (short writes are legal).
            let mut skip = done;
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len());
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                iov.push(libc::iovec {
                    iov_base: p[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: p.len() - skip,
                });
                skip = 0;
            }
            let off = self.len + done as u64;
            let n = if self.ring.is_some() {
                let sqe = io_uring::opcode::Writev::new(
                    io_uring::types::Fd(self.file.as_raw_fd()),
                    iov.as_ptr(),
                    iov.len() as u32,
                )
                .offset(off)
                .build();
                self.submit(sqe)
                    .map_err(|e| self.io_err("writing journal", e))? as usize
            } else {
                // SAFETY: the iovecs point into `parts`, alive for this call; the fd is ours and open.
                let r = unsafe {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len() as i32,
                        off as libc::off_t,
                    )
                };
                if r < 0 {
                    return Err(self.io_err("writing journal", std::io::Error::last_os_error()));
                }
                r as usize
            };
            if n == 0 {
                return Err(self.io_err("writing journal", std::io::ErrorKind::WriteZero.into()));
            }
            done += n;
        }
        self.len += total as u64;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if self.ring.is_some() {
            let sqe = io_uring::opcode::Fsync::new(io_uring::types::Fd(self.file.as_raw_fd()))
                .flags(io_uring::types::FsyncFlags::DATASYNC)
                .build();
            self.submit(sqe)
                .map_err(|e| self.io_err("syncing journal", e))?;
            Ok(())
        } else {
            self.file
                .sync_data()
                .map_err(|e| self.io_err("syncing journal", e))
        }
    }
}

/// A complete epoch found in its journal: the end marker, each chunk frame's `(offset, length)` by seq, and
/// the sending session.
type JournaledEpoch = (EpochEnd, BTreeMap<u32, (u64, usize)>, u64);

/// Test hook: abort the process halfway through applying this epoch (see `endophyte backup --crash-during-apply`).
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashPoint {
    /// Epoch during whose apply to abort.
    pub during_apply: Option<u64>,
    /// Abort with a switchover prepared (VMM started, VM restored, not yet answered).
    pub during_switchover: bool,
}

/// One VM's replica on a backup. See the module docs.
pub struct ReplicaStore {
    dir: PathBuf,
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
    use_uring: bool,
    crash: CrashPoint,
    /// vCPU and device state of the committed epoch, when its end marker carried one.
    vm_state: Option<bytes::Bytes>,
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
        let state_path = dir.join("state.json");
        let (committed, committed_session, vm_state) = match std::fs::read(&state_path) {
            Ok(bytes) => {
                let s: State = serde_json::from_slice(&bytes).map_err(|e| StoreError::State {
                    path: state_path.clone(),
                    why: e.to_string(),
                })?;
                if s.vm_id != vm_id || s.mem_bytes != mem_bytes || s.page_size != page_size {
                    return Err(StoreError::Mismatch {
                        path: state_path,
                        have_vm: s.vm_id,
                        have_bytes: s.mem_bytes,
                        have_page: s.page_size,
                        want_vm: vm_id.into(),
                        want_bytes: mem_bytes,
                        want_page: page_size,
                    });
                }
                (
                    s.checkpoint_epoch,
                    s.checkpoint_session,
                    s.vcpu_state.map(|v| {
                        bytes::Bytes::from(serde_json::to_vec(&v).expect("JSON values serialize"))
                    }),
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0, None),
            Err(e) => return Err(io("reading", &state_path)(e)),
        };
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
        let use_uring = io_uring::IoUring::new(2).is_ok();
        if !use_uring {
            tracing::warn!("io_uring unavailable here; the journal uses pwritev/fdatasync");
        }
        let mut store = Self {
            dir: dir.to_owned(),
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
            use_uring,
            crash,
            vm_state,
        };
        if !state_path.exists() {
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
    pub fn image_path(&self) -> PathBuf {
        self.dir.join("replica.img")
    }

    /// The VM's vCPU and device state at the committed epoch's pause, if its end marker carried one:
    /// with `replica.img`, what starting the VM from this epoch needs (promote).
    pub fn vm_state(&self) -> Option<&bytes::Bytes> {
        self.vm_state.as_ref()
    }

    /// Whether journal writes go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.use_uring
    }

    fn journal_path(&self, epoch: u64) -> PathBuf {
        self.dir.join("journal").join(format!("{epoch:020}.ejl"))
    }

    fn open_journal(&mut self, epoch: u64, session: u64) -> Result<(), StoreError> {
        if !self.journals.contains_key(&epoch) {
            let mut a = Appender::create(self.journal_path(epoch), self.use_uring)?;
            let hello = Message::Hello(Hello {
                session,
                path: 0,
                page_size: self.page_size as u32,
                mem_bytes: self.mem_bytes,
                vm_id: self.vm_id.clone(),
            })
            .encode();
            a.append(&[&hello.head])?;
            a.session = session;
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
        Ok(())
    }

    /// Commits an epoch whose chunks are all journaled and verified (by the [`endophyte_wire::Receiver`]):
    /// journal the end marker and fsync (the commit point), then write the chunks into the replica. The
    /// journal stays until a checkpoint covers the epoch.
    ///
    /// # Errors
    /// [`StoreError`]; if it fails before the fsync the replica still holds the previous epoch.
    pub fn commit(&mut self, end: &EpochEnd, session: u64) -> Result<(), StoreError> {
        let epoch = end.epoch;
        let path = self.journal_path(epoch);
        // An epoch with no dirty pages has no chunks, hence no journal yet.
        self.open_journal(epoch, session)?;
        let mut j = self.journals.remove(&epoch).expect("just opened");
        let frame: EncodedFrame = Message::EpochEnd(end.clone()).encode();
        j.append(&[&frame.head])?;
        let t0 = std::time::Instant::now();
        j.sync()?;
        let synced = t0.elapsed();
        let (index, session) = (std::mem::take(&mut j.index), j.session);
        drop(j);
        self.apply_chunks(&path, end, &index, session)?;
        tracing::debug!(epoch, ?synced, total = ?t0.elapsed(), "epoch committed");
        Ok(())
    }

    /// Forgets a staged epoch.
    pub fn discard(&mut self, epoch: u64) {
        self.journals.remove(&epoch);
        let _ = std::fs::remove_file(self.journal_path(epoch));
    }

    /// Scans a journal frame by frame (one frame in memory at a time); returns its end marker and where each
    /// chunk frame lies, if it holds a complete epoch whose page count and epoch hash match its chunks.
    fn read_journal(&self, path: &Path) -> Result<Option<JournaledEpoch>, StoreError> {
        let io = |source| StoreError::Io {
            op: "reading journal",
            path: path.to_owned(),
            source,
        };
        let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
        let mut chunks = BTreeMap::new();
        let (mut hashes, mut pages) = (BTreeMap::new(), 0u64);
        let mut end = None;
        let mut session = 0;
        let mut offset = 0u64;
        // A torn or corrupt tail ends the journal: whatever follows was never made durable.
        loop {
            let mut head = [0u8; HEADER_BYTES];
            if r.read_exact(&mut head).is_err() {
                break;
            }
            let Ok(h) = FrameHeader::parse(&head, DEFAULT_MAX_PAYLOAD_BYTES) else {
                break;
            };
            let mut payload = vec![0u8; h.len as usize];
            if r.read_exact(&mut payload).is_err() {
                break;
            }
            let len = HEADER_BYTES + payload.len();
            match Message::from_parts(&head, &h, payload.into()) {
                Ok(Message::Chunk { seq, chunk }) => {
                    chunks.insert(seq, (offset, len));
                    hashes.insert(seq, chunk.content_hash);
                    pages += u64::from(chunk.n_pages);
                }
                Ok(Message::EpochEnd(e)) => end = Some(e),
                Ok(Message::Hello(h)) => session = h.session,
                _ => break,
            }
            offset += len as u64;
        }
        let Some(end) = end else { return Ok(None) };
        let complete = chunks.len() as u64 == u64::from(end.chunk_count)
            && chunks
                .keys()
                .next_back()
                .is_none_or(|&s| s + 1 == end.chunk_count);
        if !complete
            || pages != end.page_count
            || epoch_hash(pages, hashes.values()) != end.epoch_hash
        {
            return Ok(None);
        }
        Ok(Some((end, chunks, session)))
    }

    fn apply_journal(&mut self, path: &Path, epoch: u64) -> Result<(), StoreError> {
        let Some((end, chunks, session)) = self.read_journal(path)? else {
            return Err(StoreError::Journal {
                path: path.to_owned(),
                why: format!("epoch {epoch} journal is incomplete"),
            });
        };
        self.apply_chunks(path, &end, &chunks, session)
    }

    /// Writes the chunks of a durable journal into the replica, in seq order.
    fn apply_chunks(
        &mut self,
        path: &Path,
        end: &EpochEnd,
        chunks: &BTreeMap<u32, (u64, usize)>,
        session: u64,
    ) -> Result<(), StoreError> {
        let epoch = end.epoch;
        let journal = File::open(path).map_err(|source| StoreError::Io {
            op: "opening journal",
            path: path.to_owned(),
            source,
        })?;
        let mut writer = RunWriter::new(&self.file, self.image_path());
        let zero = vec![0u8; self.page_size as usize];
        let half = chunks.len() / 2;
        for (i, (seq, &(offset, len))) in chunks.iter().enumerate() {
            if self.crash.during_apply == Some(epoch) && i == half {
                tracing::error!(
                    epoch,
                    "crash point reached halfway through applying; aborting"
                );
                std::process::abort();
            }
            let bad = |why: String| StoreError::Journal {
                path: path.to_owned(),
                why: format!("chunk {seq}: {why}"),
            };
            let mut buf = vec![0u8; len];
            journal
                .read_exact_at(&mut buf, offset)
                .map_err(|e| bad(e.to_string()))?;
            let head: [u8; HEADER_BYTES] = buf[..HEADER_BYTES].try_into().expect("header");
            let h = FrameHeader::parse(&head, DEFAULT_MAX_PAYLOAD_BYTES)
                .map_err(|e| bad(e.to_string()))?;
            let payload = bytes::Bytes::from(buf).slice(HEADER_BYTES..);
            let Ok(Message::Chunk { chunk, .. }) = Message::from_parts(&head, &h, payload) else {
                return Err(bad("not a chunk frame".into()));
            };
            // Its hash was checked when it arrived, and the frame CRC was checked just now.
            let d = chunk
                .decode_verified_earlier(self.page_size, self.mem_bytes)
                .map_err(|e| bad(e.to_string()))?;
            for (gpa, data) in d.pages() {
                writer.page(gpa, data.unwrap_or(&zero))?;
            }
        }
        writer.flush()?;
        self.committed = end.epoch;
        self.committed_session = session;
        self.vm_state = (!end.state.is_empty()).then(|| end.state.clone());
        self.applied.push(path.to_owned());
        Ok(())
    }

    /// Epoch `replica.img` holds durably (the last checkpoint).
    pub fn checkpoint_epoch(&self) -> u64 {
        self.checkpoint
    }

    fn state(&self) -> State {
        State {
            vm_id: self.vm_id.clone(),
            mem_bytes: self.mem_bytes,
            page_size: self.page_size,
            checkpoint_epoch: self.committed,
            checkpoint_session: self.committed_session,
            vcpu_state: self
                .vm_state
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok()),
        }
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
        let (dir, state, journals) = (
            self.dir.clone(),
            self.state(),
            std::mem::take(&mut self.applied),
        );
        let img = self.image_path();
        self.last_checkpoint = std::time::Instant::now();
        self.checkpointing = Some(std::thread::spawn(move || {
            checkpoint(&file, &img, &dir, &state, &journals)
        }));
    }

    /// Checkpoints now and waits: the replica file holds the committed epoch durably when this returns.
    ///
    /// # Errors
    /// [`StoreError::Io`] if syncing or recording fails (the journals are kept).
    pub fn checkpoint_now(&mut self) -> Result<(), StoreError> {
        self.reap_checkpoint(true);
        let journals = std::mem::take(&mut self.applied);
        let r = checkpoint(
            &self.file,
            &self.image_path(),
            &self.dir,
            &self.state(),
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
                if let Some((end, _, _)) = self.read_journal(&path)? {
                    if end.base_epoch <= self.committed {
                        tracing::info!(epoch, "redoing a committed journal left by a crash");
                        self.apply_journal(&path, epoch)?;
                        continue;
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }
}

/// Makes `file` (the replica, at `img`) durable, records `state` in `dir/state.json` atomically, then deletes
/// `journals` (all covered by the state). Returns the checkpointed epoch.
fn checkpoint(
    file: &File,
    img: &Path,
    dir: &Path,
    state: &State,
    journals: &[PathBuf],
) -> Result<u64, StoreError> {
    let t0 = std::time::Instant::now();
    // fdatasync writes back every dirty page-cache page of the replica.
    file.sync_data().map_err(|source| StoreError::Io {
        op: "syncing",
        path: img.to_owned(),
        source,
    })?;
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let io = |op| {
        let path = path.clone();
        move |source| StoreError::Io { op, path, source }
    };
    let mut f = File::create(&tmp).map_err(io("writing"))?;
    f.write_all(&serde_json::to_vec(state).expect("state serializes"))
        .map_err(io("writing"))?;
    f.sync_all().map_err(io("syncing"))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory of"))?;
    for j in journals {
        let _ = std::fs::remove_file(j);
    }
    tracing::debug!(epoch = state.checkpoint_epoch, took = ?t0.elapsed(), "checkpoint");
    Ok(state.checkpoint_epoch)
}

/// Writes pages to the replica file, coalescing runs of consecutive pages into one `pwrite` each.
struct RunWriter<'a> {
    file: &'a File,
    path: PathBuf,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> RunWriter<'a> {
    const MAX_RUN_BYTES: usize = 1 << 20;

    fn new(file: &'a File, path: PathBuf) -> Self {
        Self {
            file,
            path,
            start: 0,
            buf: Vec::with_capacity(Self::MAX_RUN_BYTES),
        }
    }

    fn page(&mut self, gpa: u64, data: &[u8]) -> Result<(), StoreError> {
        let contiguous = self.start + self.buf.len() as u64 == gpa;
        if !self.buf.is_empty()
            && (!contiguous || self.buf.len() + data.len() > Self::MAX_RUN_BYTES)
        {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.start = gpa;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.start)
                .map_err(|source| StoreError::Io {
                    op: "writing",
                    path: self.path.clone(),
                    source,
                })?;
            self.buf.clear();
        }
        Ok(())
    }
}
