//! virtio-blk request parsing and execution against a small scratch image: arbitrary headers,
//! sectors, lengths, chains and segment lists. The first byte also picks the device: the image's
//! own device, a child of a fork of it (reading through copy-on-write layers, writing its own
//! overlay), or the image's device while a child is alive (preserving what it overwrites).

#![no_main]

#[path = "virtio_harness.rs"]
mod virtio_harness;

use std::path::PathBuf;
use std::sync::OnceLock;

use forkvm_devices::virtio::block::Block;
use libfuzzer_sys::fuzz_target;

/// A 64 KiB image in the fuzz crate's (ignored) target folder, made once per fuzzing process.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/block-scratch.img");
        std::fs::write(&path, vec![0u8; 64 << 10]).expect("scratch image");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let first = data.first().copied().unwrap_or(0);
    let read_only = first & 1 == 1;
    let mut block = Block::open(image(), read_only, false, "fuzz").expect("open the scratch image");
    match (first >> 1) % 3 {
        0 => virtio_harness::run(Box::new(block), data),
        1 => {
            let state = block.freeze().expect("freeze");
            let child = Block::from_state(&state).expect("fork");
            virtio_harness::run(Box::new(child), data);
        }
        _ => {
            let state = block.freeze().expect("freeze");
            let child = Block::from_state(&state).expect("fork");
            virtio_harness::run(Box::new(block), data);
            drop(child);
        }
    }
});
