//! `AF_VSOCK` stream sockets, handed to the server as [`UnixStream`]s (whose read, write, dup and
//! shutdown are those of any stream socket).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use forkvm_agent_protocol::{Frame, PROTOCOL_VERSION, Reply, write_frame};

/// A listening vsock socket.
pub struct VsockListener {
    fd: OwnedFd,
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl VsockListener {
    /// Listens on `port` of any local CID.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = socket()?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen takes no pointers.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(VsockListener { fd })
    }

    /// Accepts a connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        // SAFETY: null address pointers are allowed; accept4 returns a new fd or -1.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new fd that nothing else owns.
        Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Accepted connections, forever.
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<UnixStream>> + '_ {
        std::iter::repeat_with(|| self.accept())
    }
}

/// Tells the host the agent is up: connects to `cid`:`port` and sends one `Ready` frame.
pub fn notify_ready(cid: u32, port: u32) -> io::Result<()> {
    let fd = socket()?;
    let addr = address(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    let mut stream = UnixStream::from(fd);
    let ready = Frame::control(
        0,
        &Reply::Ready {
            version: PROTOCOL_VERSION,
            agent: crate::AGENT_NAME.to_owned(),
        },
    )
    .map_err(io::Error::other)?;
    write_frame(&mut stream, &ready).map_err(io::Error::other)
}
