//! Endophyte's system bench harness (issue 6, under construction): LAN/WAN link profiles and the user-space
//! link emulator's core ([`link`]), hosts as network namespaces joined by emulated links over TUN devices
//! ([`netns`]), and the machine's own limits ([`limits`]). The scenarios, reports and the QEMU peer come
//! next. The hot-path micro-benchmarks live beside their
//! code (`testvm/benches`, `sidecar/attach/benches`, `sidecar/wire/benches`, `sidecar/benches`).

pub mod limits;
pub mod link;
pub mod netns;
