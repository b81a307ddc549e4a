//! The lock that gives one process a VM's replica directory: a backup holds it for each VM it serves, and
//! `endophyte export` takes it, so that an export never reads a replica a backup is writing (or that a VM
//! runs on) and a second backup never opens a directory the first one uses.
//!
//! An exclusive `flock(2)` on `<dir>/lock`, taken without waiting; the kernel drops it when its holder
//! exits, however it exits, so a crashed holder never leaves a directory locked.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::StoreError;

/// A held lock on a replica directory; released on drop. See the module docs.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir` (which must exist).
    ///
    /// # Errors
    /// [`StoreError::Locked`] when another process holds it; [`StoreError::Io`] when the lock file cannot
    /// be opened.
    pub fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StoreError::Io {
                op: "opening",
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock(2) on an fd this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Locked { path });
            }
            return Err(StoreError::Io {
                op: "locking",
                path,
                source: e,
            });
        }
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let a = DirLock::acquire(d.path()).unwrap();
        // A second open file description conflicts even within one process, as another process's would.
        let e = DirLock::acquire(d.path()).unwrap_err();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("lock"), "{e}");
        drop(a);
        DirLock::acquire(d.path()).unwrap();
    }
}
