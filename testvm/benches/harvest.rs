//! Harvest cost per GiB of guest RAM, for the dirty bitmap and the dirty ring, at several dirty fractions.
//!
//! A `scan` guest with stride `s` dirties `1/s` of its RAM per pass; each sample resumes the guest until
//! it has completed one more pass, pauses it, and times only the harvest. Prints criterion's numbers;
//! asserts nothing. Needs /dev/kvm (skips with a message otherwise).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use testvm::{DirtySource, Vm, VmConfig, WorkloadConfig};

const MEM_BYTES: u64 = 256 << 20;

fn bench_harvest(c: &mut Criterion) {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("harvest bench skipped: no /dev/kvm");
        return;
    }
    let mut g = c.benchmark_group("harvest_per_GiB");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Bytes(MEM_BYTES));
    for source in [DirtySource::Bitmap, DirtySource::Ring] {
        // stride 1024 = 0.1 %, 64 = 1.6 %, 8 = 12.5 % of pages dirty per pass
        for stride in [1024u64, 64, 8] {
            let vm = Vm::boot(VmConfig {
                mem_bytes: MEM_BYTES,
                vcpus: 1,
                workload: WorkloadConfig::parse(&format!("scan:stride={stride},rate=0")).unwrap(),
                verify_dirty: false,
                dirty_source: source,
                console: Box::new(std::io::sink()),
            })
            .unwrap();
            vm.start_dirty_log().unwrap();
            let id = BenchmarkId::new(
                format!("{source:?}"),
                format!("{:.1}%_dirty", 100.0 / stride as f64),
            );
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let passes = vm.guest_status(0).unwrap().passes;
                        vm.resume().unwrap();
                        while vm.guest_status(0).unwrap().passes == passes {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        vm.pause().unwrap();
                        let t0 = Instant::now();
                        let bm = vm.harvest().unwrap();
                        total += t0.elapsed();
                        std::hint::black_box(bm);
                    }
                    // Report per GiB of guest RAM.
                    total.mul_f64((1u64 << 30) as f64 / MEM_BYTES as f64)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_harvest);
criterion_main!(benches);
