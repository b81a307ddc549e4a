//! The hotset workload for QEMU: a multiboot twin of testvm's guest (`qemu-guest/guest.S`, assembled by
//! the build script), which QEMU boots with `-kernel`, for the bench's QEMU peer and for replicating and
//! migrating a QEMU guest.
//!
//! The guest enters long mode itself, installs an IDT that reports exceptions on COM1, and writes one
//! fresh qword into a random page of its hot set (from 4 MiB up) per page write, paced to a rate by the
//! TSC. Its status record at [`STATUS_GPA`] says what it did, read through QEMU's monitor (`xp`) or, for
//! a VM whose RAM is a file, from that file. Under an emulating KVM (this project's machines) filling RAM
//! from inside the guest takes minutes: [`prefill`] fills a RAM file from the host instead, and the guest
//! is told so ([`cmdline`]).

use std::io::Write;
use std::path::Path;

/// The guest program (32-bit multiboot ELF).
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qemu-guest.elf"));

/// Guest-physical address of the status record.
pub const STATUS_GPA: u64 = 0x101000;
/// Offset of the magic ([`STATUS_MAGIC`]) in the record.
pub const ST_MAGIC: u64 = 0;
/// Offset of the state: 1 while it fills RAM, 2 once the workload runs.
pub const ST_STATE: u64 = 8;
/// Offset of the pages-written counter.
pub const ST_PAGES: u64 = 16;
/// The record's magic.
pub const STATUS_MAGIC: u64 = 0x5445_4557_5045_4F45;
/// Where the hot set (and the region the fill covers) starts.
pub const WORK_START: u64 = 4 << 20;

/// The kernel command line (`-append`): hot set in pages, rate in pages/s (0: as fast as it can), the
/// TSC's frequency in Hz (it paces by the TSC), and whether RAM was filled by the host.
pub fn cmdline(hot_pages: u64, rate_pages_per_s: u64, tsc_hz: u64, prefilled: bool) -> String {
    format!(
        "{hot_pages} {rate_pages_per_s} {tsc_hz} {}",
        u8::from(prefilled)
    )
}

/// The host's TSC frequency, Hz (a KVM or TCG guest's TSC runs at the host's rate).
pub fn tsc_hz() -> u64 {
    let t = std::time::Instant::now();
    // SAFETY: RDTSC has no preconditions on x86_64.
    let a = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: as above.
    let b = unsafe { core::arch::x86_64::_rdtsc() };
    ((b - a) as f64 / t.elapsed().as_secs_f64()) as u64
}

/// Creates `path` as a RAM file of `mem_bytes`: zeros below [`WORK_START`], xorshift64 output (the guest's
/// own fill, incompressible) above, for QEMU's `memory-backend-file` (the guest then skips its fill).
///
/// # Errors
/// The file cannot be written.
pub fn prefill(path: &Path, mem_bytes: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    f.write_all(&vec![0u8; WORK_START.min(mem_bytes) as usize])?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    let mut left = mem_bytes.saturating_sub(WORK_START);
    while left > 0 {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()
}

/// The guest's status record in a RAM file (a `memory-backend-file`, or a replica whose first block is
/// RAM): `(state, pages written)`; `None` without the record's magic.
///
/// # Errors
/// The file cannot be read.
pub fn status_in_file(path: &Path) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut b = [0u8; 24];
    f.read_exact_at(&mut b, STATUS_GPA)?;
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok((word(0) == STATUS_MAGIC).then(|| (word(8), word(16))))
}
