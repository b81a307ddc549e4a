//! Why a backup refused a sidecar's path or could not open a replica.

use endophyte_wire::ErrorCode;

use crate::fence::FenceError;
use crate::store::StoreError;

/// Errors at the backup's boundary: each becomes an `Error` message with [`BackupError::code`] for the
/// sidecar, and names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The Hello names a VM id this node will not use as a directory name.
    #[error("VM id {vm_id:?} must be 1-128 letters, digits, '-', '_' or '.'")]
    BadVmId {
        /// The id.
        vm_id: String,
    },
    /// The Hello's geometry is not whole pages.
    #[error("geometry {mem_bytes} bytes in {page_size}-byte pages is not whole pages")]
    BadGeometry {
        /// Guest RAM bytes.
        mem_bytes: u64,
        /// Page size.
        page_size: u32,
    },
    /// The VM is replicated here with another geometry.
    #[error("VM {vm_id:?} is replicated here as {have_bytes} bytes in {have_page}-byte pages, not {mem_bytes} in {page_size}")]
    GeometryMismatch {
        /// The VM.
        vm_id: String,
        /// Its size here.
        have_bytes: u64,
        /// Its page size here.
        have_page: u32,
        /// The size the Hello says.
        mem_bytes: u64,
        /// The page size the Hello says.
        page_size: u32,
    },
    /// The VM's fence record is unreadable or could not be written.
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// The replica could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The replica thread could not be started.
    #[error("starting the replica thread of VM {vm_id:?}: {source}")]
    Thread {
        /// The VM.
        vm_id: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data directory could not be listed.
    #[error("listing {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl BackupError {
    /// The wire error code the sidecar gets for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadVmId { .. } | Self::BadGeometry { .. } | Self::GeometryMismatch { .. } => {
                ErrorCode::BadHello
            }
            Self::Fence(_) | Self::Store(_) | Self::Thread { .. } | Self::DataDir { .. } => {
                ErrorCode::Internal
            }
        }
    }
}
