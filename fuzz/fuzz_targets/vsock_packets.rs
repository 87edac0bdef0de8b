//! virtio-vsock's packet parser and connection state machine: arbitrary transmit chains
//! (headers, lengths, ops, ports, credit) and receive buffers of any shape, against a device
//! whose guest can reach one host listener.

#![no_main]

#[path = "virtio_harness.rs"]
mod virtio_harness;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use forkvm_devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;

/// A directory in the fuzz crate's (ignored) target folder with a host listener on port 1024,
/// which never accepts: the guest's connections to it queue up until its backlog is full.
fn socket_dir() -> &'static PathBuf {
    static DIR: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("target/vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let listener = UnixListener::bind(dir.join("v.sock_1024")).expect("host listener");
        (dir, listener)
    })
    .0
}

fuzz_target!(|data: &[u8]| {
    let vsock = Vsock::new(3, Some(&socket_dir().join("v.sock"))).expect("vsock device");
    virtio_harness::run(Box::new(vsock), data);
});
