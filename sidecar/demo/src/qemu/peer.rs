//! QEMU's own live migration of the same guest on the same machine, for comparison: a second source QEMU
//! booted like the demo's, migrated over TCP on loopback into a QEMU started with `-incoming`, with the
//! same downtime limit and no bandwidth cap ("tuned": QEMU 7.2's default cap is 32 MiB/s). Its figures are
//! QEMU's own (`query-migrate`: `downtime`, `total-time`, `ram.transferred`).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;

use super::vm::{boot, connect, counter_over, query_migrate, Guest};

/// What QEMU's own migration did.
#[derive(Debug, Serialize)]
pub struct QemuMigration {
    /// Guest downtime as QEMU measures it (stop to the destination's start), ms.
    pub downtime_ms: f64,
    /// From `migrate` to completion, ms.
    pub total_ms: f64,
    /// Bytes of RAM sent over the socket.
    pub transferred_bytes: u64,
    /// The guest's counter went on at the destination from where the source stopped.
    pub guest_continued: bool,
}

/// Migrates a fresh copy of `guest`, run for `run_for` first, with downtime limit `downtime`.
///
/// # Errors
/// A QEMU did not start, or the migration failed.
pub fn qemu_own_migration(
    dir: &Path,
    guest: &Guest,
    run_for: Duration,
    downtime: Duration,
) -> anyhow::Result<QemuMigration> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut src = boot(dir, "peer-source", guest, &[], false)?;
    let dst_qmp = dir.join("peer-dest.qmp");
    let err = dir.join("peer-dest.err");
    let mut dst = super::Reaped(
        Command::new("qemu-system-x86_64")
            .args(guest.args(&format!(
                "memory-backend-ram,id=mem0,size={}M",
                guest.mem >> 20
            )))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dst_qmp.display()))
            .arg("-serial")
            .arg(format!("file:{}", dir.join("peer-dest.serial").display()))
            .args(["-incoming", &format!("tcp:127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .context("starting the destination QEMU")?,
    );
    let mut dq = connect(&dst_qmp, Duration::from_secs(30))?;
    std::thread::sleep(run_for);
    let q = &mut src.probe;
    q.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": downtime.as_millis().max(1) as u64, "max-bandwidth": 100_000_000_000u64 }),
    )?;
    let t = Instant::now();
    q.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))?;
    let done = loop {
        let m = query_migrate(q)?;
        match m["status"].as_str() {
            Some("completed") => break m,
            Some("failed" | "cancelled") => {
                let said = std::fs::read_to_string(&err).unwrap_or_default();
                bail!("QEMU's own migration failed: {m}; the destination said {said}");
            }
            _ if t.elapsed() > Duration::from_secs(300) => {
                bail!("QEMU's own migration did not converge in 5 min: {m}")
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let at_stop = super::vm::guest_status(q).map_or(0, |s| s.1);
    let (d0, d1) = counter_over(&mut dq, Duration::from_millis(500))?;
    let _ = dst.0.kill();
    Ok(QemuMigration {
        downtime_ms: done["downtime"].as_f64().unwrap_or(f64::NAN),
        total_ms: done["total-time"].as_f64().unwrap_or(f64::NAN),
        transferred_bytes: done["ram"]["transferred"].as_u64().unwrap_or(0),
        guest_continued: d0 >= at_stop && d1 > d0,
    })
}
