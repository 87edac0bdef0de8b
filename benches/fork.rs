//! Copy-on-write fork of a running test guest (legacy devices only; virtio devices cannot be
//! forked yet): `fork(1)` latency from call to a running child, for a paused parent (its frozen
//! image is reused) and for a running one (paused, its memory frozen — written pages copied into
//! a new image — and resumed), for 256 MiB and 4 GiB guests; and `fork(100)` in one call.
//! Only the fork is timed; tearing the children down comes after.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use forkvm::{ConsoleOutput, Vm};
use forkvm_tests::{spinning_guest_sized, time_each};

fn spinning_parent(memory_mib: u64) -> Vm {
    spinning_guest_sized(1, memory_mib).0
}

fn quiet(n: usize) -> Vec<ConsoleOutput> {
    (0..n).map(|_| ConsoleOutput::Discard).collect()
}

/// Times `iters` forks of `n` children each; the children are dropped untimed, and with
/// `prepared` each fork's children are prepared ([`Vm::prepare_forks`]) untimed before it.
fn time_forks(parent: &Vm, iters: u64, n: usize, prepared: bool) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if prepared {
            parent.prepare_forks(n).unwrap();
        }
        total += time_each(1, || parent.fork(quiet(n)).unwrap());
    }
    total
}

fn bench_fork(c: &mut Criterion) {
    let mut group = c.benchmark_group("fork");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(10));
    for mib in [256, 4096] {
        let parent = spinning_parent(mib);
        group.bench_with_input(
            BenchmarkId::new("running_parent_fork1", mib),
            &mib,
            |b, _| b.iter_custom(|iters| time_forks(&parent, iters, 1, false)),
        );
        parent.pause().unwrap();
        group.bench_with_input(
            BenchmarkId::new("paused_parent_fork1", mib),
            &mib,
            |b, _| b.iter_custom(|iters| time_forks(&parent, iters, 1, false)),
        );
        group.bench_with_input(
            BenchmarkId::new("paused_parent_fork1_prepared", mib),
            &mib,
            |b, _| b.iter_custom(|iters| time_forks(&parent, iters, 1, true)),
        );
    }
    let parent = spinning_parent(256);
    parent.pause().unwrap();
    group.sample_size(10);
    group.bench_function("paused_parent_fork100_256", |b| {
        b.iter_custom(|iters| time_forks(&parent, iters, 100, false))
    });
    group.finish();
}

criterion_group!(benches, bench_fork);
criterion_main!(benches);
