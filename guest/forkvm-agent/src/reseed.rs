//! After a fork or restore: fresh entropy for the kernel RNG and the host's time for the clock.

use std::io;

use forkvm_agent_protocol::{ErrorKind, ErrorReply, MAX_ENTROPY, MIN_ENTROPY};

use crate::system::System;

/// Checks that a `Hello` carries [`MIN_ENTROPY`]..=[`MAX_ENTROPY`] bytes of entropy.
pub fn check_entropy(entropy: &[u8]) -> Result<(), ErrorReply> {
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
        return Err(crate::error(
            ErrorKind::InvalidArgument,
            format!(
                "hello carries {} bytes of entropy, not {MIN_ENTROPY}..={MAX_ENTROPY}",
                entropy.len()
            ),
        ));
    }
    Ok(())
}

/// Adds `entropy` to the pool (crediting 8 bits per byte) then forces a CRNG reseed, then steps
/// the clock to `time_ns`, in that order, stopping at the first failure.
pub fn reseed(system: &dyn System, entropy: &[u8], time_ns: u64) -> Result<(), ErrorReply> {
    check_entropy(entropy)?;
    let reseed_error = |what: &str, e: io::Error| ErrorReply {
        kind: ErrorKind::Reseed,
        message: format!("{what}: {e}"),
        errno: e.raw_os_error(),
    };
    system
        .add_entropy(entropy)
        .map_err(|e| reseed_error("RNDADDENTROPY", e))?;
    system
        .reseed_crng()
        .map_err(|e| reseed_error("RNDRESEEDCRNG", e))?;
    system
        .set_clock(time_ns)
        .map_err(|e| reseed_error("clock_settime", e))?;
    Ok(())
}
