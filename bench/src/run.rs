//! What `endophyte-bench quick` and `full` run, in order, and how a failed cell is recorded (a row with the
//! error in its notes, so that one broken cell does not lose the rest of a long run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::endo::{self, Guest};
use crate::link::LinkProfile;
use crate::qemu::{self, Tuning};
use crate::report::{Machine, Report, Row};
use crate::topology::{profile_named, Topology};

/// One bench run's shape.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `quick` or `full`.
    pub mode: String,
    /// Profiles of the replication and migration grid.
    pub profiles: Vec<String>,
    /// VM sizes of the grid, bytes.
    pub sizes: Vec<u64>,
    /// Dirty-rate targets of the grid, MB/s.
    pub rates: Vec<f64>,
    /// Endophyte migrations per grid cell.
    pub runs: usize,
    /// QEMU migrations per grid cell and tuning.
    pub qemu_runs: usize,
    /// Time QEMU gets per migration before it is cancelled as not converging.
    pub qemu_limit: Duration,
    /// Replication measured after the initial copy.
    pub steady: Duration,
    /// Replication before each migration (and the dirty-rate window).
    pub settle: Duration,
    /// Downtime budget, both systems.
    pub downtime: Duration,
    /// Path counts of the paths scenario.
    pub path_counts: Vec<usize>,
    /// Rate limit of each path, bits/s.
    pub path_rate: u64,
    /// VM size for the paths, failover and compression scenarios.
    pub small_mem: u64,
    /// Profiles of the failover scenario.
    pub failover_profiles: Vec<String>,
    /// Profiles of the compression scenario.
    pub compression_profiles: Vec<String>,
    /// Seconds per iperf3 measurement.
    pub emulator_secs: u32,
    /// Time per machine-limit figure.
    pub limits_each: Duration,
    /// Scenarios to run (all when empty).
    pub only: Vec<String>,
    /// Leave QEMU out.
    pub no_qemu: bool,
    /// QEMU's accelerator: KVM (as Endophyte's guest runs) or TCG.
    pub qemu_accel: qemu::Accel,
}

impl Plan {
    /// The CI-sized subset: LAN only for the grid, small VMs, few runs; under 10 minutes here.
    pub fn quick() -> Self {
        Self {
            mode: "quick".into(),
            profiles: vec!["lan".into()],
            sizes: vec![256 << 20],
            rates: vec![10.0, 50.0],
            runs: 3,
            qemu_runs: 2,
            qemu_limit: Duration::from_secs(60),
            steady: Duration::from_secs(8),
            settle: Duration::from_secs(2),
            downtime: Duration::from_millis(50),
            path_counts: vec![1, 2, 4],
            path_rate: 50_000_000,
            small_mem: 64 << 20,
            failover_profiles: vec!["lan".into()],
            compression_profiles: vec!["thin-wan".into()],
            emulator_secs: 2,
            limits_each: Duration::from_millis(500),
            only: vec![],
            no_qemu: false,
            qemu_accel: qemu::Accel::Kvm,
        }
    }

    /// Everything the issue asks for: every profile, 1 and 4 GiB, 10/50/200 MB/s, 10 runs per cell.
    pub fn full() -> Self {
        Self {
            mode: "full".into(),
            profiles: vec![
                "loopback".into(),
                "lan".into(),
                "wan".into(),
                "thin-wan".into(),
            ],
            sizes: vec![1 << 30, 4 << 30],
            rates: vec![10.0, 50.0, 200.0],
            runs: 10,
            qemu_runs: 10,
            qemu_limit: Duration::from_secs(300),
            steady: Duration::from_secs(20),
            settle: Duration::from_secs(3),
            downtime: Duration::from_millis(50),
            path_counts: vec![1, 2, 4, 8],
            path_rate: 100_000_000,
            small_mem: 256 << 20,
            failover_profiles: vec!["lan".into(), "wan".into(), "thin-wan".into()],
            compression_profiles: vec!["lan".into(), "thin-wan".into()],
            emulator_secs: 5,
            limits_each: Duration::from_secs(2),
            only: vec![],
            no_qemu: false,
            qemu_accel: qemu::Accel::Kvm,
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

fn profile(name: &str) -> anyhow::Result<Option<LinkProfile>> {
    profile_named(name).map_err(|e| anyhow::anyhow!(e))
}

fn two_hosts(p: Option<&LinkProfile>) -> anyhow::Result<Topology> {
    Topology::build(p, &["a", "b"], &[("a", "b", 1)])
}

/// Runs `f`; on error, a row saying what failed stands in for its result. The report so far is written to
/// `out/report.partial.json` after each cell, so that an interrupted long run keeps what it measured.
fn cell(
    rep: &mut Report,
    out: &Path,
    (scenario, profile, system): (&str, &str, &str),
    f: impl FnOnce() -> anyhow::Result<Row>,
) {
    let rows = &mut rep.rows;
    let t = Instant::now();
    match f() {
        Ok(r) => {
            eprintln!(
                "bench: {scenario} {profile} {system} {} done in {:.0} s",
                r.params_key(),
                t.elapsed().as_secs_f64()
            );
            rows.push(r);
        }
        Err(e) => {
            eprintln!("bench: {scenario} {profile} {system} FAILED: {e:#}");
            let mut r = Row::new(scenario, profile, system);
            r.notes.push(format!("failed: {e:#}"));
            rows.push(r);
        }
    }
    if let Ok(bytes) = serde_json::to_vec_pretty(rep) {
        let _ = std::fs::write(out.join("report.partial.json"), bytes);
    }
}

/// Runs `plan`, writing into `out` (report.json, report.md, plots; scenario logs under `out/work`).
///
/// # Errors
/// Not root or no namespaces (emulated profiles need both), or the report could not be written. Failures
/// of single cells are recorded in the report instead.
pub fn run(plan: &Plan, out: &Path) -> anyhow::Result<Report> {
    anyhow::ensure!(
        crate::netns::available(),
        "the bench needs root, /dev/net/tun and iproute2 for its network namespaces"
    );
    let started = Instant::now();
    let work: PathBuf = out.join("work");
    std::fs::create_dir_all(&work)?;
    let mut rep = Report {
        mode: plan.mode.clone(),
        started: now_rfc3339(),
        machine: Machine::this(),
        ..Report::default()
    };
    if plan.wants("limits") {
        for f in crate::limits::measure_all(plan.limits_each)? {
            let mut r = Row::new("limits", "-", "machine");
            r.set(&f.name, f.value, &f.unit);
            r.notes.push(f.how.clone());
            rep.rows.push(r);
        }
    }

    let mut ceiling = None;
    if plan.wants("emulator") {
        cell(&mut rep, out, ("emulator", "unshaped", "emulator"), || {
            let r = crate::emucheck::check(None, plan.emulator_secs, None)?;
            // The better of TCP and UDP through an unshaped link: what the emulator can carry at all.
            ceiling = r
                .get("iperf3_tcp_mbit_s")
                .into_iter()
                .chain(r.get("iperf3_udp_mbit_s"))
                .reduce(f64::max);
            Ok(r)
        });
        for name in ["lan", "wan", "thin-wan"] {
            cell(&mut rep, out, ("emulator", name, "emulator"), || {
                crate::emucheck::check(profile(name)?.as_ref(), plan.emulator_secs, ceiling)
            });
        }
    }

    for pname in &plan.profiles {
        let p = profile(pname)?;
        for &mem in &plan.sizes {
            for &rate in &plan.rates {
                let guest = Guest {
                    mem,
                    rate_mb_s: rate,
                    fill: true,
                };
                if plan.wants("replication") {
                    cell(&mut rep, out, ("replication", pname, "endophyte"), || {
                        let t = two_hosts(p.as_ref())?;
                        endo::replication(&t, &work, &guest, 4, true, plan.steady, "replication")
                    });
                }
                if plan.wants("migration") {
                    cell(&mut rep, out, ("migration", pname, "endophyte"), || {
                        let t = two_hosts(p.as_ref())?;
                        endo::migration(&t, &work, &guest, plan.runs, plan.settle, plan.downtime)
                    });
                    if !plan.no_qemu {
                        for tuning in [Tuning::Defaults, Tuning::Tuned] {
                            cell(&mut rep, out, ("migration", pname, tuning.system()), || {
                                let t = two_hosts(p.as_ref())?;
                                qemu::migration(
                                    &t,
                                    &work,
                                    &guest,
                                    (tuning, plan.qemu_accel),
                                    plan.qemu_runs,
                                    plan.settle,
                                    plan.downtime,
                                    plan.qemu_limit,
                                )
                            });
                        }
                    }
                }
            }
        }
    }

    if plan.wants("paths") {
        let per_path = LinkProfile {
            name: format!("{}mbit-per-path", plan.path_rate / 1_000_000),
            one_way_delay: Duration::from_millis(1),
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bits_per_s: Some(plan.path_rate),
            queue_bytes: (plan.path_rate / 8 / 50) as usize,
        };
        for &n in &plan.path_counts {
            cell(
                &mut rep,
                out,
                ("paths", &per_path.name, "endophyte"),
                || {
                    let t = Topology::build(Some(&per_path), &["a", "b"], &[("a", "b", n)])?;
                    let guest = Guest {
                        mem: plan.small_mem,
                        rate_mb_s: 10.0,
                        fill: true,
                    };
                    endo::replication(&t, &work, &guest, n, true, Duration::from_secs(3), "paths")
                },
            );
        }
    }

    if plan.wants("failover") {
        for pname in &plan.failover_profiles {
            cell(&mut rep, out, ("failover", pname, "endophyte"), || {
                let t = two_hosts(profile(pname)?.as_ref())?;
                let guest = Guest {
                    mem: plan.small_mem,
                    rate_mb_s: 10.0,
                    fill: true,
                };
                endo::failover(&t, &work, &guest, plan.settle)
            });
        }
    }

    if plan.wants("compression") {
        for pname in &plan.compression_profiles {
            for fill in [false, true] {
                for compress in [true, false] {
                    cell(&mut rep, out, ("compression", pname, "endophyte"), || {
                        let t = two_hosts(profile(pname)?.as_ref())?;
                        let guest = Guest {
                            mem: plan.small_mem,
                            rate_mb_s: 10.0,
                            fill,
                        };
                        endo::replication(
                            &t,
                            &work,
                            &guest,
                            4,
                            compress,
                            plan.steady,
                            "compression",
                        )
                    });
                }
            }
        }
    }

    rep.duration_s = started.elapsed().as_secs_f64();
    rep.notes.push(format!(
        "grid: profiles {:?}, sizes {:?} MiB, dirty-rate targets {:?} MB/s, {} Endophyte and {} QEMU migrations per cell, downtime budget {} ms",
        plan.profiles,
        plan.sizes.iter().map(|s| s >> 20).collect::<Vec<_>>(),
        plan.rates,
        plan.runs,
        if plan.no_qemu { 0 } else { plan.qemu_runs },
        plan.downtime.as_millis()
    ));
    Ok(rep)
}

/// Now as RFC 3339 UTC (`date -u`), without a date library.
fn now_rfc3339() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
