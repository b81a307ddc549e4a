//! Guest RAM: one region at GPA 0, backed by a memfd (fresh boot) or by a file (restore from a replica),
//! mapped `MAP_SHARED` so that another process (the sidecar) can map the same pages.
//!
//! Writes the VMM itself makes through [`GuestRam::write`] are recorded in vm-memory's `AtomicBitmap`,
//! which the dirty-page harvest merges with KVM's log (KVM only sees writes made by the guest).

use std::fs::File;
use std::os::fd::FromRawFd;

use std::sync::Arc;
use vm_memory::bitmap::AtomicBitmap;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("creating a {size_bytes}-byte memfd for guest RAM: {source}")]
    Memfd {
        /// Requested size.
        size_bytes: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// The RAM file has the wrong size.
    #[error("RAM file is {actual_bytes} bytes, the VM needs {expected_bytes}")]
    FileSize {
        /// Size of the file.
        actual_bytes: u64,
        /// Size of guest RAM.
        expected_bytes: u64,
    },
    /// Mapping failed.
    #[error("mapping {size_bytes} bytes of guest RAM: {source}")]
    Map {
        /// Requested size.
        size_bytes: u64,
        /// vm-memory error.
        source: vm_memory::mmap::FromRangesError,
    },
    /// A guest access outside RAM.
    #[error("guest RAM access of {len} bytes at GPA {gpa:#x} is outside the {mem_bytes}-byte RAM")]
    OutOfRange {
        /// Start of the access.
        gpa: u64,
        /// Length of the access.
        len: usize,
        /// RAM size.
        mem_bytes: u64,
    },
}

/// The host page size in bytes, from `sysconf(_SC_PAGESIZE)`.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(4096)
}

/// Guest RAM of one VM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap<AtomicBitmap>,
    mapping: Arc<MmapRegion<AtomicBitmap>>,
    file: File,
    size_bytes: u64,
    page_size: u64,
}

impl GuestRam {
    /// Allocates `size_bytes` of zeroed guest RAM in a new memfd.
    ///
    /// # Errors
    /// [`MemoryError::Memfd`] or [`MemoryError::Map`].
    pub fn new_memfd(size_bytes: u64, page_size: u64) -> Result<Self, MemoryError> {
        let err = |source| MemoryError::Memfd { size_bytes, source };
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"endophyte-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size_bytes).map_err(err)?;
        Self::from_file(file, size_bytes, page_size)
    }

    /// Maps `file` (exactly `size_bytes` long) shared as guest RAM; guest writes land in the file.
    ///
    /// # Errors
    /// [`MemoryError::FileSize`] or [`MemoryError::Map`].
    pub fn from_file(file: File, size_bytes: u64, page_size: u64) -> Result<Self, MemoryError> {
        let actual = file
            .metadata()
            .map_err(|source| MemoryError::Memfd { size_bytes, source })?
            .len();
        if actual != size_bytes {
            return Err(MemoryError::FileSize {
                actual_bytes: actual,
                expected_bytes: size_bytes,
            });
        }
        let dup = file
            .try_clone()
            .map_err(|source| MemoryError::Memfd { size_bytes, source })?;
        let region = GuestRegionMmap::<AtomicBitmap>::from_range(
            GuestAddress(0),
            size_bytes as usize,
            Some(FileOffset::new(dup, 0)),
        )
        .map_err(|source| MemoryError::Map { size_bytes, source })?;
        let mapping = region.get_mmap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Map {
            size_bytes,
            source: e.into(),
        })?;
        Ok(Self {
            mem,
            mapping,
            file,
            size_bytes,
            page_size,
        })
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The file backing guest RAM (a memfd or the replica file).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Host address of GPA 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    /// The VMM's own dirty bitmap (pages written through [`GuestRam::write`]).
    pub fn vmm_bitmap(&self) -> &AtomicBitmap {
        self.mapping.bitmap()
    }

    /// Writes `data` at `gpa`, marking the pages dirty in the VMM bitmap.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`].
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: data.len(),
                mem_bytes: self.size_bytes,
            })
    }

    /// Reads `buf.len()` bytes at `gpa`.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`].
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len(),
                mem_bytes: self.size_bytes,
            })
    }

    /// Reads the little-endian `u64` at `gpa` (8-byte aligned) atomically.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`].
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        self.check(gpa, 8)?;
        // SAFETY: the range was checked to lie inside the mapping, which lives as long as self; the address is 8-byte aligned (callers pass aligned record fields) and AtomicU64 has u64's layout. Atomic access is the right tool for memory another agent (the guest) writes concurrently.
        let a = unsafe {
            &*(self.host_addr().add(gpa as usize) as *const std::sync::atomic::AtomicU64)
        };
        Ok(a.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Reads the little-endian `u32` at `gpa` (4-byte aligned) atomically.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`].
    pub fn read_u32(&self, gpa: u64) -> Result<u32, MemoryError> {
        self.check(gpa, 4)?;
        // SAFETY: as in read_u64, for a 4-byte aligned u32.
        let a = unsafe {
            &*(self.host_addr().add(gpa as usize) as *const std::sync::atomic::AtomicU32)
        };
        Ok(a.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Writes a `u64` at `gpa` (8-byte aligned) atomically, marking its page dirty in the VMM bitmap.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`].
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.check(gpa, 8)?;
        // SAFETY: as in read_u64.
        let a = unsafe {
            &*(self.host_addr().add(gpa as usize) as *const std::sync::atomic::AtomicU64)
        };
        a.store(v, std::sync::atomic::Ordering::Release);
        self.vmm_bitmap().set_addr_range(gpa as usize, 8);
        Ok(())
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), MemoryError> {
        if gpa
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(MemoryError::OutOfRange {
                gpa,
                len,
                mem_bytes: self.size_bytes,
            });
        }
        Ok(())
    }

    /// BLAKE3 hash of all of guest RAM, in GPA order.
    ///
    /// # Safety
    /// No vCPU may run and no other thread may write guest RAM during the call (the VM must be paused):
    /// the hash is computed over a plain byte slice of the mapping.
    pub unsafe fn hash(&self) -> blake3::Hash {
        // SAFETY: the mapping is size_bytes long and lives as long as self; the caller guarantees that nothing writes it for the duration of the borrow.
        let all = unsafe { std::slice::from_raw_parts(self.host_addr(), self.size_bytes as usize) };
        blake3::hash(all)
    }
}
