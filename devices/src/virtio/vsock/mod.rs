//! virtio-vsock (type 19): stream sockets between the guest and host programs.
//!
//! The guest's packets arrive on the transmit queue; the device answers and delivers host data
//! on the receive queue. Each connection joins a guest port to a host Unix socket
//! ([`connection`]); the host side — the listener in Firecracker's hybrid style and in-process
//! connections — is [`host`]. Every socket lives in one epoll set whose fd the VM's event loop
//! watches, so the device never blocks and never polls.
//!
//! What a guest controls is checked: packets that do not parse (bad chain, bad length, outside
//! guest memory) are dropped; packets for another CID, another socket type, an unknown
//! connection or in the wrong state are answered with a reset; a guest that sends beyond its
//! credit has its connection reset; receive buffers that cannot hold a packet put the device
//! into `DEVICE_NEEDS_RESET`. The host holds at most [`MAX_CONNECTIONS`] connections with at most
//! [`connection::TX_BUFFER_SIZE`] bytes buffered each, and at most [`MAX_CONTROL_PACKETS`]
//! pending control packets.

pub mod connection;
pub mod host;
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vmm_sys_util::epoll::{EpollEvent, EventSet};

use self::connection::{Connection, HostRead, Reset, State};
use self::host::{ConnectRequest, HostSockets, VsockConnector};
use self::packet::*;
use super::{
    DeviceError, DeviceState, GuestMemoryMmap, INT_USED_RING, Interrupt, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};

/// Virtio device type of the socket device.
pub const VSOCK_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// The receive queue (device → guest packets).
pub const RX_QUEUE: usize = 0;
/// The transmit queue (guest → device packets).
pub const TX_QUEUE: usize = 1;
/// The event queue (transport events: a forked child's device sends a transport reset).
pub const EVENT_QUEUE: usize = 2;
/// The event a forked child's guest receives: every connection it had is gone
/// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, virtio 1.2 §5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZE: u16 = 256;
/// Largest payload of one packet, and largest receive data buffer accepted (Linux uses 64 KiB).
pub const MAX_PACKET_DATA: u32 = 64 << 10;
/// Most open connections; more are refused with a reset.
pub const MAX_CONNECTIONS: usize = 256;
/// Most control packets waiting for receive buffers; a guest that posts none while asking for
/// answers loses the excess (only resets of unknown connections can pile up that far).
pub const MAX_CONTROL_PACKETS: usize = 4 * MAX_CONNECTIONS;
/// First port given to host-initiated connections (as in Firecracker: above the usual guest
/// ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll events handled per host event.
const EVENTS_PER_ROUND: usize = 32;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0–2) or not a 32-bit value Linux accepts.
    #[error("guest CID {0} is invalid: use a value from 3 to 4294967294")]
    InvalidCid(u64),
    /// The host sockets could not be set up.
    #[error("cannot set up the vsock host side")]
    Host(#[from] io::Error),
}

/// A socket device at a fork. Connections do not survive it: each child's device starts with
/// none, new host endpoints, and a transport reset for its guest.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    cid: u64,
}

/// The socket device.
pub struct Vsock {
    cid: u64,
    host: HostSockets,
    connections: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    control: VecDeque<Control>,
    next_local_port: u32,
    /// The guest had no receive buffer for the last packet; host sockets are not read until it
    /// posts more.
    rx_starved: bool,
    /// A transport reset waits for an event buffer (set in a forked child).
    reset_pending: bool,
}

impl Vsock {
    /// A device giving the guest `cid`, with host programs reaching it through the Unix socket
    /// `uds_path` (if given) and through [`Vsock::connector`].
    pub fn new(cid: u64, uds_path: Option<&Path>) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::InvalidCid(cid));
        }
        Ok(Self {
            cid,
            host: HostSockets::new(uds_path)?,
            connections: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_starved: false,
            reset_pending: false,
        })
    }

    /// A forked child's device: the guest keeps its CID, host programs reach it through
    /// `uds_path` (if given) and [`Vsock::connector`], and the guest is sent a transport reset
    /// so that it drops the connections it had.
    pub fn from_state(state: &VsockState, uds_path: Option<&Path>) -> Result<Self, VsockError> {
        let mut device = Self::new(state.cid, uds_path)?;
        device.reset_pending = true;
        Ok(device)
    }

    /// Sends the pending transport reset if the guest posted an event buffer.
    fn send_transport_reset(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        if !self.reset_pending {
            return Ok(());
        }
        // One buffer takes the event; any others wait for a later fork of this guest.
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            return Ok(());
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let mut writer = chain.writer(memory)?;
        if writer.available_bytes() < event.len() {
            return Err(DeviceError::BadRequest(format!(
                "vsock event buffer of {} bytes",
                writer.available_bytes()
            )));
        }
        writer.write_all(&event)?;
        queue.add_used(memory, head, event.len() as u32)?;
        self.reset_pending = false;
        if queue.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        Ok(())
    }

    /// A handle that opens in-process connections to guest ports.
    pub fn connector(&self) -> VsockConnector {
        self.host.connector()
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL_PACKETS {
            log::warn!("vsock: the guest takes no packets; dropped op {op} for {key:?}");
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    /// Closes the host side of `key` (if open) and tells the guest with a reset.
    fn reset_connection(&mut self, key: ConnKey) {
        self.close(key);
        self.push_control(key, OP_RST, 0);
    }

    fn close(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.remove(&key) {
            let fd = conn.as_raw_fd();
            self.by_fd.remove(&fd);
            let _ = self.host.rewatch(fd, conn.registered, EventSet::empty());
        }
    }

    fn add_connection(&mut self, key: ConnKey, conn: Connection) {
        self.by_fd.insert(conn.as_raw_fd(), key);
        self.connections.insert(key, conn);
    }

    /// Drops every connection and pending client (driver reset, or the device left service).
    fn close_all(&mut self) {
        let keys: Vec<_> = self.connections.keys().copied().collect();
        for key in keys {
            self.close(key);
        }
        self.host.drop_clients();
        self.control.clear();
        self.rx_starved = false;
    }

    /// A guest packet from the transmit queue.
    fn handle_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if pkt.src_cid() != self.cid || pkt.dst_cid() != HOST_CID || pkt.type_() != TYPE_STREAM {
            if pkt.op() != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if pkt.op() == OP_REQUEST {
            self.guest_connect(key, pkt.buf_alloc(), pkt.fwd_cnt());
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            if pkt.op() != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        };
        conn.peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        let outcome = match (pkt.op(), conn.state()) {
            (OP_RST, _) => {
                self.close(key);
                return;
            }
            (OP_RESPONSE, State::Connecting) => conn.establish(key.local_port),
            (OP_RW, State::Established) => match pkt.data_slice() {
                Some(data) => conn.send_to_host(data),
                None => Ok(()),
            },
            (OP_SHUTDOWN, State::Established) => conn.guest_shutdown(pkt.flags()),
            (OP_CREDIT_UPDATE, State::Established) => Ok(()),
            (OP_CREDIT_REQUEST, State::Established) => {
                self.queue_credit_update(key);
                Ok(())
            }
            _ => Err(Reset::Protocol),
        };
        self.after_host_write(key, outcome);
    }

    /// Settles a connection after data moved towards the host: resets it on failure, ends it
    /// when both sides are done, and tells the guest about freed credit.
    fn after_host_write(&mut self, key: ConnKey, outcome: Result<(), Reset>) {
        if let Err(why) = outcome {
            log::debug!("vsock: resetting {key:?}: {why:?}");
            self.reset_connection(key);
            return;
        }
        let Some(conn) = self.connections.get(&key) else {
            return;
        };
        if conn.finished() {
            self.reset_connection(key);
        } else if conn.wants_credit_update() {
            self.queue_credit_update(key);
        }
    }

    fn queue_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.get_mut(&key)
            && !conn.credit_update_queued
        {
            conn.credit_update_queued = true;
            self.push_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// The guest asks for host port `key.local_port`.
    fn guest_connect(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32) {
        if self.connections.contains_key(&key) || self.connections.len() >= MAX_CONNECTIONS {
            self.push_control(key, OP_RST, 0);
            return;
        }
        let connected = self
            .host
            .connect_host_port(key.local_port)
            .and_then(|stream| Connection::new(stream, State::Established));
        match connected {
            Ok(mut conn) => {
                conn.peer_credit(buf_alloc, fwd_cnt);
                self.add_connection(key, conn);
                self.push_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                log::debug!(
                    "vsock: guest connection to host port {}: {e}",
                    key.local_port
                );
                self.push_control(key, OP_RST, 0);
            }
        }
    }

    /// A host client asked for guest port `request.port`.
    fn host_connect(&mut self, request: ConnectRequest) {
        if self.connections.len() >= MAX_CONNECTIONS {
            return; // Dropping the client's stream refuses it.
        }
        let Some(local_port) = self.free_local_port() else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: request.port,
        };
        match Connection::new(request.stream, State::Connecting) {
            Ok(conn) => {
                self.add_connection(key, conn);
                self.push_control(key, OP_REQUEST, 0);
            }
            Err(e) => log::warn!("vsock: cannot set up a host connection: {e}"),
        }
    }

    fn free_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.connections.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    /// A ready host socket of connection `key`.
    fn connection_event(&mut self, key: ConnKey, events: EventSet, readable: &mut Vec<ConnKey>) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if conn.state() == State::Connecting {
            // The host client hung up before the guest answered.
            self.reset_connection(key);
            return;
        }
        if conn.registered.contains(EventSet::OUT) {
            let outcome = conn.flush();
            self.after_host_write(key, outcome);
        }
        let wanted_input = self
            .connections
            .get(&key)
            .is_some_and(|c| c.registered.contains(EventSet::IN));
        if wanted_input && events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            readable.push(key);
        }
    }

    /// Fills the guest's receive buffers: control packets first, then data from `readable`
    /// connections (each takes a turn per packet).
    fn deliver(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        readable: Vec<ConnKey>,
    ) -> Result<(), DeviceError> {
        let Some(rx) = queues.get_mut(RX_QUEUE) else {
            return Ok(());
        };
        let mut readable = VecDeque::from(readable);
        let mut used = false;
        while !self.control.is_empty() || !readable.is_empty() {
            let Some(mut chain) = rx.pop_descriptor_chain(memory) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let mut pkt = VsockPacket::from_rx_virtq_chain(memory, &mut chain, MAX_PACKET_DATA)
                .map_err(|e| DeviceError::BadRequest(format!("vsock receive buffer: {e}")))?;
            let len = if let Some(control) = self.control.pop_front() {
                self.write_header(&mut pkt, control, 0);
                0
            } else {
                match self.write_data(&mut pkt, &mut readable)? {
                    Some(len) => len,
                    None => {
                        rx.go_to_previous_position();
                        continue;
                    }
                }
            };
            rx.add_used(memory, head, PKT_HEADER_SIZE as u32 + len)?;
            used = true;
        }
        if used && rx.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        Ok(())
    }

    fn write_header(&mut self, pkt: &mut VsockPacket<'_, ()>, control: Control, len: u32) {
        let (buf_alloc, fwd_cnt) = match self.connections.get_mut(&control.key) {
            Some(conn) => {
                if control.op == OP_CREDIT_UPDATE {
                    conn.credit_update_queued = false;
                }
                conn.report_credit()
            }
            None => (0, 0),
        };
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.cid)
            .set_src_port(control.key.local_port)
            .set_dst_port(control.key.peer_port)
            .set_type(TYPE_STREAM)
            .set_op(control.op)
            .set_flags(control.flags)
            .set_len(len)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    /// Reads the first readable connection's data into `pkt`; returns the payload length, or
    /// `None` when that connection had nothing after all (the buffer is not used).
    fn write_data(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        readable: &mut VecDeque<ConnKey>,
    ) -> Result<Option<u32>, DeviceError> {
        let Some(key) = readable.pop_front() else {
            return Ok(None);
        };
        let Some(conn) = self.connections.get_mut(&key) else {
            return Ok(None);
        };
        let Some(buffer) = pkt.data_slice() else {
            return Err(DeviceError::BadRequest(
                "vsock receive buffer has no room for data".into(),
            ));
        };
        let room = buffer.len();
        let control = |op, flags| Control { key, op, flags };
        match conn.read_for_guest(buffer) {
            HostRead::Data(n) => {
                if n as usize == room {
                    readable.push_back(key); // There may be more: another turn later.
                }
                self.write_header(pkt, control(OP_RW, 0), n);
                Ok(Some(n))
            }
            HostRead::WouldBlock => Ok(None),
            HostRead::Eof => {
                conn.set_host_eof();
                self.write_header(pkt, control(OP_SHUTDOWN, SHUTDOWN_SEND), 0);
                if self.connections.get(&key).is_some_and(Connection::finished) {
                    self.reset_connection(key);
                }
                Ok(Some(0))
            }
            HostRead::Failed(e) => {
                log::debug!("vsock: host socket of {key:?} failed: {e}");
                self.close(key);
                self.write_header(pkt, control(OP_RST, 0), 0);
                Ok(Some(0))
            }
        }
    }

    /// Registers each host socket for exactly the events that can make progress now.
    fn sync_interests(&mut self, live: bool) {
        let rx_open = live && !self.rx_starved;
        for conn in self.connections.values_mut() {
            let wanted = conn.interest(rx_open);
            if wanted != conn.registered {
                match self.host.rewatch(conn.as_raw_fd(), conn.registered, wanted) {
                    Ok(()) => conn.registered = wanted,
                    Err(e) => log::warn!("vsock: cannot watch a host socket: {e}"),
                }
            }
        }
    }

    fn process_tx(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let Some(tx) = queues.get_mut(TX_QUEUE) else {
            return Ok(());
        };
        let mut used = false;
        while let Some(mut chain) = tx.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(memory, &mut chain, MAX_PACKET_DATA) {
                Ok(pkt) => self.handle_guest_packet(&pkt),
                Err(e) => log::debug!("vsock: dropped a malformed packet: {e}"),
            }
            tx.add_used(memory, head, 0)?;
            used = true;
        }
        if used && tx.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        match index {
            RX_QUEUE => self.rx_starved = false,
            TX_QUEUE => self.process_tx(queues, memory, interrupt)?,
            // Event buffers wait for a transport event.
            _ => {
                return match queues.get_mut(EVENT_QUEUE) {
                    Some(queue) => self.send_transport_reset(queue, memory, interrupt),
                    None => Ok(()),
                };
            }
        }
        let result = self.deliver(queues, memory, interrupt, Vec::new());
        self.sync_interests(true);
        result
    }

    fn host_event(&self) -> Option<RawFd> {
        Some(self.host.epoll_fd())
    }

    fn process_host_event(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let live = !queues.is_empty();
        if !live && !self.connections.is_empty() {
            self.close_all();
        }
        let mut events = [EpollEvent::default(); EVENTS_PER_ROUND];
        let count = self.host.ready(&mut events)?;
        let mut requests = Vec::new();
        let mut readable = Vec::new();
        for event in &events[..count] {
            let fd = event.fd();
            if self.host.handle(fd, live, &mut requests) {
                continue;
            }
            if let Some(&key) = self.by_fd.get(&fd) {
                self.connection_event(key, event.event_set(), &mut readable);
            }
        }
        for request in requests {
            self.host_connect(request);
        }
        let result = self.deliver(queues, memory, interrupt, readable);
        self.sync_interests(live);
        result
    }

    fn reset(&mut self) {
        self.close_all();
        // A driver starting afresh has no connections to drop.
        self.reset_pending = false;
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Vsock(VsockState { cid: self.cid }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::connection::TX_BUFFER_SIZE;
    use super::*;
    use crate::virtio::mmio::{S_NEEDS_RESET, reg};
    use crate::virtio::test_driver::Driver;

    const GUEST_CID: u64 = 42;
    const GUEST_PORT: u32 = 5000;
    /// Receive buffers: header at `RX_AREA + i * RX_STRIDE`, data right after it.
    const RX_AREA: u64 = 0x4_0000;
    const RX_STRIDE: u64 = 0x2000;
    const RX_DATA: u32 = 0x1000;
    const TX_AREA: u64 = 0x8_0000;

    /// Packet header fields in wire order.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Hdr {
        src_cid: u64,
        dst_cid: u64,
        src_port: u32,
        dst_port: u32,
        len: u32,
        type_: u16,
        op: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    }

    impl Hdr {
        fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::with_capacity(PKT_HEADER_SIZE);
            b.extend(self.src_cid.to_le_bytes());
            b.extend(self.dst_cid.to_le_bytes());
            b.extend(self.src_port.to_le_bytes());
            b.extend(self.dst_port.to_le_bytes());
            b.extend(self.len.to_le_bytes());
            b.extend(self.type_.to_le_bytes());
            b.extend(self.op.to_le_bytes());
            b.extend(self.flags.to_le_bytes());
            b.extend(self.buf_alloc.to_le_bytes());
            b.extend(self.fwd_cnt.to_le_bytes());
            b
        }

        fn parse(b: &[u8]) -> Self {
            let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
            let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
            let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
            Self {
                src_cid: u64_at(0),
                dst_cid: u64_at(8),
                src_port: u32_at(16),
                dst_port: u32_at(20),
                len: u32_at(24),
                type_: u16_at(28),
                op: u16_at(30),
                flags: u32_at(32),
                buf_alloc: u32_at(36),
                fwd_cnt: u32_at(40),
            }
        }

        /// A packet from the test guest's port to `host_port`.
        fn to_host(host_port: u32, op: u16) -> Self {
            Self {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: GUEST_PORT,
                dst_port: host_port,
                type_: TYPE_STREAM,
                op,
                buf_alloc: 64 << 10,
                ..Self::default()
            }
        }
    }

    /// A guest-side vsock driver over the register-level test driver.
    struct Guest {
        d: Driver,
        connector: VsockConnector,
        rx_posted: u16,
        rx_seen: u16,
        tx_sent: u16,
    }

    impl Guest {
        fn new(uds: Option<&Path>) -> Self {
            let vsock = Vsock::new(GUEST_CID, uds).unwrap();
            let connector = vsock.connector();
            let mut d = Driver::new(Box::new(vsock));
            d.start();
            Self {
                d,
                connector,
                rx_posted: 0,
                rx_seen: 0,
                tx_sent: 0,
            }
        }

        /// Posts `n` receive buffers (header + `RX_DATA` bytes of data each).
        fn post_rx(&mut self, n: u16) {
            self.d.select(RX_QUEUE as u16);
            for _ in 0..n {
                let slot = u64::from(self.rx_posted % 16);
                let hdr = RX_AREA + slot * RX_STRIDE;
                let head = (self.rx_posted % 64) * 2;
                self.d.chain(
                    head,
                    &[
                        (hdr, PKT_HEADER_SIZE as u32, true),
                        (hdr + 0x100, RX_DATA, true),
                    ],
                );
                self.rx_posted += 1;
            }
            self.d.notify();
        }

        /// Sends a packet with `data` on the transmit queue.
        fn send(&mut self, hdr: Hdr, data: &[u8]) {
            let hdr = Hdr {
                len: data.len() as u32,
                ..hdr
            };
            self.send_raw(&hdr.bytes(), data);
        }

        fn send_raw(&mut self, hdr: &[u8], data: &[u8]) {
            self.d.select(TX_QUEUE as u16);
            let at = TX_AREA + u64::from(self.tx_sent % 4) * 0x1_0000;
            let head = (self.tx_sent % 64) * 2;
            self.d.memory.write_slice(hdr, GuestAddress(at)).unwrap();
            self.d
                .memory
                .write_slice(data, GuestAddress(at + 0x100))
                .unwrap();
            let mut parts = vec![(at, hdr.len() as u32, false)];
            if !data.is_empty() {
                parts.push((at + 0x100, data.len() as u32, false));
            }
            self.d.chain(head, &parts);
            self.tx_sent += 1;
            self.d.notify();
        }

        /// Lets the device handle its host sockets, as the event loop would.
        fn host_event(&mut self) {
            self.d.transport.process_host_event();
        }

        /// Packets the device delivered since the last call, with their data.
        fn received(&mut self) -> Vec<(Hdr, Vec<u8>)> {
            self.d.select(RX_QUEUE as u16);
            let (idx, _) = self.d.used(0);
            let mut out = Vec::new();
            while self.rx_seen != idx {
                let n = self.rx_seen;
                let (_, len) = self.d.used(n % 128);
                let slot = u64::from(n % 16);
                let hdr_at = RX_AREA + slot * RX_STRIDE;
                let mut raw = [0u8; PKT_HEADER_SIZE];
                self.d
                    .memory
                    .read_slice(&mut raw, GuestAddress(hdr_at))
                    .unwrap();
                let hdr = Hdr::parse(&raw);
                assert_eq!(len, PKT_HEADER_SIZE as u32 + hdr.len, "used length");
                let mut data = vec![0u8; hdr.len as usize];
                self.d
                    .memory
                    .read_slice(&mut data, GuestAddress(hdr_at + 0x100))
                    .unwrap();
                out.push((hdr, data));
                self.rx_seen += 1;
            }
            out
        }

        fn ops(&mut self) -> Vec<u16> {
            self.received().iter().map(|(h, _)| h.op).collect()
        }

        fn needs_reset(&mut self) -> bool {
            self.d.read(reg::STATUS) & S_NEEDS_RESET != 0
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("forkvm-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A guest connected to host port 1234, where `listener` accepted the host end.
    fn guest_connected(name: &str) -> (Guest, UnixStream, PathBuf) {
        let dir = temp_dir(name);
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(dir.join("v.sock_1234")).unwrap();
        let mut g = Guest::new(Some(&uds));
        g.post_rx(8);
        g.send(Hdr::to_host(1234, OP_REQUEST), &[]);
        let (host, _) = listener.accept().unwrap();
        let got = g.received();
        assert_eq!(got.len(), 1);
        let (hdr, _) = got[0];
        assert_eq!(
            (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port),
            (OP_RESPONSE, HOST_CID, GUEST_CID, 1234, GUEST_PORT)
        );
        assert_eq!(hdr.buf_alloc, TX_BUFFER_SIZE);
        (g, host, dir)
    }

    #[test]
    fn config_space_holds_the_guest_cid_and_reserved_cids_are_refused() {
        let mut g = Guest::new(None);
        assert_eq!(g.d.read(0x100), GUEST_CID as u32);
        assert_eq!(g.d.read(0x104), 0);
        assert_eq!(g.d.read(reg::DEVICE_ID), VSOCK_DEVICE_TYPE);
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            assert!(matches!(
                Vsock::new(cid, None),
                Err(VsockError::InvalidCid(_))
            ));
        }
    }

    #[test]
    fn guest_connection_carries_data_both_ways() {
        let (mut g, mut host, _dir) = guest_connected("both-ways");
        g.send(Hdr::to_host(1234, OP_RW), b"hello host");
        let mut buf = [0u8; 10];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello host");

        host.write_all(b"hello guest").unwrap();
        g.host_event();
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RW);
        assert_eq!(got[0].1, b"hello guest");
        assert_eq!(got[0].0.fwd_cnt, 10, "the guest learns what the host took");
    }

    #[test]
    fn a_host_port_nobody_listens_on_is_refused() {
        let dir = temp_dir("refused");
        let mut g = Guest::new(Some(&dir.join("v.sock")));
        g.post_rx(2);
        g.send(Hdr::to_host(99, OP_REQUEST), &[]);
        assert_eq!(g.ops(), [OP_RST]);
        let mut g = Guest::new(None);
        g.post_rx(2);
        g.send(Hdr::to_host(99, OP_REQUEST), &[]);
        assert_eq!(
            g.ops(),
            [OP_RST],
            "no Unix socket path: every guest connection is refused"
        );
    }

    #[test]
    fn a_host_listener_that_does_not_accept_cannot_stall_the_device() {
        let dir = temp_dir("backlog");
        let listener =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        listener
            .bind(&socket2::SockAddr::unix(dir.join("v.sock_7")).unwrap())
            .unwrap();
        listener.listen(1).unwrap();
        let mut g = Guest::new(Some(&dir.join("v.sock")));
        g.post_rx(16);
        for port in 0..8 {
            let mut request = Hdr::to_host(7, OP_REQUEST);
            request.src_port = GUEST_PORT + port;
            g.send(request, &[]);
        }
        let ops = g.ops();
        assert_eq!(ops.len(), 8, "every request is answered at once");
        assert!(ops.contains(&OP_RST), "a full backlog refuses: {ops:?}");
    }

    #[test]
    fn packets_the_device_cannot_carry_are_answered_with_a_reset() {
        let (mut g, _host, _dir) = guest_connected("foreign");
        let wrong_cid = Hdr {
            src_cid: 7,
            ..Hdr::to_host(1234, OP_RW)
        };
        let other_vm = Hdr {
            dst_cid: 43,
            ..Hdr::to_host(1234, OP_RW)
        };
        let seqpacket = Hdr {
            type_: 2,
            ..Hdr::to_host(1234, OP_RW)
        };
        let unknown = Hdr::to_host(4321, OP_RW);
        let bad_op = Hdr::to_host(1234, 99);
        for hdr in [wrong_cid, other_vm, seqpacket, unknown] {
            g.send(hdr, b"x");
            assert_eq!(g.ops(), [OP_RST], "{hdr:?}");
        }
        g.send(Hdr::to_host(4321, OP_RST), &[]);
        assert!(g.ops().is_empty(), "a reset is never answered");
        g.send(bad_op, &[]);
        assert_eq!(g.ops(), [OP_RST], "an unknown op resets the connection");
        g.send(Hdr::to_host(1234, OP_RW), b"x");
        assert_eq!(g.ops(), [OP_RST], "the connection is gone");
        assert!(!g.needs_reset());
    }

    #[test]
    fn malformed_transmit_chains_are_dropped() {
        let (mut g, mut host, _dir) = guest_connected("malformed");
        g.send_raw(&[0u8; 8], &[]); // header too short
        let mut lying = Hdr::to_host(1234, OP_RW);
        lying.len = 1000; // claims more data than its buffer holds
        g.send_raw(&lying.bytes(), b"short");
        lying.len = MAX_PACKET_DATA + 1;
        g.send_raw(&lying.bytes(), &[0u8; 16]);
        assert!(g.ops().is_empty());
        assert!(!g.needs_reset());
        // The connection still works.
        g.send(Hdr::to_host(1234, OP_RW), b"ok");
        let mut buf = [0u8; 2];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
    }

    #[test]
    fn a_guest_sending_beyond_its_credit_is_reset() {
        let (mut g, host, _dir) = guest_connected("credit");
        host.set_nonblocking(true).unwrap();
        // Fill the host socket's buffer and the device's; the host reads nothing.
        let chunk = vec![7u8; 60 << 10];
        let mut sent = 0usize;
        let mut ops = Vec::new();
        while !ops.contains(&OP_RST) && sent < 16 << 20 {
            g.send(Hdr::to_host(1234, OP_RW), &chunk);
            sent += chunk.len();
            ops.extend(g.ops());
        }
        assert_eq!(
            ops.last(),
            Some(&OP_RST),
            "reset once the guest overran its credit"
        );
        let mut host = host;
        host.set_nonblocking(false).unwrap();
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert!(
            all.len() < sent,
            "what went beyond the credit never reached the host"
        );
    }

    #[test]
    fn host_data_waits_for_receive_buffers_and_credit_without_spinning() {
        let dir = temp_dir("starved");
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(dir.join("v.sock_1234")).unwrap();
        let mut g = Guest::new(Some(&uds));
        g.post_rx(1);
        let mut request = Hdr::to_host(1234, OP_REQUEST);
        request.buf_alloc = 6; // the guest can take 6 bytes
        g.send(request, &[]);
        let (mut host, _) = listener.accept().unwrap();
        assert_eq!(g.ops(), [OP_RESPONSE]);
        host.write_all(b"0123456789").unwrap();
        g.host_event();
        assert_eq!(g.received(), [], "no receive buffer");
        assert!(
            !host_work_pending(&g),
            "starved: the socket is not watched, the loop sleeps"
        );
        g.post_rx(2);
        assert!(host_work_pending(&g), "posting buffers re-arms the socket");
        g.host_event();
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, b"012345", "only as much as the credit allows");
        assert!(!host_work_pending(&g), "no credit: not watched");
        let mut update = Hdr::to_host(1234, OP_CREDIT_UPDATE);
        update.buf_alloc = 6;
        update.fwd_cnt = 6;
        g.send(update, &[]);
        g.host_event();
        assert_eq!(g.received()[0].1, b"6789");
    }

    /// Whether the device's host event fd is readable (the event loop would wake).
    fn host_work_pending(g: &Guest) -> bool {
        let mut poll = libc::pollfd {
            fd: g.d.transport.host_event().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    }

    #[test]
    fn host_end_of_input_and_guest_shutdown_close_the_connection() {
        let (mut g, host, _dir) = guest_connected("shutdown");
        host.shutdown(std::net::Shutdown::Write).unwrap();
        g.host_event();
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        // The guest may still send; then it closes both directions.
        g.send(Hdr::to_host(1234, OP_RW), b"bye");
        let mut shutdown = Hdr::to_host(1234, OP_SHUTDOWN);
        shutdown.flags = SHUTDOWN_BOTH;
        g.send(shutdown, &[]);
        assert_eq!(g.ops(), [OP_RST]);
        let mut rest = Vec::new();
        (&host).read_to_end(&mut rest).unwrap();
        assert_eq!(
            rest, b"bye",
            "everything the guest sent arrives, then end of input"
        );
    }

    #[test]
    fn a_host_that_goes_away_resets_the_guest_connection() {
        let (mut g, host, _dir) = guest_connected("host-gone");
        drop(host);
        g.host_event();
        assert_eq!(g.ops(), [OP_SHUTDOWN]);
        g.send(Hdr::to_host(1234, OP_RW), b"anyone?");
        assert_eq!(g.ops(), [OP_RST], "writing to a closed host socket resets");
    }

    #[test]
    fn host_clients_connect_through_the_unix_socket_and_in_process() {
        let dir = temp_dir("host-connect");
        let uds = dir.join("v.sock");
        let mut g = Guest::new(Some(&uds));
        let connector = g.connector.clone();
        g.post_rx(8);
        let timeout = Duration::from_secs(10);
        let unix = std::thread::spawn({
            let uds = uds.clone();
            move || {
                let stream = UnixStream::connect(&uds).unwrap();
                host::hybrid_handshake(&stream, 52, timeout).map(|port| (stream, port))
            }
        });
        let in_process = std::thread::spawn(move || connector.connect(53, timeout));
        let mut requests = Vec::new();
        while requests.len() < 2 {
            g.host_event();
            requests.extend(g.received());
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut ports: Vec<u32> = requests.iter().map(|(h, _)| h.dst_port).collect();
        ports.sort();
        assert_eq!(ports, [52, 53]);
        for (hdr, _) in &requests {
            assert_eq!(hdr.op, OP_REQUEST);
            assert!(hdr.src_port >= FIRST_LOCAL_PORT);
            let answer = Hdr {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                type_: TYPE_STREAM,
                op: if hdr.dst_port == 52 {
                    OP_RESPONSE
                } else {
                    OP_RST
                },
                buf_alloc: 4096,
                ..Hdr::default()
            };
            g.send(answer, &[]);
        }
        let (mut stream, port) = unix.join().unwrap().expect("the guest accepted port 52");
        assert!(port >= FIRST_LOCAL_PORT);
        let refused = in_process
            .join()
            .unwrap()
            .expect_err("the guest refused port 53");
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
        stream.write_all(b"data").unwrap();
        g.host_event();
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.op, got[0].0.dst_port, &got[0].1[..]),
            (OP_RW, 52, &b"data"[..])
        );
    }

    #[test]
    fn clients_are_refused_until_the_driver_is_up_and_reset_drops_connections() {
        let dir = temp_dir("not-live");
        let uds = dir.join("v.sock");
        let mut d = Driver::new(Box::new(Vsock::new(GUEST_CID, Some(&uds)).unwrap()));
        let client = UnixStream::connect(&uds).unwrap();
        d.transport.process_host_event();
        let err = host::hybrid_handshake(&client, 1, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

        let (mut g, host, _dir) = guest_connected("reset");
        g.d.write(reg::STATUS, 0);
        let mut rest = Vec::new();
        (&host).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "a driver reset closes every host socket");
    }

    #[test]
    fn receive_buffers_without_room_put_the_device_into_needs_reset() {
        let (mut g, mut host, _dir) = guest_connected("tiny-rx");
        g.d.select(RX_QUEUE as u16);
        g.d.chain(100, &[(RX_AREA, PKT_HEADER_SIZE as u32, true)]);
        // Use up the well-formed buffers first.
        host.write_all(&vec![1u8; 7 * RX_DATA as usize]).unwrap();
        for _ in 0..8 {
            g.host_event();
        }
        assert!(g.needs_reset());
    }

    #[test]
    fn random_packets_never_panic() {
        let (mut g, _host, _dir) = guest_connected("random");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5_000 {
            let r = next();
            let mut hdr = Hdr::to_host(1230 + (r % 8) as u32, (r >> 8) as u16 % 9);
            hdr.src_port = GUEST_PORT + (r >> 20) as u32 % 3;
            hdr.flags = (r >> 24) as u32 % 4;
            hdr.buf_alloc = (r >> 32) as u32;
            hdr.fwd_cnt = (r >> 40) as u32;
            let data = vec![0u8; (r >> 48) as usize % 300];
            if r & 1 == 0 {
                g.send(hdr, &data);
            } else {
                hdr.len = (r >> 50) as u32;
                g.send_raw(&hdr.bytes(), &data);
            }
            if r % 7 == 0 && g.rx_posted - g.rx_seen < 8 {
                g.post_rx(4);
            }
            g.host_event();
            g.received();
        }
    }

    #[test]
    fn a_forked_device_sends_one_transport_reset_and_a_restarted_driver_none() {
        let mut g = Guest::new(None);
        let state = g.d.transport.freeze().unwrap();
        let DeviceState::Vsock(vsock_state) = &state.device else {
            panic!("not a vsock state: {:?}", state.device);
        };
        let child = Vsock::from_state(vsock_state, None).unwrap();
        let interrupt = crate::virtio::Interrupt::new(crate::trigger::IrqTrigger::new().unwrap());
        g.d.transport = crate::virtio::mmio::MmioTransport::restore(
            Box::new(child),
            g.d.memory.clone(),
            interrupt,
            &state.transport,
        )
        .unwrap();
        // The event loop serves the queues the restore marked notified (no event buffer yet).
        for index in 0..3 {
            assert_eq!(g.d.transport.queue_events()[index].read().unwrap(), 1);
            g.d.transport.process_queue(index);
        }
        let event_buffer = |g: &mut Guest, head: u16, at: u64| {
            g.d.memory.write_obj(u32::MAX, GuestAddress(at)).unwrap();
            g.d.select(EVENT_QUEUE as u16);
            g.d.chain(head, &[(at, 4, true)]);
            g.d.notify();
        };
        event_buffer(&mut g, 0, 0xa_0000);
        assert_eq!(g.d.used(0), (1, 4));
        let id: u32 = g.d.memory.read_obj(GuestAddress(0xa_0000)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        event_buffer(&mut g, 1, 0xa_0100);
        assert_eq!(g.d.used(0).0, 1, "one reset per fork");

        // A driver that starts over after the fork has nothing to reset.
        let state = g.d.transport.freeze().unwrap();
        let DeviceState::Vsock(vsock_state) = &state.device else {
            panic!("not a vsock state");
        };
        g.d = Driver::new(Box::new(Vsock::from_state(vsock_state, None).unwrap()));
        g.d.start_with(0);
        event_buffer(&mut g, 0, 0xa_0000);
        assert_eq!(g.d.used(0).0, 0);
    }
}
