//! Child processes of a scenario (backups, VMMs, sidecars, QEMU), each logging to its own file, all killed
//! when the scenario ends however it ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `endophyte` binary: next to this one (`cargo build --release` builds both), or `$ENDOPHYTE`.
///
/// # Errors
/// Neither exists; the message says how to build it.
pub fn endophyte_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENDOPHYTE") {
        return Ok(p.into());
    }
    let me = std::env::current_exe()?;
    let p = me
        .parent()
        .map(|d| d.join("endophyte"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no endophyte binary next to {} (cargo build --release -p endophyte, or set ENDOPHYTE)",
                me.display()
            )
        })?;
    Ok(p)
}

/// Named children, killed (SIGKILL) and reaped on drop.
#[derive(Default)]
pub struct Procs {
    kids: Vec<(String, Child)>,
}

impl Procs {
    /// Starts `cmd` as `name`, its stdout and stderr appended to `log`.
    ///
    /// # Errors
    /// The log could not be opened or the program not started.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<u32> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name} ({cmd:?}): {e}"))?;
        let pid = child.id();
        self.kids.push((name.into(), child));
        Ok(pid)
    }

    fn find(&mut self, name: &str) -> anyhow::Result<&mut Child> {
        self.kids
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .ok_or_else(|| anyhow::anyhow!("no process {name:?}"))
    }

    /// Sends `signal` to `name`.
    ///
    /// # Errors
    /// No such process.
    pub fn signal(&mut self, name: &str, signal: i32) -> anyhow::Result<()> {
        let pid = self.find(name)?.id();
        // SAFETY: kill(2) on a child of ours that has not been reaped (it is still in `kids`).
        unsafe { libc::kill(pid as libc::pid_t, signal) };
        Ok(())
    }

    /// Waits up to `limit` for `name` to exit; `Some(success)` if it did. It stays in the list either way.
    ///
    /// # Errors
    /// No such process, or waiting failed.
    pub fn wait(&mut self, name: &str, limit: Duration) -> anyhow::Result<Option<bool>> {
        let c = self.find(name)?;
        let t = Instant::now();
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(Some(s.success()));
            }
            if t.elapsed() > limit {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether `name` still runs.
    pub fn running(&mut self, name: &str) -> bool {
        self.find(name)
            .ok()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Kills `name` (SIGKILL), reaps it and forgets it.
    pub fn kill(&mut self, name: &str) {
        if let Some(i) = self.kids.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.kids.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.kids {
            let _ = c.kill();
        }
        for (_, c) in &mut self.kids {
            let _ = c.wait();
        }
    }
}

/// Waits until `path` exists.
///
/// # Errors
/// It did not appear within `limit`.
pub fn wait_for_file(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while !path.exists() {
        anyhow::ensure!(
            t.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The last `n` lines of a log, for error messages.
pub fn tail(log: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
