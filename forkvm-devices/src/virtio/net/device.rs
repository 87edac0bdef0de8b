//! The network device: frames from the transmit queue to the backend, frames from the backend
//! into the receive queue's buffers.

use std::os::fd::RawFd;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP, virtio_net_config,
};
use virtio_queue::{Queue, QueueT};

use super::csum::DATA_VALID;
use super::rx::{Placed, Receiver};
use super::tx::Transmitter;
use super::{NET_DEVICE_TYPE, NetBackend, NetStats, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::persist::HostNeeds;
use crate::virtio::{
    Budget, DeviceError, DeviceState, GuestMemoryMmap, INT_USED_RING, Interrupt,
    VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
};

/// Size of the configuration space (`struct virtio_net_config`; only `mac`, `status` and `mtu`
/// mean something with the features offered).
const CONFIG_LEN: usize = std::mem::size_of::<virtio_net_config>();
/// The smallest MTU a driver takes from `VIRTIO_NET_F_MTU` (IPv4's minimum; Linux refuses the
/// device below it).
const MIN_MTU: u16 = 68;

/// The network device.
pub struct Net {
    pub(super) mac: [u8; 6],
    backend: Box<dyn NetBackend>,
    /// The features the driver accepted.
    acked_features: u64,
    /// The driver sends partial checksums (`CSUM`) and the backend cannot take them: the device
    /// completes them (see `csum.rs`).
    complete_checksums: bool,
    /// The header's flags on every received frame: `DATA_VALID` when the driver accepts it
    /// (`GUEST_CSUM`) and the backend leaves checksums to it, 0 otherwise.
    rx_flags: u8,
    tx: Transmitter,
    rx: Receiver,
    stats: NetStats,
}

impl Net {
    /// A network device with address `mac`, connected to `backend`.
    pub fn new(mac: [u8; 6], backend: Box<dyn NetBackend>) -> Self {
        Self {
            mac,
            backend,
            acked_features: 0,
            complete_checksums: false,
            rx_flags: 0,
            tx: Transmitter::default(),
            rx: Receiver::default(),
            stats: NetStats::default(),
        }
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters (a handle that stays valid while the device runs).
    pub fn stats(&self) -> NetStats {
        self.stats.clone()
    }

    /// Tells the backend (if it can offload) what the driver accepted, and decides what the
    /// device itself does: complete partial checksums when the backend cannot take them, and
    /// set `DATA_VALID` only when the backend leaves the checksums of received frames to it.
    /// Called when the driver acks its features, when a restored transport re-acks them for a
    /// device that continues from its state (so a new backend learns them), and at a reset.
    fn set_checksum_offload(&mut self) {
        let partial = self.acked_features & (1 << VIRTIO_NET_F_CSUM) != 0;
        let unchecked = self.acked_features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        let capable = self.backend.checksum_offload();
        if capable {
            self.backend.set_checksum_offload(partial, unchecked);
        }
        self.complete_checksums = partial && !capable;
        self.rx_flags = if unchecked && capable { DATA_VALID } else { 0 };
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        let mac = std::mem::offset_of!(virtio_net_config, mac);
        let status = std::mem::offset_of!(virtio_net_config, status);
        config[mac..mac + 6].copy_from_slice(&self.mac);
        // The status bits fit in 16 bits (VIRTIO_NET_S_LINK_UP is 1).
        config[status..status + 2].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        if let Some(value) = self.mtu() {
            let mtu = std::mem::offset_of!(virtio_net_config, mtu);
            config[mtu..mtu + 2].copy_from_slice(&value.to_le_bytes());
        }
        config
    }

    /// The MTU the device announces: the backend's, if it has one the driver would accept.
    fn mtu(&self) -> Option<u16> {
        self.backend.mtu().filter(|mtu| *mtu >= MIN_MTU)
    }

    /// Serves the receive queue if the driver made it ready (`queues` is empty while the device
    /// is not live: the frames then wait in the backend).
    fn receive_on(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        rx: &Budget,
    ) -> Result<(), DeviceError> {
        match queues.get_mut(RX_QUEUE).filter(|queue| queue.ready()) {
            Some(queue) => self.receive(queue, memory, interrupt, rx),
            None => Ok(()),
        }
    }

    /// Moves frames from the backend into the receive buffers while both last, and while the
    /// receive rate limit (`rx`: a frame and its bytes each) allows; a frame is taken from the
    /// backend only once it is written (or once it is clear that no buffers would ever hold it:
    /// then it is dropped and counted). Interrupts the driver once if it asked.
    fn receive(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        rx: &Budget,
    ) -> Result<(), DeviceError> {
        let mergeable = self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut delivered = false;
        let result = loop {
            let Some(frame) = self.backend.peek_receive() else {
                break Ok(());
            };
            if rx.spent() {
                // The frame waits in the backend, as for a full receive queue; the transport
                // comes back when the limit allows.
                rx.leave_more();
                break Ok(());
            }
            let len = frame.len();
            match self
                .rx
                .place(queue, memory, frame, mergeable, self.rx_flags)
            {
                Ok(Placed::Delivered) => {
                    rx.charge_op();
                    rx.charge_bytes(len);
                    self.backend.consume_receive();
                    NetStats::count(&self.stats.0.rx_frames);
                    delivered = true;
                }
                Ok(Placed::NoRoom) => break Ok(()),
                Ok(Placed::NeverFits) => {
                    crate::ratelimit::guest_warn!(
                        "virtio-net: frame of {len} bytes dropped: the guest's receive buffers \
                         cannot hold it"
                    );
                    self.backend.consume_receive();
                    NetStats::count(&self.stats.0.rx_dropped);
                }
                Err(e) => break Err(e),
            }
        };
        if delivered && queue.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        result
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let offloads = if self.backend.checksum_offload() {
            (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM)
        } else {
            0
        };
        let mtu = if self.mtu().is_some() {
            1 << VIRTIO_NET_F_MTU
        } else {
            0
        };
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | offloads
            | mtu
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
        self.set_checksum_offload();
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
            RX_QUEUE => self.receive_on(queues, memory, interrupt, rx),
            TX_QUEUE => {
                let Some(queue) = queues.get_mut(TX_QUEUE) else {
                    return Ok(());
                };
                let sent = self.tx.transmit(
                    queue,
                    memory,
                    interrupt,
                    budget,
                    &mut *self.backend,
                    &self.stats,
                    self.complete_checksums,
                );
                // What was sent before a malformed chain still reaches the backend's work.
                self.backend.process();
                sent?;
                // The backend often answers at once (ARP, DHCP, a loopback peer).
                self.receive_on(queues, memory, interrupt, rx)
            }
            _ => Ok(()),
        }
    }

    fn host_event(&self) -> Option<RawFd> {
        self.backend.event_fd()
    }

    fn process_host_event(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        rx: &Budget,
    ) -> Result<(), DeviceError> {
        // Always: the backend consumes its event even while the device is not live.
        self.backend.process();
        self.receive_on(queues, memory, interrupt, rx)
    }

    fn has_receive_direction(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.set_checksum_offload();
        self.rx.clear();
    }

    fn fork_needs(&self) -> HostNeeds {
        HostNeeds {
            network: true,
            ..HostNeeds::default()
        }
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Net(self.state()))
    }
}
