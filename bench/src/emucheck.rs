//! The emulator checked by standard tools, in the bench's own output: `ping` RTT and loss, `iperf3` TCP and
//! UDP throughput across each profile, next to the profile's settings; and the emulator's own ceiling on
//! this machine (an unshaped link), so that a profile faster than that ceiling is reported as such.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::link::LinkProfile;
use crate::report::Row;
use crate::topology::Topology;

/// A link with no delay, loss or rate limit: what the emulator itself can carry.
pub fn unshaped() -> LinkProfile {
    LinkProfile {
        name: "unshaped".into(),
        one_way_delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
        rate_bits_per_s: None,
        queue_bytes: 16 << 20,
    }
}

fn need(tool: &str, package: &str) -> anyhow::Result<()> {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    anyhow::ensure!(ok, "{tool} is missing (apt-get install {package})");
    Ok(())
}

/// `ping` from `a` to `b`: `(rtt avg ms, rtt mdev ms, loss %)`.
fn ping(t: &Topology, count: u32) -> anyhow::Result<(f64, f64, f64)> {
    let to = t.addr("b", "a", 0)?.to_string();
    let out = t
        .command("a", std::path::Path::new("ping"))?
        .args(["-q", "-c", &count.to_string(), "-i", "0.05", "-W", "2", &to])
        .output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    let loss = s
        .split(',')
        .find(|p| p.contains("packet loss"))
        .and_then(|p| p.trim().split('%').next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected ping output: {s}"))?;
    // rtt min/avg/max/mdev = 0.1/0.2/0.3/0.04 ms
    let rtt: Vec<f64> = s
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .map(|v| {
            // "... = 96.6/100.3/103.7/1.6 ms, pipe 2": the numbers end at " ms".
            v.split(" ms")
                .next()
                .unwrap_or("")
                .trim()
                .split('/')
                .filter_map(|x| x.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(rtt.len() == 4, "no RTT in ping output: {s}");
    Ok((rtt[1], rtt[3], loss))
}

/// `iperf3` from `a` to `b` for `secs`: TCP when `udp_bits` is `None`, else UDP offered at that rate.
/// Returns `(received Mbit/s, loss %)`.
fn iperf3(t: &Topology, secs: u32, udp_bits: Option<u64>) -> anyhow::Result<(f64, f64)> {
    let server_addr = t.addr("b", "a", 0)?.to_string();
    let mut server = t
        .command("b", std::path::Path::new("iperf3"))?
        .args(["-s", "-1", "-p", "5201", "-B", &server_addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut c = t.command("a", std::path::Path::new("iperf3"))?;
    c.args([
        "-c",
        &server_addr,
        "-p",
        "5201",
        "-J",
        "-t",
        &secs.to_string(),
    ]);
    if let Some(b) = udp_bits {
        c.args(["-u", "-b", &b.to_string(), "-l", "1400"]);
    }
    let out = c.output()?;
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "iperf3 gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("iperf3: {e}");
    }
    let end = &v["end"];
    Ok(match udp_bits {
        None => (
            end["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e6,
            0.0,
        ),
        Some(_) => {
            // The receiver's view: what arrived, and what was lost on the way.
            let s = if end["sum_received"].is_object() {
                &end["sum_received"]
            } else {
                &end["sum"]
            };
            (
                s["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                s["lost_percent"].as_f64().unwrap_or(0.0),
            )
        }
    })
}

/// Checks `profile` (or, with `None`, the unshaped ceiling) with ping and iperf3; one row.
///
/// # Errors
/// ping or iperf3 is missing, or the topology could not be built.
pub fn check(
    profile: Option<&LinkProfile>,
    secs: u32,
    ceiling_mbit: Option<f64>,
) -> anyhow::Result<Row> {
    need("ping", "iputils-ping")?;
    need("iperf3", "iperf3")?;
    let p = profile.cloned().unwrap_or_else(unshaped);
    let t = Topology::build(Some(&p), &["a", "b"], &[("a", "b", 1)])?;
    let mut row = Row::new("emulator", &p.name, "emulator");
    row = row
        .param("rtt_ms", p.rtt_ms(), "ms")
        .param("loss_pct", p.loss * 100.0, "%")
        .param(
            "rate_mbit_s",
            p.rate_bits_per_s.map_or(f64::INFINITY, |r| r as f64 / 1e6),
            "Mbit/s",
        );
    let (avg, mdev, loss) = ping(&t, 40)?;
    row.set("ping_rtt_ms", avg, "ms");
    row.set("ping_rtt_mdev_ms", mdev, "ms");
    row.set("ping_loss_pct", loss, "%");
    let (tcp, _) = iperf3(&t, secs, None)?;
    row.set("iperf3_tcp_mbit_s", tcp, "Mbit/s");
    // UDP offered at the profile's rate (at the ceiling when unshaped): what the link delivers.
    let offer = p.rate_bits_per_s.map_or(
        ceiling_mbit.map_or(2_000_000_000, |c| (c * 2e6) as u64),
        |r| r,
    );
    let (udp, udp_loss) = iperf3(&t, secs, Some(offer))?;
    row.set("iperf3_udp_mbit_s", udp, "Mbit/s");
    row.set("iperf3_udp_loss_pct", udp_loss, "%");
    if let (Some(rate), Some(ceil)) = (p.rate_bits_per_s, ceiling_mbit) {
        if rate as f64 / 1e6 > ceil {
            row.notes.push(format!(
                "this machine cannot reach the profile's {:.0} Mbit/s: the emulator's ceiling here is {ceil:.0} Mbit/s (unshaped link, the better of iperf3 TCP and UDP), so runs on this profile are bounded by that",
                rate as f64 / 1e6
            ));
        }
    }
    if p.loss > 0.0 {
        row.notes.push(
            "single-stream TCP over loss is bounded by its congestion control (about MSS/RTT x 1.22/sqrt(loss)), not by the link rate".into(),
        );
    }
    Ok(row)
}
