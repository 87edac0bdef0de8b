//! virtio-net (device type 1): an Ethernet link between the guest and a [`NetBackend`] (forkvm's
//! user-mode network in crate `forkvm-net`, or a TAP device).

pub mod backend;

pub use backend::{NetBackend, Unconnected};
