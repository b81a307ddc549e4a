//! Unix sockets that appear only once they accept: the listener is bound under a temporary name in the
//! same directory, given its mode, and renamed into place, so that a client that waits for the path to
//! exist never finds it bound but not yet listening (its connect would be refused) nor open to others.
//! Used for the attach socket and for the daemons' control sockets.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Binds a listening socket at `path`, with permissions `mode` when given. The rename replaces whatever
/// `path` named; callers remove or refuse a live socket first.
///
/// # Errors
/// Binding, setting the mode or renaming failed (the temporary name is removed then).
pub fn bind_in_place(path: &Path, mode: Option<u32>) -> std::io::Result<UnixListener> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.binding", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let placed = UnixListener::bind(&staging).and_then(|l| {
        if let Some(m) = mode {
            std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(m))?;
        }
        std::fs::rename(&staging, path)?;
        Ok(l)
    });
    if placed.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_accepts_once_it_exists_and_has_its_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sock");
        let l = bind_in_place(&p, Some(0o600)).unwrap();
        let c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        drop(c);
        l.accept().unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "the temporary name is gone");
    }
}
