//! Chunk encoding and decoding throughput on guest-like pages.
fn main() {}
