//! The stream parser: sans-IO, bytes in ([`Parser::push`]), records out ([`Parser::poll`]), the end checked
//! by [`Parser::finish`]. Every length is checked against what arrived and against a cap before anything
//! is taken; an error names the byte offset and the section.

use bytes::{Bytes, BytesMut};

use super::{
    flag, section, RamBlock, Record, StreamError, FLAG_MASK, MAGIC, TARGET_PAGE_SIZE, VERSION,
};

/// Most RAM blocks a block list may name.
pub const MAX_BLOCKS: usize = 1024;
/// Largest device tail accepted, bytes.
pub const MAX_TAIL_BYTES: usize = 64 << 20;
/// Longest machine type name accepted, bytes.
const MAX_NAME_BYTES: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Configuration,
    Sections,
    /// Inside a RAM PART or END section: page records until EOS.
    RamData,
    Tail,
}

/// Not enough bytes yet: try again after the next [`Parser::push`].
struct Incomplete;

/// A cursor over the unconsumed bytes; reads fail with `Incomplete` rather than run past the end.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Incomplete> {
        if self.b.len() - self.at < n {
            return Err(Incomplete);
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Incomplete> {
        Ok(self.take(1)?[0])
    }
    fn be32(&mut self) -> Result<u32, Incomplete> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn be64(&mut self) -> Result<u64, Incomplete> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn peek(&self) -> Result<u8, Incomplete> {
        self.b.get(self.at).copied().ok_or(Incomplete)
    }
}

/// A QEMU migration stream parser. See the module docs.
pub struct Parser {
    buf: BytesMut,
    /// Stream offset of `buf[0]`.
    consumed: u64,
    state: State,
    blocks: Vec<RamBlock>,
    ram_section: Option<u32>,
    /// The block of the last page record (for CONTINUE).
    current: Option<usize>,
    tail: BytesMut,
    pending: Option<Record>,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

enum Step {
    Record(Record),
    Consumed,
}

impl Parser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            consumed: 0,
            state: State::Header,
            blocks: Vec::new(),
            ram_section: None,
            current: None,
            tail: BytesMut::new(),
            pending: None,
        }
    }

    /// The RAM blocks, once the block list was parsed.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Bytes of the stream consumed so far.
    pub fn offset(&self) -> u64 {
        self.consumed
    }

    /// More of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.state == State::Tail {
            self.tail.extend_from_slice(bytes);
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn error(&self, at: usize, what: impl Into<String>) -> StreamError {
        let section = match self.state {
            State::Header => "header",
            State::Configuration => "configuration",
            State::Sections => "section header",
            State::RamData => "ram",
            State::Tail => "device state",
        };
        StreamError {
            offset: self.consumed + at as u64,
            section: section.into(),
            what: what.into(),
        }
    }

    /// The next record, `None` when more bytes are needed. The device tail comes from [`Parser::finish`].
    ///
    /// # Errors
    /// A [`StreamError`]: the stream is not one this parser reads, or is corrupt; nothing after it can be
    /// trusted.
    pub fn poll(&mut self) -> Result<Option<Record>, StreamError> {
        if let Some(r) = self.pending.take() {
            return Ok(Some(r));
        }
        loop {
            if self.state == State::Tail {
                if self.tail.len() > MAX_TAIL_BYTES {
                    return Err(
                        self.error(0, format!("device state exceeds {MAX_TAIL_BYTES} bytes"))
                    );
                }
                return Ok(None);
            }
            // The buffer is out of `self` while a cursor reads it, so that the steps can change the rest.
            let buf = std::mem::take(&mut self.buf);
            let mut c = Cursor { b: &buf[..], at: 0 };
            let step = match self.state {
                State::Header => self.header(&mut c),
                State::Configuration => self.configuration(&mut c),
                State::Sections => self.section(&mut c),
                State::RamData => self.ram_record(&mut c),
                State::Tail => unreachable!(),
            };
            let n = c.at;
            self.buf = buf;
            match step {
                Ok(Ok(step)) => {
                    let taken = self.buf.split_to(n);
                    self.consumed += n as u64;
                    if self.state == State::Tail {
                        // Everything after the RAM sections is the device tail, verbatim.
                        let rest = std::mem::take(&mut self.buf);
                        self.tail.extend_from_slice(&rest);
                    }
                    match step {
                        Step::Record(Record::Prefix { machine, .. }) => {
                            return Ok(Some(Record::Prefix {
                                bytes: self.prefix_bytes(taken),
                                machine,
                            }))
                        }
                        Step::Record(Record::RamStart {
                            section_id, blocks, ..
                        }) => {
                            return Ok(Some(Record::RamStart {
                                bytes: taken.freeze(),
                                section_id,
                                blocks,
                            }))
                        }
                        Step::Record(Record::Page {
                            block,
                            offset,
                            data: Some(_),
                        }) => {
                            // The page is the last TARGET_PAGE_SIZE bytes of what was taken.
                            let data = taken.freeze().slice(n - TARGET_PAGE_SIZE..);
                            return Ok(Some(Record::Page {
                                block,
                                offset,
                                data: Some(data),
                            }));
                        }
                        Step::Record(r) => return Ok(Some(r)),
                        Step::Consumed => continue,
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(Incomplete) => return Ok(None),
            }
        }
    }

    /// The header is kept until the configuration is read, so that both come out as one prefix.
    fn prefix_bytes(&mut self, taken: BytesMut) -> Bytes {
        let mut p = std::mem::take(&mut self.tail);
        p.extend_from_slice(&taken);
        p.freeze()
    }

    fn header(&mut self, c: &mut Cursor<'_>) -> Result<Result<Step, StreamError>, Incomplete> {
        let magic = c.be32()?;
        let version = c.be32()?;
        if magic != MAGIC {
            return Ok(Err(self.error(
                0,
                format!("bad magic {magic:#010x}, not \"QEVM\": not a QEMU migration stream"),
            )));
        }
        if version != VERSION {
            return Ok(Err(self.error(
                4,
                format!("stream version {version}; this reads version {VERSION}"),
            )));
        }
        // Held (in `tail`, unused until then) to come out with the configuration as one prefix.
        self.tail.extend_from_slice(&c.b[..8]);
        self.state = State::Configuration;
        Ok(Ok(Step::Consumed))
    }

    fn configuration(
        &mut self,
        c: &mut Cursor<'_>,
    ) -> Result<Result<Step, StreamError>, Incomplete> {
        if c.peek()? != section::CONFIGURATION {
            // A machine type too old to send its configuration.
            self.state = State::Sections;
            return Ok(Ok(Step::Record(Record::Prefix {
                bytes: Bytes::new(),
                machine: String::new(),
            })));
        }
        c.u8()?;
        let len = c.be32()?;
        if len == 0 || len > MAX_NAME_BYTES {
            return Ok(Err(
                self.error(1, format!("machine type name of {len} bytes"))
            ));
        }
        let name = String::from_utf8_lossy(c.take(len as usize)?).into_owned();
        // Subsections of the configuration (QEMU's vmstate_configuration).
        while c.peek()? == section::SUBSECTION {
            let at = c.at;
            c.u8()?;
            let n = c.u8()? as usize;
            let sub = String::from_utf8_lossy(c.take(n)?).into_owned();
            let _version = c.be32()?;
            match sub.as_str() {
                "configuration/target-page-bits" => {
                    let bits = c.be32()?;
                    if 1usize << bits != TARGET_PAGE_SIZE {
                        return Ok(Err(self.error(
                            at,
                            format!("target pages of 2^{bits} bytes; this reads 4 KiB pages"),
                        )));
                    }
                }
                "configuration/capabilities" => {
                    let count = c.be32()?;
                    for _ in 0..count.min(64) {
                        let n = c.u8()? as usize;
                        c.take(n)?;
                    }
                }
                "configuration/uuid" => {
                    c.take(16)?;
                }
                other => {
                    return Ok(Err(
                        self.error(at, format!("unknown configuration subsection {other:?}"))
                    ));
                }
            }
        }
        self.state = State::Sections;
        Ok(Ok(Step::Record(Record::Prefix {
            bytes: Bytes::new(),
            machine: name,
        })))
    }

    fn section(&mut self, c: &mut Cursor<'_>) -> Result<Result<Step, StreamError>, Incomplete> {
        let kind = c.peek()?;
        match kind {
            section::START => {
                c.u8()?;
                let id = c.be32()?;
                let n = c.u8()? as usize;
                let name = String::from_utf8_lossy(c.take(n)?).into_owned();
                let _instance = c.be32()?;
                let version = c.be32()?;
                if name != "ram" {
                    return Ok(Err(self.error(0, format!(
                        "iterative section {name:?} is not supported: only RAM (is block migration or a dirty-bitmap capability on?)"
                    ))));
                }
                if version != 4 {
                    return Ok(Err(
                        self.error(0, format!("RAM section version {version}; this reads 4"))
                    ));
                }
                let blocks = match self.block_list(c)? {
                    Ok(b) => b,
                    Err(e) => return Ok(Err(e)),
                };
                if let Err(e) = self.footer(c, id)? {
                    return Ok(Err(e));
                }
                self.blocks = blocks.clone();
                self.ram_section = Some(id);
                Ok(Ok(Step::Record(Record::RamStart {
                    bytes: Bytes::new(),
                    section_id: id,
                    blocks,
                })))
            }
            section::PART | section::END => {
                c.u8()?;
                let id = c.be32()?;
                if Some(id) != self.ram_section {
                    return Ok(Err(self.error(
                        1,
                        format!(
                            "section {id} continues, but the RAM section is {:?}",
                            self.ram_section
                        ),
                    )));
                }
                self.state = State::RamData;
                Ok(Ok(Step::Consumed))
            }
            section::FULL | section::EOF => {
                if self.ram_section.is_none() {
                    return Ok(Err(self.error(0, "device state before any RAM section")));
                }
                // Leave the byte in place: the tail starts with it.
                self.state = State::Tail;
                Ok(Ok(Step::Consumed))
            }
            section::COMMAND => Ok(Err(self.error(
                0,
                "migration commands (postcopy, return path) are not supported",
            ))),
            other => Ok(Err(
                self.error(0, format!("unknown section type {other:#04x}"))
            )),
        }
    }

    fn footer(
        &mut self,
        c: &mut Cursor<'_>,
        id: u32,
    ) -> Result<Result<(), StreamError>, Incomplete> {
        if c.peek()? == section::FOOTER {
            let at = c.at;
            c.u8()?;
            let got = c.be32()?;
            if got != id {
                return Ok(Err(self.error(
                    at,
                    format!("footer of section {got} closes section {id}"),
                )));
            }
        }
        Ok(Ok(()))
    }

    fn block_list(
        &mut self,
        c: &mut Cursor<'_>,
    ) -> Result<Result<Vec<RamBlock>, StreamError>, Incomplete> {
        let at = c.at;
        let word = c.be64()?;
        if word & FLAG_MASK != flag::MEM_SIZE {
            return Ok(Err(self.error(
                at,
                format!(
                    "the RAM section starts with flags {:#x}, not the block list",
                    word & FLAG_MASK
                ),
            )));
        }
        let mut total = word & !FLAG_MASK;
        let mut blocks = Vec::new();
        while total > 0 {
            let at = c.at;
            if blocks.len() >= MAX_BLOCKS {
                return Ok(Err(
                    self.error(at, format!("more than {MAX_BLOCKS} RAM blocks"))
                ));
            }
            let n = c.u8()? as usize;
            let name = String::from_utf8_lossy(c.take(n)?).into_owned();
            let used = c.be64()?;
            if used > total || used % TARGET_PAGE_SIZE as u64 != 0 {
                return Ok(Err(self.error(at, format!(
                    "block {name:?} of {used} bytes does not fit the {total} bytes left in whole pages"
                ))));
            }
            total -= used;
            blocks.push(RamBlock {
                name,
                used_bytes: used,
            });
        }
        let at = c.at;
        let eos = c.be64()?;
        if eos & FLAG_MASK != flag::EOS {
            return Ok(Err(self.error(at, format!(
                "after the block list, flags {:#x}; postcopy or x-ignore-shared streams are not supported",
                eos & FLAG_MASK
            ))));
        }
        Ok(Ok(blocks))
    }

    fn ram_record(&mut self, c: &mut Cursor<'_>) -> Result<Result<Step, StreamError>, Incomplete> {
        let word = c.be64()?;
        let flags = word & FLAG_MASK;
        let offset = word & !FLAG_MASK;
        let known = flag::ZERO | flag::PAGE | flag::EOS | flag::CONTINUE | flag::MULTIFD_FLUSH;
        if flags & !known != 0 {
            let what = if flags & flag::XBZRLE != 0 {
                "an XBZRLE page (turn the xbzrle capability off)"
            } else if flags & flag::COMPRESS_PAGE != 0 {
                "a compressed page (turn the compress capability off)"
            } else if flags & flag::HOOK != 0 {
                "an RDMA hook"
            } else {
                "unknown RAM record flags"
            };
            return Ok(Err(self.error(0, format!("{what} ({flags:#x})"))));
        }
        if flags & (flag::ZERO | flag::PAGE) != 0 {
            let block = if flags & flag::CONTINUE != 0 {
                match self.current {
                    Some(b) => b,
                    None => {
                        return Ok(Err(self.error(0, "CONTINUE before any RAM block was named")))
                    }
                }
            } else {
                let n = c.u8()? as usize;
                let name = c.take(n)?;
                match self.blocks.iter().position(|b| b.name.as_bytes() == name) {
                    Some(i) => i,
                    None => {
                        return Ok(Err(self.error(
                            9,
                            format!(
                                "page of RAM block {:?}, which the block list does not name",
                                String::from_utf8_lossy(name)
                            ),
                        )))
                    }
                }
            };
            let b = &self.blocks[block];
            if offset >= b.used_bytes {
                return Ok(Err(self.error(
                    0,
                    format!(
                        "page at offset {offset:#x} is outside block {:?} ({} bytes)",
                        b.name, b.used_bytes
                    ),
                )));
            }
            let data = if flags & flag::ZERO != 0 {
                let fill = c.u8()?;
                if fill != 0 {
                    return Ok(Err(self.error(
                        c.at - 1,
                        format!("page filled with {fill:#04x}: only zero fills are read"),
                    )));
                }
                None
            } else {
                c.take(TARGET_PAGE_SIZE)?;
                // A placeholder: `poll` slices the page out of the bytes taken, without copying.
                Some(Bytes::new())
            };
            self.current = Some(block);
            return Ok(Ok(Step::Record(Record::Page {
                block,
                offset,
                data,
            })));
        }
        if flags & flag::EOS != 0 {
            let id = self.ram_section.expect("in a RAM section");
            if let Err(e) = self.footer(c, id)? {
                return Ok(Err(e));
            }
            self.state = State::Sections;
        }
        Ok(Ok(Step::Consumed))
    }

    /// The stream ended: returns the device tail.
    ///
    /// # Errors
    /// The stream ended before its device state (truncated), or the tail is empty or too large.
    pub fn finish(self) -> Result<Bytes, StreamError> {
        if self.state != State::Tail {
            let at = self.buf.len();
            return Err(self.error(at, "the stream ends before its device state: truncated"));
        }
        if self.tail.is_empty() {
            return Err(self.error(0, "the stream ends right after RAM: no device state"));
        }
        if self.tail.len() > MAX_TAIL_BYTES {
            return Err(self.error(0, format!("device state exceeds {MAX_TAIL_BYTES} bytes")));
        }
        // The stream ends with EOF, then the VM description: 0x06, its u32 length, that much JSON. The
        // device sections before it cannot be walked without every device's layout, but the end can be
        // found from the back: a stream cut anywhere does not end that way.
        let t = &self.tail[..];
        let ends_well = (0..t.len().saturating_sub(6)).rev().any(|p| {
            t[p] == section::EOF
                && t[p + 1] == section::VMDESCRIPTION
                && u32::from_be_bytes(t[p + 2..p + 6].try_into().expect("4 bytes")) as usize
                    == t.len() - p - 6
                && t.get(p + 6) == Some(&b'{')
        });
        if !ends_well {
            return Err(self.error(
                self.tail.len(),
                "the device state does not end with EOF and the VM description: truncated (or a machine that suppresses the description, which is not supported)",
            ));
        }
        Ok(self.tail.freeze())
    }
}
