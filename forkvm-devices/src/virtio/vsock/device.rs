//! The socket device: its queues (receive, transmit, event), the transport reset a forked
//! child owes its guest, and the host-side work the event loop hands it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EpollEvent;

use super::connection::Connection;
use super::host::{HostSockets, VsockConnector};
use super::packet::{ConnKey, Control};
use super::{
    EVENT_QUEUE, EVENT_TRANSPORT_RESET, EVENTS_PER_ROUND, FIRST_LOCAL_PORT, MAX_PACKET_DATA,
    QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VSOCK_DEVICE_TYPE, VsockConfig, VsockError,
};
use crate::virtio::chains::next_chain;
use crate::virtio::{
    Budget, DeviceError, DeviceState, GuestMemoryMmap, INT_USED_RING, Interrupt,
    VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
};

/// The socket device.
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) host: HostSockets,
    pub(super) connections: HashMap<ConnKey, Connection>,
    pub(super) by_fd: HashMap<RawFd, ConnKey>,
    pub(super) control: VecDeque<Control>,
    pub(super) next_local_port: u32,
    /// The guest had no receive buffer for the last packet; host sockets are not read until it
    /// posts more.
    pub(super) rx_starved: bool,
    /// The receive rate limit was spent with host data waiting: host sockets are not read until
    /// the transport comes back with tokens (the data stays in them).
    pub(super) rx_throttled: bool,
    /// A transport reset waits for an event buffer (set in a forked child).
    pub(super) reset_pending: bool,
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
            rx_throttled: false,
            reset_pending: false,
        })
    }

    /// A handle that opens in-process connections to guest ports.
    pub fn connector(&self) -> VsockConnector {
        self.host.connector()
    }

    /// Sends the pending transport reset if the guest posted an event buffer.
    fn send_transport_reset(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
    ) -> Result<(), DeviceError> {
        if !self.reset_pending {
            return Ok(());
        }
        // One buffer takes the event; any others wait for a later fork of this guest.
        let Some(chain) = next_chain(queue, memory, budget)? else {
            return Ok(());
        };
        let head = chain.head();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        if chain.writable_len() < event.len() {
            return Err(DeviceError::BadRequest(format!(
                "vsock event buffer of {} bytes",
                chain.writable_len()
            )));
        }
        chain.write(memory, &[&event])?;
        queue.add_used(memory, head, event.len() as u32)?;
        self.reset_pending = false;
        if queue.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        Ok(())
    }

    /// Fills the guest's receive buffers: control packets first, then data from `readable`
    /// connections (each takes a turn per packet) while the receive rate limit (`rx`: each data
    /// packet, header and payload) allows. Control packets are not held back by it: they answer
    /// the guest, carry no data, and their number is bounded.
    fn deliver(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        readable: Vec<ConnKey>,
        rx_limit: &Budget,
    ) -> Result<(), DeviceError> {
        // What waits for the guest's receive buffers is bounded by the host's sockets.
        let budget = &Budget::unlimited();
        let Some(rx) = queues.get_mut(RX_QUEUE) else {
            return Ok(());
        };
        let mut readable = VecDeque::from(readable);
        let mut used = false;
        while !self.control.is_empty() || !readable.is_empty() {
            if self.control.is_empty() && rx_limit.spent() {
                // The data stays in the host sockets, unread, until tokens are back.
                rx_limit.leave_more();
                self.rx_throttled = true;
                break;
            }
            let Some(mut chain) = next_chain(rx, memory, budget)? else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head();
            let mut pkt = VsockPacket::from_rx_virtq_chain(memory, chain.raw(), MAX_PACKET_DATA)
                .map_err(|e| DeviceError::BadRequest(format!("vsock receive buffer: {e}")))?;
            let len = if let Some(control) = self.control.pop_front() {
                self.write_header(&mut pkt, control, 0);
                0
            } else {
                match self.write_data(&mut pkt, &mut readable)? {
                    Some(len) => {
                        rx_limit.charge_op();
                        rx_limit.charge_bytes(PKT_HEADER_SIZE + len as usize);
                        len
                    }
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

    fn process_tx(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
    ) -> Result<(), DeviceError> {
        let Some(tx) = queues.get_mut(TX_QUEUE) else {
            return Ok(());
        };
        let mut used = false;
        while let Some(mut chain) = next_chain(tx, memory, budget)? {
            let head = chain.head();
            match VsockPacket::from_tx_virtq_chain(memory, chain.raw(), MAX_PACKET_DATA) {
                Ok(pkt) => {
                    budget.charge_bytes(PKT_HEADER_SIZE + pkt.len() as usize);
                    self.handle_guest_packet(&pkt);
                }
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
        let config = VsockConfig {
            guest_cid: self.cid.to_le(),
        };
        read_config_bytes(config.as_slice(), offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
        rx: &Budget,
    ) -> Result<(), DeviceError> {
        match index {
            RX_QUEUE => self.rx_starved = false,
            TX_QUEUE => self.process_tx(queues, memory, interrupt, budget)?,
            // Event buffers wait for a transport event.
            _ => {
                return match queues.get_mut(EVENT_QUEUE) {
                    Some(queue) => self.send_transport_reset(queue, memory, interrupt, budget),
                    None => Ok(()),
                };
            }
        }
        let result = self.deliver(queues, memory, interrupt, Vec::new(), rx);
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
        rx: &Budget,
    ) -> Result<(), DeviceError> {
        let live = !queues.is_empty();
        if !rx.spent() {
            // Tokens are back: host sockets are read again (from the next round of events).
            self.rx_throttled = false;
        }
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
        let result = self.deliver(queues, memory, interrupt, readable, rx);
        self.sync_interests(live);
        result
    }

    fn has_receive_direction(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        self.close_all();
        // A driver starting afresh has no connections to drop.
        self.reset_pending = false;
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Vsock(self.state()))
    }
}
