//! Throttle curves: pure functions from replication pressure in `[0, 1]` to a vCPU throttle fraction.
//!
//! This crate is empty on purpose: the curves (linear, exponential, QEMU-compatible step, custom
//! piecewise-linear) and their parsing arrive with the adaptive-throttling work. Nothing here claims to
//! work yet.
