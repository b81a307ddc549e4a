//! Endophyte's system bench harness (network namespaces, a user-space link emulator, LAN/WAN profiles,
//! scenarios and the QEMU peer).
//!
//! Empty on purpose for now: the harness arrives after replication and migration exist. The hot-path
//! micro-benchmarks live beside their code (`testvm/benches`, `sidecar/attach/benches`).
