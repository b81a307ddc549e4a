//! The peer: QEMU's own pre-copy live migration, on the same hosts and links as Endophyte.
//!
//! QEMU (`qemu-system-x86_64`, under KVM with `-cpu qemu64` by default, the same emulating KVM that runs
//! Endophyte's testvm guest; TCG as an option) boots the twin of the testvm hotset workload
//! (`qemu-guest/guest.S`, assembled by the build script) through multiboot, with the same RAM size, the same
//! PRNG fill and the same page-write rate target. The fill comes from the host, as testvm's does: the
//! source's RAM is a private mapping (`memory-backend-file`, `share=off`) of a file
//! [`testvm::qemu_guest::prefill`] wrote once, and the guest skips its own fill. The bench reads the guest's
//! own counter through QEMU's monitor (`xp`), so the dirty rate reported is what the guest achieved. QEMU is
//! driven through QMP, the way libvirt and KubeVirt drive it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::endo::{page_size, Guest};
use crate::procs::{tail, wait_for_file, Procs};
use crate::report::{percentile, MigrationRuns, Row};
use crate::topology::Topology;

pub use testvm::qemu_guest::{tsc_hz, GUEST_ELF};
use testvm::qemu_guest::{STATUS_GPA as STATUS, STATUS_MAGIC, ST_PAGES, ST_STATE};

/// TCP port of the incoming migration.
const MIGRATION_PORT: u16 = 4444;

/// A QMP connection (QEMU's JSON monitor protocol, one object per line).
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects to `sock` and leaves capabilities negotiation mode.
    ///
    /// # Errors
    /// No QMP server there within 30 s, or it answered with an error.
    pub fn connect(sock: &Path) -> anyhow::Result<Self> {
        wait_for_file(sock, Duration::from_secs(30))?;
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => anyhow::bail!("connecting to QMP at {}: {e}", sock.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        anyhow::ensure!(greeting.contains("QMP"), "not a QMP greeting: {greeting:?}");
        q.cmd("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    /// Runs `command` with `arguments` (`Null` for none); returns its `return` value.
    ///
    /// # Errors
    /// QEMU answered with an error (its class and description), or the connection failed.
    pub fn cmd(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let msg = if arguments.is_null() {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        writeln!(self.w, "{msg}")?;
        loop {
            let mut line = String::new();
            anyhow::ensure!(
                self.r.read_line(&mut line)? > 0,
                "QMP closed during {command}"
            );
            let v: Value = serde_json::from_str(&line)?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                anyhow::bail!("QMP {command}: {} ({})", e["desc"], e["class"]);
            }
            return Ok(v["return"].clone());
        }
    }

    /// A u64 of guest-physical memory, through the human monitor's `xp`.
    ///
    /// # Errors
    /// The monitor's answer could not be parsed.
    pub fn read_u64(&mut self, gpa: u64) -> anyhow::Result<u64> {
        let out = self.cmd(
            "human-monitor-command",
            json!({ "command-line": format!("xp /1gx {gpa:#x}") }),
        )?;
        let s = out.as_str().unwrap_or("");
        let hex = s
            .split(':')
            .nth(1)
            .map(str::trim)
            .and_then(|h| h.strip_prefix("0x"))
            .ok_or_else(|| anyhow::anyhow!("unexpected xp output {s:?}"))?;
        Ok(u64::from_str_radix(hex, 16)?)
    }
}

/// The guest's status record, read through QMP: `(state, pages written)`; state 1 while it fills RAM, 2 once
/// its workload runs.
///
/// # Errors
/// No status record at its address (the guest did not boot), or the monitor failed.
pub fn guest_status(qmp: &mut Qmp) -> anyhow::Result<(u64, u64)> {
    anyhow::ensure!(
        qmp.read_u64(STATUS)? == STATUS_MAGIC,
        "no guest status record at {STATUS:#x}"
    );
    Ok((
        qmp.read_u64(STATUS + ST_STATE)?,
        qmp.read_u64(STATUS + ST_PAGES)?,
    ))
}

/// One QEMU process.
struct Vm {
    name: String,
    qmp: Qmp,
}

impl Vm {
    fn guest_pages(&mut self) -> anyhow::Result<u64> {
        let (_, pages) =
            guest_status(&mut self.qmp).map_err(|e| anyhow::anyhow!("{}: {e}", self.name))?;
        Ok(pages)
    }

    fn rate(&mut self, window: Duration) -> anyhow::Result<f64> {
        let (p0, t0) = (self.guest_pages()?, Instant::now());
        std::thread::sleep(window);
        Ok((self.guest_pages()? - p0) as f64 / t0.elapsed().as_secs_f64())
    }
}

/// QEMU's accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Accel {
    /// `accel=kvm` with `-cpu qemu64`: the host's KVM, as Endophyte's guest.
    Kvm,
    /// `accel=tcg`: QEMU's own emulator.
    Tcg,
}

impl Accel {
    fn machine(self) -> &'static str {
        match self {
            Self::Kvm => "pc,accel=kvm,memory-backend=mem0",
            Self::Tcg => "pc,accel=tcg,memory-backend=mem0",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Kvm => "KVM",
            Self::Tcg => "TCG",
        }
    }
}

/// The guest-physical range that is not guest RAM in a pc machine's first MiB (VGA window, option ROMs and
/// the BIOS shadow): left out when two VMs' RAM is compared, since firmware owns it.
const LEGACY_HOLE: std::ops::Range<u64> = 0xA0000..0x10_0000;

/// How QEMU's migration is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    /// QEMU's defaults (its max-bandwidth and downtime-limit, one channel).
    Defaults,
    /// multifd with 4 channels, max-bandwidth unlimited, auto-converge, and the same downtime budget as
    /// Endophyte's.
    Tuned,
}

impl Tuning {
    /// The report's system name.
    pub fn system(self) -> &'static str {
        match self {
            Self::Defaults => "qemu-defaults",
            Self::Tuned => "qemu-tuned",
        }
    }
}

struct Peer<'t> {
    topo: &'t Topology,
    dir: PathBuf,
    elf: PathBuf,
    guest: Guest,
    tsc_hz: u64,
    procs: Procs,
    seq: usize,
    accel: Accel,
    /// The host-filled RAM image every source maps privately.
    ram_image: PathBuf,
}

impl Peer<'_> {
    fn start(&mut self, host: &str, incoming: bool) -> anyhow::Result<Vm> {
        self.seq += 1;
        let name = format!("qemu-{host}-{}", self.seq);
        let sock = self.dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&sock);
        let mut c = self.topo.command(host, Path::new("qemu-system-x86_64"))?;
        let mib = self.guest.mem >> 20;
        // The first source maps the host-filled image privately (its writes never reach the file); an
        // incoming VM's RAM is anonymous, overwritten by the migration. Both name their RAM block mem0.
        let backend = if incoming {
            format!("memory-backend-ram,id=mem0,size={mib}M")
        } else {
            format!(
                "memory-backend-file,id=mem0,size={mib}M,mem-path={},share=off",
                self.ram_image.display()
            )
        };
        c.args([
            "-machine",
            self.accel.machine(),
            "-cpu",
            "qemu64",
            "-smp",
            "1",
        ])
        .args(["-m", &format!("{mib}M")])
        .args(["-object", &backend])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .arg("-serial")
        .arg(format!(
            "file:{}",
            self.dir.join(format!("{name}.serial")).display()
        ))
        .arg("-kernel")
        .arg(&self.elf)
        .arg("-append")
        .arg(testvm::qemu_guest::cmdline(
            self.guest.hot_pages(),
            self.guest.pages_per_s(),
            self.tsc_hz,
            true,
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
        if incoming {
            // Held paused after the migration (-S) so that its RAM can be compared with the source's
            // before it runs; QEMU's downtime figure is the source's and does not include this.
            c.args(["-incoming", "defer", "-S"]);
        }
        let log = self.dir.join(format!("{name}.log"));
        self.procs.spawn(&name, c, &log)?;
        let qmp = Qmp::connect(&sock).map_err(|e| anyhow::anyhow!("{e}: {}", tail(&log, 5)))?;
        Ok(Vm { name, qmp })
    }

    fn wait_filled(&mut self, vm: &mut Vm) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            if vm.qmp.read_u64(STATUS)? == STATUS_MAGIC && vm.qmp.read_u64(STATUS + ST_STATE)? == 2
            {
                return Ok(());
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(600),
                "{}: the guest did not finish its fill within 10 min: {}",
                vm.name,
                tail(&self.dir.join(format!("{}.serial", vm.name)), 3)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Guest-physical addresses of the pages (of the host's size) in which the two VMs' RAM differs, over the
    /// first `min(mem, 3 GiB)` (the pc machine's RAM below its PCI hole) less [`LEGACY_HOLE`], from
    /// `pmemsave` dumps of each. Both must be stopped.
    fn ram_differs(&mut self, a: &mut Vm, b: &mut Vm) -> anyhow::Result<Vec<u64>> {
        use std::io::Read;
        let size = self.guest.mem.min(3 << 30);
        let mut files = vec![];
        for vm in [&mut *a, &mut *b] {
            let f = self.dir.join(format!("{}.ram", vm.name));
            vm.qmp.cmd(
                "pmemsave",
                json!({ "val": 0, "size": size, "filename": f.display().to_string() }),
            )?;
            files.push(f);
        }
        let page = page_size() as usize;
        let mut ra = std::io::BufReader::new(std::fs::File::open(&files[0])?);
        let mut rb = std::io::BufReader::new(std::fs::File::open(&files[1])?);
        let (mut pa, mut pb) = (vec![0u8; page], vec![0u8; page]);
        let mut differing = vec![];
        for i in 0..size / page as u64 {
            ra.read_exact(&mut pa)?;
            rb.read_exact(&mut pb)?;
            let gpa = i * page as u64;
            if pa != pb && !LEGACY_HOLE.contains(&gpa) {
                differing.push(gpa);
            }
        }
        for f in files {
            let _ = std::fs::remove_file(f);
        }
        Ok(differing)
    }

    fn set_up(&self, vm: &mut Vm, tuning: Tuning, budget: Duration) -> anyhow::Result<()> {
        if tuning == Tuning::Tuned {
            vm.qmp.cmd(
                "migrate-set-capabilities",
                json!({ "capabilities": [
                    { "capability": "multifd", "state": true },
                    { "capability": "auto-converge", "state": true },
                ]}),
            )?;
            vm.qmp.cmd(
                "migrate-set-parameters",
                json!({
                    "multifd-channels": 4,
                    "max-bandwidth": 1_000_000_000_000u64,
                    "downtime-limit": budget.as_millis() as u64,
                }),
            )?;
        }
        Ok(())
    }
}

/// QEMU's migration on `topo`: `runs` migrations back and forth between hosts `a` and `b` with `tuning`,
/// each given `limit` to complete (else cancelled and counted as not converged).
///
/// Figures: the guest's dirty rate (its own counter, over `settle` before each run) and QEMU's own
/// measurement (`calc-dirty-rate`); downtime, total and setup time (QEMU's `query-migrate`); bytes on the
/// wire (the emulator's counters, or QEMU's `ram.transferred` on loopback); whether each run converged;
/// and whether the guest's counter went on at the target.
///
/// # Errors
/// QEMU could not be started or driven.
#[allow(clippy::too_many_arguments)]
pub fn migration(
    topo: &Topology,
    work: &Path,
    guest: &Guest,
    (tuning, accel): (Tuning, Accel),
    runs: usize,
    settle: Duration,
    budget: Duration,
    limit: Duration,
) -> anyhow::Result<Row> {
    let dir = work.join(format!(
        "{}-{}-{}m-{}mbs",
        tuning.system(),
        topo.profile_name(),
        guest.mem >> 20,
        guest.rate_mb_s
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let elf = dir.join("qemu-guest.elf");
    std::fs::write(&elf, GUEST_ELF)?;
    let ram_image = dir.join("ram.img");
    testvm::qemu_guest::prefill(&ram_image, guest.mem)?;
    let mut peer = Peer {
        topo,
        dir,
        elf,
        guest: guest.clone(),
        tsc_hz: tsc_hz(),
        procs: Procs::default(),
        seq: 0,
        accel,
        ram_image,
    };
    let mut row = guest.params(Row::new("migration", topo.profile_name(), tuning.system()));
    row = row.param("downtime_budget_ms", budget.as_secs_f64() * 1e3, "ms");
    let mut src = peer.start("a", false)?;
    peer.wait_filled(&mut src)?;
    // QEMU's own view of the dirty rate: distinct pages dirtied over 1 s.
    if src
        .qmp
        .cmd("calc-dirty-rate", json!({ "calc-time": 1 }))
        .is_ok()
    {
        std::thread::sleep(Duration::from_millis(1500));
        if let Ok(v) = src.qmp.cmd("query-dirty-rate", Value::Null) {
            if let Some(r) = v["dirty-rate"].as_f64() {
                row.set("qemu_calc_dirty_rate_mb_s", r * 1.048_576, "MB/s");
            }
        }
    }
    let params = src.qmp.cmd("query-migrate-parameters", Value::Null)?;
    let (mut here, mut there) = ("a", "b");
    let mut m = MigrationRuns {
        runs,
        ..MigrationRuns::default()
    };
    let mut setup = vec![];
    for run in 0..runs {
        m.rates_mb_s
            .push(src.rate(settle)? * page_size() as f64 / 1e6);
        let mut dst = peer.start(there, true)?;
        peer.set_up(&mut dst, tuning, budget)?;
        peer.set_up(&mut src, tuning, budget)?;
        let (listen, connect) = match topo.profile() {
            None => (
                format!("tcp:127.0.0.1:{}", MIGRATION_PORT + run as u16),
                format!("tcp:127.0.0.1:{}", MIGRATION_PORT + run as u16),
            ),
            Some(_) => (
                format!("tcp:0.0.0.0:{MIGRATION_PORT}"),
                format!("tcp:{}:{MIGRATION_PORT}", topo.addr(there, here, 0)?),
            ),
        };
        dst.qmp.cmd("migrate-incoming", json!({ "uri": listen }))?;
        let w0 = topo.delivered_bytes(here, there) + topo.delivered_bytes(there, here);
        let t0 = Instant::now();
        src.qmp.cmd("migrate", json!({ "uri": connect }))?;
        let info = loop {
            std::thread::sleep(Duration::from_millis(100));
            let v = src.qmp.cmd("query-migrate", Value::Null)?;
            match v["status"].as_str().unwrap_or("") {
                "completed" | "failed" | "cancelled" => break v,
                _ if t0.elapsed() > limit => {
                    let _ = src.qmp.cmd("migrate_cancel", Value::Null);
                    let mut v = v;
                    v["status"] = json!("timed-out");
                    break v;
                }
                _ => {}
            }
        };
        let w1 = topo.delivered_bytes(here, there) + topo.delivered_bytes(there, here);
        let status = info["status"].as_str().unwrap_or("").to_string();
        if status != "completed" {
            row.notes.push(format!(
                "run {run} ({here} -> {there}): {status} after {:.0} s ({:.0} MB sent){}",
                t0.elapsed().as_secs_f64(),
                info["ram"]["transferred"].as_f64().unwrap_or(0.0) / 1e6,
                info["error-desc"]
                    .as_str()
                    .map_or(String::new(), |e| format!(": {e}"))
            ));
            // Carry on from the source, which still runs the guest; the target goes.
            peer.procs.kill(&dst.name);
            m.wire_bytes.push((w1 - w0) as f64);
            continue;
        }
        // Independent evidence: the target's RAM, before it runs, equals the stopped source's; then the
        // guest goes on at the target (its counter advances there from the source's last value).
        let differing = peer.ram_differs(&mut src, &mut dst)?;
        dst.qmp.cmd("cont", Value::Null)?;
        let p_src = src.guest_pages()?;
        std::thread::sleep(Duration::from_millis(300));
        let p_dst = dst.guest_pages()?;
        std::thread::sleep(Duration::from_millis(300));
        let p_dst2 = dst.guest_pages()?;
        if !(differing.is_empty() && p_dst >= p_src && p_dst2 > p_dst) {
            let first: Vec<String> = differing
                .iter()
                .take(6)
                .map(|a| format!("{a:#x}"))
                .collect();
            row.notes.push(format!(
                "run {run}: the target's RAM differed from the stopped source's in {} pages (first at {}); guest counter {p_src} at the source, {p_dst} then {p_dst2} at the target",
                differing.len(),
                first.join(", ")
            ));
            m.wrong_memory += 1;
        }
        {
            // QEMU's timings count for every completed run; a run that moved the wrong memory is also
            // counted in `runs_with_wrong_memory` and described in the notes.
            m.completed += 1;
            m.downtime_ms
                .push(info["downtime"].as_f64().unwrap_or(f64::NAN));
            m.total_ms
                .push(info["total-time"].as_f64().unwrap_or(f64::NAN));
            setup.push(info["setup-time"].as_f64().unwrap_or(f64::NAN));
            m.wire_bytes.push(if topo.profile().is_some() {
                (w1 - w0) as f64
            } else {
                info["ram"]["transferred"].as_f64().unwrap_or(f64::NAN)
            });
        }
        let _ = src.qmp.cmd("quit", Value::Null);
        peer.procs.kill(&src.name);
        src = dst;
        std::mem::swap(&mut here, &mut there);
    }
    let _ = src.qmp.cmd("quit", Value::Null);
    peer.procs.kill(&src.name);
    let _ = std::fs::remove_file(&peer.ram_image);
    m.record(&mut row);
    row.set("setup_ms_p50", percentile(&setup, 50.0), "ms");
    row.notes.push(format!(
        "QEMU {} {} (RAM filled by the host); max-bandwidth {} B/s, downtime-limit {} ms, multifd {}; limit {:.0} s per run; QEMU's downtime is its own (source stop to completion)",
        tuning.system(),
        accel.name(),
        if tuning == Tuning::Tuned { json!(1_000_000_000_000u64) } else { params["max-bandwidth"].clone() },
        if tuning == Tuning::Tuned { json!(budget.as_millis() as u64) } else { params["downtime-limit"].clone() },
        if tuning == Tuning::Tuned { "4 channels" } else { "off" },
        limit.as_secs_f64()
    ));
    Ok(row)
}
