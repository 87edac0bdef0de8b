//! Copy-on-write fork of a running test guest, 2 vCPUs, 256 MiB and 4 GiB:
//!
//! - `fork(1)` latency from call to a running child, for a paused parent (its frozen image is
//!   reused) and for a running one that keeps writing (paused, its memory re-frozen — image data
//!   and written pages copied into a new image — and resumed), each with and without the child
//!   prepared ahead ([`Vm::prepare_forks`], untimed);
//! - how long each fork held a running parent paused ([`Vm::last_pause`]): repeated forks of a
//!   parent that keeps writing (the criterion runs above), the first fork of fresh parents, and
//!   repeated forks of a parent the host writes 16 MiB into between forks;
//! - `fork(1)` of a paused parent with virtio-blk (64 MiB image), virtio-rng, virtio-console and
//!   virtio-vsock (the children get copies of each), with and without the child prepared.
//!
//! Criterion reports medians of the fork latency; every single fork is also timed, topped up after
//! criterion's loop to `FORK_BENCH_N` forks (else `FORKVM_BENCH_SAMPLES`, else 1,000; warm-up
//! forks included), and after each benchmark its p50, p90, p99 and maximum are printed and
//! written to the report (`forkvm_tests::report`), with those of the parent's pause; the first and
//! heavy pauses take as many rounds. Only the fork is timed; tearing the children down comes after.
//! `cargo bench --bench fork_scale` has `fork(n)`, the lazy-fault tail and density.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use forkvm::{ConsoleOutput, Vm};
use forkvm_tests::{print_percentiles, sample_count, spinning_guest_sized, spinning_guest_with};

const VCPUS: u32 = 2;

fn spinning_parent(memory_mib: u64) -> Vm {
    spinning_guest_sized(VCPUS, memory_mib).0
}

fn quiet(n: usize) -> Vec<ConsoleOutput> {
    (0..n).map(|_| ConsoleOutput::Discard).collect()
}

/// Every fork's latency and the parent's pause in it, across criterion's calls.
#[derive(Default)]
struct Record {
    fork: Vec<Duration>,
    pause: Vec<Duration>,
}

impl Record {
    fn print(&mut self, name: &str, paused_parent: bool) {
        if self.fork.is_empty() {
            return; // filtered out
        }
        print_percentiles(&format!("{name}: fork latency"), &mut self.fork);
        if !paused_parent {
            print_percentiles(&format!("{name}: parent paused"), &mut self.pause);
        }
        *self = Self::default();
    }
}

/// Forks `iters` times, one child each, timing each fork; the children are dropped untimed, and
/// with `prepared` each child is prepared ([`Vm::prepare_forks`]) untimed before its fork.
fn time_forks(parent: &Vm, iters: u64, prepared: bool, record: &Mutex<Record>) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if prepared {
            parent.prepare_forks(1).unwrap();
        }
        let t0 = Instant::now();
        let children = parent.fork(quiet(1)).unwrap();
        let took = t0.elapsed();
        total += took;
        let mut record = record.lock().unwrap();
        record.fork.push(took);
        record.pause.extend(parent.last_pause());
        drop(record);
        drop(children);
    }
    total
}

/// Forks more, outside criterion's loop, until `record` holds the sample count (nothing if
/// criterion's filter skipped the benchmark).
fn top_up(parent: &Vm, prepared: bool, record: &Mutex<Record>) {
    let want = sample_count("FORK_BENCH_N");
    let have = record.lock().unwrap().fork.len();
    if have > 0 && have < want {
        time_forks(parent, (want - have) as u64, prepared, record);
    }
}

fn bench_fork1(c: &mut Criterion) {
    let record = Mutex::new(Record::default());
    let mut group = c.benchmark_group("fork1");
    for mib in [256, 4096] {
        let parent = spinning_parent(mib);
        for paused in [false, true] {
            if paused {
                parent.pause().unwrap();
            }
            for prepared in [false, true] {
                let name = format!(
                    "{}_parent{}",
                    if paused { "paused" } else { "running" },
                    if prepared { "_prepared" } else { "" }
                );
                group.bench_with_input(BenchmarkId::new(&name, mib), &mib, |b, _| {
                    b.iter_custom(|iters| time_forks(&parent, iters, prepared, &record))
                });
                top_up(&parent, prepared, &record);
                record
                    .lock()
                    .unwrap()
                    .print(&format!("fork1/{name}/{mib}"), paused);
            }
        }
    }
    group.finish();
}

fn bench_fork1_devices(c: &mut Criterion) {
    let record = Mutex::new(Record::default());
    let mut group = c.benchmark_group("fork1_devices");
    for mib in [256, 4096] {
        let disk = forkvm_tests::TempFile::with_contents("fork-bench.img", &vec![0u8; 64 << 20]);
        let (parent, _, _) = spinning_guest_with(VCPUS, mib, |builder| {
            builder
                .block(disk.path(), false)
                .rng()
                .virtio_console(ConsoleOutput::Discard, None)
                .vsock(forkvm::VsockConfig::new(3))
        });
        parent.pause().unwrap();
        for prepared in [false, true] {
            let name = format!("paused_parent{}", if prepared { "_prepared" } else { "" });
            group.bench_with_input(BenchmarkId::new(&name, mib), &mib, |b, _| {
                b.iter_custom(|iters| time_forks(&parent, iters, prepared, &record))
            });
            top_up(&parent, prepared, &record);
            record
                .lock()
                .unwrap()
                .print(&format!("fork1_devices/{name}/{mib}"), true);
        }
    }
    group.finish();
}

/// Pauses that criterion's loops do not cover: the first fork of fresh running parents, and
/// repeated forks of a running parent into which the host writes 16 MiB (4,096 pages) between
/// forks, so that each re-freeze copies them.
fn first_and_heavy_pauses(_: &mut Criterion) {
    let rounds = sample_count("FORK_BENCH_N");
    for mib in [256, 4096] {
        if !selected(&format!("pause/{mib}")) {
            continue;
        }
        let mut first = Vec::new();
        for _ in 0..rounds {
            let parent = spinning_parent(mib);
            let children = parent.fork(quiet(1)).unwrap();
            first.extend(parent.last_pause());
            drop(children);
            drop(parent);
            // Untimed: the teardowns must not pile up behind the next rounds.
            forkvm::wait_for_releases(Duration::from_secs(10));
        }
        print_percentiles(&format!("pause/first_fork/{mib}"), &mut first);

        let parent = spinning_parent(mib);
        let mut heavy = Vec::new();
        let mut latency = Vec::new();
        for round in 0..rounds {
            for page in 0..4096u64 {
                parent
                    .write_memory((16 << 20) + page * 4096, &[round as u8])
                    .unwrap();
            }
            let t0 = Instant::now();
            let children = parent.fork(quiet(1)).unwrap();
            latency.push(t0.elapsed());
            heavy.extend(parent.last_pause());
            drop(children);
        }
        print_percentiles(&format!("pause/repeated_16MiB_written/{mib}"), &mut heavy);
        print_percentiles(
            &format!("fork1/running_16MiB_written/{mib}: fork latency"),
            &mut latency,
        );
    }
}

/// Whether criterion's filter (a plain substring here, the first argument not an option) names
/// `id`, or there is none.
fn selected(id: &str) -> bool {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    filter.is_none_or(|f| id.contains(&f))
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_fork1, bench_fork1_devices, first_and_heavy_pauses
}
criterion_main!(benches);
