//! Applying a durable epoch to `replica.img`: its journaled chunks in seq order, each page written with
//! runs of consecutive pages coalesced into one `pwrite`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use endophyte_wire::frame::{FrameHeader, DEFAULT_MAX_PAYLOAD_BYTES, HEADER_BYTES};
use endophyte_wire::{EpochEnd, Message, PageChunk};

use super::{CrashPoint, StoreError};

/// The replica file and its geometry, for [`apply_chunks`].
pub(super) struct Image<'a> {
    pub file: &'a File,
    pub path: PathBuf,
    pub page_size: u64,
    pub mem_bytes: u64,
}

/// Reads the chunks of the journal at `journal` (frames at the given offsets, in seq order) for a redo
/// after a crash. Each frame's CRC, structure and message kind are checked.
pub(super) fn read_chunks(
    journal: &Path,
    chunks: &BTreeMap<u32, (u64, usize)>,
) -> Result<Vec<PageChunk>, StoreError> {
    let file = File::open(journal).map_err(|source| StoreError::Io {
        op: "opening journal",
        path: journal.to_owned(),
        source,
    })?;
    let mut out = Vec::with_capacity(chunks.len());
    for (seq, &(offset, len)) in chunks {
        let bad = |why: String| StoreError::Journal {
            path: journal.to_owned(),
            why: format!("chunk {seq}: {why}"),
        };
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| bad(e.to_string()))?;
        let head: [u8; HEADER_BYTES] = buf[..HEADER_BYTES].try_into().expect("header");
        let h =
            FrameHeader::parse(&head, DEFAULT_MAX_PAYLOAD_BYTES).map_err(|e| bad(e.to_string()))?;
        let payload = bytes::Bytes::from(buf).slice(HEADER_BYTES..);
        let Ok(Message::Chunk { chunk, .. }) = Message::from_parts(&head, &h, payload) else {
            return Err(bad("not a chunk frame".into()));
        };
        out.push(chunk);
    }
    Ok(out)
}

/// Writes an epoch's chunks (in seq order) into the replica. Chunks are not hashed again: at commit they
/// are the ones the receiver verified on arrival, kept in memory since; at a redo they were read back
/// under their frame CRC ([`read_chunks`]). Structure, bounds and lz4 data are checked. `journal` names
/// the epoch's journal in errors.
pub(super) fn apply_chunks(
    image: &Image<'_>,
    journal: &Path,
    end: &EpochEnd,
    chunks: &[PageChunk],
    crash: CrashPoint,
) -> Result<Vec<u64>, StoreError> {
    let epoch = end.epoch;
    let mut writer = RunWriter::new(image.file, image.path.clone());
    let zero = vec![0u8; image.page_size as usize];
    let half = chunks.len() / 2;
    let mut written = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        // At the first epoch at or above the one asked for that carries pages: a backup that fell behind
        // gets its catch-up as one epoch, whose number can step over the one asked for.
        if crash.during_apply.is_some_and(|c| epoch >= c) && i == half {
            tracing::error!(
                epoch,
                "crash point reached halfway through applying; aborting"
            );
            std::process::abort();
        }
        let d = chunk
            .decode_verified_earlier(image.page_size, image.mem_bytes)
            .map_err(|e| StoreError::Journal {
                path: journal.to_owned(),
                why: format!("chunk {i}: {e}"),
            })?;
        for (gpa, data) in d.pages() {
            writer.page(gpa, data.unwrap_or(&zero))?;
            written.push(gpa);
        }
    }
    writer.flush()?;
    Ok(written)
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
