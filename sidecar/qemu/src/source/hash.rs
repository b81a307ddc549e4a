//! The RAM hash of a QEMU guest, from QEMU's own view of guest memory (`pmemsave`): what tests and the
//! demo compare a replica's bytes with.

use std::path::Path;

use endophyte_vmm::VmmError;
use serde_json::json;

use super::qmp_err;
use crate::qmp::Qmp;

/// The PC's legacy window, 640 KiB to 1 MiB: QEMU's physical view (what `pmemsave` dumps) shows VGA
/// memory and the option ROMs and BIOS there, not the RAM block's bytes beneath them.
pub const LEGACY_WINDOW: std::ops::Range<u64> = 0xa_0000..0x10_0000;
/// The lowest the PC machines start the PCI hole at (q35 with more than 2.75 GiB of RAM): main RAM up to
/// this size lies at guest physical addresses 0.. in one piece.
pub const MAX_HASHED_RAM: u64 = 0x8000_0000;

/// The RAM hash of a QEMU guest: BLAKE3 of its main RAM block as `pmemsave` shows it from guest physical
/// address 0, `bytes` long, with [`LEGACY_WINDOW`] as zeros; hex. Dumped by QEMU into a file under `tmp`,
/// removed after. The VM should be paused for the hash to be of one instant.
///
/// # Errors
/// RAM over [`MAX_HASHED_RAM`] (part of it would lie above the PCI hole); QEMU refused the dump; the file
/// could not be read.
pub fn pmem_hash(q: &mut Qmp, tmp: &Path, bytes: u64) -> Result<String, VmmError> {
    if bytes > MAX_HASHED_RAM {
        return Err(VmmError::Failed {
            op: "hashing guest RAM",
            message: format!("{bytes} bytes of main RAM: RAM hashes cover guests of up to {MAX_HASHED_RAM} bytes, whose RAM lies below the PCI hole in one piece"),
        });
    }
    let f = tmp.join(format!("endophyte-pmem-{}.bin", std::process::id()));
    q.execute(
        "pmemsave",
        json!({ "val": 0, "size": bytes, "filename": f.display().to_string() }),
    )
    .map_err(qmp_err("dumping guest RAM (pmemsave)"))?;
    let r = std::fs::read(&f).map(|mut ram| masked_ram_hash(&mut ram));
    let _ = std::fs::remove_file(&f);
    r.map_err(|source| VmmError::Process {
        op: format!("hashing {}", f.display()),
        source,
    })
}

/// BLAKE3 of `ram` (main RAM from address 0) with [`LEGACY_WINDOW`] zeroed in place, hex: the hash
/// [`pmem_hash`] gives, for bytes from elsewhere (a replica file).
pub fn masked_ram_hash(ram: &mut [u8]) -> String {
    let end = (LEGACY_WINDOW.end as usize).min(ram.len());
    let start = (LEGACY_WINDOW.start as usize).min(end);
    ram[start..end].fill(0);
    blake3::hash(ram).to_hex().to_string()
}
