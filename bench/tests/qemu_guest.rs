//! The QEMU peer's guest boots under QEMU (TCG), fills its RAM, and writes pages at the rate it is given,
//! by its own counter read through QEMU's monitor. Skipped without qemu-system-x86_64, except under CI.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use endophyte_bench::qemu::{guest_status, tsc_hz, Qmp, GUEST_ELF};

#[test]
fn the_twin_guest_boots_fills_and_paces_itself() {
    let have = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install qemu-system-x86"
        );
        return;
    }
    // Digits in the kernel's path: QEMU puts the path before the parameters on the command line.
    let dir = tempfile::Builder::new()
        .prefix("guest-4096-")
        .tempdir()
        .unwrap();
    let elf = dir.path().join("guest-12.elf");
    std::fs::write(&elf, GUEST_ELF).unwrap();
    let sock = dir.path().join("qmp.sock");
    let serial = dir.path().join("serial.log");
    let rate = 5000u64;
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc,accel=tcg",
            "-cpu",
            "qemu64",
            "-m",
            "64M",
            "-smp",
            "1",
        ])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&elf)
        .arg("-append")
        .arg(format!("1024 {rate} {}", tsc_hz()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .spawn()
        .unwrap();
    let result = (|| -> anyhow::Result<(u64, f64)> {
        let mut q = Qmp::connect(&sock)?;
        let t = Instant::now();
        while guest_status(&mut q).map(|s| s.0).unwrap_or(0) != 2 {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "no fill within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (_, p0) = guest_status(&mut q)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let (state, p1) = guest_status(&mut q)?;
        Ok((state, (p1 - p0) as f64 / t0.elapsed().as_secs_f64()))
    })();
    let _ = qemu.kill();
    let _ = qemu.wait();
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let (state, measured) = result.unwrap_or_else(|e| panic!("{e:#}; console: {console}"));
    assert_eq!(state, 2, "{console}");
    assert!(console.contains("filled, running"), "{console}");
    assert!(
        !console.contains("EXC"),
        "the guest took an exception: {console}"
    );
    // Paced: never above the rate asked for (it naps when ahead), and running (not stuck in a nap).
    assert!(
        measured <= rate as f64 * 1.05 && measured > rate as f64 * 0.3,
        "{measured:.0} pages/s for {rate} asked"
    );
}
