//! After a fork or restore: fresh entropy for the kernel RNG and the host's time for the clock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use forkvm_agent_protocol::{ErrorKind, ErrorReply, MAX_ENTROPY, MIN_ENTROPY};

use crate::system::System;

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

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

/// `ioctl(RNDADDENTROPY)` on `/dev/urandom`, crediting every bit. Needs `CAP_SYS_ADMIN`.
pub fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    let len = i32::try_from(entropy.len())
        .ok()
        .filter(|len| *len <= i32::MAX / 8)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, as u32 words so
    // that the buffer is aligned for it.
    let mut words = vec![0u32; 2 + entropy.len().div_ceil(4)];
    words[0] = (len * 8) as u32;
    words[1] = len as u32;
    for (word, chunk) in words[2..].iter_mut().zip(entropy.chunks(4)) {
        let mut bytes = [0u8; 4];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(bytes);
    }
    let urandom = File::open("/dev/urandom")?;
    // SAFETY: `words` is a valid rand_pool_info whose buf holds buf_size bytes; the kernel only
    // reads it during the call, and the fd is open.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ioctl(RNDRESEEDCRNG)` on `/dev/urandom`. Needs `CAP_SYS_ADMIN`.
pub fn reseed_crng() -> io::Result<()> {
    let urandom = File::open("/dev/urandom")?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `clock_settime(CLOCK_REALTIME)`. Needs `CAP_SYS_TIME`.
pub fn set_clock(time_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that the call only reads.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
