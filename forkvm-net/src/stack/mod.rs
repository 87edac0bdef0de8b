//! [`UserNetwork`]: the per-VM endpoint as a virtio-net backend, and its loop turn.
//!
//! Everything runs on the VM's event loop, in [`NetBackend::process`]: the loop watches one epoll
//! fd of ours, which holds the host sockets, a timerfd (smoltcp's next deadline, the flows'
//! timeouts), the DNS forwarder's fd and the control eventfd (handle commands; guest frames
//! waiting). A turn reads the ready events, runs the handle's commands, classifies the guest's
//! frames (TCP and ARP to smoltcp, the rest answered or relayed here), copies data between the
//! flows' smoltcp sockets and host sockets, lets smoltcp emit, and re-arms the timer.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use forkvm_devices::virtio::net::NetBackend;
use smoltcp::iface::{Interface, PollResult, SocketSet};
use smoltcp::wire::EthernetAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::config::NetworkConfig;
use crate::device::Link;
use crate::dns::DnsForwarder;
use crate::frames::{
    Guest, IPV4_UDP_HEADERS, classify_with, echo_reply_frame, tcp_probe_frame, udp_frame,
};
use crate::handle::{
    COMMAND_QUEUE, Command, DeniedFlow, GuestConnection, NetworkHandle, NetworkStats, Shared, lock,
};
use crate::policy::{self, DenyReason, DnsPins, NetworkPolicy, PolicyContext, Protocol, Verdict};
use crate::seams::{Connector, Seams};
use crate::slab::Slab;
mod offload;
pub(crate) mod tcp;
pub(crate) mod udp;

use tcp::TcpTable;
use udp::UdpTable;

/// Epoll token of the control eventfd.
pub(crate) const TOKEN_CONTROL: u64 = 1;
/// Epoll token of the timerfd.
pub(crate) const TOKEN_TIMER: u64 = 2;
/// Epoll token of the DNS forwarder's fd.
pub(crate) const TOKEN_DNS: u64 = 3;
/// Epoll tokens of TCP flows' host sockets: this plus the flow's index.
pub(crate) const TOKEN_TCP: u64 = 1 << 40;
/// Epoll tokens of UDP flows' host sockets.
pub(crate) const TOKEN_UDP: u64 = 2 << 40;
/// Epoll tokens of published ports' listeners.
pub(crate) const TOKEN_LISTENER: u64 = 3 << 40;
const TOKEN_KIND: u64 = !((1 << 40) - 1);

/// Guest frames waiting for `process()`, at most (more are dropped and counted).
const FROM_GUEST_FRAMES: usize = 1024;
/// Bytes of guest frames waiting for `process()`, at most.
const FROM_GUEST_BYTES: usize = 8 << 20;
/// Guest frames handled in one turn (the rest wait for the next, which comes at once).
const FRAMES_PER_TURN: usize = 256;
/// Connections accepted per listener per turn.
const ACCEPTS_PER_TURN: usize = 16;
/// Commands run per turn.
const COMMANDS_PER_TURN: usize = 64;
/// How often the host's own addresses are read again.
const HOST_ADDRS_REFRESH: Duration = Duration::from_secs(30);
/// How often smoltcp is reminded of the guest's MAC address (its ARP entries last 60 s).
const NEIGHBOR_REFRESH: Duration = Duration::from_secs(30);
/// A wake-up at least this often while flows are open (their timeouts).
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Denials of one UDP flow are reported once per this long.
const UDP_DENIAL_QUIET: Duration = Duration::from_secs(30);

/// One VM's user-mode network: a [`NetBackend`] for its virtio-net device.
pub struct UserNetwork {
    epoll: Arc<Epoll>,
    shared: Arc<Shared>,
    stack: Option<Box<Stack>>,
    /// The link's MTU (kept for the device after the stack is down).
    mtu: u16,
}

impl std::fmt::Debug for UserNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserNetwork")
            .field("down", &self.stack.is_none())
            .finish_non_exhaustive()
    }
}

/// A published port.
pub(crate) struct Listener {
    pub(crate) listener: std::net::TcpListener,
    pub(crate) guest_port: u16,
    pub(crate) address: SocketAddr,
}

/// The network's state; dropped whole when the network goes down.
pub(crate) struct Stack {
    pub(crate) config: NetworkConfig,
    pub(crate) iface: Interface,
    pub(crate) link: Link,
    /// Sockets of established (or establishing inbound) flows: smoltcp's egress runs over these.
    pub(crate) active: SocketSet<'static>,
    /// Listening sockets whose SYN-ACK is held until the host connect completes. Kept apart so
    /// that their held SYN-ACK (which smoltcp reports as due now) never sets the timer.
    pub(crate) pending: SocketSet<'static>,
    pub(crate) tcp: TcpTable,
    pub(crate) udp: UdpTable,
    pub(crate) listeners: Slab<Listener>,
    pub(crate) dns: DnsForwarder,
    pub(crate) pins: DnsPins,
    pub(crate) host_addrs: Vec<IpAddr>,
    /// When `host_addrs` was read; `None` until the first turn reads it (before any guest frame
    /// is looked at), which keeps `getifaddrs` (~40 µs) out of `new`, so out of a fork.
    host_addrs_at: Option<Instant>,
    neighbor_at: Option<Instant>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) epoll: Arc<Epoll>,
    timer: TimerFd,
    control: Arc<EventFd>,
    commands: Receiver<Command>,
    from_guest: VecDeque<Vec<u8>>,
    from_guest_bytes: usize,
    pub(crate) stats: NetworkStats,
    denied_udp: HashMap<(SocketAddrV4, SocketAddrV4), Instant>,
    /// Flow count and total when the shared list of connections was last written.
    connections_shape: (usize, u64),
    epoch: Instant,
}

impl UserNetwork {
    /// A network for one VM with `config`'s addresses, `policy` for its flows, and `seams` to
    /// reach outside. Returns the backend (give it to the virtio-net device) and its handle.
    pub fn new(
        config: NetworkConfig,
        policy: NetworkPolicy,
        seams: Seams,
    ) -> io::Result<(UserNetwork, NetworkHandle)> {
        validate(&config)?;
        let epoll = Arc::new(Epoll::new()?);
        let control = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let timer = TimerFd::new()?;
        let dns = DnsForwarder::new(seams.resolver.clone(), seams.hosts.clone())?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(control.as_raw_fd(), TOKEN_CONTROL)?;
        add(timer.as_raw_fd(), TOKEN_TIMER)?;
        add(dns.event_fd(), TOKEN_DNS)?;

        let mut link = Link::new(config.mtu);
        let iface = offload::new_iface(&config, &mut link)?;

        let shared = Arc::new(Shared::new(policy));
        let (sender, commands) = sync_channel(COMMAND_QUEUE);
        let handle = NetworkHandle::new(shared.clone(), sender, control.clone());
        let now = Instant::now();
        let mtu = config.mtu;
        let stack = Stack {
            config,
            iface,
            link,
            active: SocketSet::new(Vec::new()),
            pending: SocketSet::new(Vec::new()),
            tcp: TcpTable::default(),
            udp: UdpTable::default(),
            listeners: Slab::default(),
            dns,
            pins: DnsPins::default(),
            host_addrs: Vec::new(),
            host_addrs_at: None,
            neighbor_at: None,
            shared: shared.clone(),
            connector: seams.connector,
            epoll: epoll.clone(),
            timer,
            control,
            commands,
            from_guest: VecDeque::new(),
            from_guest_bytes: 0,
            stats: NetworkStats::default(),
            denied_udp: HashMap::new(),
            connections_shape: (0, 0),
            epoch: now,
        };
        let network = UserNetwork {
            epoll,
            shared,
            stack: Some(Box::new(stack)),
            mtu,
        };
        Ok((network, handle))
    }

    /// Takes the network down after a contained panic: every flow and host socket goes, the
    /// event fd stays (empty, never readable), frames from the guest are dropped and counted.
    fn go_down(&mut self) {
        log::error!("forkvm-net: internal error; this VM's network is down");
        if let Some(stack) = self.stack.take() {
            for fd in [
                stack.control.as_raw_fd(),
                stack.timer.as_raw_fd(),
                stack.dns.event_fd(),
            ] {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            if catch_unwind(AssertUnwindSafe(move || drop(stack))).is_err() {
                log::error!("forkvm-net: dropping the failed network panicked too");
            }
        }
        self.shared.stats().down = true;
    }

    fn dropped(&self) {
        self.shared.stats().frames_dropped += 1;
    }

    /// Resets `connections` in the guest: the guest's connections of the VM this one continues
    /// (a fork child, a restored snapshot), which this network never carried. Each gets an ACK
    /// far outside its window; the guest answers it with an ACK carrying its own sequence
    /// numbers, and that, matching no connection here, is answered with an exact reset. A guest
    /// that waits to read on such a connection therefore sees a reset at once rather than
    /// hanging. (The probe's sequence number is arbitrary: with a window of `w` bytes it falls
    /// inside with odds `w / 2^32`, and then the connection is reset on its next segment.)
    pub fn reset_guest_connections(&mut self, connections: &[GuestConnection]) {
        let Some(stack) = self.stack.as_mut() else {
            return;
        };
        for (index, &(guest, remote)) in connections.iter().enumerate() {
            if !stack.link.has_room() {
                break;
            }
            let seq = (random_seed() as u32).wrapping_add((index as u32).wrapping_mul(0x9e37_79b9));
            stack.link.push(tcp_probe_frame(
                stack.config.gateway_mac,
                stack.config.guest_mac,
                remote,
                guest,
                seq,
            ));
        }
        // The device drains the frames when it next serves the network's events.
        let _ = stack.control.write(1);
    }
}

impl NetBackend for UserNetwork {
    fn transmit(&mut self, frame: &[u8]) {
        let Some(stack) = self.stack.as_mut() else {
            self.dropped();
            return;
        };
        let result = catch_unwind(AssertUnwindSafe(|| stack.queue_guest_frame(frame)));
        if result.is_err() {
            self.go_down();
        }
    }

    fn peek_receive(&mut self) -> Option<&[u8]> {
        self.stack.as_ref()?.link.front()
    }

    fn consume_receive(&mut self) {
        if let Some(stack) = self.stack.as_mut() {
            let was_full = !stack.link.has_room();
            stack.link.pop();
            if was_full && stack.link.has_room() {
                // smoltcp stopped for a full queue: let it go on.
                let _ = stack.control.write(1);
            }
        }
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process(&mut self) {
        let Some(stack) = self.stack.as_mut() else {
            return;
        };
        if catch_unwind(AssertUnwindSafe(|| stack.turn())).is_err() {
            self.go_down();
        }
    }

    /// Yes: see `offload.rs`.
    fn checksum_offload(&self) -> bool {
        true
    }

    /// The configured MTU (65,520 by default), so that the guest's interface uses it from the
    /// start, before DHCP (which says it too) and with a static `ip=`.
    fn mtu(&self) -> Option<u16> {
        Some(self.mtu)
    }

    fn set_checksum_offload(&mut self, from_guest_partial: bool, to_guest_unchecked: bool) {
        if let Some(stack) = self.stack.as_mut() {
            stack.set_offload(from_guest_partial, to_guest_unchecked);
        }
    }
}

fn validate(config: &NetworkConfig) -> io::Result<()> {
    let invalid = |what: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            what.to_string(),
        ))
    };
    if !EthernetAddress(config.gateway_mac).is_unicast()
        || !EthernetAddress(config.guest_mac).is_unicast()
    {
        return invalid("MAC addresses must be unicast");
    }
    if !(576..=65520).contains(&config.mtu) {
        return invalid("MTU must be 576 to 65520");
    }
    if !(8..=30).contains(&config.prefix_len) {
        return invalid("prefix length must be 8 to 30");
    }
    let ips = [config.guest_ip, config.gateway_ip, config.dns_ip];
    if ips.iter().any(|ip| !in_subnet(config, *ip)) {
        return invalid("guest, gateway and DNS addresses must share the guest's network");
    }
    if ips[0] == ips[1] || ips[0] == ips[2] || ips[1] == ips[2] {
        return invalid("guest, gateway and DNS addresses must differ");
    }
    Ok(())
}

/// Whether `ip` lies in the guest's network.
pub(crate) fn in_subnet(config: &NetworkConfig, ip: Ipv4Addr) -> bool {
    let mask = u32::from(crate::dhcp::netmask(config.prefix_len));
    u32::from(ip) & mask == u32::from(config.guest_ip) & mask
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    hasher.finish()
}

impl Stack {
    /// smoltcp's clock.
    pub(crate) fn smol_now(&self, now: Instant) -> smoltcp::time::Instant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    fn queue_guest_frame(&mut self, frame: &[u8]) {
        self.stats.frames_from_guest += 1;
        if self.from_guest.len() >= FROM_GUEST_FRAMES
            || self.from_guest_bytes + frame.len() > FROM_GUEST_BYTES
        {
            self.stats.frames_dropped += 1;
            return;
        }
        if self.from_guest.is_empty() {
            let _ = self.control.write(1);
        }
        self.from_guest_bytes += frame.len();
        self.from_guest.push_back(frame.to_vec());
    }

    /// One turn of the loop.
    fn turn(&mut self) {
        let now = Instant::now();
        if self
            .host_addrs_at
            .is_none_or(|at| now.duration_since(at) >= HOST_ADDRS_REFRESH)
        {
            self.host_addrs = policy::host_addresses();
            self.host_addrs_at = Some(now);
        }
        if self
            .neighbor_at
            .is_none_or(|at| now.duration_since(at) >= NEIGHBOR_REFRESH)
        {
            self.prime_neighbor(now);
        }
        self.read_events(now);
        self.run_commands(now);
        for _ in 0..FRAMES_PER_TURN {
            let Some(frame) = self.from_guest.pop_front() else {
                break;
            };
            self.from_guest_bytes = self.from_guest_bytes.saturating_sub(frame.len());
            self.guest_frame(frame, now);
        }
        self.service_tcp(now);
        self.service_udp(now);
        self.egress(now);
        self.publish_stats();
        self.arm_timer(now);
    }

    fn read_events(&mut self, now: Instant) {
        let mut events = [EpollEvent::default(); 256];
        let count = match self.epoll.wait(0, &mut events) {
            Ok(count) => count,
            Err(e) => {
                log::warn!("forkvm-net: epoll_wait: {e}");
                0
            }
        };
        for event in events.iter().take(count) {
            let token = event.data();
            let set = event.event_set();
            match token {
                TOKEN_CONTROL => {
                    let _ = self.control.read();
                }
                TOKEN_TIMER => {
                    // Readable, so this read does not block.
                    let _ = self.timer.wait();
                }
                TOKEN_DNS => self.dns_answers(now),
                _ => {
                    let index = usize::try_from(token & !TOKEN_KIND).unwrap_or(usize::MAX);
                    match token & TOKEN_KIND {
                        TOKEN_TCP => self.tcp_event(index, set),
                        TOKEN_UDP => self.udp_event(index),
                        TOKEN_LISTENER => self.accept(index, now),
                        _ => {}
                    }
                }
            }
        }
    }

    fn run_commands(&mut self, now: Instant) {
        for _ in 0..COMMANDS_PER_TURN {
            match self.commands.try_recv() {
                Ok(Command::Connect { guest_port, stream }) => {
                    self.open_inbound(guest_port, tcp::HostStream::Unix(stream), now);
                }
                Ok(Command::Publish {
                    listener,
                    guest_port,
                }) => self.publish(listener, guest_port),
                Ok(Command::Unpublish(address)) => {
                    let found = self
                        .listeners
                        .indices()
                        .into_iter()
                        .find(|i| self.listeners.get(*i).is_some_and(|l| l.address == address));
                    if let Some(index) = found {
                        self.listeners.remove(index);
                    }
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
        // More commands wait: come back at once.
        let _ = self.control.write(1);
    }

    fn publish(&mut self, listener: std::net::TcpListener, guest_port: u16) {
        let Ok(address) = listener.local_addr() else {
            return;
        };
        let fd = listener.as_raw_fd();
        let index = self.listeners.insert(Listener {
            listener,
            guest_port,
            address,
        });
        let event = EpollEvent::new(EventSet::IN, TOKEN_LISTENER + index as u64);
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, event) {
            log::warn!("forkvm-net: cannot watch the listener on {address}: {e}");
            self.listeners.remove(index);
        }
    }

    fn accept(&mut self, index: usize, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let guest_port = listener.guest_port;
            match listener.listener.accept() {
                Ok((stream, _peer)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.open_inbound(guest_port, tcp::HostStream::Tcp(stream), now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("forkvm-net: accept: {e}");
                    return;
                }
            }
        }
    }

    /// One frame from the guest.
    fn guest_frame(&mut self, frame: Vec<u8>, now: Instant) {
        let config = &self.config;
        let (gateway, dns_ip, guest) = (config.gateway_ip, config.dns_ip, config.guest_ip);
        let tcp = match classify_with(&frame, self.verify_guest_checksums()) {
            Guest::Arp { target, .. } => {
                // Only the gateway's and the DNS server's addresses are answered (smoltcp would
                // answer every address with AnyIP on, the guest's own included).
                if target == gateway || target == dns_ip {
                    self.ingest(frame, false, now);
                }
                return;
            }
            Guest::Tcp { src, dst, syn } => (src, dst, syn),
            Guest::Udp { src, dst, payload } => {
                if dst.port() == smoltcp::wire::DHCP_SERVER_PORT {
                    if let Some(reply) = crate::dhcp::reply(&self.config, payload) {
                        self.link.push(reply);
                    }
                } else if *src.ip() != guest {
                    self.stats.frames_dropped += 1;
                } else if *dst.ip() == dns_ip && dst.port() == 53 {
                    self.dns_query(src, payload, now);
                } else {
                    self.udp_datagram(src, dst, payload, now);
                }
                return;
            }
            Guest::Ping {
                src,
                dst,
                ident,
                seq_no,
                data,
            } => {
                if src == guest && (dst == gateway || dst == dns_ip) {
                    let reply = echo_reply_frame(
                        self.config.gateway_mac,
                        self.config.guest_mac,
                        dst,
                        src,
                        ident,
                        seq_no,
                        data,
                    );
                    self.link.push(reply);
                } else {
                    self.stats.frames_dropped += 1;
                }
                return;
            }
            Guest::Other(what) => {
                log::trace!("forkvm-net: dropped a guest frame: {what}");
                self.stats.frames_dropped += 1;
                return;
            }
        };
        let (src, dst, syn) = tcp;
        if *src.ip() != guest {
            self.stats.frames_dropped += 1;
            return;
        }
        self.tcp_segment(frame, src, dst, syn, now);
    }

    /// Tells smoltcp the guest's MAC address (the configured one) with an ARP request "from the
    /// guest" whose reply is discarded, so that smoltcp can answer the guest at once, without
    /// asking first. That matters for a fresh network behind a running guest (a fork child): the
    /// guest's old connections get their resets on their first segment.
    fn prime_neighbor(&mut self, now: Instant) {
        self.neighbor_at = Some(now);
        let (queued, dropped) = (self.link.queued(), self.link.dropped);
        let frame = crate::frames::arp_request_frame(
            self.config.guest_mac,
            self.config.guest_ip,
            self.config.gateway_ip,
        );
        self.ingest(frame, false, now);
        self.link.truncate(queued);
        self.link.dropped = dropped;
    }

    /// Gives one frame to smoltcp, against the pending sockets or the active ones.
    pub(crate) fn ingest(&mut self, frame: Vec<u8>, pending: bool, now: Instant) {
        let timestamp = self.smol_now(now);
        self.link.from_guest = Some(frame);
        let sockets = if pending {
            &mut self.pending
        } else {
            &mut self.active
        };
        self.iface
            .poll_ingress_single(timestamp, &mut self.link, sockets);
        self.link.from_guest = None;
    }

    fn egress(&mut self, now: Instant) {
        let timestamp = self.smol_now(now);
        self.iface.poll_maintenance(timestamp);
        for _ in 0..4096 {
            let result = self
                .iface
                .poll_egress(timestamp, &mut self.link, &mut self.active);
            if result == PollResult::None || !self.link.has_room() {
                break;
            }
        }
    }

    /// The policy's decision on a flow to `target` (the gateway already mapped).
    pub(crate) fn check(&self, target: SocketAddr, protocol: Protocol, now: Instant) -> Verdict {
        let context = PolicyContext {
            pins: &self.pins,
            host_addrs: &self.host_addrs,
            now,
        };
        match self.shared.policy.read() {
            Ok(policy) => policy.check(target, protocol, &context),
            Err(poisoned) => poisoned.into_inner().check(target, protocol, &context),
        }
    }

    /// Where a flow to `dialled` goes on the host: the gateway stands for the host's loopback.
    pub(crate) fn host_target(&self, dialled: SocketAddrV4) -> SocketAddr {
        if *dialled.ip() == self.config.gateway_ip {
            SocketAddr::from((Ipv4Addr::LOCALHOST, dialled.port()))
        } else {
            SocketAddr::V4(dialled)
        }
    }

    /// Counts a denied flow and tells the callbacks.
    pub(crate) fn denied(
        &mut self,
        protocol: Protocol,
        destination: SocketAddr,
        dialled: SocketAddrV4,
        reason: DenyReason,
    ) {
        self.stats.denied_total += 1;
        *self.stats.denied_by_reason.entry(reason).or_default() += 1;
        log::debug!("forkvm-net: denied {protocol:?} to {destination} ({reason:?})");
        self.shared.denied(&DeniedFlow {
            protocol,
            destination,
            dialled,
            reason,
        });
    }

    /// Whether a denied UDP flow should be reported now (once per quiet period per flow).
    pub(crate) fn report_udp_denial(
        &mut self,
        key: (SocketAddrV4, SocketAddrV4),
        now: Instant,
    ) -> bool {
        if let Some(last) = self.denied_udp.get(&key)
            && now.duration_since(*last) < UDP_DENIAL_QUIET
        {
            return false;
        }
        if self.denied_udp.len() >= 256 {
            self.denied_udp.clear();
        }
        self.denied_udp.insert(key, now);
        true
    }

    fn dns_query(&mut self, client: SocketAddrV4, payload: &[u8], now: Instant) {
        let policy = self.shared.policy();
        let answer = self.dns.query(
            client,
            payload,
            &policy,
            &mut self.pins,
            &self.host_addrs,
            now,
        );
        if let Some(answer) = answer {
            self.dns_reply(client, &answer);
        }
    }

    fn dns_answers(&mut self, now: Instant) {
        let policy = self.shared.policy();
        let answers = self
            .dns
            .take_answers(&policy, &mut self.pins, &self.host_addrs, now);
        for (client, answer) in answers {
            self.dns_reply(client, &answer);
        }
    }

    fn dns_reply(&mut self, client: SocketAddrV4, answer: &[u8]) {
        if answer.len() + IPV4_UDP_HEADERS > usize::from(self.config.mtu) {
            self.stats.frames_dropped += 1;
            return;
        }
        let frame = udp_frame(
            self.config.gateway_mac,
            self.config.guest_mac,
            SocketAddrV4::new(self.config.dns_ip, 53),
            client,
            answer,
        );
        self.link.push(frame);
    }

    fn publish_stats(&mut self) {
        let shape = (self.tcp.flows.len(), self.tcp.total);
        if shape != self.connections_shape {
            self.connections_shape = shape;
            *lock(&self.shared.connections) = self.tcp.keys();
        }
        self.stats.tcp_flows_open = self.tcp.flows.len() as u64;
        self.stats.tcp_flows_total = self.tcp.total;
        self.stats.udp_flows_open = self.udp.flows.len() as u64;
        self.stats.udp_flows_total = self.udp.total;
        self.stats.dns = self.dns.stats();
        let mut shared = self.shared.stats();
        // Drops counted after the network went down are the handle's; everything else is ours.
        let mut stats = self.stats.clone();
        stats.frames_to_guest = self.link.sent;
        stats.frames_dropped += self.link.dropped;
        *shared = stats;
    }

    fn arm_timer(&mut self, now: Instant) {
        let mut next = None;
        if self.link.has_room() {
            let timestamp = self.smol_now(now);
            if let Some(delay) = self.iface.poll_delay(timestamp, &self.active) {
                let delay = Duration::from_micros(delay.total_micros());
                next = Some(delay.max(Duration::from_millis(1)));
            }
        }
        if self.tcp.flows.len() + self.udp.flows.len() > 0 {
            next = Some(next.map_or(HOUSEKEEPING, |d: Duration| d.min(HOUSEKEEPING)));
        }
        let armed = match next {
            Some(delay) => self.timer.reset(delay, None),
            None => self.timer.clear(),
        };
        if let Err(e) = armed {
            log::warn!("forkvm-net: timerfd: {e}");
        }
        if !self.from_guest.is_empty() {
            let _ = self.control.write(1);
        }
    }
}
