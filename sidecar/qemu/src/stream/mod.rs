//! QEMU's migration stream (`migration/savevm.c`, `migration/ram.c`), as QEMU 7.2 writes it for a
//! background snapshot or an ordinary migration: all integers big-endian.
//!
//! ```text
//! header        magic "QEVM" (0x5145564d) u32, version 3 u32
//! configuration 0x07, u32 length, machine type name (e.g. "pc-i440fx-7.2"), optional subsections
//! ram START     0x01, u32 section id, u8 length + "ram", u32 instance id, u32 version id,
//!               u64 total RAM bytes | MEM_SIZE, then per RAM block: u8 length + id, u64 used length,
//!               then u64 EOS; footer 0x7e + u32 section id
//! ram PART/END  0x02 or 0x03, u32 section id, page records, u64 EOS, footer
//! page record   u64 offset | flags; unless CONTINUE: u8 length + the RAM block's id;
//!               ZERO: u8 fill byte (0); PAGE: 4096 bytes
//! device tail   FULL sections (0x04) of every device, EOF (0x00), VM description (0x06, u32 length,
//!               JSON): opaque here, kept as it came
//! ```
//!
//! [`parse::Parser`] turns bytes into [`Record`]s (sans-IO: bytes in, records out, nothing read or
//! allocated before its length is checked); [`write::Writer`] writes a stream back from a replica's pages and
//! the recorded header and device tail, for restoring a VM into a new QEMU.

pub mod parse;
pub mod write;

use bytes::Bytes;

/// The stream's magic, "QEVM".
pub const MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU writes.
pub const VERSION: u32 = 3;
/// Section types.
pub mod section {
    /// End of the device state.
    pub const EOF: u8 = 0x00;
    /// Start of an iterative section (with its name).
    pub const START: u8 = 0x01;
    /// More of an iterative section.
    pub const PART: u8 = 0x02;
    /// The last part of an iterative section.
    pub const END: u8 = 0x03;
    /// A whole device section (with its name).
    pub const FULL: u8 = 0x04;
    /// A subsection of a device or of the configuration.
    pub const SUBSECTION: u8 = 0x05;
    /// The JSON VM description after EOF.
    pub const VMDESCRIPTION: u8 = 0x06;
    /// The configuration (machine type).
    pub const CONFIGURATION: u8 = 0x07;
    /// A migration command.
    pub const COMMAND: u8 = 0x08;
    /// A section's footer.
    pub const FOOTER: u8 = 0x7e;
}
/// RAM record flags (the low bits of a record's offset).
pub mod flag {
    /// The page is all one byte (0): no data follows but that byte.
    pub const ZERO: u64 = 0x02;
    /// The record is the block list (its offset is the total RAM bytes).
    pub const MEM_SIZE: u64 = 0x04;
    /// A whole page follows.
    pub const PAGE: u64 = 0x08;
    /// End of this section's RAM records.
    pub const EOS: u64 = 0x10;
    /// Same RAM block as the record before: no id follows.
    pub const CONTINUE: u64 = 0x20;
    /// An XBZRLE-encoded page (not supported).
    pub const XBZRLE: u64 = 0x40;
    /// RDMA hook (not supported).
    pub const HOOK: u64 = 0x80;
    /// A compressed page (not supported).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd flush marker (newer QEMUs; nothing to do).
    pub const MULTIFD_FLUSH: u64 = 0x200;
}
/// The target page size of the streams parsed here (x86: 4 KiB); RAM records are in these units.
pub const TARGET_PAGE_SIZE: usize = 4096;
const FLAG_MASK: u64 = TARGET_PAGE_SIZE as u64 - 1;

/// One RAM block of the VM, as its block list in the stream names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// Its id (`pc.ram`, `mem0`, `pc.bios`, ...).
    pub name: String,
    /// Bytes in use.
    pub used_bytes: u64,
}

/// What the parser found, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// The header and configuration, verbatim, and the machine type it names.
    Prefix {
        /// The bytes, to write back when restoring.
        bytes: Bytes,
        /// The machine type (e.g. `pc-i440fx-7.2`).
        machine: String,
    },
    /// The RAM section's start, verbatim (its header and block list), and the blocks it lists.
    RamStart {
        /// The bytes, to write back when restoring.
        bytes: Bytes,
        /// The RAM section's id.
        section_id: u32,
        /// The blocks.
        blocks: Vec<RamBlock>,
    },
    /// A page of block `block` (index into the block list) at byte `offset`: its data, or `None` for a
    /// page of zeroes.
    Page {
        /// Index of the block.
        block: usize,
        /// Byte offset in the block.
        offset: u64,
        /// The page, or `None` for zeroes.
        data: Option<Bytes>,
    },
    /// The device state after the RAM sections, verbatim up to the end of the stream (sections of every
    /// device, EOF, the VM description).
    DeviceTail(Bytes),
}

/// Why a stream was refused: what, where (byte offset from the stream's start) and in which section.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("QEMU migration stream at byte {offset} ({section}): {what}")]
pub struct StreamError {
    /// Byte offset of the fault from the start of the stream.
    pub offset: u64,
    /// The section (`header`, `configuration`, `ram`, `device state`, ...).
    pub section: String,
    /// What was wrong.
    pub what: String,
}
