//! Endophyte's scenarios: each starts real processes (`endophyte backup`, `endophyte testvm-serve`,
//! `endophyte sidecar`) on the hosts of a [`Topology`] and measures from outside them: the guest's own page
//! counter (through the attach socket), the emulator's byte counters, the sidecar's status and its final
//! report, and the migration and promote answers.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use endophyte_attach::client::AttachClient;

use crate::link::LinkProfile;
use crate::procs::{tail, wait_for_file, Procs};
use crate::report::{percentile, MigrationRuns, Row};
use crate::topology::Topology;

/// The guest and its workload.
#[derive(Clone, Debug)]
pub struct Guest {
    /// Guest RAM, bytes.
    pub mem: u64,
    /// Target dirty rate, MB/s (10^6 bytes of written pages per second); the guest's own counter says what
    /// it achieved.
    pub rate_mb_s: f64,
    /// Fill RAM with PRNG output first (incompressible pages), as the QEMU twin does.
    pub fill: bool,
}

impl Guest {
    /// Page writes per second for the target rate.
    pub fn pages_per_s(&self) -> u64 {
        (self.rate_mb_s * 1e6 / page_size() as f64).round() as u64
    }

    /// Hot set: a quarter of RAM, at most 256 MiB; in pages.
    pub fn hot_pages(&self) -> u64 {
        (self.mem / 4).min(256 << 20) / page_size()
    }

    /// vCPUs: two when one cannot reach the rate under this host's nested KVM (about 40,000 pages/s each).
    pub fn vcpus(&self) -> u64 {
        if self.pages_per_s() > 30_000 {
            2
        } else {
            1
        }
    }

    fn workload(&self) -> String {
        format!(
            "hotset:size={}K,rate={}",
            self.hot_pages() * page_size() / 1024,
            self.pages_per_s().div_ceil(self.vcpus())
        )
    }

    /// The row parameters shared by every scenario with a guest.
    pub fn params(&self, row: Row) -> Row {
        row.param("mem_gib", self.mem as f64 / (1u64 << 30) as f64, "GiB")
            .param("dirty_rate_target_mb_s", self.rate_mb_s, "MB/s")
    }
}

/// The host's page size, bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf(3) has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

fn free_udp() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One scenario's processes and files.
pub struct Cluster<'t> {
    topo: &'t Topology,
    exe: PathBuf,
    /// The scenario's directory (logs, certificates, replicas).
    pub dir: PathBuf,
    certs: PathBuf,
    /// Its processes.
    pub procs: Procs,
    /// Backup listen addresses as seen from each peer: `(backup host, port)`.
    ports: Vec<(String, u16)>,
}

impl<'t> Cluster<'t> {
    /// A scenario directory with a fresh CA and certificates for `nodes`.
    ///
    /// # Errors
    /// The directory or certificates could not be made.
    pub fn new(topo: &'t Topology, dir: &Path, nodes: &[&str]) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let certs = dir.join("certs");
        endophyte_engine::tls::init_network(&certs, "bench")?;
        for n in nodes {
            endophyte_engine::tls::issue_node(&certs, n)?;
        }
        Ok(Self {
            topo,
            exe: crate::procs::endophyte_bin()?,
            dir: dir.into(),
            certs,
            procs: Procs::default(),
            ports: vec![],
        })
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts `endophyte backup` as node `node` on `host`, its control socket at `DIR/NODE.ctl`.
    ///
    /// # Errors
    /// It could not be started.
    pub fn backup(&mut self, host: &str, node: &str) -> anyhow::Result<()> {
        let (listen, port) = match self.topo.profile() {
            None => {
                let p = free_udp()?;
                (format!("127.0.0.1:{p}"), p)
            }
            Some(_) => ("0.0.0.0:7400".to_string(), 7400),
        };
        let mut c = self.topo.command(host, &self.exe)?;
        c.args(["backup", "--listen", &listen, "--node", node])
            .arg("--certs")
            .arg(&self.certs)
            .arg("--data-dir")
            .arg(self.dir.join(format!("data-{node}")))
            .arg("--control-socket")
            .arg(self.dir.join(format!("{node}.ctl")));
        let log = self.log(node);
        self.procs.spawn(node, c, &log)?;
        self.ports.push((host.into(), port));
        wait_for_file(
            &self.dir.join(format!("{node}.ctl")),
            Duration::from_secs(20),
        )
    }

    /// The VM's directory on backup `node` (where a migrated or promoted VM's `vmm.sock` is).
    pub fn vm_dir(&self, node: &str) -> PathBuf {
        self.dir.join(format!("data-{node}")).join("vm1")
    }

    /// Starts the testvm VMM for `guest` on `host`; returns its attach socket once it exists.
    ///
    /// # Errors
    /// It could not be started or did not create its socket within 5 minutes.
    pub fn vmm(&mut self, host: &str, guest: &Guest) -> anyhow::Result<PathBuf> {
        let sock = self.dir.join("vm.sock");
        let mut c = self.topo.command(host, &self.exe)?;
        c.args(["testvm-serve", "--workload", &guest.workload()])
            .arg("--mem")
            .arg(guest.mem.to_string())
            .arg("--vcpus")
            .arg(guest.vcpus().to_string())
            .arg("--attach-socket")
            .arg(&sock);
        if guest.fill {
            c.arg("--fill");
        }
        let log = self.log("vmm");
        self.procs.spawn("vmm", c, &log)?;
        wait_for_file(&sock, Duration::from_secs(300))
            .map_err(|e| anyhow::anyhow!("{e}: {}", tail(&log, 5)))?;
        Ok(sock)
    }

    /// `backup` node's address for `k`-th path from `from` (every path its own link when the topology has
    /// several).
    fn backup_addr(&self, from: &str, host: &str, k: usize) -> anyhow::Result<SocketAddr> {
        let port = self
            .ports
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, p)| *p)
            .ok_or_else(|| anyhow::anyhow!("no backup on {host}"))?;
        Ok(SocketAddr::new(self.topo.addr(host, from, k)?.into(), port))
    }

    /// Starts a sidecar (process `name`, node `s<host>`) on `host` for the VM behind `attach`, replicating to backup `node` on
    /// `backup_host` over `paths` paths (path `k` over the `k`-th link when there are as many, else all over
    /// the first). Returns its control socket.
    ///
    /// # Errors
    /// It could not be started or did not serve its control socket within 20 s.
    #[allow(clippy::too_many_arguments)]
    pub fn sidecar(
        &mut self,
        name: &str,
        host: &str,
        attach: &Path,
        (node, backup_host): (&str, &str),
        paths: usize,
        generation: u64,
        extra: &[&str],
    ) -> anyhow::Result<PathBuf> {
        let ctl = self.dir.join(format!("{name}.ctl"));
        let _ = std::fs::remove_file(&ctl);
        let first = self.backup_addr(host, backup_host, 0)?;
        // Path k goes to via[k - 1]: the backup's address on link k (see BackupSpec::via).
        let mut via = vec![];
        for k in 1..paths {
            match self.backup_addr(host, backup_host, k) {
                Ok(a) if a != first => via.push(a.to_string()),
                _ => break,
            }
        }
        let mut spec = format!("name={node},addr={first},paths={paths}");
        if !via.is_empty() {
            spec.push_str(&format!(",via={}", via.join("+")));
        }
        let mut c = self.topo.command(host, &self.exe)?;
        // Its certificate is the host's sidecar identity (`sa` on host `a`); `name` names the process.
        c.args(["sidecar", "--vm-id", "vm1", "--quorum", "1"])
            .arg(format!("--node=s{host}"))
            .arg(format!("--backup={spec}"))
            .arg("--attach-socket")
            .arg(attach)
            .arg("--certs")
            .arg(&self.certs)
            .arg("--control-socket")
            .arg(&ctl)
            .arg("--report")
            .arg(self.dir.join(format!("{name}.report.json")))
            .arg("--console-out")
            .arg(self.dir.join("console.log"))
            .arg(format!("--generation={generation}"))
            .args(extra);
        // On the lossy profiles the sidecar runs as docs/bench.md advises for lossy WAN paths: BBR, whose
        // rate random loss does not cut (CUBIC holds each path near the Mathis bound there).
        if self.topo.profile().is_some_and(|p| p.loss > 0.0) {
            c.arg("--congestion=bbr");
        }
        let log = self.log(name);
        self.procs.spawn(name, c, &log)?;
        wait_for_file(&ctl, Duration::from_secs(20))
            .map_err(|e| anyhow::anyhow!("{e}: {}", tail(&log, 5)))?;
        Ok(ctl)
    }

    /// Waits until the sidecar behind `ctl` has its initial copy durable (its status shows an RPO);
    /// returns how long that took from now.
    ///
    /// # Errors
    /// The sidecar exited or `limit` passed.
    pub fn wait_initial_copy(
        &mut self,
        name: &str,
        ctl: &Path,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let t = Instant::now();
        loop {
            if !self.procs.running(name) {
                anyhow::bail!(
                    "sidecar {name} exited before its initial copy was durable: {}",
                    tail(&self.log(name), 8)
                );
            }
            if let Ok(s) = endophyte_engine::control::request(ctl, "GET", "/v1/status", None) {
                if s["rpo_ms"].is_number() {
                    return Ok(t.elapsed());
                }
            }
            anyhow::ensure!(
                t.elapsed() < limit,
                "sidecar {name}: the initial copy was not durable within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops sidecar `name` (SIGTERM: it finishes its epoch and writes its report) and returns the report.
    ///
    /// # Errors
    /// It did not exit within 60 s or wrote no report.
    pub fn stop_sidecar(&mut self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.procs.signal(name, libc::SIGTERM)?;
        self.procs
            .wait(name, Duration::from_secs(60))?
            .ok_or_else(|| anyhow::anyhow!("sidecar {name} did not stop within 60 s"))?;
        let p = self.dir.join(format!("{name}.report.json"));
        let bytes = std::fs::read(&p).map_err(|e| {
            anyhow::anyhow!(
                "sidecar {name} wrote no report ({e}): {}",
                tail(&self.log(name), 8)
            )
        })?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

impl Drop for Cluster<'_> {
    /// A VM that migrated or was promoted runs in a VMM its backup daemon started (and a warm-up may have
    /// started a standby one); those outlive the daemon by design, since a daemon restart must not kill
    /// the guest. The scenario is over: every process whose command line names this scenario's directory
    /// goes.
    fn drop(&mut self) {
        let needle = self.dir.display().to_string();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if pid != me && String::from_utf8_lossy(&cmdline).contains(&needle) {
                // Its command line names the scenario's directory: it was started for this scenario.
                // SAFETY: kill(2) has no memory effects; a pid that exited meanwhile gets ESRCH.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// The guest's own pages-written counter, through the VMM's attach socket.
///
/// # Errors
/// The socket could not be reached or holds no guest status record.
pub fn guest_pages(sock: &Path) -> anyhow::Result<u64> {
    let c = AttachClient::connect(sock, "bench")?;
    endophyte_demo::probe::guest_pages_written(&c)
}

/// The guest's write rate over `window`, pages/s, from its own counter.
///
/// # Errors
/// As [`guest_pages`].
pub fn guest_rate(sock: &Path, window: Duration) -> anyhow::Result<f64> {
    let (p0, t0) = (guest_pages(sock)?, Instant::now());
    std::thread::sleep(window);
    Ok((guest_pages(sock)? - p0) as f64 / t0.elapsed().as_secs_f64())
}

fn mb_s(pages_per_s: f64) -> f64 {
    pages_per_s * page_size() as f64 / 1e6
}

fn copy_report_figures(row: &mut Row, rep: &serde_json::Value) {
    for (k, unit) in [
        ("rpo_ms_p50", "ms"),
        ("rpo_ms_p99", "ms"),
        ("epoch_pause_ms_p50", "ms"),
        ("epoch_pause_ms_p99", "ms"),
        ("throttle_pct_p50", "%"),
        ("throttle_pct_max", "%"),
        ("emergency_events", "count"),
        ("compression_ratio", "x"),
    ] {
        if let Some(v) = rep[k].as_f64() {
            row.set(k, v, unit);
        }
    }
}

/// Replication on `topo` (hosts `a`, primary, and `b`, backup): the initial copy, then `steady` of
/// replication, measured.
///
/// Figures: the guest's dirty rate (its own counter over the steady window) and its free rate before
/// replication; RPO and epoch pause p50/p99, throttle, emergencies (the sidecar's report); bytes the
/// emulator carried from primary to backup in the steady window against the guest's dirty bytes; the
/// initial copy's duration and rate.
///
/// # Errors
/// A process failed to start or stop, or a wait timed out.
pub fn replication(
    topo: &Topology,
    work: &Path,
    guest: &Guest,
    paths: usize,
    compress: bool,
    steady: Duration,
    scenario: &str,
) -> anyhow::Result<Row> {
    let tag = format!(
        "{scenario}-{}-{}m-{}mbs-p{paths}{}{}",
        topo.profile_name(),
        guest.mem >> 20,
        guest.rate_mb_s,
        if compress { "" } else { "-nolz4" },
        if guest.fill { "" } else { "-nofill" }
    );
    let mut c = Cluster::new(topo, &work.join(&tag), &["sa", "nb"])?;
    c.backup("b", "nb")?;
    let sock = c.vmm("a", guest)?;
    let free = guest_rate(&sock, Duration::from_secs(2))?;
    let extra: &[&str] = if compress { &[] } else { &["--no-compress"] };
    let ctl = c.sidecar("sa", "a", &sock, ("nb", "b"), paths, 0, extra)?;
    let initial = c.wait_initial_copy("sa", &ctl, Duration::from_secs(900))?;
    let (w0, p0, t0) = (
        topo.delivered_bytes("a", "b"),
        guest_pages(&sock)?,
        Instant::now(),
    );
    std::thread::sleep(steady);
    let (w1, p1, dt) = (
        topo.delivered_bytes("a", "b"),
        guest_pages(&sock)?,
        t0.elapsed().as_secs_f64(),
    );
    let rep = c.stop_sidecar("sa")?;
    let mut row = guest.params(Row::new(scenario, topo.profile_name(), "endophyte"));
    row = row
        .param("paths", paths as f64, "count")
        .param("compress", f64::from(u8::from(compress)), "bool")
        .param("fill", f64::from(u8::from(guest.fill)), "bool");
    let dirty_bytes = (p1 - p0) * page_size();
    row.set("dirty_rate_mb_s", mb_s((p1 - p0) as f64 / dt), "MB/s");
    row.set("guest_free_rate_mb_s", mb_s(free), "MB/s");
    copy_report_figures(&mut row, &rep);
    if let Some(p) = topo.profile() {
        // No write can be committed sooner than its trip to the backup and the acknowledgement's back.
        row.set_limit("rpo_ms_p50", p.rtt_ms(), "ms");
        row.set_limit("rpo_ms_p99", p.rtt_ms(), "ms");
        row.notes
            .push("limit: RPO can be no less than one round trip on the link".into());
    }
    row.set("initial_copy_s", initial.as_secs_f64(), "s");
    row.set(
        "initial_copy_mb_s",
        guest.mem as f64 / 1e6 / initial.as_secs_f64(),
        "MB/s",
    );
    if topo.profile().is_some() {
        row.set("wire_bytes_steady", (w1 - w0) as f64, "bytes");
        row.set(
            "wire_per_dirty",
            (w1 - w0) as f64 / dirty_bytes.max(1) as f64,
            "x",
        );
        row.set("wire_mb_s_steady", (w1 - w0) as f64 / 1e6 / dt, "MB/s");
    } else {
        // No emulator to count bytes: the sidecar's own count, initial copy excluded.
        let wire =
            rep["wire_bytes"].as_f64().unwrap_or(0.0) - rep["resync_bytes"].as_f64().unwrap_or(0.0);
        let dirty = rep["dirty_bytes"].as_f64().unwrap_or(0.0);
        row.set("wire_per_dirty", wire / dirty.max(1.0), "x");
        row.notes.push(
            "loopback: wire_per_dirty is the sidecar's own frame count over harvested dirty bytes"
                .into(),
        );
    }
    Ok(row)
}

/// The least downtime a switchover can have on link `p`: its `bytes` (final delta and vCPU/device state)
/// at the link's rate, one round trip (the target's answer) and the target's measured `restore_ms`; ms.
/// NaN on a link without a rate limit.
fn switchover_limit_ms(p: &LinkProfile, bytes: f64, restore_ms: f64) -> f64 {
    let Some(bits) = p.rate_bits_per_s else {
        return f64::NAN;
    };
    bytes / (bits as f64 / 8.0) * 1e3 + p.rtt_ms() + restore_ms
}

/// Records the physical limits of a migration row's figures from each run's: downtime (at the same
/// percentile of the runs' limits), total time (with the replica current, the switchover is all that
/// must happen), and bytes on the wire (the final delta and the state).
fn record_limits(row: &mut Row, limit_ms: &[f64], limit_bytes: &[f64]) {
    for (fig, p) in [
        ("downtime_ms_p50", 50.0),
        ("downtime_ms_p99", 99.0),
        ("downtime_ms_max", 100.0),
    ] {
        row.set_limit(fig, percentile(limit_ms, p), "ms");
    }
    row.set_limit("total_ms_p50", percentile(limit_ms, 50.0), "ms");
    row.set_limit("wire_bytes_p50", percentile(limit_bytes, 50.0), "bytes");
    if !limit_bytes.is_empty() {
        row.notes.push(
            "limit: per run, the final delta and the state at the link's rate, plus one round trip and the target's measured restore (none without a link rate); for bytes, the final delta and the state"
                .into(),
        );
    }
}

/// Migration on `topo`: `runs` live migrations back and forth between hosts `a` and `b`, each host running
/// a backup daemon; before each, a sidecar on the VM's host replicates it to the other for its initial
/// copy plus `settle`. Downtime and times come from the sidecar's migration report; bytes on the wire from
/// the emulator; each run is checked by the RAM hashes both VMMs took and by the guest's counter going on
/// at the target.
///
/// # Errors
/// Setup failed; a failed run is recorded in the row's notes instead.
pub fn migration(
    topo: &Topology,
    work: &Path,
    guest: &Guest,
    runs: usize,
    settle: Duration,
    downtime_budget: Duration,
) -> anyhow::Result<Row> {
    let tag = format!(
        "migration-{}-{}m-{}mbs",
        topo.profile_name(),
        guest.mem >> 20,
        guest.rate_mb_s
    );
    let mut c = Cluster::new(topo, &work.join(&tag), &["sa", "sb", "na", "nb"])?;
    c.backup("a", "na")?;
    c.backup("b", "nb")?;
    let mut attach = c.vmm("a", guest)?;
    let mut row = guest.params(Row::new("migration", topo.profile_name(), "endophyte"));
    row = row.param(
        "downtime_budget_ms",
        downtime_budget.as_secs_f64() * 1e3,
        "ms",
    );
    let (mut here, mut there) = ("a", "b");
    let mut generation = 0;
    let mut m = MigrationRuns {
        runs,
        ..MigrationRuns::default()
    };
    let (mut converge, mut initial) = (vec![], vec![]);
    // Per run, the physical limit of its downtime and its bytes (see `record_limits`).
    let (mut limit_ms, mut limit_bytes) = (vec![], vec![]);
    for run in 0..runs {
        let name = format!("s{here}{run}");
        let node = format!("n{there}");
        let ctl = c.sidecar(&name, here, &attach, (&node, there), 4, generation, &[])?;
        let init = c.wait_initial_copy(&name, &ctl, Duration::from_secs(900))?;
        initial.push(init.as_secs_f64());
        m.rates_mb_s.push(mb_s(guest_rate(&attach, settle)?));
        // The bench's own view of the source guest: its mapping outlives the source VMM, which stays
        // paused from the final pause until it exits, so the counter there is the one at the switchover.
        let source = AttachClient::connect(&attach, "bench")?;
        let w0 = topo.delivered_bytes(here, there) + topo.delivered_bytes(there, here);
        let out = std::process::Command::new(&c.exe)
            .args([
                "migrate", "vm1", "--to", &node, "--verify", "--output", "json",
            ])
            .arg("--control")
            .arg(&ctl)
            .arg("--downtime")
            .arg(format!("{}ms", downtime_budget.as_millis()))
            .args(["--deadline", "300s"])
            .output()?;
        let w1 = topo.delivered_bytes(here, there) + topo.delivered_bytes(there, here);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let r = &st["report"];
        let _ = c.procs.wait(&name, Duration::from_secs(30));
        c.procs.kill(&name);
        if !out.status.success() || !r.is_object() {
            row.notes.push(format!(
                "run {run} ({here} -> {there}) failed: {} {}",
                st["error"].as_str().unwrap_or(""),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
            continue;
        }
        let hashes_match =
            r["source_ram_hash"].as_str().is_some() && r["source_ram_hash"] == r["target_ram_hash"];
        let target_sock = c.vm_dir(&node).join("vmm.sock");
        let continued = guest_pages(&target_sock)
            .ok()
            .zip(endophyte_demo::probe::guest_pages_written(&source).ok())
            .is_some_and(|(p, src)| p >= src);
        drop(source);
        if !(hashes_match && continued) {
            row.notes.push(format!(
                "run {run}: RAM hashes match {hashes_match}, the guest's counter went on at the target {continued}"
            ));
            m.wrong_memory += 1;
        }
        m.completed += 1;
        m.downtime_ms
            .push(r["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        converge.push(r["converge_ms"].as_f64().unwrap_or(f64::NAN));
        let delta = r["final_epoch_bytes"].as_f64().unwrap_or(f64::NAN);
        let state = r["state_bytes"].as_f64().unwrap_or(f64::NAN);
        let restore = r["breakdown"]["restore_ms"].as_f64().unwrap_or(f64::NAN);
        if let Some(p) = topo.profile() {
            limit_ms.push(switchover_limit_ms(p, delta + state, restore));
        }
        limit_bytes.push(delta + state);
        m.total_ms.push(r["total_ms"].as_f64().unwrap_or(f64::NAN));
        m.wire_bytes.push(if topo.profile().is_some() {
            (w1 - w0) as f64
        } else {
            r["bytes_sent"].as_f64().unwrap_or(f64::NAN)
        });
        generation = r["generation"].as_u64().unwrap_or(generation + 1);
        // The VM now runs on `there`, in its backup daemon's directory; the source VMM has exited.
        if run == 0 {
            c.procs.kill("vmm");
        }
        attach = target_sock;
        std::mem::swap(&mut here, &mut there);
    }
    m.record(&mut row);
    record_limits(&mut row, &limit_ms, &limit_bytes);
    row.set("converge_ms_p50", percentile(&converge, 50.0), "ms");
    row.set("replica_build_s_p50", percentile(&initial, 50.0), "s");
    row.notes.push(
        "total_ms counts from the migration request with the replica already built; replica_build_s is what building it took (once per target)"
            .into(),
    );
    Ok(row)
}

/// Failover on `topo`: the primary on `a` (VMM and sidecar) replicates to the backup on `b`; after `settle`
/// the primary is killed (SIGKILL, both processes). The bench then asks the backup to promote every 100 ms,
/// unforced, as an operator's automation would: it refuses while the primary's lease is live.
///
/// Figures: kill to promote accepted, the promote itself, and kill to the promoted guest's own counter
/// advancing; the epoch promoted and the RPO it implies.
///
/// # Errors
/// Setup failed, or the VM was not running within 60 s of the kill.
pub fn failover(
    topo: &Topology,
    work: &Path,
    guest: &Guest,
    settle: Duration,
) -> anyhow::Result<Row> {
    let tag = format!("failover-{}-{}m", topo.profile_name(), guest.mem >> 20);
    let mut c = Cluster::new(topo, &work.join(&tag), &["sa", "nb"])?;
    c.backup("b", "nb")?;
    let sock = c.vmm("a", guest)?;
    let ctl = c.sidecar("sa", "a", &sock, ("nb", "b"), 4, 0, &[])?;
    c.wait_initial_copy("sa", &ctl, Duration::from_secs(900))?;
    std::thread::sleep(settle);
    let killed = Instant::now();
    c.procs.kill("sa");
    c.procs.kill("vmm");
    let bctl = c.dir.join("nb.ctl");
    let body = serde_json::json!({"vm": "vm1", "force": false, "verify": false});
    let (resp, accepted) = loop {
        match endophyte_engine::control::request(&bctl, "POST", "/v1/promote", Some(&body)) {
            Ok(v) => break (v, killed.elapsed()),
            Err(e) => {
                anyhow::ensure!(
                    killed.elapsed() < Duration::from_secs(60),
                    "no promote within 60 s of the kill: {e:#}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let promoted_sock = c.vm_dir("nb").join("vmm.sock");
    let p0 = guest_pages(&promoted_sock)?;
    let running = loop {
        if guest_pages(&promoted_sock)? > p0 {
            break killed.elapsed();
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "the promoted guest did not run within 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut row = guest.params(Row::new("failover", topo.profile_name(), "endophyte"));
    row.set(
        "kill_to_promote_accepted_ms",
        accepted.as_secs_f64() * 1e3,
        "ms",
    );
    row.set(
        "promote_ms",
        resp["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        "ms",
    );
    row.set(
        "kill_to_guest_running_ms",
        running.as_secs_f64() * 1e3,
        "ms",
    );
    row.set(
        "epoch_promoted",
        resp["epoch"].as_f64().unwrap_or(f64::NAN),
        "epoch",
    );
    row.notes.push(format!(
        "unforced promote: it waits out the primary's {} s lease; `--force` skips that wait when the operator knows the primary is dead",
        3
    ));
    Ok(row)
}
