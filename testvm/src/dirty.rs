//! KVM dirty-page tracking: the dirty bitmap with manual protection, and the dirty ring.
//!
//! Two sources, chosen when the VM is created (KVM forbids switching later):
//!
//! - **Bitmap** (`KVM_GET_DIRTY_LOG` + `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` + `KVM_CLEAR_DIRTY_LOG`,
//!   Documentation/virt/kvm/api.rst 4.8, 4.118, 7.18). With manual protection, `GET` only reads the bits;
//!   we then `CLEAR` exactly the bits we read, which re-write-protects those pages, just before the caller
//!   reads their contents. A guest write between `GET` and `CLEAR` lands on a page already reported as
//!   dirty, whose contents are read after `CLEAR`: nothing is lost.
//! - **Ring** (`KVM_CAP_DIRTY_LOG_RING`, api.rst 8.29): each vCPU has a ring of `kvm_dirty_gfn` entries
//!   mmapped from its fd at `KVM_DIRTY_LOG_PAGE_OFFSET` pages. We collect entries flagged `DIRTY`, flag them
//!   `RESET`, then `KVM_RESET_DIRTY_RINGS` re-protects the pages. A vCPU whose ring fills exits with
//!   `KVM_EXIT_DIRTY_RING_FULL` and waits for the next harvest.
//!
//! kvm-ioctls has no wrappers for `KVM_CLEAR_DIRTY_LOG`, `KVM_RESET_DIRTY_RINGS` or the ring mapping, so
//! they are defined here with vmm-sys-util's ioctl macros and kvm-bindings' structs.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use endophyte_attach::bitmap::DirtyBitmap;
use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)` and `_IO(KVMIO, 0xc7)`, include/uapi/linux/kvm.h.
mod nr {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// `kvm_dirty_gfn.flags`: the entry holds a dirty GFN not yet collected (include/uapi/linux/kvm.h).
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `kvm_dirty_gfn.flags`: the entry was collected and may be reset by `KVM_RESET_DIRTY_RINGS`.
const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// `kvm_run.exit_reason` when a vCPU's dirty ring is (soft) full.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// Which KVM mechanism reports the guest's dirty pages.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DirtySource {
    /// `KVM_GET_DIRTY_LOG` with manual protect and `KVM_CLEAR_DIRTY_LOG`.
    Bitmap,
    /// The per-vCPU KVM dirty ring.
    Ring,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// An ioctl failed.
    #[error("{op} on memory slot {slot}: {source}")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// Memory slot.
        slot: u32,
        /// OS error.
        source: std::io::Error,
    },
    /// The host KVM lacks a capability.
    #[error("this KVM lacks {cap}, needed for {what}")]
    Unsupported {
        /// Capability name.
        cap: &'static str,
        /// What needs it.
        what: &'static str,
    },
    /// Mapping a vCPU's dirty ring failed.
    #[error("mapping the dirty ring of vCPU {vcpu} ({bytes} bytes): {source}")]
    RingMap {
        /// vCPU index.
        vcpu: u32,
        /// Ring size in bytes.
        bytes: usize,
        /// OS error.
        source: std::io::Error,
    },
    /// The ring reported a GFN outside guest RAM.
    #[error("dirty ring of vCPU {vcpu} reported slot {slot} offset {offset}, outside guest RAM")]
    BadRingEntry {
        /// vCPU index.
        vcpu: u32,
        /// Slot in the entry.
        slot: u32,
        /// Page offset in the entry.
        offset: u64,
    },
}

/// Reads and clears the dirty bits of `slot` (`pages` pages) with `KVM_GET_DIRTY_LOG` then
/// `KVM_CLEAR_DIRTY_LOG`, ORing them into `into`.
///
/// Requires manual dirty-log protection to be enabled on the VM and dirty logging on the slot.
///
/// # Errors
/// [`DirtyError::Ioctl`] if either ioctl fails; bits already read but not cleared stay set in KVM and are
/// reported again next time.
pub fn harvest_bitmap(
    vm: &kvm_ioctls::VmFd,
    slot: u32,
    into: &mut DirtyBitmap,
) -> Result<(), DirtyError> {
    let pages = into.pages();
    let page_size = into.page_size();
    let mut words = vm
        .get_dirty_log(slot, (pages * page_size) as usize)
        .map_err(|e| DirtyError::Ioctl {
            op: "KVM_GET_DIRTY_LOG",
            slot,
            source: e.into(),
        })?;
    // Clear only what we read, in runs of 64-page words that have bits, so untouched parts of a large
    // slot cost nothing in the kernel.
    let mut i = 0;
    while i < words.len() {
        if words[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < words.len() && words[i] != 0 {
            i += 1;
        }
        let first_page = start as u64 * 64;
        let num_pages = ((i as u64 * 64).min(pages) - first_page) as u32;
        let mut clear = kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = words[start..i].as_mut_ptr().cast();
        // SAFETY: `clear` is a valid kvm_clear_dirty_log whose bitmap pointer covers num_pages bits (ceil(num_pages / 64) words from `words[start..i]`, which outlives the call); the fd is a VM fd.
        let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(DirtyError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                slot,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    into.or_words(&words);
    Ok(())
}

/// One vCPU's dirty ring, mapped from its vCPU fd.
#[derive(Debug)]
pub struct DirtyRing {
    vcpu: u32,
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// Index of the next entry to collect (free-running; slot = index % count).
    fetch: AtomicU32,
}

// SAFETY: the ring is a shared mapping that lives as long as this struct; entries are accessed through
// atomics on their flags (the kernel's protocol), and `fetch` is only advanced under the caller's harvest
// lock, so sharing the pointer across threads is sound.
unsafe impl Send for DirtyRing {}
// SAFETY: see Send.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    /// Maps the dirty ring of `vcpu_fd`: `ring_bytes` bytes at page offset `KVM_DIRTY_LOG_PAGE_OFFSET`.
    ///
    /// # Errors
    /// [`DirtyError::RingMap`].
    pub fn map(
        vcpu: u32,
        vcpu_fd: &impl AsRawFd,
        ring_bytes: usize,
        page_size: u64,
    ) -> Result<Self, DirtyError> {
        let offset = i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * page_size as i64;
        // SAFETY: mapping a KVM vCPU fd at the documented dirty-ring offset with the size enabled on the VM; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyError::RingMap {
                vcpu,
                bytes: ring_bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            vcpu,
            entries: p.cast(),
            count: (ring_bytes / std::mem::size_of::<kvm_dirty_gfn>()) as u32,
            fetch: AtomicU32::new(0),
        })
    }

    /// Collects every `DIRTY` entry into `bitmaps` (indexed by slot), marking each `RESET`. Returns the
    /// number of entries collected. The caller must then issue `KVM_RESET_DIRTY_RINGS`.
    ///
    /// # Errors
    /// [`DirtyError::BadRingEntry`] for an entry outside the bitmaps; the entry is still reset.
    pub fn collect(&self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        let mut n = 0u64;
        let mut fetch = self.fetch.load(Ordering::Relaxed);
        let mut bad = None;
        loop {
            let idx = (fetch % self.count) as usize;
            // SAFETY: idx < count, so the entry lies inside the mapping; `flags` is a u32 at offset 0 of a repr(C) struct, suitably aligned for AtomicU32.
            let e = unsafe { &*self.entries.add(idx) };
            // SAFETY: as above; the kernel publishes entries by setting DIRTY after writing slot/offset.
            let flags = unsafe { &*(std::ptr::addr_of!(e.flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            let (slot, offset) = (e.slot, e.offset);
            match bitmaps.get_mut(slot as usize) {
                Some(bm) if offset < bm.pages() => bm.set(offset),
                _ => {
                    bad = Some(DirtyError::BadRingEntry {
                        vcpu: self.vcpu,
                        slot,
                        offset,
                    })
                }
            }
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            fetch = fetch.wrapping_add(1);
            n += 1;
        }
        self.fetch.store(fetch, Ordering::Relaxed);
        match bad {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`; nothing uses it after drop.
        unsafe {
            libc::munmap(
                self.entries.cast(),
                self.count as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            );
        }
    }
}

/// Issues `KVM_RESET_DIRTY_RINGS`: re-protects every page whose ring entry was flagged `RESET`.
///
/// # Errors
/// [`DirtyError::Ioctl`].
pub fn reset_dirty_rings(vm: &kvm_ioctls::VmFd) -> Result<(), DirtyError> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches the VM's own rings.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(DirtyError::Ioctl {
            op: "KVM_RESET_DIRTY_RINGS",
            slot: 0,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
