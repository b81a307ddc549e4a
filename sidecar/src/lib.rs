//! The Endophyte sidecar library.
//!
//! Today it holds the operator-facing inspection of a VMM through the attach protocol
//! ([`inspect`]); epoch replication, throttling and migration build on the same client
//! ([`endophyte_attach::AttachClient`]).

pub mod inspect;
