//! A guest that reaches the user-mode network through the real virtio-net device: a smoltcp
//! stack whose `phy::Device` plays the guest's virtio-net driver over the register-level test
//! driver (`forkvm_devices::virtio::test_driver`), in front of `Net` with a `UserNetwork`
//! backend. No KVM: the "VM's event loop" is [`VirtioGuest::step`], which kicks the queues
//! and serves the backend's event fd the way the VMM's loop does.
//!
//! The driver negotiates `MRG_RXBUF` (and `MAC`, `STATUS`; with `offload`, also `CSUM` and
//! `GUEST_CSUM`: its smoltcp then neither computes TCP/UDP checksums, marking those frames
//! `NEEDS_CSUM` as Linux does, nor verifies received ones, each of which must then come
//! `DATA_VALID`), keeps every receive descriptor
//! posted as a one-buffer chain, puts each transmitted frame behind a zeroed 12-byte header in a
//! one-descriptor chain, kicks the transmit queue once per batch and reaps used entries. Shared
//! by the tests (`mod support`) and the benchmarks (`#[path]` include from `benches/net.rs`), so
//! it names only crates both have: `forkvm_devices`, `forkvm_net`, `smoltcp`, `vm_memory`,
//! `libc`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm_devices::virtio::GuestMemoryMmap;
use forkvm_devices::virtio::net::{NET_HDR_LEN, Net, NetStats};
use forkvm_devices::virtio::test_driver::{AVAIL, Driver, QUEUE_SIZE, QUEUE_STRIDE, USED};
use forkvm_net::{
    Cidr, Connector, NetworkConfig, NetworkHandle, NetworkPolicy, Seams, StaticResolver,
    UserNetwork,
};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
use vm_memory::{Bytes, GuestAddress};

/// virtio-net feature bits the guest accepts (VERSION_1 is added by the driver).
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const RX: u16 = 0;
const TX: u16 = 1;
/// Receive buffers start here (the test driver's rings lie below 1 MiB).
const RX_BASE: u64 = 0x10_0000;
/// Transmit frames are kicked at the latest after this many (the ring's size).
const TX_BATCH: u16 = QUEUE_SIZE;

/// The gateway as the guest sees it: flows to it reach the host's 127.0.0.1.
pub const GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 2);

/// A connector that opens loopback sockets only and refuses (and records) anything else; the
/// owner asserts that nothing was refused.
#[derive(Default)]
pub struct LoopbackOnly {
    /// Destinations refused because they are not on 127.0.0.0/8.
    pub refused: Mutex<Vec<SocketAddr>>,
}

impl LoopbackOnly {
    fn check(&self, to: SocketAddr) -> io::Result<()> {
        if to.ip().is_loopback() {
            Ok(())
        } else {
            self.refused.lock().unwrap().push(to);
            Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "not loopback",
            ))
        }
    }
}

impl Connector for LoopbackOnly {
    fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
        self.check(to)?;
        forkvm_net::HostConnector.connect_tcp(to)
    }

    fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket> {
        self.check(to)?;
        forkvm_net::HostConnector.connect_udp(to)
    }
}

/// Seams that reach 127.0.0.0/8 only (no names), and the policy that lets the guest reach the
/// host's 127.0.0.1 (and nothing else) through the gateway.
pub fn loopback_only() -> (Seams, Arc<LoopbackOnly>, NetworkPolicy) {
    let connector = Arc::new(LoopbackOnly::default());
    let seams = Seams {
        connector: connector.clone(),
        resolver: Arc::new(StaticResolver::new()),
        hosts: Default::default(),
    };
    let loopback: Cidr = "127.0.0.1/32".parse().unwrap();
    (seams, connector, NetworkPolicy::deny_all().allow(loopback))
}

/// The guest's side of the link: the virtio driver and its buffers.
pub struct VirtioLink {
    tx: TxSide,
    /// The frame being handed to smoltcp (reassembled from its receive buffers).
    frame: Vec<u8>,
    /// Next used-ring entry of the receive queue to reap.
    rx_used: u16,
    /// Buffers given back since the last receive-queue kick.
    rx_reposted: u16,
    rx_buf_len: u32,
    mtu: usize,
    /// Checksum offloads negotiated.
    offload: bool,
    /// Frames received and transmitted, kicks of each queue.
    pub counts: Counts,
}

/// What the guest's driver did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_kicks: u64,
    pub tx_kicks: u64,
    pub host_events: u64,
}

struct TxSide {
    driver: Driver,
    /// Next transmit descriptor (slot) to fill.
    next: u16,
    /// Frames made available and not kicked yet.
    pending: u16,
    base: u64,
    slot: u64,
    scratch: Vec<u8>,
    kicks: u64,
    frames: u64,
    /// Checksum offloads negotiated: TCP/UDP frames go out with `NEEDS_CSUM`.
    offload: bool,
}

impl TxSide {
    fn kick(&mut self) {
        if self.pending == 0 {
            return;
        }
        self.driver.select(TX);
        self.driver.notify();
        // The device takes every available chain per notification.
        let used: u16 = read(&self.driver.memory, USED + QUEUE_STRIDE * u64::from(TX) + 2);
        let avail: u16 = read(
            &self.driver.memory,
            AVAIL + QUEUE_STRIDE * u64::from(TX) + 2,
        );
        assert_eq!(used, avail, "the device left transmit chains");
        self.pending = 0;
        self.kicks += 1;
    }
}

fn read<T: vm_memory::ByteValued>(memory: &GuestMemoryMmap, at: u64) -> T {
    memory.read_obj(GuestAddress(at)).unwrap()
}

impl VirtioLink {
    /// The receive queue's used entry `n`: (descriptor id, bytes written).
    fn rx_used_entry(&self, n: u16) -> (u16, u32) {
        let at = USED + 4 + 8 * u64::from(n % QUEUE_SIZE);
        let id: u32 = read(&self.tx.driver.memory, at);
        (id as u16, read(&self.tx.driver.memory, at + 4))
    }

    fn rx_buffer(&self, id: u16) -> u64 {
        RX_BASE + u64::from(id) * u64::from(self.rx_buf_len)
    }

    /// Reaps the next received frame (all its buffers) into `self.frame` and posts the buffers
    /// again; false if the device has written none.
    fn reap(&mut self) -> bool {
        let used: u16 = read(&self.tx.driver.memory, USED + 2);
        if used == self.rx_used {
            return false;
        }
        let (id, len) = self.rx_used_entry(self.rx_used);
        let num_buffers: u16 = read(&self.tx.driver.memory, self.rx_buffer(id) + 10);
        let flags: u8 = read(&self.tx.driver.memory, self.rx_buffer(id));
        // DATA_VALID (2) exactly when GUEST_CSUM was negotiated: the guest verifies nothing.
        assert_eq!(
            flags,
            if self.offload { 2 } else { 0 },
            "received header flags"
        );
        assert!(num_buffers >= 1 && used.wrapping_sub(self.rx_used) >= num_buffers);
        self.frame.clear();
        for k in 0..num_buffers {
            let (id, len) = if k == 0 {
                (id, len)
            } else {
                self.rx_used_entry(self.rx_used.wrapping_add(k))
            };
            let skip = if k == 0 { NET_HDR_LEN } else { 0 };
            let start = self.frame.len();
            let len = len as usize - skip;
            self.frame.resize(start + len, 0);
            let at = GuestAddress(self.rx_buffer(id) + skip as u64);
            self.tx
                .driver
                .memory
                .read_slice(&mut self.frame[start..], at)
                .unwrap();
            self.tx.driver.select(RX);
            self.tx.driver.make_available(id);
            self.rx_reposted += 1;
        }
        self.rx_used = self.rx_used.wrapping_add(num_buffers);
        self.counts.rx_frames += 1;
        true
    }

    /// Whether the device has written a frame the guest has not reaped.
    pub fn rx_ready(&self) -> bool {
        read::<u16>(&self.tx.driver.memory, USED + 2) != self.rx_used
    }

    /// Kicks the transmit queue if frames wait and the receive queue if buffers were given back.
    pub fn flush(&mut self) {
        self.tx.kick();
        if self.rx_reposted > 0 {
            self.tx.driver.select(RX);
            self.tx.driver.notify();
            self.rx_reposted = 0;
            self.counts.rx_kicks += 1;
        }
    }

    /// Serves the backend's event fd if it is readable, as the VM's event loop does; returns
    /// whether it was.
    pub fn serve_host_event(&mut self, wait_ms: i32) -> bool {
        let fd = self.tx.driver.transport.host_event().unwrap();
        if readable(fd, wait_ms) {
            self.tx.driver.transport.process_host_event();
            self.counts.host_events += 1;
            true
        } else {
            false
        }
    }

    /// The driver (its transport holds the device).
    pub fn driver(&mut self) -> &mut Driver {
        &mut self.tx.driver
    }

    fn counts(&self) -> Counts {
        Counts {
            tx_frames: self.tx.frames,
            tx_kicks: self.tx.kicks,
            ..self.counts
        }
    }
}

/// Whether `fd` becomes readable within `ms`.
pub fn readable(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its count, a bounded timeout.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// A received frame, borrowed from the link's reassembly buffer.
pub struct Rx<'a>(&'a [u8]);
/// Room for one frame in the transmit ring.
pub struct Tx<'a>(&'a mut TxSide);

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.0;
        if tx.pending == TX_BATCH {
            tx.kick();
        }
        tx.scratch.clear();
        tx.scratch.resize(NET_HDR_LEN + len, 0);
        let r = f(&mut tx.scratch[NET_HDR_LEN..]);
        if tx.offload {
            mark_partial(&mut tx.scratch);
        }
        let slot = tx.next % QUEUE_SIZE;
        let at = tx.base + u64::from(slot) * tx.slot;
        assert!(tx.scratch.len() as u64 <= tx.slot);
        tx.driver
            .memory
            .write_slice(&tx.scratch, GuestAddress(at))
            .unwrap();
        tx.driver.select(TX);
        tx.driver
            .chain(slot, &[(at, tx.scratch.len() as u32, false)]);
        tx.next = tx.next.wrapping_add(1);
        tx.pending += 1;
        tx.frames += 1;
        r
    }
}

/// Marks a TCP or UDP frame over IPv4 behind its virtio-net header `NEEDS_CSUM`, with where its
/// checksum starts and lies, as a driver with `CSUM` does (smoltcp left the field zero).
fn mark_partial(bytes: &mut [u8]) {
    let frame = &bytes[NET_HDR_LEN..];
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let start = 14 + 4 * u16::from(frame[14] & 0x0f);
    let offset: u16 = match frame[23] {
        6 => 16,
        17 => 6,
        _ => return,
    };
    bytes[0] = 1;
    bytes[6..8].copy_from_slice(&start.to_le_bytes());
    bytes[8..10].copy_from_slice(&offset.to_le_bytes());
}

impl phy::Device for VirtioLink {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        if !self.reap() {
            return None;
        }
        Some((Rx(&self.frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        if self.offload {
            caps.checksum.tcp = phy::Checksum::None;
            caps.checksum.udp = phy::Checksum::None;
        }
        caps
    }
}

/// A smoltcp guest on a virtio-net device whose backend is a `UserNetwork`.
pub struct VirtioGuest {
    pub link: VirtioLink,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub handle: NetworkHandle,
    pub config: NetworkConfig,
    /// The device's counters.
    pub stats: NetStats,
    epoch: Instant,
    next_port: u16,
}

impl VirtioGuest {
    /// A guest with link MTU `mtu` (the network's and its own) and receive buffers of
    /// `rx_buf_len` bytes (one per descriptor, the ring full of them); with `static_ip` it has
    /// 10.0.2.15/24 and the gateway as its route, otherwise no address (it runs DHCP). No
    /// checksum offloads.
    pub fn new(
        mtu: u16,
        rx_buf_len: u32,
        policy: NetworkPolicy,
        seams: Seams,
        static_ip: bool,
    ) -> Self {
        Self::with_offload(mtu, rx_buf_len, policy, seams, static_ip, false)
    }

    /// The same, negotiating the checksum offloads (`CSUM`, `GUEST_CSUM`) with `offload`.
    pub fn with_offload(
        mtu: u16,
        rx_buf_len: u32,
        policy: NetworkPolicy,
        seams: Seams,
        static_ip: bool,
        offload: bool,
    ) -> Self {
        let config = NetworkConfig {
            mtu,
            ..NetworkConfig::default()
        };
        let (net, handle) = UserNetwork::new(config.clone(), policy, seams).unwrap();
        let device = Net::new(config.guest_mac, Box::new(net));
        let stats = device.stats();
        let slot = (NET_HDR_LEN as u64 + u64::from(mtu) + 14).next_multiple_of(4096);
        let rx_len = u64::from(QUEUE_SIZE) * u64::from(rx_buf_len);
        let tx_base = (RX_BASE + rx_len).next_multiple_of(4096);
        let size = tx_base + u64::from(QUEUE_SIZE) * slot;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let mut driver = Driver::with_memory(Box::new(device), memory);
        let offloads = if offload { F_CSUM | F_GUEST_CSUM } else { 0 };
        driver.start_with(F_MAC | F_STATUS | F_MRG_RXBUF | offloads);
        driver.select(RX);
        for id in 0..QUEUE_SIZE {
            let at = RX_BASE + u64::from(id) * u64::from(rx_buf_len);
            driver.chain(id, &[(at, rx_buf_len, true)]);
        }
        driver.notify();
        let mut link = VirtioLink {
            tx: TxSide {
                driver,
                next: 0,
                pending: 0,
                base: tx_base,
                slot,
                scratch: Vec::new(),
                kicks: 0,
                frames: 0,
                offload,
            },
            frame: Vec::new(),
            rx_used: 0,
            rx_reposted: 0,
            rx_buf_len,
            mtu: usize::from(mtu),
            offload,
            counts: Counts::default(),
        };
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
            link,
            iface,
            sockets: SocketSet::new(Vec::new()),
            handle,
            config,
            stats,
            epoch: Instant::now(),
            next_port: 40000,
        }
    }

    /// The receive buffer size that suits `mtu`: 2 KiB buffers (one frame each) at 1500,
    /// 16 KiB ones (a 64 KiB frame spans five) above.
    pub fn rx_buf_len_for(mtu: u16) -> u32 {
        if mtu <= 2000 { 2048 } else { 16384 }
    }

    /// smoltcp's clock.
    pub fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// One round of guest and event loop: the guest polls (reaping received frames, queueing
    /// frames to send), kicks its queues, and the loop serves the backend's event if one is
    /// pending (waiting up to `wait_ms` for one when the guest had nothing to do). Returns
    /// whether anything moved.
    pub fn step(&mut self, wait_ms: i32) -> bool {
        let before = (self.link.counts.rx_frames, self.link.tx.frames);
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
        self.link.flush();
        let moved = before != (self.link.counts.rx_frames, self.link.tx.frames);
        let served = self.link.serve_host_event(if moved { 0 } else { wait_ms });
        moved || served
    }

    /// Runs rounds until `done` says so, at most `limit` long; returns whether it did.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done(self) {
                return true;
            }
            self.step(1);
        }
        done(self)
    }

    /// A TCP socket with `size`-byte buffers each way and no delayed ACKs.
    pub fn tcp_socket(&mut self, size: usize) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; size]),
            tcp::SocketBuffer::new(vec![0; size]),
        );
        socket.set_ack_delay(None);
        self.sockets.add(socket)
    }

    /// Starts a connection to the gateway's `port` (the host's 127.0.0.1) with `size`-byte
    /// buffers, from a fresh local port.
    pub fn connect_gateway(&mut self, port: u16, size: usize) -> SocketHandle {
        let handle = self.tcp_socket(size);
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(40000);
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        socket
            .connect(self.iface.context(), (GATEWAY, port), local)
            .unwrap();
        handle
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// What the guest's driver did so far.
    pub fn counts(&self) -> Counts {
        self.link.counts()
    }
}
