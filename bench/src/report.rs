//! The bench's report: rows of figures with units, written as `report.json`, `report.md` (ours next to
//! QEMU's, with the ratio) and PNG plots of downtime and RPO against the dirty rate, per profile.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A measured value and its unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The value; not measured or infinite ones are `null` in JSON and read back as NaN.
    #[serde(deserialize_with = "null_as_nan")]
    pub value: f64,
    /// Its unit (`ms`, `MB/s`, `bytes`, `%`, `bool`, ...).
    pub unit: String,
}

fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One scenario, on one profile, for one system, with one set of parameters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Row {
    /// `limits`, `emulator`, `replication`, `migration`, `paths`, `failover` or `compression`.
    pub scenario: String,
    /// `loopback`, `lan`, `wan`, `thin-wan` (or `-` where no link is involved).
    pub profile: String,
    /// `endophyte`, `qemu-defaults`, `qemu-tuned`, `emulator` or `machine`.
    pub system: String,
    /// What the scenario was asked to do (`mem_gib`, `dirty_rate_target_mb_s`, `paths`, ...).
    pub params: BTreeMap<String, Figure>,
    /// What was measured.
    pub figures: BTreeMap<String, Figure>,
    /// The physical limit of some figures, in their units: what the link and this machine allow at all
    /// (e.g. a switchover's downtime can be no less than its final delta at the link's rate, plus a round
    /// trip, plus the restore). The report shows each next to the figure with the ratio figure / limit.
    #[serde(default)]
    pub limits: BTreeMap<String, Figure>,
    /// What a reader needs to know about this row (a rate the emulator could not reach, a run that failed).
    pub notes: Vec<String>,
}

impl Row {
    /// A row without figures yet.
    pub fn new(scenario: &str, profile: &str, system: &str) -> Self {
        Self {
            scenario: scenario.into(),
            profile: profile.into(),
            system: system.into(),
            ..Self::default()
        }
    }

    /// Adds a parameter.
    pub fn param(mut self, name: &str, value: f64, unit: &str) -> Self {
        self.params.insert(
            name.into(),
            Figure {
                value,
                unit: unit.into(),
            },
        );
        self
    }

    /// Records a figure.
    pub fn set(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.insert(
            name.into(),
            Figure {
                value,
                unit: unit.into(),
            },
        );
    }

    /// A figure's value, if measured.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures.get(name).map(|f| f.value)
    }

    /// Records the physical limit of figure `name` (in the figure's unit; NaN is not recorded).
    pub fn set_limit(&mut self, name: &str, value: f64, unit: &str) {
        if value.is_finite() {
            self.limits.insert(
                name.into(),
                Figure {
                    value,
                    unit: unit.into(),
                },
            );
        }
    }

    /// The physical limit of figure `name`, if known.
    pub fn limit(&self, name: &str) -> Option<f64> {
        self.limits.get(name).map(|f| f.value)
    }

    /// The parameters as one short key, e.g. `mem_gib=1 dirty_rate_target_mb_s=50`.
    pub fn params_key(&self) -> String {
        self.params
            .iter()
            .map(|(k, f)| format!("{k}={}", fmt_num(f.value)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The machine the bench ran on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// RAM, GiB.
    pub mem_gib: f64,
    /// `uname -r`.
    pub kernel: String,
    /// QEMU's version line.
    pub qemu: String,
}

impl Machine {
    /// Reads this machine's facts.
    pub fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|s| s.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let out = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_else(|_| "not found".into())
        };
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_gib: mem_kib / (1024.0 * 1024.0),
            kernel: out("uname", &["-r"]),
            qemu: out("qemu-system-x86_64", &["--version"]),
        }
    }
}

/// A whole bench run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// `quick` or `full` (and the options that narrowed it).
    pub mode: String,
    /// When it started, RFC 3339 UTC.
    pub started: String,
    /// How long it took, s.
    pub duration_s: f64,
    /// Where it ran.
    pub machine: Machine,
    /// Every measured row.
    pub rows: Vec<Row>,
    /// Notes on the run as a whole.
    pub notes: Vec<String>,
}

/// A number for a table: integers as such, others with 3 significant digits or 1 decimal.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

const PEERS: [&str; 2] = ["qemu-defaults", "qemu-tuned"];

impl Report {
    /// Writes `report.json` and `report.md` into `dir` (the plots: [`crate::plot::plots`]).
    ///
    /// # Errors
    /// A file could not be written (its message says which).
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let mut written = vec![];
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)?;
        written.push(json);
        let md = dir.join("report.md");
        std::fs::write(&md, self.markdown())?;
        written.push(md);
        Ok(written)
    }

    /// The report as Markdown: the run's facts, then per scenario a table with one line per profile,
    /// parameters and figure, ours next to each QEMU configuration's and the ratio QEMU / ours.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# Endophyte bench: {}\n", self.mode);
        let _ = writeln!(
            s,
            "Started {} and took {:.0} s on {} ({} CPUs, {:.0} GiB RAM, kernel {}; {}).\n",
            self.started, self.duration_s, m.cpu, m.cpus, m.mem_gib, m.kernel, m.qemu
        );
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        let mut scenarios: Vec<&str> = vec![];
        for r in &self.rows {
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
        for sc in scenarios {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.scenario == sc).collect();
            let _ = writeln!(s, "## {sc}\n");
            let has_peer = rows.iter().any(|r| PEERS.contains(&r.system.as_str()));
            if has_peer {
                let _ = writeln!(
                    s,
                    "| profile | parameters | figure | unit | endophyte | limit | endophyte / limit | qemu-defaults | qemu / endophyte | qemu-tuned | qemu / endophyte |"
                );
                let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
            }
            // Group by (profile, parameters), in order of first appearance.
            let mut groups: Vec<(String, String)> = vec![];
            for r in &rows {
                let k = (r.profile.clone(), r.params_key());
                if !groups.contains(&k) {
                    groups.push(k);
                }
            }
            for (profile, key) in &groups {
                let in_group: Vec<&&Row> = rows
                    .iter()
                    .filter(|r| &r.profile == profile && &r.params_key() == key)
                    .collect();
                if has_peer {
                    let by = |sys: &str| in_group.iter().find(|r| r.system == sys).copied();
                    let ours = by("endophyte");
                    let mut names: Vec<(&String, &String)> = vec![];
                    for r in &in_group {
                        for (n, f) in &r.figures {
                            if !names.iter().any(|(x, _)| *x == n) {
                                names.push((n, &f.unit));
                            }
                        }
                    }
                    for (name, unit) in names {
                        // A figure not measured (NaN: a peer that never completed a run) has no ratio either.
                        let cell = |r: Option<&&Row>| {
                            r.and_then(|r| r.get(name)).filter(|v| v.is_finite())
                        };
                        let o = cell(ours);
                        let limit = in_group.iter().find_map(|r| r.limit(name));
                        let mut line = format!(
                            "| {profile} | {key} | {name} | {unit} | {} | {} | {} ",
                            o.map_or("-".into(), fmt_num),
                            limit.map_or("-".into(), fmt_num),
                            ratio_to_limit(o, limit)
                        );
                        for peer in PEERS {
                            let p = cell(by(peer));
                            let ratio = match (o, p) {
                                (Some(o), Some(p)) if o != 0.0 && unit != "bool" => {
                                    format!("{:.2}", p / o)
                                }
                                _ => "-".into(),
                            };
                            let _ = write!(line, "| {} | {ratio} ", p.map_or("-".into(), fmt_num));
                        }
                        let _ = writeln!(s, "{line}|");
                    }
                }
            }
            if !has_peer {
                // One line per row, a column per figure (rows of one scenario share their figures).
                let mut names: Vec<(&String, &String)> = vec![];
                for r in &rows {
                    for (n, f) in &r.figures {
                        if !names.iter().any(|(x, _)| *x == n) {
                            names.push((n, &f.unit));
                        }
                    }
                }
                let head: Vec<String> = names.iter().map(|(n, u)| format!("{n} ({u})")).collect();
                let _ = writeln!(
                    s,
                    "| profile | system | parameters | {} |",
                    head.join(" | ")
                );
                let _ = writeln!(s, "|---|---|---|{}", "---|".repeat(names.len()));
                // Rows with the same profile, system and parameters share a line (the limits are one
                // row per figure).
                let mut lines: Vec<(String, String, String)> = vec![];
                for r in &rows {
                    let k = (r.profile.clone(), r.system.clone(), r.params_key());
                    if !lines.contains(&k) {
                        lines.push(k);
                    }
                }
                for (profile, system, key) in lines {
                    let same: Vec<&&Row> = rows
                        .iter()
                        .filter(|r| {
                            r.profile == profile && r.system == system && r.params_key() == key
                        })
                        .collect();
                    let cells: Vec<String> = names
                        .iter()
                        .map(|(n, _)| {
                            let v = same.iter().find_map(|r| r.get(n));
                            match (v, same.iter().find_map(|r| r.limit(n))) {
                                (Some(v), Some(l)) => format!(
                                    "{} (limit {}, {})",
                                    fmt_num(v),
                                    fmt_num(l),
                                    ratio_to_limit(Some(v), Some(l))
                                ),
                                (v, _) => v.map_or("-".into(), fmt_num),
                            }
                        })
                        .collect();
                    let _ = writeln!(
                        s,
                        "| {profile} | {system} | {key} | {} |",
                        cells.join(" | ")
                    );
                }
            }
            let notes: Vec<String> = rows
                .iter()
                .flat_map(|r| {
                    r.notes.iter().map(move |n| {
                        format!("- {} / {} / {}: {n}", r.profile, r.system, r.params_key())
                    })
                })
                .collect();
            if !notes.is_empty() {
                s.push('\n');
                for n in notes {
                    let _ = writeln!(s, "{n}");
                }
            }
            s.push('\n');
        }
        s
    }
}

/// `value / limit` as `12.3x`, or `-` when either is missing or the limit is zero.
fn ratio_to_limit(value: Option<f64>, limit: Option<f64>) -> String {
    match (value, limit) {
        (Some(v), Some(l)) if l > 0.0 && v.is_finite() => format!("{:.1}x", v / l),
        _ => "-".into(),
    }
}

/// What a migration scenario measured over its runs, either system.
#[derive(Debug, Default)]
pub struct MigrationRuns {
    /// Runs attempted.
    pub runs: usize,
    /// Runs that completed (the VM ran on the target).
    pub completed: usize,
    /// Completed runs whose target memory differed from the source's.
    pub wrong_memory: usize,
    /// The guest's dirty rate before each run, MB/s.
    pub rates_mb_s: Vec<f64>,
    /// Downtime per completed run, ms.
    pub downtime_ms: Vec<f64>,
    /// Total time per completed run, ms.
    pub total_ms: Vec<f64>,
    /// Bytes on the wire per run.
    pub wire_bytes: Vec<f64>,
}

impl MigrationRuns {
    /// Records the figures both systems share into `row`.
    pub fn record(&self, row: &mut Row) {
        row.set("runs", self.runs as f64, "count");
        row.set("runs_completed", self.completed as f64, "count");
        row.set("runs_with_wrong_memory", self.wrong_memory as f64, "count");
        row.set(
            "converged_fraction",
            self.completed as f64 / self.runs.max(1) as f64,
            "ratio",
        );
        let mean = if self.rates_mb_s.is_empty() {
            f64::NAN
        } else {
            self.rates_mb_s.iter().sum::<f64>() / self.rates_mb_s.len() as f64
        };
        row.set("dirty_rate_mb_s", mean, "MB/s");
        row.set("downtime_ms_p50", percentile(&self.downtime_ms, 50.0), "ms");
        row.set("downtime_ms_p99", percentile(&self.downtime_ms, 99.0), "ms");
        row.set(
            "downtime_ms_max",
            percentile(&self.downtime_ms, 100.0),
            "ms",
        );
        row.set("total_ms_p50", percentile(&self.total_ms, 50.0), "ms");
        row.set(
            "wire_bytes_p50",
            percentile(&self.wire_bytes, 50.0),
            "bytes",
        );
    }
}

/// Percentile `p` (0..=100) of `v` by nearest rank; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: &str, downtime: f64) -> Row {
        let mut r = Row::new("migration", "lan", system).param("mem_gib", 1.0, "GiB");
        r.set("downtime_ms_p50", downtime, "ms");
        r
    }

    #[test]
    fn the_markdown_puts_qemu_next_to_ours_with_the_ratio() {
        let mut ours = row("endophyte", 20.0);
        ours.set_limit("downtime_ms_p50", 2.5, "ms");
        let rep = Report {
            mode: "quick".into(),
            rows: vec![ours, row("qemu-defaults", 300.0)],
            ..Report::default()
        };
        let md = rep.markdown();
        let line = md
            .lines()
            .find(|l| l.contains("downtime_ms_p50"))
            .expect("a line for the figure");
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | lan | mem_gib=1 | downtime_ms_p50 | ms | 20 | 2.50 | 8.0x | 300 | 15.00 | - | - |
        assert_eq!(
            cells[1..12],
            [
                "lan",
                "mem_gib=1",
                "downtime_ms_p50",
                "ms",
                "20",
                "2.50",
                "8.0x",
                "300",
                "15.00",
                "-",
                "-"
            ]
        );
    }

    #[test]
    fn a_peer_that_never_completed_shows_no_figure_and_no_ratio() {
        // QEMU's defaults timed out on every wan run: downtime not measured, NaN in the row.
        let rep = Report {
            mode: "full".into(),
            rows: vec![row("endophyte", 314.0), row("qemu-defaults", f64::NAN)],
            ..Report::default()
        };
        let md = rep.markdown();
        let line = md.lines().find(|l| l.contains("downtime_ms_p50")).unwrap();
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells[8..10], ["-", "-"], "{line}");
    }

    #[test]
    fn rows_without_a_peer_share_a_line_per_profile_system_and_parameters() {
        let mut a = Row::new("limits", "-", "machine");
        a.set("memcpy", 20.0, "GB/s");
        let mut b = Row::new("limits", "-", "machine");
        b.set("tcp_loopback", 2500.0, "MB/s");
        let rep = Report {
            rows: vec![a, b],
            ..Report::default()
        };
        let md = rep.markdown();
        let head = md.lines().find(|l| l.contains("memcpy")).unwrap();
        assert!(
            head.contains("memcpy (GB/s)") && head.contains("tcp_loopback (MB/s)"),
            "{md}"
        );
        let body: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("| - | machine"))
            .collect();
        assert_eq!(body, ["| - | machine |  | 20 | 2500 |"], "{md}");
    }

    #[test]
    fn a_figure_without_a_peer_shows_its_limit_and_the_ratio_in_its_cell() {
        let mut r = Row::new("replication", "lan", "endophyte");
        r.set("rpo_ms_p99", 90.0, "ms");
        r.set("epoch_pause_ms_p99", 1.5, "ms");
        r.set_limit("rpo_ms_p99", 0.2, "ms");
        r.set_limit("epoch_pause_ms_p99", f64::NAN, "ms");
        let rep = Report {
            rows: vec![r],
            ..Report::default()
        };
        let md = rep.markdown();
        let body = md
            .lines()
            .find(|l| l.starts_with("| lan | endophyte"))
            .unwrap();
        // Figures in name order: epoch_pause_ms_p99 (no limit: NaN is not recorded), rpo_ms_p99.
        assert_eq!(
            body, "| lan | endophyte |  | 1.50 | 90 (limit 0.200, 450.0x) |",
            "{md}"
        );
    }

    #[test]
    fn the_json_round_trips_with_units() {
        let rep = Report {
            rows: vec![row("endophyte", 12.5)],
            ..Report::default()
        };
        let mut rep = rep;
        rep.rows[0].set("downtime_ms_p99", f64::NAN, "ms");
        rep.rows[0].set_limit("downtime_ms_p50", 3.0, "ms");
        let back: Report = serde_json::from_str(&serde_json::to_string(&rep).unwrap()).unwrap();
        assert_eq!(back.rows[0].figures["downtime_ms_p50"].unit, "ms");
        assert_eq!(back.rows[0].limit("downtime_ms_p50"), Some(3.0));
        // A report written before limits existed still reads.
        let old = r#"{"scenario":"migration","profile":"lan","system":"endophyte","params":{},"figures":{},"notes":[]}"#;
        assert!(serde_json::from_str::<Row>(old).unwrap().limits.is_empty());
        assert_eq!(back.rows[0].figures["downtime_ms_p50"].value, 12.5);
        // NaN (not measured) goes out as null and comes back as NaN.
        assert!(back.rows[0].figures["downtime_ms_p99"].value.is_nan());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
