//! virtio-blk request parsing and execution against a small scratch image: arbitrary headers,
//! sectors, lengths, chains and segment lists.

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
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let block = Block::open(image(), read_only, false, "fuzz").expect("open the scratch image");
    virtio_harness::run(Box::new(block), data);
});
