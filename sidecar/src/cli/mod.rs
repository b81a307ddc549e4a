//! The subcommands, one module per family.

pub mod admin;
pub mod backup;
pub mod export;
pub mod ops;
pub mod sidecar;
pub mod template;
