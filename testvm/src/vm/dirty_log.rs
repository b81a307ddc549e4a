//! A testvm VM's dirty log: KVM's per-slot dirty logging switched on and off, and harvests of the pages
//! written since the last one (from the bitmap or the dirty rings, as the VM was built).

use std::sync::atomic::Ordering;

use endophyte_attach::bitmap::DirtyBitmap;
use kvm_bindings::kvm_userspace_memory_region;

use super::{Vm, VmError};
use crate::dirty::{self, DirtySource};
use crate::vcpu;

impl Vm {
    /// Starts dirty logging: from now on every page the guest or the VMM writes is reported by
    /// [`Vm::harvest`]. Pages written before are not (the first epoch ships all of RAM anyway).
    ///
    /// # Errors
    /// [`VmError::Kvm`] if KVM refuses the memory slot update.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        self.set_slot_logging(true)?;
        self.ram.vmm_bitmap().reset();
        self.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops dirty logging.
    ///
    /// # Errors
    /// [`VmError::Kvm`] if KVM refuses the memory slot update.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.logging.store(false, Ordering::SeqCst);
        self.set_slot_logging(false)
    }

    fn set_slot_logging(&self, on: bool) -> Result<(), VmError> {
        let _g = self.harvest_lock.lock().unwrap_or_else(|e| e.into_inner());
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: self.ram.size_bytes(),
            userspace_addr: self.ram.host_addr() as u64,
        };
        // SAFETY: same region as at creation, only the logging flag changes; the mapping outlives the VM.
        unsafe { self.vm_fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION (dirty logging)",
            source,
        })
    }

    /// Whether dirty logging is on.
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::SeqCst)
    }

    /// Takes the dirty pages since the last harvest: KVM's log (bitmap or ring) ORed with the pages the
    /// VMM wrote itself. The bits are removed from their sources: a caller that fails to consume them
    /// must hand them back with [`Vm::put_back`] (or use [`Vm::harvest_with`]). Works while running
    /// or paused. Returns one bitmap per memory region (testvm has one).
    ///
    /// # Errors
    /// [`VmError::NotLogging`], or [`VmError::Dirty`] when KVM fails; bits already taken from KVM are then
    /// kept in the VMM bitmap, so they are reported by the next harvest.
    pub fn harvest(&self) -> Result<Vec<DirtyBitmap>, VmError> {
        let _g = self.harvest_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.is_logging() {
            return Err(VmError::NotLogging);
        }
        let mut bm = DirtyBitmap::new(
            0,
            self.layout.page_size,
            self.layout.mem_bytes / self.layout.page_size,
        );
        let kvm_result = match self.dirty_source {
            DirtySource::Bitmap => dirty::harvest_bitmap(&self.vm_fd, 0, &mut bm),
            DirtySource::Ring => {
                vcpu::sync_vcpus(&self.vcpus, &self.ctl);
                let mut r = Ok(());
                for ring in &self.rings {
                    if let Err(e) = ring.collect(std::slice::from_mut(&mut bm)) {
                        r = Err(e);
                    }
                }
                let reset = dirty::reset_dirty_rings(&self.vm_fd);
                let mut st = self.ctl.lock();
                st.harvest_seq += 1;
                drop(st);
                self.ctl.notify();
                r.and(reset)
            }
        };
        bm.or_words(&self.ram.vmm_bitmap().get_and_reset());
        if let Err(e) = kvm_result {
            self.put_back(std::slice::from_ref(&bm));
            return Err(e.into());
        }
        Ok(vec![bm])
    }

    /// Marks the pages of `bitmaps` dirty again (in the VMM bitmap), so the next harvest reports them.
    pub fn put_back(&self, bitmaps: &[DirtyBitmap]) {
        let vmm = self.ram.vmm_bitmap();
        for bm in bitmaps {
            let first = bm.base_gpa() / bm.page_size();
            for p in bm.iter_pages() {
                vmm.set_bit((first + p) as usize);
            }
        }
    }

    /// Harvests and hands the bitmaps to `consume`; if it fails, the bits are put back so that no dirty
    /// page is lost, and its error is returned as the inner `Err`.
    ///
    /// # Errors
    /// Outer: harvest failure ([`Vm::harvest`]). Inner: the consumer's error.
    pub fn harvest_with<T, E>(
        &self,
        consume: impl FnOnce(&[DirtyBitmap]) -> Result<T, E>,
    ) -> Result<Result<T, E>, VmError> {
        let bitmaps = self.harvest()?;
        let r = consume(&bitmaps);
        if r.is_err() {
            self.put_back(&bitmaps);
        }
        Ok(r)
    }
}
