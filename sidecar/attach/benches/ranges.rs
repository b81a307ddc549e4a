//! Bitmap-to-ranges coalescing for 1 GiB of 4 KiB pages at several dirty patterns. Prints, asserts nothing.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use endophyte_attach::bitmap::{words_for, DirtyBitmap};

fn bench_ranges(c: &mut Criterion) {
    let pages = (1u64 << 30) / 4096;
    let mut g = c.benchmark_group("ranges_1GiB");
    g.throughput(Throughput::Elements(pages));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let patterns: Vec<(&str, Vec<u64>)> = vec![
        ("clean", vec![0; words_for(pages)]),
        ("all_dirty", vec![u64::MAX; words_for(pages)]),
        (
            "random_1pct",
            (0..words_for(pages))
                .map(|_| (0..64).fold(0u64, |w, b| w | (u64::from(rand() % 100 == 0) << b)))
                .collect(),
        ),
        (
            "random_50pct",
            (0..words_for(pages)).map(|_| rand()).collect(),
        ),
        (
            "runs_of_256",
            (0..words_for(pages))
                .map(|i| if (i / 4) % 2 == 0 { u64::MAX } else { 0 })
                .collect(),
        ),
    ];
    for (name, words) in patterns {
        let bm = DirtyBitmap::from_words(0, 4096, pages, words);
        g.bench_with_input(BenchmarkId::from_parameter(name), &bm, |b, bm| {
            b.iter(|| bm.ranges())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_ranges);
criterion_main!(benches);
