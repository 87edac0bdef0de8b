//! The host side of the vsock device, in the hybrid style of Firecracker: host programs reach a
//! guest port through one Unix socket (`CONNECT <port>\n`, answered with `OK <host port>\n`),
//! guest connections to host port `P` reach the Unix socket `<path>_<P>`, and
//! [`VsockConnector`] does the same handshake in-process over a socket pair, without touching
//! the file system.
//!
//! Everything here is watched by one epoll set, whose fd the VM's event loop watches in turn
//! (the device's host event). Host clients that have not finished their `CONNECT` line are kept
//! here, at most [`MAX_PENDING_CLIENTS`] of them, with at most [`CONNECT_LINE_MAX`] bytes each.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::send_nosignal;

/// Most host clients waiting to finish their `CONNECT` line (more are closed at once).
pub const MAX_PENDING_CLIENTS: usize = 32;
/// Longest `CONNECT <port>\n` line accepted.
pub const CONNECT_LINE_MAX: usize = 32;

/// A host client that asked for a guest port.
pub struct ConnectRequest {
    /// The client's socket.
    pub stream: UnixStream,
    /// The guest port it named.
    pub port: u32,
}

/// A host client whose `CONNECT` line is not complete yet.
struct Client {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Opens in-process connections to guest ports; cloneable, usable from any thread.
#[derive(Clone)]
pub struct VsockConnector {
    queue: Arc<Mutex<Vec<UnixStream>>>,
    wake: Arc<EventFd>,
}

impl VsockConnector {
    /// Connects to `port` in the guest: returns one end of a socket pair whose other end the
    /// device joins to the guest's connection once the guest accepts. Fails with
    /// `ConnectionRefused` when the guest refuses (nothing listens on the port, or its vsock
    /// driver is not up) and `TimedOut` when it does not answer within `timeout`.
    pub fn connect(&self, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        {
            let mut queue = self.lock();
            if queue.len() >= MAX_PENDING_CLIENTS {
                return Err(io::Error::new(
                    ErrorKind::WouldBlock,
                    "too many vsock connections are being set up at once",
                ));
            }
            queue.push(theirs);
        }
        self.wake.write(1)?;
        hybrid_handshake(&ours, port, timeout)?;
        Ok(ours)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<UnixStream>> {
        crate::sync::lock(&self.queue)
    }
}

/// The client side of the hybrid handshake on a connected `stream`: sends `CONNECT <port>\n`
/// and reads `OK <host port>\n`; returns the host port of the new connection.
pub fn hybrid_handshake(stream: &UnixStream, port: u32, timeout: Duration) -> io::Result<u32> {
    let timeout = Some(timeout.max(Duration::from_millis(1)));
    stream.set_write_timeout(timeout)?;
    stream.set_read_timeout(timeout)?;
    let refused = || {
        io::Error::new(
            ErrorKind::ConnectionRefused,
            format!(
                "the guest refused vsock port {port} (nothing listens there, or its vsock driver \
                 is not up)"
            ),
        )
    };
    let request = format!("CONNECT {port}\n");
    match send_nosignal(stream, request.as_bytes()) {
        Ok(n) if n == request.len() => {}
        Ok(_) => return Err(io::Error::new(ErrorKind::WriteZero, "short CONNECT write")),
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
            return Err(refused());
        }
        Err(e) => return Err(e),
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut reader = stream;
    while line.len() < CONNECT_LINE_MAX {
        match reader.read(&mut byte) {
            Ok(0) => return Err(refused()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    format!("the guest did not answer a connection to vsock port {port} in time"),
                ));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(refused()),
            Err(e) => return Err(e),
        }
    }
    let host_port = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("OK "))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("unexpected vsock handshake reply {line:?}"),
            )
        })?;
    stream.set_write_timeout(None)?;
    stream.set_read_timeout(None)?;
    Ok(host_port)
}

/// The Unix-socket side of one vsock device and the epoll set that watches it.
pub struct HostSockets {
    epoll: Epoll,
    listener: Option<(UnixListener, PathBuf)>,
    connector: VsockConnector,
    clients: HashMap<RawFd, Client>,
}

impl HostSockets {
    /// Listens on `uds_path` if given (the path must not exist; it is removed again on drop).
    pub fn new(uds_path: Option<&Path>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let listener = uds_path
            .map(|path| {
                let listener = UnixListener::bind(path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot listen on {}: {e}", path.display()),
                    )
                })?;
                listener.set_nonblocking(true)?;
                Ok::<_, io::Error>((listener, path.to_owned()))
            })
            .transpose()?;
        let connector = VsockConnector {
            queue: Arc::default(),
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        };
        let sockets = Self {
            epoll,
            listener,
            connector,
            clients: HashMap::new(),
        };
        if let Some((listener, _)) = &sockets.listener {
            sockets.watch(listener.as_raw_fd(), EventSet::IN)?;
        }
        sockets.watch(sockets.connector.wake.as_raw_fd(), EventSet::IN)?;
        Ok(sockets)
    }

    /// The epoll set's fd (readable when any watched socket is ready).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// A handle for in-process connections.
    pub fn connector(&self) -> VsockConnector {
        self.connector.clone()
    }

    /// Up to `events.len()` ready sockets, without blocking.
    pub fn ready(&self, events: &mut [EpollEvent]) -> io::Result<usize> {
        self.epoll.wait(0, events)
    }

    /// Starts watching `fd` for `events` (a connection's socket uses the same set).
    pub fn watch(&self, fd: RawFd, events: EventSet) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, fd as u64),
        )
    }

    /// Changes what `fd` is watched for; empty stops watching it.
    pub fn rewatch(&self, fd: RawFd, from: EventSet, to: EventSet) -> io::Result<()> {
        let operation = match (from.is_empty(), to.is_empty()) {
            (true, true) => return Ok(()),
            (true, false) => ControlOperation::Add,
            (false, true) => ControlOperation::Delete,
            (false, false) => ControlOperation::Modify,
        };
        self.epoll
            .ctl(operation, fd, EpollEvent::new(to, fd as u64))
    }

    /// Connects to the host socket for guest connections to `port`: `<uds path>_<port>`.
    pub fn connect_host_port(&self, port: u32) -> io::Result<UnixStream> {
        let Some((_, path)) = &self.listener else {
            return Err(io::Error::new(
                ErrorKind::NotFound,
                "this vsock device has no Unix socket path for guest connections",
            ));
        };
        let mut target = path.clone().into_os_string();
        target.push(format!("_{port}"));
        connect_nonblocking(Path::new(&target))
    }

    /// Handles readiness of `fd` if it is one of this side's own sockets (the listener, the
    /// in-process wake-up or a client still sending its line); returns `false` otherwise.
    /// Finished `CONNECT` lines become `requests`; while `accepting` is false (the guest driver
    /// is not up) new clients are closed at once, which they read as a refusal.
    pub fn handle(
        &mut self,
        fd: RawFd,
        accepting: bool,
        requests: &mut Vec<ConnectRequest>,
    ) -> bool {
        if self
            .listener
            .as_ref()
            .is_some_and(|(l, _)| l.as_raw_fd() == fd)
        {
            self.accept(accepting);
        } else if fd == self.connector.wake.as_raw_fd() {
            let _ = self.connector.wake.read();
            let streams = std::mem::take(&mut *self.connector.lock());
            for stream in streams {
                self.add_client(stream, accepting);
            }
        } else if self.clients.contains_key(&fd) {
            self.read_line(fd, requests);
        } else {
            return false;
        }
        true
    }

    fn accept(&mut self, accepting: bool) {
        let Some((listener, _)) = &self.listener else {
            return;
        };
        let mut accepted = Vec::new();
        while accepted.len() < MAX_PENDING_CLIENTS {
            match listener.accept() {
                Ok((stream, _)) => accepted.push(stream),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        crate::ratelimit::guest_warn!("vsock: accept failed: {e}");
                    }
                    break;
                }
            }
        }
        for stream in accepted {
            self.add_client(stream, accepting);
        }
    }

    fn add_client(&mut self, stream: UnixStream, accepting: bool) {
        if !accepting || self.clients.len() >= MAX_PENDING_CLIENTS {
            return; // Dropping the stream closes it: the client reads a refusal.
        }
        let fd = stream.as_raw_fd();
        if let Err(e) = stream
            .set_nonblocking(true)
            .and_then(|()| self.watch(fd, EventSet::IN))
        {
            crate::ratelimit::guest_warn!("vsock: cannot watch a host client: {e}");
            return;
        }
        self.clients.insert(
            fd,
            Client {
                stream,
                line: Vec::new(),
            },
        );
    }

    /// Reads what the client sent of its line, a byte at a time so that no stream data after
    /// the line is consumed.
    fn read_line(&mut self, fd: RawFd, requests: &mut Vec<ConnectRequest>) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match (&client.stream).read(&mut byte) {
                Ok(0) => break Some(None),
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect(&client.line)),
                Ok(_) if client.line.len() >= CONNECT_LINE_MAX => break Some(None),
                Ok(_) => client.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(_) => break Some(None),
            }
        };
        let Some(port) = done else {
            return;
        };
        if let Some(client) = self.clients.remove(&fd) {
            let _ = self.rewatch(fd, EventSet::IN, EventSet::empty());
            if let Some(port) = port {
                requests.push(ConnectRequest {
                    stream: client.stream,
                    port,
                });
            }
        }
    }

    /// Closes every client that has not finished its line.
    pub fn drop_clients(&mut self) {
        for (fd, client) in self.clients.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            drop(client);
        }
    }
}

impl Drop for HostSockets {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connects to the Unix socket at `path` without ever blocking: a listener whose backlog is
/// full (a host program that does not accept) fails with `WouldBlock` instead of stalling the
/// event loop, so a guest cannot freeze the VMM by connecting faster than the host accepts.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Parses `CONNECT <port>`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    std::str::from_utf8(line)
        .ok()?
        .strip_prefix("CONNECT ")?
        .trim_end_matches('\r')
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
