//! Devices that forkvm emulates for its guests.
//!
//! Every value a guest controls reaches these devices through a port or MMIO access; each device
//! validates it and answers a bad access with a defined result (reads of unknown registers return
//! all-ones, writes are ignored), never a host panic.
//!
//! Today: the legacy PC devices a microVM needs ([`legacy`]) and the [`bus`] that routes the
//! guest's port accesses to them. The virtio devices over virtio-mmio follow.

pub mod bus;
pub mod legacy;
pub mod trigger;
