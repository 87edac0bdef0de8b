//! Test support for the user-mode network without KVM: a guest that is a second smoltcp stack
//! wired to a [`UserNetwork`] through its `NetBackend` methods, and a "fake internet" connector
//! that reaches only servers the test runs on 127.0.0.1.
//!
//! No packet leaves the machine: the fake connector maps a few fake public addresses to
//! loopback ports, passes loopback through, and refuses and records everything else.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm_devices::virtio::net::NetBackend;
use forkvm_net::{
    Connector, NetworkConfig, NetworkHandle, NetworkPolicy, Seams, StaticResolver, UserNetwork,
};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use socket2::{Domain, Socket, Type};

/// A connector that reaches 127.0.0.0/8 only: fake public addresses map to loopback ports,
/// loopback passes through, everything else is refused and recorded.
#[derive(Default)]
pub struct FakeInternet {
    map: HashMap<SocketAddr, SocketAddr>,
    /// Every destination the network asked for, in order.
    pub calls: Mutex<Vec<SocketAddr>>,
    /// Destinations refused because they are neither mapped nor loopback.
    pub refused: Mutex<Vec<SocketAddr>>,
    /// A destination whose connect panics (a broken connector, to test containment).
    panic_on: Option<SocketAddr>,
    /// Whether it says it may run on the event loop (as forkvm's own connector does).
    on_event_loop: bool,
    /// The threads connects ran on.
    pub threads: Mutex<Vec<std::thread::ThreadId>>,
}

impl FakeInternet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `public` (what the guest dials) to `local` (a loopback address of a test server).
    pub fn map(mut self, public: SocketAddr, local: SocketAddr) -> Self {
        assert!(local.ip().is_loopback(), "{local} is not loopback");
        self.map.insert(public, local);
        self
    }

    /// Makes connects to `to` panic.
    pub fn panic_on(mut self, to: SocketAddr) -> Self {
        self.panic_on = Some(to);
        self
    }

    /// Says it may run on the event loop, as forkvm's own connector does (so that a panic in it
    /// is a panic inside the network).
    pub fn on_event_loop(mut self) -> Self {
        self.on_event_loop = true;
        self
    }

    fn route(&self, to: SocketAddr) -> io::Result<SocketAddr> {
        self.calls.lock().unwrap().push(to);
        self.threads
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        if self.panic_on == Some(to) {
            panic!("the fake connector panics on {to} (on purpose)");
        }
        let real = match self.map.get(&to) {
            Some(local) => *local,
            None if to.ip().is_loopback() => to,
            None => {
                self.refused.lock().unwrap().push(to);
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "off the fake internet",
                ));
            }
        };
        assert!(real.ip().is_loopback());
        Ok(real)
    }

    pub fn calls(&self) -> Vec<SocketAddr> {
        self.calls.lock().unwrap().clone()
    }

    pub fn refused(&self) -> Vec<SocketAddr> {
        self.refused.lock().unwrap().clone()
    }
}

impl Connector for FakeInternet {
    fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
        let real = self.route(to)?;
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        match socket.connect(&real.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(socket.into())
    }

    fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket> {
        let real = self.route(to)?;
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_nonblocking(true)?;
        socket.connect(real)?;
        Ok(socket)
    }

    fn runs_on_event_loop(&self) -> bool {
        self.on_event_loop
    }
}

/// The guest's link: frames both ways.
#[derive(Default)]
pub struct GuestLink {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
}

pub struct GuestRx(Vec<u8>);
pub struct GuestTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for GuestRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for GuestTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl phy::Device for GuestLink {
    type RxToken<'a> = GuestRx;
    type TxToken<'a> = GuestTx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(GuestRx, GuestTx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((GuestRx(frame), GuestTx(&mut self.tx)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<GuestTx<'_>> {
        Some(GuestTx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// A guest (smoltcp) and the network under test, moved along together.
pub struct Harness {
    pub net: UserNetwork,
    pub handle: NetworkHandle,
    pub internet: Arc<FakeInternet>,
    pub config: NetworkConfig,
    pub iface: Interface,
    pub link: GuestLink,
    pub sockets: SocketSet<'static>,
    epoch: Instant,
    next_port: u16,
    /// When set, the "device" takes no frames for the guest (a guest without receive buffers).
    pub rx_paused: bool,
}

/// The address of the gateway as the guest sees it.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

impl Harness {
    /// A guest with the static address 10.0.2.15/24 behind a default network.
    pub fn new(policy: NetworkPolicy, internet: FakeInternet) -> Self {
        Self::with(policy, internet, StaticResolver::new(), true)
    }

    /// A guest without an address when `static_ip` is false (it runs DHCP itself).
    pub fn with(
        policy: NetworkPolicy,
        internet: FakeInternet,
        resolver: StaticResolver,
        static_ip: bool,
    ) -> Self {
        let config = NetworkConfig::default();
        let internet = Arc::new(internet);
        let seams = Seams {
            connector: internet.clone(),
            resolver: Arc::new(resolver),
            hosts: HashMap::new(),
        };
        let (net, handle) = UserNetwork::new(config.clone(), policy, seams).unwrap();
        let mut link = GuestLink::default();
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(config.guest_mac))),
            &mut link,
            smoltcp::time::Instant::ZERO,
        );
        if static_ip {
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(config.guest_ip.into(), config.prefix_len))
                    .unwrap();
            });
            iface
                .routes_mut()
                .add_default_ipv4_route(config.gateway_ip)
                .unwrap();
        }
        Self {
            net,
            handle,
            internet,
            config,
            iface,
            link,
            sockets: SocketSet::new(Vec::new()),
            epoch: Instant::now(),
            next_port: 40000,
            rx_paused: false,
        }
    }

    pub fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// One round: the guest polls, its frames go to the network, the network works, its frames
    /// come to the guest. Returns whether any frame moved.
    pub fn step(&mut self) -> bool {
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
        let mut moved = false;
        while let Some(frame) = self.link.tx.pop_front() {
            self.net.transmit(&frame);
            moved = true;
        }
        self.net.process();
        // The device drains a bounded number of frames per round, as a guest with few receive
        // buffers would.
        for _ in 0..if self.rx_paused { 0 } else { 256 } {
            let Some(frame) = self.net.peek_receive() else {
                break;
            };
            self.link.rx.push_back(frame.to_vec());
            self.net.consume_receive();
            moved = true;
        }
        moved
    }

    /// Runs rounds until `done` says so, at most `limit` long; returns whether it did.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done(self) {
                return true;
            }
            if !self.step() {
                wait_readable(self.net.event_fd().unwrap(), 2);
            }
        }
        done(self)
    }

    /// Runs rounds for `span`.
    pub fn run_for(&mut self, span: Duration) {
        self.run_until(span, |_| false);
    }

    /// A guest TCP socket with `size`-byte buffers.
    pub fn tcp_socket(&mut self, size: usize) -> SocketHandle {
        let socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; size]),
            tcp::SocketBuffer::new(vec![0; size]),
        );
        self.sockets.add(socket)
    }

    /// Starts a guest connection to `to` from a fresh port.
    pub fn connect(&mut self, to: SocketAddr) -> SocketHandle {
        let handle = self.tcp_socket(256 * 1024);
        let port = self.next_port;
        self.next_port += 1;
        let SocketAddr::V4(to) = to else {
            panic!("IPv4 only")
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        socket
            .connect(self.iface.context(), (*to.ip(), to.port()), port)
            .unwrap();
        handle
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    pub fn state(&mut self, handle: SocketHandle) -> tcp::State {
        self.tcp(handle).state()
    }
}

impl Drop for Harness {
    /// Every test checks, at its end, that the network never asked the fake internet for a
    /// destination outside it (none of them expects one).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(
                self.internet.refused().is_empty(),
                "the network asked for destinations off the fake internet: {:?}",
                self.internet.refused()
            );
        }
    }
}

/// Waits up to `ms` for `fd` to become readable.
pub fn wait_readable(fd: RawFd, ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its count, a bounded timeout.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// A deterministic byte pattern (xorshift) and its FNV-1a checksum.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// A public-looking address the fake internet maps.
pub fn public(port: u16) -> SocketAddr {
    SocketAddr::from(([93, 184, 216, 34], port))
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

pub fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}
