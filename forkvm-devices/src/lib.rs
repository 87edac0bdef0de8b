//! Devices that forkvm emulates for its guests.
//!
//! Every value a guest controls reaches these devices through a port or MMIO access; each device
//! validates it and answers a bad access with a defined result (reads of unknown registers return
//! all-ones, writes are ignored), never a host panic.
//!
//! The legacy PC devices a microVM needs ([`legacy`]), virtio devices over virtio-mmio
//! ([`virtio`]), and the [`bus`] that routes the guest's port and MMIO accesses to them.

pub mod bus;
pub mod chain;
pub mod input;
pub mod legacy;
pub mod ratelimit;
pub mod sync;
#[cfg(test)]
mod test_util;
pub mod trigger;
pub mod virtio;
