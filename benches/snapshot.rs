//! Snapshot and restore of a running test guest: writing a snapshot whose memory holds 128 MiB of
//! data (filled by the host) against copying the same memory file in the same run, and restore
//! latency (call → VM running) for 256 MiB and 4 GiB guests: `Vm::restore`, a loaded
//! snapshot's spawn with a child kept ready (`Snapshot::keep_ready`), and `Vm::restore` of a
//! directory kept ready (`Vm::keep_restores_ready`): p50/p90/p99/max of `SNAPSHOT_BENCH_N`
//! rounds each (else `FORKVM_BENCH_SAMPLES`, else 1,000), also in the report
//! (`forkvm_tests::report`).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use forkvm::{ConsoleOutput, MEMORY_FILE, Vm};
use forkvm_tests::{print_percentiles, sample_count, spinning_guest_sized, time_each};

const DATA_MIB: u64 = 128;

fn spinning(memory_mib: u64) -> Vm {
    spinning_guest_sized(1, memory_mib).0
}

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkvm-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn bench_snapshot(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));

    // 128 MiB of non-zero data at 16 MiB, written by the host, then the VM stays paused: each
    // snapshot writes the same image.
    let vm = spinning(256);
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for mib in 0..DATA_MIB {
        vm.write_memory((16 + mib) << 20, &chunk).unwrap();
    }
    vm.pause().unwrap();
    let target = dir("write");
    group.throughput(Throughput::Bytes(DATA_MIB << 20));
    group.bench_function("write_128MiB_data", |b| {
        b.iter(|| vm.snapshot(&target).unwrap())
    });
    let copy = dir("copy");
    std::fs::create_dir_all(&copy).unwrap();
    group.bench_function("cp_memory_file", |b| {
        b.iter(|| std::fs::copy(target.join(MEMORY_FILE), copy.join(MEMORY_FILE)).unwrap())
    });
    drop(vm);

    group.throughput(Throughput::Elements(1));
    for mib in [256, 4096] {
        let vm = spinning(mib);
        let snapshot = dir(&format!("restore-{mib}"));
        vm.snapshot(&snapshot).unwrap();
        drop(vm);
        group.bench_with_input(BenchmarkId::new("restore", mib), &mib, |b, _| {
            b.iter_custom(|iters| {
                time_each(iters, || {
                    Vm::restore(&snapshot, ConsoleOutput::Discard).unwrap()
                })
            })
        });
        restore_prepared(&snapshot, mib);
        let _ = std::fs::remove_dir_all(&snapshot);
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&target);
    let _ = std::fs::remove_dir_all(&copy);
}

/// `Vm::restore` (load + spawn) against `Snapshot::spawn` of a loaded snapshot that keeps one
/// child ready (`keep_ready(1)`, refilled in the background; each round waits, untimed, until it
/// is) and `Vm::restore` of the same files in a directory kept ready
/// (`Vm::keep_restores_ready(dir, 1)`), alternating, the sample count of rounds each.
fn restore_prepared(snapshot: &std::path::Path, mib: u64) {
    let loaded = forkvm::Snapshot::load(snapshot).unwrap();
    loaded.keep_ready(1).unwrap();
    // The same files under another name, kept ready (`Vm::restore` of `snapshot` stays cold).
    let kept = dir(&format!("restore-kept-{mib}"));
    std::fs::create_dir_all(&kept).unwrap();
    for entry in std::fs::read_dir(snapshot).unwrap() {
        let entry = entry.unwrap();
        std::fs::hard_link(entry.path(), kept.join(entry.file_name())).unwrap();
    }
    Vm::keep_restores_ready(&kept, 1).unwrap();
    let rounds = sample_count("SNAPSHOT_BENCH_N");
    let (mut cold, mut ready, mut dir_ready) = (Vec::new(), Vec::new(), Vec::new());
    let wait_until = |done: &dyn Fn() -> bool| {
        let wait = std::time::Instant::now();
        while !done() && wait.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    for _ in 0..rounds {
        let t0 = std::time::Instant::now();
        let vm = Vm::restore(snapshot, ConsoleOutput::Discard).unwrap();
        cold.push(t0.elapsed());
        drop(vm);
        // Untimed: the dropped VM's teardown must not compete with the next restore.
        forkvm::wait_for_releases(Duration::from_secs(10));
        wait_until(&|| loaded.prepared() > 0);
        let t0 = std::time::Instant::now();
        let vm = loaded.spawn(ConsoleOutput::Discard).unwrap();
        ready.push(t0.elapsed());
        drop(vm);
        forkvm::wait_for_releases(Duration::from_secs(10));
        wait_until(&|| Vm::restores_ready(&kept) > 0);
        let t0 = std::time::Instant::now();
        let vm = Vm::restore(&kept, ConsoleOutput::Discard).unwrap();
        dir_ready.push(t0.elapsed());
        drop(vm);
        forkvm::wait_for_releases(Duration::from_secs(10));
    }
    Vm::keep_restores_ready(&kept, 0).unwrap();
    forkvm::wait_for_releases(Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&kept);
    print_percentiles(&format!("snapshot/restore_cold/{mib}MiB"), &mut cold);
    print_percentiles(&format!("snapshot/restore_kept_ready/{mib}MiB"), &mut ready);
    print_percentiles(
        &format!("snapshot/restore_dir_kept_ready/{mib}MiB"),
        &mut dir_ready,
    );
}

criterion_group!(benches, bench_snapshot);
criterion_main!(benches);
