//! Where a QEMU VM's RAM blocks lie in its replica: one after another, in the order QEMU lists them
//! (`info ramblock`, the same as its migration stream's block list: largest first, so the main RAM block
//! starts the replica at address 0). Pages are keyed by (block, offset) in QEMU; in the replica by address.

use endophyte_vmm::{Geometry, Region};

use crate::stream::{RamBlock, TARGET_PAGE_SIZE};

/// The replica's layout of a VM's RAM blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    blocks: Vec<RamBlock>,
    bases: Vec<u64>,
}

/// Why `info ramblock` could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("QEMU's `info ramblock` answer could not be read ({what}): {text:?}")]
pub struct LayoutError {
    /// What was wrong.
    pub what: &'static str,
    /// The answer.
    pub text: String,
}

impl RamLayout {
    /// The layout of `blocks`, in their order.
    pub fn new(blocks: Vec<RamBlock>) -> Self {
        let mut bases = Vec::with_capacity(blocks.len());
        let mut at = 0u64;
        for b in &blocks {
            bases.push(at);
            at += b.used_bytes.div_ceil(TARGET_PAGE_SIZE as u64) * TARGET_PAGE_SIZE as u64;
        }
        Self { blocks, bases }
    }

    /// Reads the blocks from the human monitor's `info ramblock` (QMP has no command for it): a header
    /// line, then `name psize offset used total` per block, sizes in hex.
    ///
    /// # Errors
    /// The text is not that table.
    pub fn from_info_ramblock(text: &str) -> Result<Self, LayoutError> {
        let bad = |what| LayoutError {
            what,
            text: text.to_string(),
        };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let header = lines.next().ok_or_else(|| bad("empty"))?;
        if !header.starts_with("Block Name") {
            return Err(bad("no header"));
        }
        let mut blocks = vec![];
        for l in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name, page size value, page size unit, offset, used, total
            if f.len() < 6 {
                return Err(bad("a short line"));
            }
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16);
            let used = hex(f[f.len() - 2]).map_err(|_| bad("a used size that is not hex"))?;
            blocks.push(RamBlock {
                name: f[0].to_string(),
                used_bytes: used,
            });
        }
        if blocks.is_empty() {
            return Err(bad("no blocks"));
        }
        Ok(Self::new(blocks))
    }

    /// The blocks, in replica order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The replica's geometry: one region per block.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            page_size: TARGET_PAGE_SIZE as u64,
            regions: self
                .blocks
                .iter()
                .zip(&self.bases)
                .map(|(b, &addr)| Region {
                    addr,
                    size_bytes: b.used_bytes.div_ceil(TARGET_PAGE_SIZE as u64)
                        * TARGET_PAGE_SIZE as u64,
                })
                .collect(),
        }
    }

    /// The replica address of byte `offset` of block `block`.
    pub fn addr(&self, block: usize, offset: u64) -> u64 {
        self.bases[block] + offset
    }

    /// Whether the stream's block list is this layout's (same names and sizes, same order).
    pub fn matches(&self, blocks: &[RamBlock]) -> bool {
        self.blocks == blocks
    }

    /// The block and byte offset in it of replica address `addr`; `None` outside every block.
    pub fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let i = self.bases.partition_point(|&b| b <= addr).checked_sub(1)?;
        let offset = addr - self.bases[i];
        (offset < self.blocks[i].used_bytes).then_some((i, offset))
    }

    /// The main RAM block's size (the first block: guest RAM as the guest sees it from address 0).
    pub fn main_ram_bytes(&self) -> u64 {
        self.blocks.first().map_or(0, |b| b.used_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "              Block Name    PSize              Offset               Used              Total\r\n                    mem0    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000\r\n    /rom@etc/acpi/tables    4 KiB  0x0000000010080000 0x0000000000020000 0x0000000000200000\r\n                 pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000\r\n";

    #[test]
    fn info_ramblock_lays_blocks_out_in_order() {
        let l = RamLayout::from_info_ramblock(INFO).unwrap();
        let names: Vec<&str> = l.blocks().iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["mem0", "/rom@etc/acpi/tables", "pc.bios"]);
        assert_eq!(l.addr(0, 4096), 4096);
        assert_eq!(l.addr(1, 0), 0x1000_0000);
        assert_eq!(l.addr(2, 0), 0x1002_0000);
        assert_eq!(l.geometry().mem_bytes(), 0x1006_0000);
        assert!(RamLayout::from_info_ramblock("nonsense").is_err());
        assert_eq!(l.locate(4096), Some((0, 4096)));
        assert_eq!(l.locate(0x1000_0000), Some((1, 0)));
        assert_eq!(l.locate(0x1002_1000), Some((2, 0x1000)));
        assert_eq!(l.locate(0x1006_0000), None);
    }
}
