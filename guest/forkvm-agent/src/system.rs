//! The privileged operations the agent performs, behind a trait so that tests can record them
//! instead of reseeding the host's RNG, stepping its clock or powering it off.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

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
        add_entropy(entropy)
    }

    fn reseed_crng(&self) -> io::Result<()> {
        reseed_crng()
    }

    fn set_clock(&self, time_ns: u64) -> io::Result<()> {
        set_clock(time_ns)
    }

    fn power(&self, action: PowerAction) -> io::Result<()> {
        Err(crate::init::power(action))
    }
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `ioctl(RNDADDENTROPY)` on `/dev/urandom`, crediting every bit. Needs `CAP_SYS_ADMIN`.
fn add_entropy(entropy: &[u8]) -> io::Result<()> {
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
fn reseed_crng() -> io::Result<()> {
    let urandom = File::open("/dev/urandom")?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
    let rc = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `clock_settime(CLOCK_REALTIME)`. Needs `CAP_SYS_TIME`.
fn set_clock(time_ns: u64) -> io::Result<()> {
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
