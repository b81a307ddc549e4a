//! Writing a migration stream back: the recorded prefix (header, configuration) and RAM section start, then
//! every page of every RAM block from a replica, then the recorded device tail. What a QEMU started with
//! `-incoming` loads as the VM at the epoch the replica holds.

use std::io::Write;

use super::{flag, section, RamBlock, TARGET_PAGE_SIZE};

/// Writes a stream into `w`, page by page. Call [`Writer::begin`], then [`Writer::page`] or
/// [`Writer::zero`] for each page (any order), then [`Writer::finish`].
pub struct Writer<W: Write> {
    w: W,
    blocks: Vec<RamBlock>,
    section_id: u32,
    current: Option<usize>,
    written: u64,
}

impl<W: Write> Writer<W> {
    /// Writes `prefix` and `ram_start` (as recorded from a stream QEMU wrote, with the blocks it lists and
    /// its RAM section id), and opens the section that carries the pages.
    ///
    /// # Errors
    /// Writing failed.
    pub fn begin(
        mut w: W,
        prefix: &[u8],
        ram_start: &[u8],
        blocks: &[RamBlock],
        section_id: u32,
    ) -> std::io::Result<Self> {
        w.write_all(prefix)?;
        w.write_all(ram_start)?;
        w.write_all(&[section::PART])?;
        w.write_all(&section_id.to_be_bytes())?;
        Ok(Self {
            w,
            blocks: blocks.to_vec(),
            section_id,
            current: None,
            written: (prefix.len() + ram_start.len() + 5) as u64,
        })
    }

    fn record(&mut self, block: usize, offset: u64, kind: u64) -> std::io::Result<()> {
        debug_assert_eq!(offset % TARGET_PAGE_SIZE as u64, 0);
        let cont = self.current == Some(block);
        let word = offset | kind | if cont { flag::CONTINUE } else { 0 };
        self.w.write_all(&word.to_be_bytes())?;
        self.written += 8;
        if !cont {
            let name = self.blocks[block].name.as_bytes();
            self.w.write_all(&[name.len() as u8])?;
            self.w.write_all(name)?;
            self.written += 1 + name.len() as u64;
            self.current = Some(block);
        }
        Ok(())
    }

    /// A page of block `block` at byte `offset`.
    ///
    /// # Errors
    /// Writing failed.
    pub fn page(&mut self, block: usize, offset: u64, data: &[u8]) -> std::io::Result<()> {
        debug_assert_eq!(data.len(), TARGET_PAGE_SIZE);
        self.record(block, offset, flag::PAGE)?;
        self.w.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// A page of zeroes of block `block` at byte `offset`.
    ///
    /// # Errors
    /// Writing failed.
    pub fn zero(&mut self, block: usize, offset: u64) -> std::io::Result<()> {
        self.record(block, offset, flag::ZERO)?;
        self.w.write_all(&[0])?;
        self.written += 1;
        Ok(())
    }

    /// Hands what is buffered to the underlying writer (the stream stays open for more pages).
    ///
    /// # Errors
    /// Writing failed.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }

    /// Closes the RAM sections and writes the recorded device `tail`; returns the writer and the bytes
    /// written in all.
    ///
    /// # Errors
    /// Writing failed.
    pub fn finish(mut self, tail: &[u8]) -> std::io::Result<(W, u64)> {
        let id = self.section_id.to_be_bytes();
        let eos = flag::EOS.to_be_bytes();
        for kind in [section::PART, section::END] {
            if kind == section::END {
                self.w.write_all(&[section::END])?;
                self.w.write_all(&id)?;
            }
            self.w.write_all(&eos)?;
            self.w.write_all(&[section::FOOTER])?;
            self.w.write_all(&id)?;
        }
        self.w.write_all(tail)?;
        self.written += 2 * 13 + 5 + tail.len() as u64;
        self.w.flush()?;
        Ok((self.w, self.written))
    }
}
