//! One epoch of a QEMU source: one migration of the VM into this process, read and parsed as it comes,
//! and everything it changed in QEMU set back after it.
//!
//! The stream is read on the calling thread and QMP commands during the migration (the pre-copy cut)
//! go from a second one: QEMU writes the migration's last part holding its big lock, which its monitor
//! needs too, so a reader that waited for a monitor answer while the socket is full would deadlock.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use endophyte_vmm::{SnapshotPage, VmmError};
use serde_json::{json, Value};

use super::{qmp_err, EpochMode, QemuSource, FD_NAME};
use crate::qmp::{CapabilityState, Event, MigrationInfo, Qmp, QmpError, StatusInfo};
use crate::state::QemuState;
use crate::stream::parse::Parser;
use crate::stream::Record;

/// What an epoch changed in QEMU's migration settings, to set back after it.
#[derive(Default)]
struct Changed {
    background_snapshot: bool,
    events: bool,
    max_bandwidth: Option<u64>,
    downtime_limit: Option<u64>,
}

impl QemuSource {
    /// Runs one migration into this process and feeds its pages to `sink`; returns the state, how long
    /// the guest stood still for it, and, with `into_pause` (a pre-copy that leaves the VM paused: the
    /// switchover's), when it stopped.
    pub(super) fn take(
        &self,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        into_pause: bool,
    ) -> Result<(QemuState, Duration, Option<Instant>), VmmError> {
        // Paused by us (a switchover): an ordinary migration, which leaves it paused (a background
        // snapshot would start it, and QEMU 7.2 aborts on one of a VM that never ran).
        let status: StatusInfo = self
            .qmp()
            .query("query-status")
            .map_err(qmp_err("reading the guest's run state"))?;
        let was_paused = !status.running;
        if was_paused && !self.paused.load(Ordering::SeqCst) {
            // Paused by someone else since `busy` looked: this one epoch is an ordinary migration, which
            // leaves the VM postmigrate until it runs again; `busy` then names them, not a migration.
            self.left_stopped.store(true, Ordering::SeqCst);
            tracing::warn!(status = %status.status, "the VM was paused by someone else just now: this epoch is an ordinary migration");
        }
        let background = self.mode == EpochMode::BackgroundSnapshot && !was_paused && !into_pause;
        let (ours, theirs) = UnixStream::pair().map_err(|source| VmmError::Process {
            op: "making the epoch's socket pair".into(),
            source,
        })?;
        let mut changed = Changed::default();
        {
            let mut q = self.qmp();
            let set = (|| {
                if background {
                    set_capability(&mut q, "background-snapshot", true)?;
                    changed.background_snapshot = true;
                    // MIGRATION events tell a stop of someone else's from the snapshot's own.
                    let caps: Vec<CapabilityState> = q.query("query-migrate-capabilities")?;
                    if !caps.iter().any(|c| c.capability == "events" && c.state) {
                        set_capability(&mut q, "events", true)?;
                        changed.events = true;
                    }
                } else {
                    // An ordinary migration is rate-limited by default (128 MiB/s); an epoch wants it
                    // all. And it completes by itself once what is left fits its downtime limit at the
                    // measured rate (300 ms of GB/s by default: most of RAM, with the guest stopped);
                    // a 1 ms limit leaves the cut to this sidecar, after one full pass.
                    let p = q.execute("query-migrate-parameters", Value::Null)?;
                    changed.max_bandwidth = p["max-bandwidth"].as_u64();
                    changed.downtime_limit = p["downtime-limit"].as_u64();
                    q.execute(
                        "migrate-set-parameters",
                        json!({ "max-bandwidth": u64::MAX >> 12, "downtime-limit": 1 }),
                    )?;
                }
                q.clear_events();
                q.execute_with_fd(
                    "getfd",
                    json!({ "fdname": FD_NAME }),
                    Some(theirs.as_raw_fd()),
                )?;
                q.execute("migrate", json!({ "uri": format!("fd:{FD_NAME}") }))
            })();
            drop(theirs);
            if let Err(e) = set {
                set_back(&mut q, &changed);
                return Err(qmp_err("starting the epoch's migration")(e));
            }
        }
        let read = self.read_stream(ours, sink, !background && !was_paused);
        let stream_end = Instant::now();
        let mut q = self.qmp();
        if read.is_err() {
            let _ = q.execute("migrate_cancel", Value::Null);
        }
        let done = wait_migration(&mut q);
        set_back(&mut q, &changed);
        if background && stopped_before_snapshot(q.events()) {
            // Someone stopped the VM after the run state was read and before the snapshot stopped it, and
            // the snapshot's end started it again (QEMU's bg_migration_vm_start_bh): stop it as they asked.
            tracing::warn!("the VM was stopped by someone else as a background snapshot began, which resumed it: stopping it again");
            q.execute("stop", Value::Null)
                .map_err(qmp_err("stopping the guest again after the snapshot"))?;
        }
        q.clear_events();
        let (state, cut_at) = read?;
        let info = done?;
        let qemu_downtime = Duration::from_millis(info.downtime.unwrap_or(0));
        if background || was_paused {
            let paused_at = (into_pause && was_paused).then(Instant::now);
            return Ok((state, qemu_downtime, paused_at));
        }
        // Stopped at our cut, or at QEMU's own stop: its downtime before the stream's end.
        let stopped_at =
            cut_at.unwrap_or_else(|| stream_end.checked_sub(qemu_downtime).unwrap_or(stream_end));
        if into_pause {
            self.paused.store(true, Ordering::SeqCst);
            self.stopped_by_other.store(false, Ordering::SeqCst);
            return Ok((state, stopped_at.elapsed(), Some(stopped_at)));
        }
        // An ordinary migration leaves the VM stopped (postmigrate): it runs on unless someone else
        // stopped it meanwhile (the cut found it stopped; or QEMU completed by itself and recorded it
        // paused, not running, at the completion) or we paused it.
        let stopped_by_other = self.stopped_by_other.swap(false, Ordering::SeqCst)
            || (cut_at.is_none() && state.runstate().as_deref() == Some("paused"));
        if stopped_by_other {
            self.left_stopped.store(true, Ordering::SeqCst);
            tracing::warn!(
                "the VM was stopped by someone else during a pre-copy epoch: it stays stopped"
            );
        } else if !self.paused.load(Ordering::SeqCst) {
            q.execute("cont", Value::Null)
                .map_err(qmp_err("resuming the guest after the epoch"))?;
        }
        Ok((state, stopped_at.elapsed(), None))
    }

    /// Reads the stream to its end; with `cut` (pre-copy), stops the VM from a second thread once every
    /// page went once. Returns the state and, when the cut stopped the VM, when.
    fn read_stream(
        &self,
        mut s: UnixStream,
        sink: &mut dyn FnMut(SnapshotPage<'_>) -> Result<(), String>,
        cut: bool,
    ) -> Result<(QemuState, Option<Instant>), VmmError> {
        let bad = |e: crate::stream::StreamError| VmmError::Failed {
            op: "reading QEMU's migration stream",
            message: e.to_string(),
        };
        let total_pages = self.geometry.pages();
        std::thread::scope(|scope| {
            let mut p = Parser::new();
            let mut buf = vec![0u8; 1 << 20];
            let (mut prefix, mut machine, mut ram) = (None, String::new(), None);
            let mut pages_seen = 0u64;
            let mut cutter = None;
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(VmmError::Process {
                            op: "reading QEMU's migration stream".into(),
                            source,
                        })
                    }
                };
                p.push(&buf[..n]);
                while let Some(r) = p.poll().map_err(bad)? {
                    match r {
                        Record::Prefix { bytes, machine: m } => {
                            prefix = Some(bytes);
                            machine = m;
                        }
                        Record::RamStart {
                            bytes,
                            section_id,
                            blocks,
                        } => {
                            if !self.layout.matches(&blocks) {
                                return Err(VmmError::Failed {
                                    op: "reading QEMU's migration stream",
                                    message: format!(
                                        "its RAM blocks {blocks:?} are not the ones QEMU listed at attach ({:?}): memory hot-plugged? restart the sidecar",
                                        self.layout.blocks()
                                    ),
                                });
                            }
                            ram = Some((bytes, section_id, blocks));
                        }
                        Record::Page {
                            block,
                            offset,
                            data,
                        } => {
                            let addr = self.layout.addr(block, offset);
                            sink((addr, data.as_deref())).map_err(VmmError::Abandoned)?;
                            pages_seen += 1;
                            if cut && cutter.is_none() && pages_seen >= total_pages {
                                // Every page went once: the VM stops, and QEMU sends what changed since.
                                cutter = Some(scope.spawn(|| self.cut_pre_copy()));
                            }
                        }
                        Record::DeviceTail(_) => {}
                    }
                }
            }
            let tail = p.finish().map_err(bad)?;
            let cut_at = match cutter {
                Some(h) => h.join().expect("the cut's thread panicked")?,
                None => None,
            };
            let (ram_start, section_id, blocks) = ram.ok_or_else(|| VmmError::Failed {
                op: "reading QEMU's migration stream",
                message: "it has no RAM section".into(),
            })?;
            let state = QemuState {
                qemu_version: self.version.to_string(),
                machine,
                prefix: prefix.unwrap_or_default(),
                ram_start,
                section_id,
                blocks,
                tail,
            };
            Ok((state, cut_at))
        })
    }

    /// The pre-copy cut: stops the VM unless QEMU already did (its own completion) or someone else did
    /// (then it stays stopped after the epoch). Returns when it stopped the VM.
    fn cut_pre_copy(&self) -> Result<Option<Instant>, VmmError> {
        let mut q = self.qmp();
        let st: StatusInfo = q
            .query("query-status")
            .map_err(qmp_err("reading the guest's run state"))?;
        match st.status.as_str() {
            "running" => {
                let at = Instant::now();
                q.execute("stop", Value::Null)
                    .map_err(qmp_err("stopping the guest to cut the epoch"))?;
                Ok(Some(at))
            }
            // QEMU converged by itself and stopped the VM for its completion.
            "finish-migrate" | "postmigrate" => Ok(None),
            _ => {
                self.stopped_by_other.store(true, Ordering::SeqCst);
                Ok(None)
            }
        }
    }
}

/// Sets back what an epoch changed; failures are logged (the epoch's result stands).
fn set_back(q: &mut Qmp, changed: &Changed) {
    for (name, on) in [
        ("background-snapshot", changed.background_snapshot),
        ("events", changed.events),
    ] {
        if on {
            if let Err(e) = set_capability(q, name, false) {
                tracing::error!("setting {name} back off: {e}");
            }
        }
    }
    for (name, v) in [
        ("max-bandwidth", changed.max_bandwidth),
        ("downtime-limit", changed.downtime_limit),
    ] {
        if let Some(v) = v {
            if let Err(e) = q.execute("migrate-set-parameters", json!({ name: v })) {
                tracing::error!("setting {name} back to {v}: {e}");
            }
        }
    }
}

/// Whether a `STOP` event came before the migration went `active` (a background snapshot stops the VM
/// only once active): someone else stopped the VM, and the snapshot resumed it.
fn stopped_before_snapshot<'a>(events: impl Iterator<Item = &'a Event>) -> bool {
    for e in events {
        match e.name.as_str() {
            "STOP" => return true,
            "MIGRATION" if e.data["status"] == "active" => return false,
            _ => {}
        }
    }
    false
}

/// Turns a migration capability on or off.
pub(super) fn set_capability(q: &mut Qmp, name: &str, on: bool) -> Result<(), QmpError> {
    q.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": name, "state": on }] }),
    )
    .map(|_| ())
}

/// Waits (up to a minute) for the migration to end; `completed` is success.
fn wait_migration(q: &mut Qmp) -> Result<MigrationInfo, VmmError> {
    let t = Instant::now();
    loop {
        let m: MigrationInfo = q
            .query("query-migrate")
            .map_err(qmp_err("following the epoch's migration"))?;
        match m.status.as_deref() {
            Some("completed") => return Ok(m),
            Some("failed" | "cancelled") => {
                return Err(VmmError::Failed {
                    op: "QEMU's epoch migration",
                    message: m
                        .error_desc
                        .unwrap_or_else(|| format!("status {:?}", m.status)),
                })
            }
            _ if t.elapsed() > Duration::from_secs(60) => {
                return Err(VmmError::Failed {
                    op: "QEMU's epoch migration",
                    message: format!("not done after a minute (status {:?})", m.status),
                })
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, status: Option<&str>) -> Event {
        Event {
            name: name.into(),
            data: status.map_or(Value::Null, |s| json!({ "status": s })),
            at_us: 0,
        }
    }

    #[test]
    fn a_stop_before_the_snapshot_went_active_is_someone_elses() {
        let own = [
            ev("MIGRATION", Some("setup")),
            ev("MIGRATION", Some("active")),
            ev("STOP", None),
            ev("RESUME", None),
            ev("MIGRATION", Some("completed")),
        ];
        assert!(!stopped_before_snapshot(own.iter()));
        let theirs = [
            ev("STOP", None),
            ev("MIGRATION", Some("setup")),
            ev("MIGRATION", Some("active")),
            ev("RESUME", None),
        ];
        assert!(stopped_before_snapshot(theirs.iter()));
        let between = [
            ev("MIGRATION", Some("setup")),
            ev("STOP", None),
            ev("MIGRATION", Some("active")),
        ];
        assert!(stopped_before_snapshot(between.iter()));
    }
}
