//! The virtio-mmio transport's register state machine and queue handling, with virtio-rng behind it.

#![no_main]

#[path = "virtio_harness.rs"]
mod virtio_harness;

use forkvm_devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| virtio_harness::run(Box::new(Rng::new()), data));
