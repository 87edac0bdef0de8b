//! Per-call overhead of the C binding against the Rust API, on the test guest: a no-op call
//! (`is_paused`) and `fork(1)`. Ignored by default; run it optimized:
//! `cargo test -p forkvm-ffi --release --lib -- --ignored --nocapture overhead`.

use std::time::{Duration, Instant};

use forkvm::{ConsoleOutput, VmBuilder};

use crate::error::forkvm_status::FORKVM_OK;
use crate::vm::{VMS, forkvm_vm, forkvm_vm_fork, forkvm_vm_free, forkvm_vm_is_paused};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture, optimized"]
fn overhead() {
    let vm = VmBuilder::new()
        .kernel(forkvm_tests::test_guest())
        .memory_mib(32)
        .cmdline("mode=spin")
        .console(ConsoleOutput::Discard)
        .build()
        .unwrap();
    vm.start().unwrap();
    let handle: *mut forkvm_vm = VMS.insert(vm);
    let vm = VMS.get(handle).unwrap();

    const CALLS: u32 = 1_000_000;
    let t0 = Instant::now();
    for _ in 0..CALLS {
        std::hint::black_box(vm.is_paused());
    }
    let rust_noop = t0.elapsed() / CALLS;
    let mut paused = false;
    let t0 = Instant::now();
    for _ in 0..CALLS {
        // SAFETY: a live handle and a valid out-pointer.
        let status = unsafe { forkvm_vm_is_paused(handle, &mut paused) };
        assert_eq!(std::hint::black_box(status), FORKVM_OK);
    }
    let c_noop = t0.elapsed() / CALLS;

    const FORKS: usize = 30;
    let (mut rust_fork, mut c_fork) = (Vec::new(), Vec::new());
    for _ in 0..FORKS {
        let t0 = Instant::now();
        let children = vm.fork([ConsoleOutput::Discard]).unwrap();
        rust_fork.push(t0.elapsed());
        drop(children);

        let mut child: *mut forkvm_vm = std::ptr::null_mut();
        let t0 = Instant::now();
        // SAFETY: a live handle, no child descriptions, room for one child.
        let status = unsafe { forkvm_vm_fork(handle, std::ptr::null(), 1, &mut child) };
        c_fork.push(t0.elapsed());
        assert_eq!(status, FORKVM_OK);
        // SAFETY: the child just made.
        assert_eq!(unsafe { forkvm_vm_free(child) }, FORKVM_OK);
    }
    let (rust_fork, c_fork) = (median(rust_fork), median(c_fork));
    println!(
        "no-op (is_paused): Rust {rust_noop:?}, C binding {c_noop:?} per call \
         (+{:?})",
        c_noop.saturating_sub(rust_noop)
    );
    println!(
        "fork(1), median of {FORKS}: Rust {rust_fork:?}, C binding {c_fork:?} \
         (difference {:?})",
        c_fork.abs_diff(rust_fork)
    );
    drop(vm);
    // SAFETY: the handle made above.
    assert_eq!(unsafe { forkvm_vm_free(handle) }, FORKVM_OK);
}
