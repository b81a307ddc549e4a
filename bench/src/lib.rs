//! Endophyte's system bench harness (issue 6, under construction): LAN/WAN link profiles and the user-space
//! link emulator's core ([`link`]), and the machine's own limits ([`limits`]). Network namespaces, the TUN
//! plumbing, the scenarios and the QEMU peer come next. The hot-path micro-benchmarks live beside their
//! code (`testvm/benches`, `sidecar/attach/benches`, `sidecar/wire/benches`, `sidecar/benches`).

pub mod limits;
pub mod link;
