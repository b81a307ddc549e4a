//! Endophyte's system bench harness: the same scenarios for Endophyte and for QEMU's own pre-copy migration,
//! on emulated LAN and WAN links, read against the machine's limits.
//!
//! - [`link`]: the link emulator's core (delay, jitter, loss, rate, queue; sans-IO);
//! - [`netns`] and [`topology`]: hosts as network namespaces joined by emulated links over TUN devices;
//! - [`emucheck`]: the emulator checked with ping and iperf3, and its ceiling on this machine;
//! - [`limits`]: memcpy, raw UDP and TCP loopback, lz4;
//! - [`endo`] and [`qemu`]: the scenarios, Endophyte's and the QEMU peer's;
//! - [`run`]: `quick` and `full`; [`report`] and [`plot`]: report.json, report.md, PNG plots.
//!
//! The hot-path micro-benchmarks live beside their code (`testvm/benches`, `sidecar/attach/benches`,
//! `sidecar/wire/benches`, `sidecar/benches`).

pub mod emucheck;
pub mod endo;
pub mod limits;
pub mod link;
pub mod netns;
pub mod plot;
pub mod procs;
pub mod qemu;
pub mod report;
pub mod run;
pub mod topology;
