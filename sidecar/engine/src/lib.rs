//! The Endophyte sidecar library: everything behind the `endophyte` binary.
//!
//! - [`replicate`]: the sidecar's epoch loop and path driver (`endophyte sidecar`).
//! - [`backup`] and [`store`]: the backup node and its replica files and journals (`endophyte backup`).
//! - [`relay`]: UDP relays that add paths without decrypting them (`endophyte relay`).
//! - [`tls`]: network CAs and node certificates (`endophyte certs`), mutual TLS configuration.
//! - [`transport`]: QUIC paths carrying the frames of [`endophyte_wire`].
//! - [`config`]: the sidecar's TOML configuration.
//! - [`throttle`]: the controller that turns measured pressure into a vCPU throttle along a curve.
//! - [`demo`]: `endophyte demo replicate`, everything on loopback in one command.
//! - [`inspect`]: checks what a sidecar sees of a VMM through the attach protocol.

pub mod backup;
pub mod config;
pub mod control;
pub mod demo;
pub mod inspect;
pub mod migrate;
pub mod relay;
pub mod replicate;
pub mod store;
pub mod switchover;
pub mod throttle;
pub mod tls;
pub mod transport;
