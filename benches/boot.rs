//! VMM time to boot: `build()` alone, `build()` → the guest's first instruction, and `build()` →
//! the test guest's serial banner, for a 256 MiB, 1-vCPU VM.
//!
//! The first-instruction case boots a generated PVH image whose first instruction writes the
//! debug-exit port; the time runs until `wait()` returns, so it also covers that exit and the
//! joining of the VM's threads (an upper bound on the time to the first instruction).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use forkvm::{ConsoleOutput, GuestExit, VmBuilder};
use forkvm_tests::{EXIT_AT_ONCE, TempFile, fake_pvh_elf, image_vm, test_guest};

const MEMORY_MIB: u64 = 256;
const BANNER: &[u8] = b"forkvm test guest\n";

fn first_instruction_image() -> TempFile {
    TempFile::with_contents("bench-pvh", &fake_pvh_elf(0x10_0000, &EXIT_AT_ONCE))
}

/// Runs `once` `iters` times and adds up the durations it reports (its timed part).
fn sum_of(iters: u64, mut once: impl FnMut() -> Duration) -> Duration {
    (0..iters).map(|_| once()).sum()
}

fn bench_boot(c: &mut Criterion) {
    let image = first_instruction_image();
    let builder = || image_vm(image.path()).memory_mib(MEMORY_MIB);
    let mut group = c.benchmark_group("boot_256MiB_1vcpu");
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(10));

    // Only the build is timed; tearing the VM down (KVM's VM destruction) happens after.
    group.bench_function("build", |b| {
        b.iter_custom(|iters| {
            sum_of(iters, || {
                let t0 = Instant::now();
                let vm = builder().build().unwrap();
                let elapsed = t0.elapsed();
                drop(vm);
                elapsed
            })
        })
    });

    group.bench_function("build_to_first_instruction", |b| {
        b.iter_custom(|iters| {
            sum_of(iters, || {
                let t0 = Instant::now();
                let vm = builder().build().unwrap();
                vm.start().unwrap();
                let exit = vm.wait().unwrap();
                let elapsed = t0.elapsed();
                assert_eq!(exit, GuestExit::PoweredOff { status: Some(0) });
                elapsed
            })
        })
    });

    group.bench_function("build_to_test_guest_banner", |b| {
        b.iter_custom(|iters| {
            sum_of(iters, || {
                let (tx, rx) = mpsc::channel::<Vec<u8>>();
                let t0 = Instant::now();
                let vm = VmBuilder::new()
                    .kernel(test_guest())
                    .memory_mib(MEMORY_MIB)
                    .cmdline("mode=spin")
                    .console(ConsoleOutput::Callback(Box::new(move |bytes| {
                        let _ = tx.send(bytes.to_vec());
                    })))
                    .build()
                    .unwrap();
                vm.start().unwrap();
                let mut seen = Vec::new();
                while !seen.ends_with(BANNER) {
                    seen.extend(rx.recv().expect("the guest printed its banner"));
                }
                let elapsed = t0.elapsed();
                vm.stop();
                elapsed
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_boot);
criterion_main!(benches);
