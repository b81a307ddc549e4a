//! PNG plots of a [`Report`]: guest downtime against the guest's measured dirty rate (migration), and RPO
//! against it (replication), one file per profile, a series per system and VM size.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::report::{Report, Row};

/// Where the plots' font is looked for (Debian's fonts-dejavu-core).
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn ensure_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONTS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                format!("no font for the plots at {FONTS:?} (apt-get install fonts-dejavu-core)")
            })?;
        let bytes: &'static [u8] = std::fs::read(path)
            .map_err(|e| format!("reading {path}: {e}"))?
            .leak();
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a font plotters can use"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// One line of a plot: its label and its points, sorted by x.
type Series = (String, Vec<(f64, f64)>);

/// Series of `y` against the measured dirty rate, for `scenario` rows on `profile`, one per system and
/// VM size.
fn series(report: &Report, scenario: &str, profile: &str, y: &str) -> Vec<Series> {
    let mut out: Vec<Series> = vec![];
    let rows: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.scenario == scenario && r.profile == profile)
        .collect();
    for r in rows {
        let (Some(x), Some(yv)) = (r.get("dirty_rate_mb_s"), r.get(y)) else {
            continue;
        };
        if !(x.is_finite() && yv.is_finite()) {
            continue;
        }
        let mem = r.params.get("mem_gib").map_or(0.0, |f| f.value);
        let label = format!("{} {} GiB", r.system, crate::report::fmt_num(mem));
        match out.iter_mut().find(|(l, _)| *l == label) {
            Some((_, pts)) => pts.push((x, yv)),
            None => out.push((label, vec![(x, yv)])),
        }
    }
    for (_, pts) in &mut out {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Draws one plot; `false` when there is nothing to draw.
fn draw(path: &Path, title: &str, y_desc: &str, data: &[Series]) -> anyhow::Result<bool> {
    if data.iter().all(|(_, p)| p.is_empty()) {
        return Ok(false);
    }
    ensure_font()?;
    let pts = data.iter().flat_map(|(_, p)| p.iter());
    let x_max = pts.clone().map(|p| p.0).fold(0.0, f64::max) * 1.1 + 1.0;
    let y_max = pts.map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1.0;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("guest dirty rate, measured (MB/s)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (label, p)) in data.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(p.iter().map(|&xy| Circle::new(xy, 4, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(true)
}

/// Writes `downtime-<profile>.png` and `rpo-<profile>.png` into `dir` for every profile with data;
/// returns the files written.
///
/// # Errors
/// No font, or a plot could not be drawn or written.
pub fn plots(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut profiles: Vec<&str> = vec![];
    for r in &report.rows {
        if !profiles.contains(&r.profile.as_str()) {
            profiles.push(&r.profile);
        }
    }
    let mut written = vec![];
    for p in profiles {
        let f = dir.join(format!("downtime-{p}.png"));
        let data = series(report, "migration", p, "downtime_ms_p50");
        if draw(
            &f,
            &format!("Migration downtime (p50), {p}"),
            "downtime (ms)",
            &data,
        )? {
            written.push(f);
        }
        let f = dir.join(format!("rpo-{p}.png"));
        let data = series(report, "replication", p, "rpo_ms_p50");
        if draw(
            &f,
            &format!("Replication RPO (p50), {p}"),
            "RPO (ms)",
            &data,
        )? {
            written.push(f);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_is_a_png_with_the_series_drawn() {
        if ensure_font().is_err() {
            // The font is a runtime dependency of the bench; CI installs it (.ci/run).
            assert!(std::env::var_os("CI").is_none(), "{:?}", ensure_font());
            return;
        }
        let mut rows = vec![];
        for (sys, k) in [("endophyte", 1.0), ("qemu-defaults", 10.0)] {
            for rate in [10.0, 50.0, 200.0] {
                let mut r = Row::new("migration", "lan", sys).param("mem_gib", 1.0, "GiB");
                r.set("dirty_rate_mb_s", rate, "MB/s");
                r.set("downtime_ms_p50", k * rate, "ms");
                rows.push(r);
            }
        }
        let rep = Report {
            rows,
            ..Report::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let files = plots(&rep, dir.path()).unwrap();
        assert_eq!(files, vec![dir.path().join("downtime-lan.png")]);
        let bytes = std::fs::read(&files[0]).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Width and height from the IHDR chunk.
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (900, 560));
        // Not a blank canvas: a blank 900x560 PNG compresses to well under 10 KB.
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
    }
}
