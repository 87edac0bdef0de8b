//! virtio-console's receive and transmit queues: arbitrary chains carrying guest output, and
//! receive buffers of any shape for pending host input.

#![no_main]

#[path = "virtio_harness.rs"]
mod virtio_harness;

use forkvm_devices::virtio::console::Console;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let console = Console::new(Box::new(std::io::sink())).expect("console");
    // Some host input waits, so receive buffers are filled too.
    console.input().push(&data[..data.len().min(64)]);
    virtio_harness::run(Box::new(console), data);
});
