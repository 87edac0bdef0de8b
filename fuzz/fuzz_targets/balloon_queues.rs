//! virtio-balloon's queues: inflate and deflate PFN lists, statistics buffers and free page
//! reports of any shape, with the host's requests (a new target, fresh statistics) waiting on
//! the event loop between them. Whatever the guest sends, the device may only ever ask to
//! discard whole pages of guest RAM.

#![no_main]

#[path = "virtio_harness.rs"]
mod virtio_harness;

use std::sync::Arc;

use forkvm_devices::virtio::balloon::{Balloon, PAGE_SIZE, RamDiscard};
use libfuzzer_sys::fuzz_target;

/// The harness's guest memory: 64 KiB from address 0.
const RAM: u64 = 0x1_0000;

/// A discard that checks what it is asked to free and frees nothing.
struct CheckedDiscard;

impl RamDiscard for CheckedDiscard {
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<()> {
        assert!(
            len > 0 && addr % PAGE_SIZE == 0 && len % PAGE_SIZE == 0,
            "discard of {addr:#x}+{len:#x}: not whole pages"
        );
        assert!(
            addr.checked_add(len).is_some_and(|end| end <= RAM),
            "discard of {addr:#x}+{len:#x}: past guest RAM"
        );
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // Every feature offered; the input chooses which the driver accepts.
    let balloon = Balloon::new(RAM, true, true, Arc::new(CheckedDiscard)).expect("balloon");
    let handle = balloon.handle();
    let target = data.first().map_or(0, |b| u64::from(*b) % (RAM / PAGE_SIZE + 1));
    handle.set_target_pages(target).expect("a target within RAM");
    handle.request_stats();
    virtio_harness::run(Box::new(balloon), data);
});
