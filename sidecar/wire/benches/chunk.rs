//! Chunk encoding (zero-page check + lz4 + BLAKE3) and decoding (lz4 + checks + BLAKE3) per core, on three
//! kinds of guest pages: PRNG-filled (what testvm's `--fill` produces: incompressible), all-zero, and
//! "structured" (a page that is 3/4 zero with small integers in the rest, like page tables or slab pages).
//! Throughput is in page bytes (uncompressed).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use endophyte_wire::ChunkBuilder;

const PAGES: usize = 64;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

fn pages(kind: &str) -> Vec<Vec<u8>> {
    let ps = page_size();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..PAGES)
        .map(|i| {
            let mut p = vec![0u8; ps];
            match kind {
                "prng" => {
                    for w in p.chunks_exact_mut(8) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        w.copy_from_slice(&x.to_le_bytes());
                    }
                }
                "structured" => {
                    for (j, w) in p[..ps / 4].chunks_exact_mut(8).enumerate() {
                        w.copy_from_slice(&((i * 1000 + j) as u64).to_le_bytes());
                    }
                }
                _ => {}
            }
            p
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes((PAGES * page_size()) as u64));
    for kind in ["prng", "zero", "structured"] {
        let ps = pages(kind);
        for compress in [true, false] {
            let name = if compress { "encode_lz4" } else { "encode_raw" };
            g.bench_with_input(BenchmarkId::new(name, kind), &ps, |b, ps| {
                let mut builder = ChunkBuilder::new(1, page_size(), PAGES as u32);
                b.iter(|| {
                    for (i, p) in ps.iter().enumerate() {
                        builder.push((i * page_size()) as u64, p);
                    }
                    builder.finish(compress)
                })
            });
        }
        let mut builder = ChunkBuilder::new(1, page_size(), PAGES as u32);
        for (i, p) in ps.iter().enumerate() {
            builder.push((i * page_size()) as u64, p);
        }
        let chunk = builder.finish(true);
        eprintln!(
            "{kind}: {} page bytes -> {} body bytes (ratio {:.2})",
            PAGES * page_size(),
            chunk.body.len(),
            (PAGES * page_size()) as f64 / chunk.body.len() as f64
        );
        g.bench_with_input(BenchmarkId::new("decode", kind), &chunk, |b, c| {
            b.iter(|| c.decode(page_size() as u64, 1 << 30).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
