//! Endophyte's attach protocol: how a sidecar process sees a VMM's guest RAM and drives its VM.
//!
//! - [`bitmap`]: dirty-page bitmaps and their coalescing into `{gpa, len}` ranges.
pub mod bitmap;
