//! A VM's fence record on a backup's disk: `<vm dir>/fence.json`, the [`Fence`] the switchover target
//! ([`endophyte_wire::switchover::target`]) keeps, plus where its VMM can be reached.
//!
//! The file is one aligned [`FENCE_BYTES`] block of JSON padded with spaces:
//!
//! ```json
//! {"generation":2,"state":"running","epoch":81,"session":1234,"vmm_pid":4242,"vmm_endpoint":"/data/vm1/vmm.sock"}
//! ```
//!
//! Records are overwritten in place with `O_DIRECT` (and `O_DSYNC` when durable): on stable storage when
//! the call returns, without the filesystem journal commit an fsync waits for (15-75 ms on this project's
//! machines while replicas were being written back, against about 1 ms for this). The file is created at
//! its full size first ([`ensure_file`]), so a record changes no metadata. Where `O_DIRECT` is refused
//! (tmpfs), a buffered write, with `fdatasync` when durable. An unreadable record fails the backup's start
//! with the file named, never a guess.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use endophyte_wire::{Fence, FenceState};
use serde::{Deserialize, Serialize};

/// Size of `fence.json`: one aligned block.
pub const FENCE_BYTES: usize = 4096;

/// Errors reading or writing a fence record.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The record is not a fence.
    #[error("{path}: not a fence record: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// A fence with where its VMM is reached, as on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceRecord {
    /// The fence.
    pub fence: Fence,
    /// The VMM's endpoint (its control socket) while it holds the VM; empty otherwise.
    pub vmm_endpoint: String,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    generation: u64,
    state: String,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    session: u64,
    #[serde(default)]
    vmm_pid: u32,
    #[serde(default)]
    vmm_endpoint: String,
}

fn path_of(dir: &Path) -> PathBuf {
    dir.join("fence.json")
}

/// Reads `dir/fence.json`; `None` when there is none.
///
/// # Errors
/// The file exists but cannot be read, or is not a fence record.
pub fn load(dir: &Path) -> Result<Option<FenceRecord>, FenceError> {
    let path = path_of(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FenceError::Io {
                op: "reading",
                path,
                source,
            })
        }
    };
    parse(&bytes)
        .map(Some)
        .map_err(|why| FenceError::Parse { path, why })
}

/// Decodes the bytes of a `fence.json` (trailing whitespace, the file's padding, allowed).
///
/// # Errors
/// Why the bytes are not a fence record.
pub fn parse(bytes: &[u8]) -> Result<FenceRecord, String> {
    let d: OnDisk = serde_json::from_slice(bytes.trim_ascii_end()).map_err(|e| e.to_string())?;
    let state =
        FenceState::parse(&d.state).ok_or_else(|| format!("unknown state {:?}", d.state))?;
    Ok(FenceRecord {
        fence: Fence {
            generation: d.generation,
            state,
            epoch: d.epoch,
            session: d.session,
            vmm_pid: d.vmm_pid,
        },
        vmm_endpoint: d.vmm_endpoint,
    })
}

/// Makes sure `dir/fence.json` exists durably at its full size, so that later records overwrite it in
/// place without changing any metadata. Writes a `none` record if there is no fence yet.
///
/// # Errors
/// I/O, with the path.
pub fn ensure_file(dir: &Path) -> Result<(), FenceError> {
    let path = path_of(dir);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == FENCE_BYTES as u64) {
        return Ok(());
    }
    let current = load(dir)?.unwrap_or_default();
    let io = |op| {
        let path = path.clone();
        move |source| FenceError::Io { op, path, source }
    };
    let tmp = dir.join("fence.json.tmp");
    std::fs::write(&tmp, block(&current)?).map_err(io("writing"))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("syncing"))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming"))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory of"))
}

fn block(r: &FenceRecord) -> Result<Vec<u8>, FenceError> {
    let d = OnDisk {
        generation: r.fence.generation,
        state: r.fence.state.as_str().into(),
        epoch: r.fence.epoch,
        session: r.fence.session,
        vmm_pid: r.fence.vmm_pid,
        vmm_endpoint: r.vmm_endpoint.clone(),
    };
    let mut json = serde_json::to_vec(&d).expect("a fence serializes");
    if json.len() > FENCE_BYTES {
        return Err(FenceError::Parse {
            path: PathBuf::from("fence.json"),
            why: format!("a record of {} bytes exceeds {FENCE_BYTES}", json.len()),
        });
    }
    json.resize(FENCE_BYTES, b' ');
    Ok(json)
}

/// Overwrites `dir/fence.json` in place with `record`; on stable storage when this returns if `durable`.
/// Makes the file first if needed ([`ensure_file`]).
///
/// # Errors
/// I/O, with the path; a record longer than [`FENCE_BYTES`].
pub fn record(dir: &Path, record: &FenceRecord, durable: bool) -> Result<(), FenceError> {
    ensure_file(dir)?;
    let path = path_of(dir);
    let bytes = block(record)?;
    let layout =
        std::alloc::Layout::from_size_align(FENCE_BYTES, FENCE_BYTES).expect("a valid layout");
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc(layout) };
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` points to FENCE_BYTES bytes we own until the dealloc below, written before any read.
    let buf = unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, FENCE_BYTES);
        std::slice::from_raw_parts(ptr, FENCE_BYTES)
    };
    let flags = libc::O_DIRECT | if durable { libc::O_DSYNC } else { 0 };
    let r = match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(flags)
        .open(&path)
    {
        Ok(f) => f.write_all_at(buf, 0),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| {
                f.write_all_at(buf, 0)?;
                if durable {
                    f.sync_data()?;
                }
                Ok(())
            }),
        Err(e) => Err(e),
    };
    // SAFETY: allocated above with this layout; `buf` is not used after this.
    unsafe { std::alloc::dealloc(ptr, layout) };
    r.map_err(|source| FenceError::Io {
        op: "writing",
        path,
        source,
    })
}

/// Whether process `pid` exists (a VMM recorded in a fence, after this backup restarted).
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for the process; no memory is involved.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// Kills process `pid` (a VMM a crash left with a prepared VM, which never ran).
pub fn kill(pid: u32) {
    if pid != 0 {
        // SAFETY: kill(2) on a pid recorded for a VMM this node started; at worst it is gone (ESRCH).
        let _ = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_in_place_at_full_size() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let r = FenceRecord {
            fence: Fence {
                generation: 3,
                state: FenceState::Running,
                epoch: 81,
                session: 9,
                vmm_pid: 77,
            },
            vmm_endpoint: "/x/vmm.sock".into(),
        };
        record(dir.path(), &r, true).unwrap();
        let len = std::fs::metadata(dir.path().join("fence.json"))
            .unwrap()
            .len();
        assert_eq!(len, FENCE_BYTES as u64);
        assert_eq!(load(dir.path()).unwrap(), Some(r.clone()));
        let aborted = FenceRecord {
            fence: Fence {
                state: FenceState::Aborted,
                vmm_pid: 0,
                ..r.fence
            },
            vmm_endpoint: String::new(),
        };
        record(dir.path(), &aborted, false).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(aborted));
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("fence.json"),
            b"{\"generation\":1,\"state\":\"maybe\"}",
        )
        .unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("fence.json") && e.contains("maybe"), "{e}");
        std::fs::write(dir.path().join("fence.json"), b"\x00\x01garbage").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
