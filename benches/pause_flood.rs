//! `Vm::pause()` while the guest floods a virtio queue (issue 15), without criterion: the test
//! guest's `virtio-flood` mode keeps its entropy device's 128-entry queue full of chains of 128
//! descriptors and notifies without end, so the event loop always has a queue to serve; with
//! `flood_indirect=4096` each chain is one indirect descriptor naming 4,096 (a feature never
//! negotiated: the device must refuse it). Each sample is one `pause()` (timed) and `resume()`,
//! 200 µs apart; the same guest spinning idle (`mode=spin`, with the same device) is the
//! baseline. Prints p50/p90/p99 of each case and the device's status afterwards (a flood of
//! well-formed chains is no error: the device stays live, 0xf; the indirect one needs a reset,
//! 0x4f). `PAUSE_FLOOD_SAMPLES` (or `FORKVM_BENCH_SAMPLES`; default 1000) pauses each.

use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, DeviceKind};
use forkvm_tests::{print_percentiles, sample_count, test_guest_vm, wait_for_output};

fn main() {
    let n = sample_count("PAUSE_FLOOD_SAMPLES");
    for (name, cmdline, ready) in [
        ("idle guest (spinning)", "mode=spin", "counter at"),
        (
            "guest flooding its rng queue",
            "mode=virtio-flood",
            "virtio-flood ready",
        ),
        (
            "guest flooding it with indirect tables of 4,096 (never negotiated)",
            "mode=virtio-flood flood_indirect=4096",
            "virtio-flood ready",
        ),
    ] {
        let console = ConsoleBuffer::new();
        let vm = test_guest_vm(cmdline, &console)
            .rng()
            .build()
            .expect("build the test guest");
        vm.start().expect("start");
        wait_for_output(&console, ready);
        std::thread::sleep(Duration::from_millis(100));
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t0 = Instant::now();
            vm.pause().expect("pause");
            samples.push(t0.elapsed());
            vm.resume().expect("resume");
            std::thread::sleep(Duration::from_micros(200));
        }
        print_percentiles(&format!("pause(): {name}"), &mut samples);
        let status = vm
            .devices()
            .iter()
            .find(|d| d.kind == DeviceKind::Entropy)
            .map(|d| d.status);
        println!("  rng device status afterwards: {status:#x?}");
        vm.stop();
    }
}
