//! Page chunks: a run of guest pages of one epoch, zero pages elided, the rest lz4-compressed.
//!
//! Body layout (all little-endian):
//!
//! ```text
//! n_pages x u64  page entries: gpa | flags, gpa a multiple of the page size, flags in the low bits
//!                (bit 0: ZERO, the page is all zeroes and carries no data); gpas strictly increasing
//! ...            data: the non-zero pages back to back (raw_len = non-zero pages x page size bytes),
//!                lz4 block-compressed when the chunk's `compressed` flag is set, raw otherwise
//! ```
//!
//! The chunk's content hash is BLAKE3 over `epoch (u64) | n_pages (u32) | entries | raw data`, so a chunk
//! cannot be replayed into another epoch, and a receiver checks it after decompressing.

use bytes::Bytes;

/// Entry flag: the page is all zeroes; no data follows for it.
pub const ENTRY_ZERO: u64 = 1;
const ENTRY_FLAGS: u64 = 0xfff;
/// Most pages one chunk may carry.
pub const MAX_CHUNK_PAGES: u32 = 1024;
/// Most uncompressed page data one chunk may carry: 1 MiB.
pub const MAX_CHUNK_RAW_BYTES: u32 = 1 << 20;

/// Why a chunk was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChunkError {
    /// The chunk claims more pages or bytes than a chunk may carry.
    #[error("chunk of epoch {epoch} claims {n_pages} pages / {raw_len} raw bytes, over the cap of {MAX_CHUNK_PAGES} pages / {MAX_CHUNK_RAW_BYTES} bytes")]
    TooLarge {
        /// Epoch of the chunk.
        epoch: u64,
        /// Pages claimed.
        n_pages: u32,
        /// Raw bytes claimed.
        raw_len: u32,
    },
    /// The body is shorter than its page entries.
    #[error(
        "chunk of epoch {epoch} is truncated: {n_pages} entries need {need} bytes, body has {have}"
    )]
    Truncated {
        /// Epoch of the chunk.
        epoch: u64,
        /// Pages claimed.
        n_pages: u32,
        /// Bytes the entries need.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A page entry is not page-aligned, has unknown flags, is out of order or outside guest RAM.
    #[error("chunk of epoch {epoch}: bad page entry {index} (gpa {gpa:#x}): {why}")]
    BadEntry {
        /// Epoch of the chunk.
        epoch: u64,
        /// Index of the entry.
        index: usize,
        /// The gpa it names.
        gpa: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The data length does not match the non-zero page count.
    #[error("chunk of epoch {epoch}: {nonzero} non-zero pages need {need} data bytes but raw_len is {raw_len}")]
    LengthMismatch {
        /// Epoch of the chunk.
        epoch: u64,
        /// Non-zero pages.
        nonzero: usize,
        /// Bytes they need.
        need: u64,
        /// The chunk's raw_len.
        raw_len: u32,
    },
    /// The compressed data did not decompress to exactly `raw_len` bytes.
    #[error("chunk of epoch {epoch}: lz4 data is corrupt: {why}")]
    Decompress {
        /// Epoch of the chunk.
        epoch: u64,
        /// The decoder's complaint.
        why: String,
    },
    /// The content does not hash to the chunk's content hash.
    #[error("chunk of epoch {epoch}: content hash mismatch (corrupted chunk)")]
    HashMismatch {
        /// Epoch of the chunk.
        epoch: u64,
    },
}

/// One chunk as it travels: compressed body plus the metadata needed to check it.
///
/// Cheap to clone (the body is reference-counted), so one encoded chunk can be sent to every backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageChunk {
    /// Epoch the pages belong to.
    pub epoch: u64,
    /// Number of page entries.
    pub n_pages: u32,
    /// Bytes of uncompressed page data (non-zero pages x page size).
    pub raw_len: u32,
    /// Whether the data part of the body is lz4 block-compressed.
    pub compressed: bool,
    /// BLAKE3 of the logical content (see the module docs).
    pub content_hash: [u8; 32],
    /// Entries, then data.
    pub body: Bytes,
}

impl PageChunk {
    /// Bytes this chunk occupies on the wire, excluding frame and message headers.
    pub fn body_bytes(&self) -> usize {
        self.body.len()
    }

    /// Checks the chunk against a guest of `mem_bytes` bytes with `page_size`-byte pages and returns its pages.
    ///
    /// # Errors
    /// Any [`ChunkError`]: caps, entries, lengths, lz4 data, content hash.
    pub fn decode(&self, page_size: u64, mem_bytes: u64) -> Result<DecodedChunk, ChunkError> {
        self.decode_checked(page_size, mem_bytes, true)
    }

    /// As [`PageChunk::decode`] but without recomputing the content hash, for a chunk whose hash was
    /// already verified and that has been carried since under a CRC (a backup applying its own journal).
    /// Structure, bounds and lz4 data are still checked.
    ///
    /// # Errors
    /// Any [`ChunkError`] but [`ChunkError::HashMismatch`].
    pub fn decode_verified_earlier(
        &self,
        page_size: u64,
        mem_bytes: u64,
    ) -> Result<DecodedChunk, ChunkError> {
        self.decode_checked(page_size, mem_bytes, false)
    }

    fn decode_checked(
        &self,
        page_size: u64,
        mem_bytes: u64,
        verify_hash: bool,
    ) -> Result<DecodedChunk, ChunkError> {
        let epoch = self.epoch;
        if self.n_pages > MAX_CHUNK_PAGES || self.raw_len > MAX_CHUNK_RAW_BYTES {
            return Err(ChunkError::TooLarge {
                epoch,
                n_pages: self.n_pages,
                raw_len: self.raw_len,
            });
        }
        let n = self.n_pages as usize;
        let need = n * 8;
        if self.body.len() < need {
            return Err(ChunkError::Truncated {
                epoch,
                n_pages: self.n_pages,
                need,
                have: self.body.len(),
            });
        }
        let mut entries = Vec::with_capacity(n);
        let mut nonzero = 0usize;
        let mut prev: Option<u64> = None;
        for (index, raw) in self.body[..need].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(raw.try_into().expect("8 bytes"));
            let gpa = e & !ENTRY_FLAGS;
            let bad = |why| ChunkError::BadEntry {
                epoch,
                index,
                gpa,
                why,
            };
            if e & ENTRY_FLAGS & !ENTRY_ZERO != 0 {
                return Err(bad("unknown flag bits"));
            }
            if gpa % page_size != 0 {
                return Err(bad("not page-aligned"));
            }
            if gpa.checked_add(page_size).is_none_or(|end| end > mem_bytes) {
                return Err(bad("outside guest RAM"));
            }
            if prev.is_some_and(|p| gpa <= p) {
                return Err(bad("gpas not strictly increasing"));
            }
            prev = Some(gpa);
            if e & ENTRY_ZERO == 0 {
                nonzero += 1;
            }
            entries.push(e);
        }
        let need_data = nonzero as u64 * page_size;
        if need_data != u64::from(self.raw_len) {
            return Err(ChunkError::LengthMismatch {
                epoch,
                nonzero,
                need: need_data,
                raw_len: self.raw_len,
            });
        }
        let payload = &self.body[need..];
        let data = if self.compressed {
            let mut out = vec![0u8; self.raw_len as usize];
            let got = lz4_flex::block::decompress_into(payload, &mut out).map_err(|e| {
                ChunkError::Decompress {
                    epoch,
                    why: e.to_string(),
                }
            })?;
            if got != out.len() {
                return Err(ChunkError::Decompress {
                    epoch,
                    why: format!("{got} bytes out, {} expected", out.len()),
                });
            }
            out
        } else {
            if payload.len() != self.raw_len as usize {
                return Err(ChunkError::LengthMismatch {
                    epoch,
                    nonzero,
                    need: payload.len() as u64,
                    raw_len: self.raw_len,
                });
            }
            payload.to_vec()
        };
        if verify_hash
            && content_hash(epoch, self.n_pages, &self.body[..need], &data) != self.content_hash
        {
            return Err(ChunkError::HashMismatch { epoch });
        }
        Ok(DecodedChunk {
            page_size,
            entries,
            data,
        })
    }
}

fn content_hash(epoch: u64, n_pages: u32, entries: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&n_pages.to_le_bytes());
    h.update(entries);
    h.update(data);
    *h.finalize().as_bytes()
}

/// A checked chunk's pages, ready to apply.
#[derive(Debug)]
pub struct DecodedChunk {
    page_size: u64,
    entries: Vec<u64>,
    data: Vec<u8>,
}

impl DecodedChunk {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the chunk carries no pages.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pages in gpa order: `(gpa, Some(bytes))` for data pages, `(gpa, None)` for zero pages.
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        let ps = self.page_size as usize;
        let mut off = 0usize;
        self.entries.iter().map(move |&e| {
            let gpa = e & !ENTRY_FLAGS;
            if e & ENTRY_ZERO != 0 {
                (gpa, None)
            } else {
                let page = &self.data[off..off + ps];
                off += ps;
                (gpa, Some(page))
            }
        })
    }
}

/// Whether every byte of `page` is zero. Word-wise, so it runs at memory speed.
pub fn is_zero_page(page: &[u8]) -> bool {
    // OR 64-byte blocks together eight words at a time; the compiler turns this into vector loads.
    let mut blocks = page.chunks_exact(64);
    let blocks_zero = blocks.by_ref().all(|block| {
        block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        }) == 0
    });
    blocks_zero && blocks.remainder().iter().all(|&b| b == 0)
}

/// Builds one chunk from pages pushed in increasing gpa order.
#[derive(Debug)]
pub struct ChunkBuilder {
    epoch: u64,
    page_size: usize,
    max_pages: u32,
    entries: Vec<u8>,
    raw: Vec<u8>,
    n_pages: u32,
}

impl ChunkBuilder {
    /// A builder for epoch `epoch`, pages of `page_size` bytes, at most `max_pages` per chunk
    /// (clamped to [`MAX_CHUNK_PAGES`] and to [`MAX_CHUNK_RAW_BYTES`] of data).
    pub fn new(epoch: u64, page_size: usize, max_pages: u32) -> Self {
        let cap = (MAX_CHUNK_RAW_BYTES as usize / page_size) as u32;
        let max_pages = max_pages.clamp(1, MAX_CHUNK_PAGES.min(cap));
        Self {
            epoch,
            page_size,
            max_pages,
            entries: Vec::with_capacity(max_pages as usize * 8),
            raw: Vec::with_capacity(max_pages as usize * page_size),
            n_pages: 0,
        }
    }

    /// Pages in the chunk so far.
    pub fn len(&self) -> u32 {
        self.n_pages
    }

    /// Whether no page was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.n_pages == 0
    }

    /// Whether the chunk has reached its page cap.
    pub fn is_full(&self) -> bool {
        self.n_pages >= self.max_pages
    }

    /// Adds the page at `gpa`; an all-zero page is recorded as an entry with no data.
    ///
    /// # Panics
    /// If the chunk is full or `page` is not one page long.
    pub fn push(&mut self, gpa: u64, page: &[u8]) {
        assert!(!self.is_full(), "chunk is full");
        assert_eq!(page.len(), self.page_size, "page of the wrong size");
        if is_zero_page(page) {
            self.entries
                .extend_from_slice(&(gpa | ENTRY_ZERO).to_le_bytes());
        } else {
            self.entries.extend_from_slice(&gpa.to_le_bytes());
            self.raw.extend_from_slice(page);
        }
        self.n_pages += 1;
    }

    /// Seals the chunk: hashes it and, if `compress` and it helps, lz4-compresses the data.
    /// The builder is left empty for the next chunk of the same epoch.
    pub fn finish(&mut self, compress: bool) -> PageChunk {
        let hash = content_hash(self.epoch, self.n_pages, &self.entries, &self.raw);
        let mut body = std::mem::take(&mut self.entries);
        let mut compressed = false;
        if compress && !self.raw.is_empty() {
            let bound = lz4_flex::block::get_maximum_output_size(self.raw.len());
            let start = body.len();
            body.resize(start + bound, 0);
            let n = lz4_flex::block::compress_into(&self.raw, &mut body[start..])
                .expect("buffer sized by get_maximum_output_size");
            if n < self.raw.len() {
                body.truncate(start + n);
                compressed = true;
            } else {
                body.truncate(start);
            }
        }
        if !compressed {
            body.extend_from_slice(&self.raw);
        }
        let chunk = PageChunk {
            epoch: self.epoch,
            n_pages: self.n_pages,
            raw_len: self.raw.len() as u32,
            compressed,
            content_hash: hash,
            body: Bytes::from(body),
        };
        self.entries = Vec::with_capacity(self.max_pages as usize * 8);
        self.raw.clear();
        self.n_pages = 0;
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: usize = 4096;

    fn page(seed: u8, zero: bool) -> Vec<u8> {
        if zero {
            vec![0; PS]
        } else {
            (0..PS)
                .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                .collect()
        }
    }

    proptest! {
        #[test]
        fn round_trips(pages in proptest::collection::vec((any::<u8>(), any::<bool>()), 1..64), compress: bool) {
            let mut b = ChunkBuilder::new(7, PS, 64);
            let content: Vec<(u64, Vec<u8>)> = pages.iter().enumerate()
                .map(|(i, &(s, z))| ((i as u64) * 3 * PS as u64, page(s | 1, z))).collect();
            for (gpa, p) in &content {
                b.push(*gpa, p);
            }
            let chunk = b.finish(compress);
            let d = chunk.decode(PS as u64, 1 << 30).unwrap();
            let got: Vec<(u64, Vec<u8>)> = d.pages().map(|(g, p)| (g, p.map(|p| p.to_vec()).unwrap_or_else(|| vec![0; PS]))).collect();
            prop_assert_eq!(got, content);
        }
    }

    #[test]
    fn zero_pages_cost_only_their_entry() {
        let mut b = ChunkBuilder::new(1, PS, 64);
        for i in 0..64 {
            b.push(i * PS as u64, &[0u8; PS]);
        }
        let c = b.finish(true);
        assert_eq!(c.raw_len, 0);
        assert_eq!(c.body.len(), 64 * 8);
    }

    #[test]
    fn any_flipped_body_bit_is_caught() {
        let mut b = ChunkBuilder::new(3, PS, 8);
        for i in 0..8u8 {
            b.push(u64::from(i) * PS as u64, &page(i + 1, i == 4));
        }
        let c = b.finish(true);
        for pos in (0..c.body.len()).step_by(97) {
            let mut body = c.body.to_vec();
            body[pos] ^= 0x04;
            let bad = PageChunk {
                body: body.into(),
                ..c.clone()
            };
            assert!(
                bad.decode(PS as u64, 1 << 30).is_err(),
                "flip at {pos} not caught"
            );
        }
    }

    #[test]
    fn a_chunk_cannot_move_to_another_epoch() {
        let mut b = ChunkBuilder::new(3, PS, 8);
        b.push(0, &page(9, false));
        let c = b.finish(false);
        let moved = PageChunk { epoch: 4, ..c };
        assert_eq!(
            moved.decode(PS as u64, 1 << 30).unwrap_err(),
            ChunkError::HashMismatch { epoch: 4 }
        );
    }

    #[test]
    fn entries_outside_ram_are_refused() {
        let mut b = ChunkBuilder::new(3, PS, 8);
        b.push(1 << 20, &page(9, false));
        let c = b.finish(false);
        let e = c.decode(PS as u64, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("outside guest RAM"), "{e}");
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PS + 3];
        assert!(is_zero_page(&p[1..PS + 1]));
        p[PS] = 1;
        assert!(!is_zero_page(&p[1..PS + 1]));
        p[PS] = 0;
        p[1] = 1;
        assert!(!is_zero_page(&p[1..PS + 1]));
    }
}
