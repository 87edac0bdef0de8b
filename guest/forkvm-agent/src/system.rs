//! The privileged operations the agent performs, behind a trait so that tests can record them
//! instead of reseeding the host's RNG, stepping its clock or powering it off.

use std::io;

use forkvm_agent_protocol::PowerAction;

/// Privileged operations on the (guest) system.
pub trait System: Send + Sync {
    /// Adds `entropy` to the kernel's pool, crediting it (`RNDADDENTROPY`).
    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()>;
    /// Forces the kernel's CRNG to reseed (`RNDRESEEDCRNG`).
    fn reseed_crng(&self) -> io::Result<()>;
    /// Steps `CLOCK_REALTIME` to `time_ns` nanoseconds since the Unix epoch.
    fn set_clock(&self, time_ns: u64) -> io::Result<()>;
    /// Stops every other process, syncs and powers off or reboots. The real one returns only on
    /// failure.
    fn power(&self, action: PowerAction) -> io::Result<()>;
}

/// The real system calls.
pub struct RealSystem;

impl System for RealSystem {
    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()> {
        crate::reseed::add_entropy(entropy)
    }

    fn reseed_crng(&self) -> io::Result<()> {
        crate::reseed::reseed_crng()
    }

    fn set_clock(&self, time_ns: u64) -> io::Result<()> {
        crate::reseed::set_clock(time_ns)
    }

    fn power(&self, action: PowerAction) -> io::Result<()> {
        Err(crate::init::power(action))
    }
}
