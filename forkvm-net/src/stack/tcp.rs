//! TCP flows: the flow table, how a guest SYN becomes a flow (policy, caps, a host connect, a
//! listening smoltcp socket on exactly the dialled address with its SYN-ACK held until the
//! connect completes), inbound flows (published ports, in-process connects), and the copy
//! between each flow's smoltcp socket and its host socket, with backpressure (epoll interest
//! follows the smoltcp buffers), half-close and resets both ways, and timeouts.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{Socket, SocketBuffer, State};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};
use socket2::SockRef;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{Stack, TOKEN_TCP, in_subnet};
use crate::policy::{Protocol, Verdict};
use crate::slab::Slab;

/// TCP flows open at once, at most (one more gets a reset).
pub const MAX_TCP_FLOWS: usize = 1024;
/// Guest connections waiting for their host connect, at most.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Each smoltcp socket's buffer, each way (the window the guest sees), for the first
/// [`LARGE_FLOWS`] flows open at once.
const LARGE_BUFFER: usize = 256 * 1024;
/// Flows with large buffers at once; the others get [`SMALL_BUFFER`]. Buffers are sized when the
/// socket is made (smoltcp fixes the window scale then), and calloc'd memory may be resident at
/// once, so this bounds the TCP buffers of a VM to 64 × 512 KiB + 960 × 64 KiB ≈ 92 MiB.
const LARGE_FLOWS: usize = 64;
/// The buffer, each way, of flows beyond the first [`LARGE_FLOWS`].
const SMALL_BUFFER: usize = 32 * 1024;
/// A host connect (or a connect to the guest) that takes longer fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A flow with no data either way for this long is reset.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
/// smoltcp gives up on a guest that acknowledges nothing for this long.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// An aborted flow's reset has this long to reach the guest.
const RESET_GRACE: Duration = Duration::from_secs(5);
/// First port of the gateway's side of inbound flows.
const EPHEMERAL_FIRST: u16 = 49152;

/// A flow's 4-tuple: the guest's end, the other end as the guest sees it.
pub(crate) type Key = (SocketAddrV4, SocketAddrV4);

/// A host socket of a flow.
pub(crate) enum HostStream {
    /// A connection the connector opened or a published port accepted.
    Tcp(TcpStream),
    /// The far end of a [`crate::NetworkHandle::connect_tcp`] stream.
    Unix(UnixStream),
}

impl HostStream {
    fn fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }

    fn sock(&self) -> SockRef<'_> {
        match self {
            Self::Tcp(s) => SockRef::from(s),
            Self::Unix(s) => SockRef::from(s),
        }
    }

    fn read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => {
                let mut reader: &TcpStream = s;
                reader.read(buffer)
            }
            Self::Unix(s) => {
                let mut reader: &UnixStream = s;
                reader.read(buffer)
            }
        }
    }

    /// Writes without ever raising SIGPIPE in the embedding process.
    fn write(&self, buffer: &[u8]) -> io::Result<usize> {
        self.sock().send_with_flags(buffer, libc::MSG_NOSIGNAL)
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(true),
            Self::Unix(s) => s.set_nonblocking(true),
        }
    }

    fn shutdown_write(&self) {
        let _ = self.sock().shutdown(Shutdown::Write);
    }

    /// Closes with a reset where the transport has one (SO_LINGER 0).
    fn reset(self) {
        let _ = self.sock().set_linger(Some(Duration::ZERO));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Outbound: the host connect is in progress, the SYN-ACK held. Inbound: our SYN is out.
    Connecting,
    /// Copying both ways.
    Open,
    /// Aborted: the reset is on its way to the guest, then the flow goes.
    Resetting,
}

/// One TCP flow.
pub(crate) struct TcpFlow {
    key: Key,
    outbound: bool,
    phase: Phase,
    handle: SocketHandle,
    in_pending: bool,
    host: Option<HostStream>,
    /// The epoll interest registered (`None`: not registered).
    interest: Option<EventSet>,
    readable: bool,
    writable: bool,
    hangup: bool,
    /// The host socket hung up: it leaves the epoll set (it would report the hang-up on every
    /// turn) and is read and written on every turn instead.
    hung_up: bool,
    host_eof: bool,
    host_write_shut: bool,
    deadline: Instant,
    last_activity: Instant,
    large: bool,
}

/// The TCP flows.
#[derive(Default)]
pub(crate) struct TcpTable {
    pub(crate) flows: Slab<TcpFlow>,
    by_key: HashMap<Key, usize>,
    pending: usize,
    pub(crate) total: u64,
    next_port: u16,
    large: usize,
}

impl TcpTable {
    /// The 4-tuples of the flows.
    pub(crate) fn keys(&self) -> Vec<Key> {
        self.by_key.keys().copied().collect()
    }

    /// Whether a new flow gets large buffers, and their size.
    fn buffer_size(&self) -> (bool, usize) {
        if self.large < LARGE_FLOWS {
            (true, LARGE_BUFFER)
        } else {
            (false, SMALL_BUFFER)
        }
    }
}

/// Closes a host socket (if any) with a reset.
fn reset_host(host: Option<HostStream>) {
    if let Some(host) = host {
        host.reset();
    }
}

fn new_socket(size: usize) -> Socket<'static> {
    let mut socket = Socket::new(
        SocketBuffer::new(vec![0; size]),
        SocketBuffer::new(vec![0; size]),
    );
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket.set_timeout(Some(smoltcp::time::Duration::from_secs(
        GUEST_TIMEOUT.as_secs(),
    )));
    socket
}

impl Stack {
    /// A TCP segment from the guest (its source already checked to be the guest's address).
    pub(crate) fn tcp_segment(
        &mut self,
        frame: Vec<u8>,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        syn: bool,
        now: Instant,
    ) {
        let key = (src, dst);
        if let Some(&index) = self.tcp.by_key.get(&key)
            && let Some(flow) = self.tcp.flows.get_mut(index)
        {
            let pending = flow.in_pending;
            self.ingest(frame, pending, now);
            return;
        }
        if syn && let Some(index) = self.open_outbound(key, now) {
            self.ingest(frame, true, now);
            // The SYN must have reached the new socket; if smoltcp refused it, so do we.
            let taken = self.tcp.flows.get(index).is_some_and(|flow| {
                self.pending.get::<Socket>(flow.handle).state() == State::SynReceived
            });
            if !taken {
                self.remove_tcp(index);
            }
            return;
        }
        // No flow: smoltcp answers with a reset.
        self.ingest(frame, false, now);
    }

    /// A new guest connection to `key.1`: policy, caps, host connect, held listening socket.
    fn open_outbound(&mut self, key: Key, now: Instant) -> Option<usize> {
        let dialled = key.1;
        if *dialled.ip() != self.config.gateway_ip && in_subnet(&self.config, *dialled.ip()) {
            self.stats.tcp_rejected += 1;
            return None;
        }
        let target = self.host_target(dialled);
        if let Verdict::Deny(reason) = self.check(target, Protocol::Tcp, now) {
            self.denied(Protocol::Tcp, target, dialled, reason);
            return None;
        }
        if self.tcp.flows.len() >= MAX_TCP_FLOWS || self.tcp.pending >= MAX_PENDING_HANDSHAKES {
            self.stats.tcp_rejected += 1;
            return None;
        }
        let stream = match crate::seams::connect_tcp(&self.connector, target) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("forkvm-net: connect to {target}: {e}");
                self.stats.tcp_rejected += 1;
                return None;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            self.stats.tcp_rejected += 1;
            return None;
        }
        let _ = stream.set_nodelay(true);
        let (large, size) = self.tcp.buffer_size();
        let mut socket = new_socket(size);
        let endpoint = IpListenEndpoint {
            addr: Some((*dialled.ip()).into()),
            port: dialled.port(),
        };
        if socket.listen(endpoint).is_err() {
            self.stats.tcp_rejected += 1;
            return None;
        }
        socket.pause_synack(true);
        let handle = self.pending.add(socket);
        self.tcp.pending += 1;
        let index = self.insert_tcp(TcpFlow {
            key,
            outbound: true,
            phase: Phase::Connecting,
            handle,
            in_pending: true,
            host: Some(HostStream::Tcp(stream)),
            interest: None,
            readable: false,
            writable: false,
            hangup: false,
            hung_up: false,
            host_eof: false,
            host_write_shut: false,
            deadline: now + CONNECT_TIMEOUT,
            last_activity: now,
            large,
        });
        self.set_interest(index, Some(EventSet::OUT));
        Some(index)
    }

    /// A connection to the guest's `guest_port` for `host` (a published port's connection or
    /// an in-process connect), from the gateway's address.
    pub(crate) fn open_inbound(&mut self, guest_port: u16, host: HostStream, now: Instant) {
        if self.tcp.flows.len() >= MAX_TCP_FLOWS
            || guest_port == 0
            || host.set_nonblocking().is_err()
        {
            self.stats.tcp_rejected += 1;
            host.reset();
            return;
        }
        let guest = SocketAddrV4::new(self.config.guest_ip, guest_port);
        let Some(port) = self.ephemeral_port(guest) else {
            self.stats.tcp_rejected += 1;
            host.reset();
            return;
        };
        let remote = SocketAddrV4::new(self.config.gateway_ip, port);
        let (large, size) = self.tcp.buffer_size();
        let mut socket = new_socket(size);
        let connected = socket.connect(
            self.iface.context(),
            IpEndpoint::new(self.config.guest_ip.into(), guest_port),
            IpListenEndpoint {
                addr: Some(self.config.gateway_ip.into()),
                port,
            },
        );
        if connected.is_err() {
            self.stats.tcp_rejected += 1;
            host.reset();
            return;
        }
        let handle = self.active.add(socket);
        let index = self.insert_tcp(TcpFlow {
            key: (guest, remote),
            outbound: false,
            phase: Phase::Connecting,
            handle,
            in_pending: false,
            host: Some(host),
            interest: None,
            readable: true,
            writable: true,
            hangup: false,
            hung_up: false,
            host_eof: false,
            host_write_shut: false,
            deadline: now + CONNECT_TIMEOUT,
            last_activity: now,
            large,
        });
        // Only errors and hang-ups until the guest accepted.
        self.set_interest(index, Some(EventSet::empty()));
    }

    fn ephemeral_port(&mut self, guest: SocketAddrV4) -> Option<u16> {
        let span = u16::MAX - EPHEMERAL_FIRST + 1;
        for _ in 0..span {
            let port = EPHEMERAL_FIRST + self.tcp.next_port % span;
            self.tcp.next_port = self.tcp.next_port.wrapping_add(1) % span;
            let remote = SocketAddrV4::new(self.config.gateway_ip, port);
            if !self.tcp.by_key.contains_key(&(guest, remote)) {
                return Some(port);
            }
        }
        None
    }

    fn insert_tcp(&mut self, flow: TcpFlow) -> usize {
        let key = flow.key;
        let index = self.tcp.flows.insert(flow);
        self.tcp.by_key.insert(key, index);
        self.tcp.total += 1;
        if self.tcp.flows.get(index).is_some_and(|flow| flow.large) {
            self.tcp.large += 1;
        }
        index
    }

    /// Removes a flow, its smoltcp socket and its host socket (closed as it is).
    fn remove_tcp(&mut self, index: usize) {
        let Some(flow) = self.tcp.flows.remove(index) else {
            return;
        };
        self.tcp.by_key.remove(&flow.key);
        if flow.large {
            self.tcp.large = self.tcp.large.saturating_sub(1);
        }
        if flow.in_pending {
            self.pending.remove(flow.handle);
        } else {
            self.active.remove(flow.handle);
        }
        if flow.outbound && flow.phase == Phase::Connecting {
            self.tcp.pending = self.tcp.pending.saturating_sub(1);
        }
        // Dropping the host socket closes it, which also takes it out of the epoll set.
    }

    /// Readiness of a flow's host socket.
    pub(crate) fn tcp_event(&mut self, index: usize, events: EventSet) {
        if let Some(flow) = self.tcp.flows.get_mut(index) {
            if events.contains(EventSet::IN) {
                flow.readable = true;
            }
            if events.contains(EventSet::OUT) {
                flow.writable = true;
            }
            if events.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) {
                flow.hangup = true;
                flow.readable = true;
                flow.writable = true;
            }
        }
    }

    /// Moves every flow on: connects that completed, data both ways, closes, timeouts.
    pub(crate) fn service_tcp(&mut self, now: Instant) {
        for index in self.tcp.flows.indices() {
            let Some(phase) = self.tcp.flows.get(index).map(|flow| flow.phase) else {
                continue;
            };
            let keep = match phase {
                Phase::Connecting => self.service_connecting(index, now),
                Phase::Open => self.service_open(index, now),
                Phase::Resetting => self.service_resetting(index, now),
            };
            if !keep {
                self.remove_tcp(index);
            } else {
                self.update_interest(index);
            }
        }
    }

    fn service_connecting(&mut self, index: usize, now: Instant) -> bool {
        let Some(flow) = self.tcp.flows.get_mut(index) else {
            return false;
        };
        if !flow.outbound {
            let socket = self.active.get_mut::<Socket>(flow.handle);
            return match socket.state() {
                State::SynSent if now >= flow.deadline || flow.hangup => {
                    socket.abort();
                    flow.phase = Phase::Resetting;
                    flow.deadline = now + RESET_GRACE;
                    reset_host(flow.host.take());
                    true
                }
                State::SynSent => true,
                State::Closed | State::Listen | State::TimeWait => {
                    // The guest refused (or smoltcp gave up): the host side reads EOF/reset.
                    reset_host(flow.host.take());
                    false
                }
                _ => {
                    flow.phase = Phase::Open;
                    flow.last_activity = now;
                    true
                }
            };
        }
        let socket = self.pending.get_mut::<Socket>(flow.handle);
        if socket.state() != State::SynReceived {
            // The guest gave up (its RST took the socket back to LISTEN).
            return false;
        }
        let mut outcome = None;
        if flow.writable || flow.hangup {
            flow.writable = false;
            if let Some(host) = &flow.host {
                let sock = host.sock();
                outcome = match sock.take_error() {
                    Ok(None) if sock.peer_addr().is_ok() => Some(true),
                    Ok(None) if !flow.hangup => None,
                    _ => Some(false),
                };
            }
        }
        if outcome.is_none() && now >= flow.deadline {
            outcome = Some(false);
        }
        let Some(connected) = outcome else {
            return true;
        };
        // Either way the socket joins the active set: to send its SYN-ACK, or its reset.
        let socket = self.pending.remove(flow.handle);
        #[allow(irrefutable_let_patterns)]
        let smoltcp::socket::Socket::Tcp(mut socket) = socket else {
            return false;
        };
        socket.pause_synack(false);
        if !connected {
            socket.abort();
        }
        flow.handle = self.active.add(socket);
        flow.in_pending = false;
        self.tcp.pending = self.tcp.pending.saturating_sub(1);
        if connected {
            flow.phase = Phase::Open;
            flow.readable = true;
            flow.writable = true;
            flow.last_activity = now;
        } else {
            self.stats.tcp_rejected += 1;
            flow.phase = Phase::Resetting;
            flow.deadline = now + RESET_GRACE;
            flow.host = None;
        }
        true
    }

    fn service_resetting(&mut self, index: usize, now: Instant) -> bool {
        let Some(flow) = self.tcp.flows.get(index) else {
            return false;
        };
        let socket = self.active.get::<Socket>(flow.handle);
        // smoltcp forgets the peer once the RST went out.
        socket.remote_endpoint().is_some() && now < flow.deadline
    }

    fn service_open(&mut self, index: usize, now: Instant) -> bool {
        let Some(flow) = self.tcp.flows.get_mut(index) else {
            return false;
        };
        let socket = self.active.get_mut::<Socket>(flow.handle);
        let Some(host) = flow.host.as_ref() else {
            return false;
        };
        let mut failed = false;
        let mut moved = false;

        // A hang-up with an error is a reset from the host's peer.
        if flow.hangup {
            flow.hangup = false;
            flow.hung_up = true;
            match host.sock().take_error() {
                Ok(None) => {}
                _ => failed = true,
            }
        }
        if flow.hung_up {
            flow.readable = true;
            flow.writable = true;
        }

        // Guest → host.
        while !failed && flow.writable && socket.can_recv() {
            let result = socket.recv(|data| match host.write(data) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match result {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => flow.writable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => failed = true,
            }
        }
        // The guest's FIN, once its data went: half-close toward the host.
        if !failed
            && !flow.host_write_shut
            && socket.recv_queue() == 0
            && matches!(
                socket.state(),
                State::CloseWait | State::LastAck | State::Closing | State::TimeWait
            )
        {
            host.shutdown_write();
            flow.host_write_shut = true;
        }

        // Host → guest.
        while !failed && flow.readable && !flow.host_eof && socket.can_send() {
            let result = socket.send(|space| match host.read(space) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match result {
                Ok(Ok(0)) => {
                    flow.host_eof = true;
                    socket.close();
                }
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => flow.readable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => failed = true,
                Err(_) => break,
            }
        }

        if moved {
            flow.last_activity = now;
        }
        if !failed && now.duration_since(flow.last_activity) >= IDLE_TIMEOUT {
            failed = true;
        }
        if failed {
            // A host error or reset, or idleness: reset both sides.
            socket.abort();
            reset_host(flow.host.take());
            flow.phase = Phase::Resetting;
            flow.deadline = now + RESET_GRACE;
            return true;
        }
        match socket.state() {
            State::Closed => {
                // Closed before both sides finished: the guest reset the connection (or
                // smoltcp timed it out); the host's peer gets a reset too.
                let host = flow.host.take();
                if !(flow.host_eof && flow.host_write_shut) {
                    reset_host(host);
                }
                false
            }
            State::TimeWait => !flow.host_write_shut,
            _ => true,
        }
    }

    /// Sets the epoll interest a flow needs now (backpressure: read the host only while the
    /// guest-bound buffer has room; wait for writability only after a short write).
    fn update_interest(&mut self, index: usize) {
        let Some(flow) = self.tcp.flows.get(index) else {
            return;
        };
        let wanted = match flow.phase {
            Phase::Connecting if flow.outbound => Some(EventSet::OUT),
            Phase::Connecting => Some(EventSet::empty()),
            Phase::Resetting => None,
            Phase::Open => {
                if flow.hung_up || (flow.host_eof && flow.host_write_shut) {
                    // Nothing more to hear from the host; a registered fd that hung up would
                    // report it on every turn.
                    None
                } else {
                    let socket = self.active.get::<Socket>(flow.handle);
                    let mut events = EventSet::empty();
                    if !flow.host_eof
                        && socket.may_send()
                        && socket.send_queue() < socket.send_capacity()
                    {
                        events |= EventSet::IN;
                    }
                    if !flow.writable {
                        events |= EventSet::OUT;
                    }
                    Some(events)
                }
            }
        };
        self.set_interest(index, wanted);
    }

    fn set_interest(&mut self, index: usize, wanted: Option<EventSet>) {
        let Some(flow) = self.tcp.flows.get_mut(index) else {
            return;
        };
        if flow.interest == wanted {
            return;
        }
        let Some(host) = &flow.host else {
            flow.interest = None;
            return;
        };
        let token = TOKEN_TCP + index as u64;
        let result = match (flow.interest, wanted) {
            (None, Some(events)) => self.epoll.ctl(
                ControlOperation::Add,
                host.fd(),
                EpollEvent::new(events, token),
            ),
            (Some(_), Some(events)) => self.epoll.ctl(
                ControlOperation::Modify,
                host.fd(),
                EpollEvent::new(events, token),
            ),
            (Some(_), None) => {
                self.epoll
                    .ctl(ControlOperation::Delete, host.fd(), EpollEvent::default())
            }
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => flow.interest = wanted,
            Err(e) => log::warn!("forkvm-net: epoll_ctl on a flow: {e}"),
        }
    }
}
