//! A QEMU VM's state as replication carries it: a [`VmState`] of format [`STATE_FORMAT`] holding what,
//! with a replica's pages, makes a stream a new QEMU loads: the stream's prefix (header and configuration:
//! the machine type), its RAM section start (the block list), and its device tail (every device's state,
//! EOF, the VM description), all as QEMU wrote them, plus the QEMU version that wrote them.
//!
//! Encoding (little-endian): magic `EQMS`, then `qemu_version`, `machine`, `prefix`, `ram_start`, `tail`,
//! each a u32 length and its bytes, then the RAM section id u32 and the block list (u32 count; per block
//! a u8 length, its name, u64 used bytes).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use endophyte_vmm::VmState;

use crate::stream::RamBlock;

/// The [`VmState::format`] of QEMU states.
pub const STATE_FORMAT: &str = "qemu";
/// Its version.
pub const STATE_VERSION: u32 = 1;
const MAGIC: &[u8; 4] = b"EQMS";

/// Why bytes are not a QEMU state.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// Another VMM kind's state.
    #[error("the VM state is of format {found:?} version {version}; QEMU restores {STATE_FORMAT:?} version {STATE_VERSION}")]
    Format {
        /// Its format.
        found: String,
        /// Its version.
        version: u32,
    },
    /// Truncated or inconsistent.
    #[error("the QEMU VM state is malformed: {0}")]
    Malformed(&'static str),
}

/// See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuState {
    /// The QEMU that wrote it (e.g. `7.2.22`).
    pub qemu_version: String,
    /// The machine type (e.g. `pc-i440fx-7.2`): a restoring QEMU must be started with it.
    pub machine: String,
    /// Header and configuration, verbatim.
    pub prefix: Bytes,
    /// The RAM section's start, verbatim.
    pub ram_start: Bytes,
    /// The RAM section's id.
    pub section_id: u32,
    /// The RAM blocks it lists.
    pub blocks: Vec<RamBlock>,
    /// The device tail, verbatim.
    pub tail: Bytes,
}

impl QemuState {
    /// The VM's run state when QEMU saved it (`running`, `paused`, `prelaunch`, ...), from the device
    /// tail's `globalstate` section (QEMU's `migration/global_state.c`: a be32 length, then that many
    /// bytes of the state's name, NUL-padded), which machine types since QEMU 2.4 always write. `None`
    /// when the tail has none or it does not read as one.
    pub fn runstate(&self) -> Option<String> {
        const ID: &[u8] = b"\x0bglobalstate";
        let at = self.tail.windows(ID.len()).position(|w| w == ID)?;
        // The section's instance and version ids (be32 each), then the field.
        let mut rest = self.tail.get(at + ID.len() + 8..)?;
        if rest.len() < 4 {
            return None;
        }
        let len = rest.get_u32() as usize;
        let name = rest.get(..len.min(100))?;
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        std::str::from_utf8(name)
            .ok()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
            .map(str::to_string)
    }

    /// As a [`VmState`].
    pub fn to_vm_state(&self) -> VmState {
        let mut b = BytesMut::new();
        b.put_slice(MAGIC);
        for part in [
            self.qemu_version.as_bytes(),
            self.machine.as_bytes(),
            &self.prefix[..],
            &self.ram_start[..],
            &self.tail[..],
        ] {
            b.put_u32_le(part.len() as u32);
            b.put_slice(part);
        }
        b.put_u32_le(self.section_id);
        b.put_u32_le(self.blocks.len() as u32);
        for bl in &self.blocks {
            b.put_u8(bl.name.len() as u8);
            b.put_slice(bl.name.as_bytes());
            b.put_u64_le(bl.used_bytes);
        }
        VmState::new(STATE_FORMAT, STATE_VERSION, b.freeze())
            .expect("a QEMU state within the VM state caps")
    }

    /// From a [`VmState`] made by [`QemuState::to_vm_state`].
    ///
    /// # Errors
    /// [`StateError`].
    pub fn from_vm_state(s: &VmState) -> Result<Self, StateError> {
        if s.format != STATE_FORMAT || s.version != STATE_VERSION {
            return Err(StateError::Format {
                found: s.format.clone(),
                version: s.version,
            });
        }
        let mut p = s.data.clone();
        let bad = StateError::Malformed;
        if p.remaining() < 4 || &p[..4] != MAGIC {
            return Err(bad("no EQMS magic"));
        }
        p.advance(4);
        let part = |p: &mut Bytes| -> Result<Bytes, StateError> {
            if p.remaining() < 4 {
                return Err(bad("truncated length"));
            }
            let n = p.get_u32_le() as usize;
            if p.remaining() < n {
                return Err(bad("truncated field"));
            }
            Ok(p.split_to(n))
        };
        let qemu_version = String::from_utf8_lossy(&part(&mut p)?).into_owned();
        let machine = String::from_utf8_lossy(&part(&mut p)?).into_owned();
        let prefix = part(&mut p)?;
        let ram_start = part(&mut p)?;
        let tail = part(&mut p)?;
        if p.remaining() < 8 {
            return Err(bad("truncated block list"));
        }
        let section_id = p.get_u32_le();
        let count = p.get_u32_le() as usize;
        if count > crate::stream::parse::MAX_BLOCKS {
            return Err(bad("too many RAM blocks"));
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            if p.remaining() < 1 {
                return Err(bad("truncated block"));
            }
            let n = p.get_u8() as usize;
            if p.remaining() < n + 8 {
                return Err(bad("truncated block"));
            }
            let name = String::from_utf8_lossy(&p.split_to(n)).into_owned();
            blocks.push(RamBlock {
                name,
                used_bytes: p.get_u64_le(),
            });
        }
        if p.has_remaining() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            qemu_version,
            machine,
            prefix,
            ram_start,
            section_id,
            blocks,
            tail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_formats() {
        let s = QemuState {
            qemu_version: "7.2.22".into(),
            machine: "pc-i440fx-7.2".into(),
            prefix: Bytes::from_static(b"QEVM...."),
            ram_start: Bytes::from_static(&[1, 2, 3]),
            section_id: 2,
            blocks: vec![RamBlock {
                name: "pc.ram".into(),
                used_bytes: 1 << 26,
            }],
            tail: Bytes::from_static(b"\x04devices\x00{}"),
        };
        let v = s.to_vm_state();
        assert_eq!(QemuState::from_vm_state(&v).unwrap(), s);
        let other = VmState::new("testvm", 1, b"{}".to_vec()).unwrap();
        let e = QemuState::from_vm_state(&other).unwrap_err();
        assert!(e.to_string().contains("testvm"), "{e}");
        let cut = VmState::new(
            STATE_FORMAT,
            STATE_VERSION,
            v.data.slice(..v.data.len() - 3),
        )
        .unwrap();
        assert!(QemuState::from_vm_state(&cut).is_err());
    }
}
