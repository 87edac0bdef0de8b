//! [`TapBackend`]: a virtio-net device on a host TAP interface, for users who already run
//! Firecracker-style networking (a TAP device per VM, bridged or routed by the host). The host
//! configures the interface; forkvm only moves Ethernet frames between it and the guest, so no
//! policy, DHCP or DNS of forkvm's applies. No checksum offload: the device opens the TAP
//! without a vnet header, so a partial checksum from the guest would reach the host's network
//! wrong (the default [`NetBackend::checksum_offload`] says no). Opening a TAP device needs `CAP_NET_ADMIN` (or a
//! persistent TAP device owned by the caller).

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use forkvm_devices::virtio::net::NetBackend;

/// Frames read from the TAP device that wait for the guest's receive buffers, at most; beyond
/// that the device reads and drops, as a NIC with a full ring does (a host network drops too).
const RX_FRAMES: usize = 256;
/// The largest frame read: a 64 KiB IP packet behind an Ethernet header with a VLAN tag.
const MAX_FRAME: usize = 65535 + 18;

/// A virtio-net backend on a host TAP interface.
#[derive(Debug)]
pub struct TapBackend {
    tap: File,
    name: String,
    to_guest: VecDeque<Vec<u8>>,
    buffer: Vec<u8>,
    dropped: u64,
}

impl TapBackend {
    /// Attaches to the TAP interface `name` (created if it does not exist and the caller may).
    pub fn open(name: &str) -> io::Result<Self> {
        let c_name = CString::new(name).map_err(|_| invalid("a TAP name without NUL bytes"))?;
        let bytes = c_name.as_bytes_with_nul();
        if bytes.len() > libc::IFNAMSIZ {
            return Err(invalid("a TAP name of at most 15 bytes"));
        }
        let tap = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (to, from) in request.ifr_name.iter_mut().zip(bytes) {
            *to = *from as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes back the name into) the ifreq we own; the fd is
        // open.
        let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            tap,
            name: name.to_owned(),
            to_guest: VecDeque::new(),
            buffer: vec![0; MAX_FRAME],
            dropped: 0,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Frames dropped: sent by the guest while the interface could not take them, or read from
    /// the interface while the guest had too many waiting.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Reads what the interface has (non-blocking), keeping at most [`RX_FRAMES`].
    fn read_frames(&mut self) {
        // Bounded: a busy interface cannot hold the event loop.
        for _ in 0..RX_FRAMES * 2 {
            match self.tap.read(&mut self.buffer) {
                Ok(0) => return,
                Ok(n) if self.to_guest.len() < RX_FRAMES => {
                    self.to_guest.push_back(self.buffer[..n].to_vec());
                }
                Ok(_) => self.dropped += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: nothing more now; any other error: the interface went away, and
                // the event loop will report it again if it persists.
                Err(_) => return,
            }
        }
    }
}

impl NetBackend for TapBackend {
    fn transmit(&mut self, frame: &[u8]) {
        // A TAP write takes the whole frame or nothing.
        if self.tap.write(frame).is_err() {
            self.dropped += 1;
        }
    }

    fn peek_receive(&mut self) -> Option<&[u8]> {
        if self.to_guest.is_empty() {
            self.read_frames();
        }
        self.to_guest.front().map(Vec::as_slice)
    }

    fn consume_receive(&mut self) {
        self.to_guest.pop_front();
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn process(&mut self) {
        self.read_frames();
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("expected {what}"))
}
