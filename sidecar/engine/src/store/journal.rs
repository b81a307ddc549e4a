//! Per-epoch journals: `journal/<epoch>.ejl`, the epoch's frames as they arrived (a Hello naming the
//! sending session, the Chunk frames, then the EpochEnd frame at commit), appended with pwritev and made
//! durable with fdatasync; and the scan that tells a complete, verifiable journal from a torn one.
//!
//! Each append waits for its write anyway, so io_uring (used before 2026-12-02, one ring per epoch)
//! bought nothing, and once left a backup's replica thread waiting 20 minutes for a buffered write's
//! completion that never came (a bench run on this project's nested kernel); a plain system call
//! cannot be stranded that way.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use endophyte_wire::frame::{FrameHeader, DEFAULT_MAX_PAYLOAD_BYTES, HEADER_BYTES};
use endophyte_wire::msg::epoch_hash;
use endophyte_wire::{EpochEnd, Message, PageChunk};

use super::StoreError;

/// How many chunk body bytes an epoch keeps in memory for its commit: an ordinary epoch's delta fits; a
/// resync epoch (all of guest RAM) does not, and is applied from its journal instead, so that a backup's
/// memory does not grow with the guest's.
pub(super) const HELD_BYTES_MAX: usize = 64 << 20;

/// Appends to a file with pwritev.
pub(super) struct Appender {
    file: File,
    path: PathBuf,
    /// Bytes written so far.
    pub(super) len: u64,
    /// Where each chunk frame lies: seq -> (offset, length).
    pub(super) index: BTreeMap<u32, (u64, usize)>,
    /// The verified chunks themselves, by seq, until the commit applies them (a retransmitted chunk
    /// replaces its first copy, as good as it); emptied for good once they exceed [`HELD_BYTES_MAX`]
    /// (`spilled`): the commit then reads them back from the journal.
    pub(super) chunks: BTreeMap<u32, PageChunk>,
    /// Body bytes in `chunks`.
    pub(super) held_bytes: usize,
    /// The epoch outgrew [`HELD_BYTES_MAX`] (a resync: up to all of guest RAM).
    pub(super) spilled: bool,
    /// The session whose Hello opens the journal.
    pub(super) session: u64,
}

impl Appender {
    pub(super) fn create(path: PathBuf) -> Result<Self, StoreError> {
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
        Ok(Self {
            file,
            path,
            len: 0,
            index: BTreeMap::new(),
            chunks: BTreeMap::new(),
            held_bytes: 0,
            spilled: false,
            session: 0,
        })
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    pub(super) fn append(&mut self, parts: &[&[u8]]) -> Result<(), StoreError> {
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
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.io_err("writing journal", e));
            }
            let n = r as usize;
            if n == 0 {
                return Err(self.io_err("writing journal", std::io::ErrorKind::WriteZero.into()));
            }
            done += n;
        }
        self.len += total as u64;
        Ok(())
    }

    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("syncing journal", e))
    }
}

/// A complete epoch found in its journal: the end marker, each chunk frame's `(offset, length)` by seq, and
/// the sending session.
pub(super) type JournaledEpoch = (EpochEnd, BTreeMap<u32, (u64, usize)>, u64);

/// Scans a journal frame by frame (one frame in memory at a time); returns its end marker and where each
/// chunk frame lies, if it holds a complete epoch whose page count and epoch hash match its chunks. A torn or
/// corrupt tail ends the journal: whatever follows was never made durable.
pub(super) fn read_journal(path: &Path) -> Result<Option<JournaledEpoch>, StoreError> {
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
    if !complete || pages != end.page_count || epoch_hash(pages, hashes.values()) != end.epoch_hash
    {
        return Ok(None);
    }
    Ok(Some((end, chunks, session)))
}
