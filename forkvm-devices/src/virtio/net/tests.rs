//! Tests of the network device over the register-level test driver, against an in-memory
//! backend that records what the guest sends and holds frames for it.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    virtio_net_config,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tx::MAX_TX_CHAIN_LEN;
use super::*;
use crate::virtio::persist::HostEnds;
use crate::virtio::test_driver::{
    BUF, Driver, MEM_SIZE, QUEUE_SIZE as DRIVER_QUEUE_SIZE, QUEUE_STRIDE, S_NEEDS_RESET, USED, reg,
};
use crate::virtio::{DeviceState, VIRTIO_F_VERSION_1, VirtioDevice};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
/// Where tests put receive buffers (clear of both queues' rings).
const RX_BUF: u64 = 0x2_0000;
/// Where tests put large transmit buffers.
const TX_BIG: u64 = 0x4_0000;

#[derive(Default)]
struct Shared {
    sent: Vec<Vec<u8>>,
    inbox: VecDeque<Vec<u8>>,
    /// Frames that reach `inbox` at the backend's next `process`.
    later: VecDeque<Vec<u8>>,
    consumed: usize,
    processed: usize,
    /// Sent frames come back (at the next `process`).
    echo: bool,
    /// The backend says it can take checksum offloads.
    offload: bool,
    /// What `set_checksum_offload` was told, in order.
    told: Vec<(bool, bool)>,
    /// The MTU the backend reports.
    mtu: Option<u16>,
}

/// The test's view of the backend it gave the device.
#[derive(Clone)]
struct Wire {
    shared: Arc<Mutex<Shared>>,
    event: Arc<EventFd>,
}

impl Wire {
    fn new() -> Self {
        Self {
            shared: Arc::default(),
            event: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    }

    fn backend(&self) -> Box<dyn NetBackend> {
        Box::new(TestBackend {
            wire: self.clone(),
            current: None,
        })
    }

    fn receive(&self, frame: &[u8]) {
        self.shared.lock().unwrap().inbox.push_back(frame.to_vec());
    }

    fn arrive_on_process(&self, frame: &[u8]) {
        self.shared.lock().unwrap().later.push_back(frame.to_vec());
        self.event.write(1).unwrap();
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        self.shared.lock().unwrap().sent.clone()
    }

    fn consumed(&self) -> usize {
        self.shared.lock().unwrap().consumed
    }

    fn processed(&self) -> usize {
        self.shared.lock().unwrap().processed
    }
}

/// An in-memory [`NetBackend`].
struct TestBackend {
    wire: Wire,
    /// The frame `peek_receive` returned and the device has not consumed.
    current: Option<Vec<u8>>,
}

impl NetBackend for TestBackend {
    fn transmit(&mut self, frame: &[u8]) {
        let mut shared = self.wire.shared.lock().unwrap();
        shared.sent.push(frame.to_vec());
        if shared.echo {
            shared.later.push_back(frame.to_vec());
        }
    }

    fn peek_receive(&mut self) -> Option<&[u8]> {
        if self.current.is_none() {
            self.current = self.wire.shared.lock().unwrap().inbox.pop_front();
        }
        self.current.as_deref()
    }

    fn consume_receive(&mut self) {
        assert!(
            self.current.take().is_some(),
            "consumed a frame never peeked"
        );
        self.wire.shared.lock().unwrap().consumed += 1;
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.wire.event.as_raw_fd())
    }

    fn checksum_offload(&self) -> bool {
        self.wire.shared.lock().unwrap().offload
    }

    fn mtu(&self) -> Option<u16> {
        self.wire.shared.lock().unwrap().mtu
    }

    fn set_checksum_offload(&mut self, from_guest_partial: bool, to_guest_unchecked: bool) {
        let mut shared = self.wire.shared.lock().unwrap();
        assert!(shared.offload, "told an offload it cannot take");
        shared.told.push((from_guest_partial, to_guest_unchecked));
    }

    fn process(&mut self) {
        let _ = self.wire.event.read();
        let mut shared = self.wire.shared.lock().unwrap();
        shared.processed += 1;
        while let Some(frame) = shared.later.pop_front() {
            shared.inbox.push_back(frame);
        }
    }
}

/// A live device (with `features` beyond VERSION_1), its driver, wire and counters.
fn net(features: u64) -> (Driver, Wire, NetStats) {
    let wire = Wire::new();
    let net = Net::new(MAC, wire.backend());
    let stats = net.stats();
    let mut d = Driver::new(Box::new(net));
    d.start_with(features);
    (d, wire, stats)
}

/// Freezes `d`'s device and continues it on `backend`, as a fork child's is: a device from the
/// frozen state behind a transport restored from it, in place of the old.
fn continue_device(d: &mut Driver, backend: Box<dyn NetBackend>) {
    let state = d.transport.freeze().unwrap();
    let (device, _) = state
        .device
        .into_device(HostEnds {
            net_backend: Some(backend),
            ..HostEnds::default()
        })
        .unwrap();
    let interrupt = crate::virtio::Interrupt::new(crate::trigger::IrqTrigger::new().unwrap());
    d.transport = crate::virtio::mmio::MmioTransport::restore(
        device,
        d.memory.clone(),
        interrupt,
        &state.transport,
    )
    .unwrap();
}

/// A frame of `len` bytes that tells its bytes apart.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn read(d: &Driver, at: u64, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    d.memory.read_slice(&mut got, GuestAddress(at)).unwrap();
    got
}

/// The used ring of queue `q`: its index and element `n` (descriptor id, length).
fn used(d: &Driver, q: u64, n: u64) -> (u16, (u32, u32)) {
    let used = USED + QUEUE_STRIDE * q;
    let idx: u16 = d.memory.read_obj(GuestAddress(used + 2)).unwrap();
    let id: u32 = d.memory.read_obj(GuestAddress(used + 4 + 8 * n)).unwrap();
    let len: u32 = d.memory.read_obj(GuestAddress(used + 8 + 8 * n)).unwrap();
    (idx, (id, len))
}

fn used_idx(d: &Driver, q: u64) -> u16 {
    used(d, q, 0).0
}

/// Interrupts raised since the last call.
fn interrupts(d: &Driver) -> u64 {
    d.transport.interrupt().irq().eventfd().read().unwrap_or(0)
}

fn needs_reset(d: &mut Driver) -> bool {
    d.read(reg::STATUS) & S_NEEDS_RESET != 0
}

/// The virtio-net header the device writes in front of a received frame.
fn rx_header(num_buffers: u16) -> Vec<u8> {
    let mut header = vec![0u8; NET_HDR_LEN];
    header[10..].copy_from_slice(&num_buffers.to_le_bytes());
    header
}

/// Transmits `frame` behind a zeroed header, split into descriptors of `split` bytes, as the
/// chain at descriptor `head` of the transmit queue (data at `at`).
fn send(d: &mut Driver, head: u16, at: u64, frame: &[u8], split: usize) {
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes.extend_from_slice(frame);
    d.memory.write_slice(&bytes, GuestAddress(at)).unwrap();
    let parts: Vec<(u64, u32, bool)> = bytes
        .chunks(split)
        .enumerate()
        .map(|(i, part)| (at + (i * split) as u64, part.len() as u32, false))
        .collect();
    d.select(TX_QUEUE as u16);
    d.chain(head, &parts);
}

#[test]
fn the_device_offers_its_features_and_a_read_only_config_with_mac_and_link_up() {
    let wire = Wire::new();
    let mut d = Driver::new(Box::new(Net::new(MAC, wire.backend())));
    assert_eq!(d.read(reg::DEVICE_ID), 1);
    d.write(reg::DEVICE_FEATURES_SEL, 0);
    let low = u64::from(d.read(reg::DEVICE_FEATURES));
    d.write(reg::DEVICE_FEATURES_SEL, 1);
    let features = low | u64::from(d.read(reg::DEVICE_FEATURES)) << 32;
    assert_eq!(
        features,
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF),
        "no offloads, no control queue, no MTU"
    );
    for q in [RX_QUEUE, TX_QUEUE] {
        d.write(reg::QUEUE_SEL, q as u32);
        assert_eq!(d.read(reg::QUEUE_NUM_MAX), 256);
    }
    d.write(reg::QUEUE_SEL, 2);
    assert_eq!(d.read(reg::QUEUE_NUM_MAX), 0, "two queues only");

    let config = |d: &mut Driver| {
        let mut bytes = [0u8; 8];
        crate::bus::BusDevice::read(&mut d.transport, 0x100, &mut bytes);
        bytes
    };
    assert_eq!(config(&mut d), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0]);
    crate::bus::BusDevice::write(&mut d.transport, 0x100, &[0xff; 4]);
    crate::bus::BusDevice::write(&mut d.transport, 0x106, &[0, 0]);
    assert_eq!(config(&mut d)[..6], MAC, "the guest cannot change the MAC");
    assert_eq!(config(&mut d)[6], 1, "nor take the link down");
    // A driver accepting the features (MRG_RXBUF included) gets FEATURES_OK.
    assert_ne!(
        d.negotiate((1 << VIRTIO_F_VERSION_1) | MRG | (1 << VIRTIO_NET_F_MAC))
            & crate::virtio::test_driver::S_FEATURES_OK,
        0
    );
}

#[test]
fn a_backend_with_an_mtu_gets_it_offered_and_in_the_config() {
    let features = |d: &mut Driver| {
        d.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(d.read(reg::DEVICE_FEATURES));
        d.write(reg::DEVICE_FEATURES_SEL, 1);
        low | u64::from(d.read(reg::DEVICE_FEATURES)) << 32
    };
    let mtu = |d: &mut Driver| {
        let at = 0x100 + std::mem::offset_of!(virtio_net_config, mtu) as u64;
        let mut bytes = [0u8; 2];
        crate::bus::BusDevice::read(&mut d.transport, at, &mut bytes);
        u16::from_le_bytes(bytes)
    };
    for (reported, offered) in [
        (Some(65520), Some(65520)),
        (Some(1500), Some(1500)),
        (Some(67), None),
        (None, None),
    ] {
        let wire = Wire::new();
        wire.shared.lock().unwrap().mtu = reported;
        let mut d = Driver::new(Box::new(Net::new(MAC, wire.backend())));
        let has = features(&mut d) & (1 << VIRTIO_NET_F_MTU) != 0;
        assert_eq!(has, offered.is_some(), "{reported:?}");
        assert_eq!(mtu(&mut d), offered.unwrap_or(0), "{reported:?}");
        // A driver that accepts it gets FEATURES_OK.
        let wanted = (1 << VIRTIO_F_VERSION_1) | MRG | (1 << VIRTIO_NET_F_MTU);
        let status = d.negotiate(if has {
            wanted
        } else {
            wanted & !(1 << VIRTIO_NET_F_MTU)
        });
        assert_ne!(status & crate::virtio::test_driver::S_FEATURES_OK, 0);
    }
}

#[test]
fn a_transmitted_frame_reaches_the_backend_without_its_header() {
    let (mut d, wire, stats) = net(0);
    let sent = frame(60, 1);
    send(&mut d, 0, BUF, &sent, 4096);
    d.notify();
    assert_eq!(wire.sent(), vec![sent]);
    assert_eq!(used(&d, 1, 0), (1, (0, 0)), "used with length 0");
    assert_eq!(stats.tx_frames(), 1);
    assert_eq!(interrupts(&d), 1);
    assert!(wire.processed() >= 1, "the backend works on what it got");
}

#[test]
fn many_frames_split_over_descriptors_go_out_in_order_with_one_interrupt() {
    let (mut d, wire, stats) = net(0);
    let frames = [frame(1514, 1), frame(100, 2), frame(0, 3), frame(9000, 4)];
    let mut head = 0;
    let mut at = TX_BIG;
    // In one or many descriptors: the header with part of the frame, the header alone and the
    // frame in pieces, a header without a frame, a jumbo frame.
    for (i, f) in frames.iter().enumerate() {
        let split = [763, NET_HDR_LEN, 4096, 1000][i];
        send(&mut d, head, at, f, split);
        head += (NET_HDR_LEN + f.len()).div_ceil(split) as u16;
        at += 0x4000;
    }
    d.notify();
    assert_eq!(wire.sent(), frames.to_vec());
    assert_eq!(used_idx(&d, 1), 4);
    assert_eq!(stats.tx_frames(), 4);
    assert_eq!(interrupts(&d), 1, "one interrupt for the batch");
}

#[test]
fn frames_are_received_one_per_buffer_without_mrg_rxbuf() {
    let (mut d, wire, stats) = net(0);
    let (a, b) = (frame(1514, 1), frame(42, 2));
    wire.receive(&a);
    wire.receive(&b);
    d.chain(0, &[(RX_BUF, 2048, true)]);
    // A buffer may be split anywhere, the header included.
    d.chain(
        1,
        &[(RX_BUF + 0x1000, 5, true), (RX_BUF + 0x2000, 2043, true)],
    );
    d.notify();
    assert_eq!(used(&d, 0, 0), (2, (0, 12 + 1514)));
    assert_eq!(used(&d, 0, 1).1, (1, 12 + 42));
    assert_eq!(interrupts(&d), 1);
    let mut first = rx_header(1);
    first.extend_from_slice(&a);
    assert_eq!(read(&d, RX_BUF, 12 + 1514), first);
    let mut second = read(&d, RX_BUF + 0x1000, 5);
    second.extend(read(&d, RX_BUF + 0x2000, 12 + 42 - 5));
    let mut expected = rx_header(1);
    expected.extend_from_slice(&b);
    assert_eq!(second, expected);
    assert_eq!(
        (wire.consumed(), stats.rx_frames(), stats.rx_dropped()),
        (2, 2, 0)
    );
}

#[test]
fn with_mrg_rxbuf_a_frame_spans_chains_and_num_buffers_counts_them() {
    let (mut d, wire, stats) = net(MRG);
    let (big, small) = (frame(3000, 5), frame(100, 6));
    wire.receive(&big);
    wire.receive(&small);
    d.chain(0, &[(RX_BUF, 1024, true)]);
    d.chain(1, &[(RX_BUF + 0x1000, 1024, true)]);
    d.chain(
        2,
        &[(RX_BUF + 0x2000, 512, true), (RX_BUF + 0x3000, 512, true)],
    );
    d.chain(4, &[(RX_BUF + 0x4000, 1024, true)]);
    d.notify();
    // 12 + 3000 bytes: two whole chains and 964 bytes of the third; then the small frame.
    assert_eq!(used(&d, 0, 0), (4, (0, 1024)));
    assert_eq!(used(&d, 0, 1).1, (1, 1024));
    assert_eq!(used(&d, 0, 2).1, (2, 964));
    assert_eq!(used(&d, 0, 3).1, (4, 112));
    let mut got = read(&d, RX_BUF, 1024);
    got.extend(read(&d, RX_BUF + 0x1000, 1024));
    got.extend(read(&d, RX_BUF + 0x2000, 512));
    got.extend(read(&d, RX_BUF + 0x3000, 452));
    let mut expected = rx_header(3);
    expected.extend_from_slice(&big);
    assert_eq!(got, expected);
    let mut expected = rx_header(1);
    expected.extend_from_slice(&small);
    assert_eq!(read(&d, RX_BUF + 0x4000, 112), expected);
    assert_eq!(interrupts(&d), 1);
    assert_eq!((wire.consumed(), stats.rx_frames()), (2, 2));
}

#[test]
fn a_frame_waits_in_the_backend_until_buffers_hold_it_and_no_buffer_is_lost() {
    let (mut d, wire, stats) = net(MRG);
    let big = frame(3000, 9);
    wire.receive(&big);
    d.transport.process_queue(RX_QUEUE);
    assert_eq!(used_idx(&d, 0), 0, "no buffers yet");
    d.chain(0, &[(RX_BUF, 1024, true)]);
    d.notify();
    d.chain(1, &[(RX_BUF + 0x1000, 1024, true)]);
    d.notify();
    assert_eq!(used_idx(&d, 0), 0, "2048 bytes do not hold 3012");
    assert_eq!(
        (wire.consumed(), stats.rx_dropped()),
        (0, 0),
        "kept, not dropped"
    );
    d.chain(2, &[(RX_BUF + 0x2000, 1024, true)]);
    d.notify();
    // The chains taken and put back before are the ones used, in the order they came.
    assert_eq!(used(&d, 0, 0), (3, (0, 1024)));
    assert_eq!(used(&d, 0, 1).1, (1, 1024));
    assert_eq!(used(&d, 0, 2).1, (2, 964));
    let mut got = read(&d, RX_BUF, 1024);
    got.extend(read(&d, RX_BUF + 0x1000, 1024));
    got.extend(read(&d, RX_BUF + 0x2000, 964));
    assert_eq!(got[12..], big[..]);
    assert_eq!(
        (wire.consumed(), stats.rx_frames(), stats.rx_dropped()),
        (1, 1, 0)
    );
}

#[test]
fn without_mrg_rxbuf_a_frame_waits_for_a_buffer() {
    let (mut d, wire, _) = net(0);
    wire.receive(&frame(500, 1));
    d.transport.process_queue(RX_QUEUE);
    d.transport.process_queue(TX_QUEUE);
    assert_eq!(wire.consumed(), 0);
    d.chain(0, &[(RX_BUF, 1526, true)]);
    d.notify();
    assert_eq!(used(&d, 0, 0), (1, (0, 512)));
    assert_eq!(wire.consumed(), 1);
}

#[test]
fn without_mrg_rxbuf_a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let (mut d, wire, stats) = net(0);
    wire.receive(&frame(2000, 1));
    wire.receive(&frame(50, 2));
    d.chain(0, &[(RX_BUF, 1526, true)]);
    d.notify();
    assert_eq!(stats.rx_dropped(), 1);
    assert_eq!(
        used(&d, 0, 0),
        (1, (0, 62)),
        "the next frame got the buffer"
    );
    assert_eq!(read(&d, RX_BUF + 12, 50), frame(50, 2));
    assert_eq!((wire.consumed(), stats.rx_frames()), (2, 1));
}

#[test]
fn with_mrg_rxbuf_a_frame_a_whole_ring_cannot_hold_is_dropped_and_the_queue_goes_on() {
    let (mut d, wire, stats) = net(MRG);
    // A full ring of 16-byte buffers holds 2048 bytes.
    for i in 0..DRIVER_QUEUE_SIZE {
        d.chain(i, &[(RX_BUF + 16 * u64::from(i), 16, true)]);
    }
    wire.receive(&frame(2100, 1));
    wire.receive(&frame(3, 2));
    d.notify();
    assert_eq!(stats.rx_dropped(), 1);
    assert_eq!(
        used(&d, 0, 0),
        (1, (0, 15)),
        "the first buffer, put back, holds the next"
    );
    assert_eq!(read(&d, RX_BUF, 15)[12..], frame(3, 2));
    assert_eq!(wire.consumed(), 2);
}

#[test]
fn frames_above_the_largest_are_dropped_whatever_the_buffers() {
    let (mut d, wire, stats) = net(MRG);
    d.chain(0, &[(RX_BUF, 0x2_0000, true)]);
    wire.receive(&frame(MAX_FRAME_LEN + 1, 1));
    wire.receive(&frame(MAX_FRAME_LEN, 2));
    d.notify();
    assert_eq!(stats.rx_dropped(), 1);
    assert_eq!(
        used(&d, 0, 0),
        (1, (0, (NET_HDR_LEN + MAX_FRAME_LEN) as u32))
    );
    assert_eq!(
        read(&d, RX_BUF + 12, MAX_FRAME_LEN),
        frame(MAX_FRAME_LEN, 2)
    );
}

#[test]
fn the_largest_transmit_chain_is_taken_and_one_byte_more_is_refused() {
    let (mut d, wire, _) = net(0);
    d.select(TX_QUEUE as u16);
    d.chain(0, &[(TX_BIG, MAX_TX_CHAIN_LEN as u32, false)]);
    d.notify();
    assert_eq!(wire.sent().len(), 1);
    assert_eq!(wire.sent()[0].len(), MAX_FRAME_LEN);
    assert!(!needs_reset(&mut d));
    // Over the bound in two descriptors that are each within it.
    let half = (MAX_TX_CHAIN_LEN / 2 + 1) as u32;
    d.chain(1, &[(TX_BIG, half, false), (TX_BIG, half, false)]);
    d.notify();
    assert!(needs_reset(&mut d));
    assert_eq!(wire.sent().len(), 1);
}

/// A live device whose transmit queue gets the chain `parts`: returns whether it needs a reset
/// and what the backend got.
fn transmit_chain(parts: &[(u64, u32, bool)]) -> (bool, usize) {
    let (mut d, wire, _) = net(0);
    d.memory.write_slice(&[0u8; 64], GuestAddress(BUF)).unwrap();
    d.select(TX_QUEUE as u16);
    d.chain(0, parts);
    d.notify();
    (needs_reset(&mut d), wire.sent().len())
}

#[test]
fn malformed_transmit_chains_need_a_reset_and_send_nothing() {
    let end = MEM_SIZE as u64;
    for (parts, why) in [
        (
            &[(BUF, 12, false), (BUF + 0x100, 64, true)][..],
            "device-writable",
        ),
        (&[(BUF, 11, false)][..], "shorter than the header"),
        (
            &[(BUF, (MAX_TX_CHAIN_LEN + 1) as u32, false)][..],
            "too long",
        ),
        (
            &[(BUF, 12, false), (end - 8, 64, false)][..],
            "past guest memory",
        ),
        (
            &[(u64::MAX - 4, 64, false)][..],
            "at the end of the address space",
        ),
    ] {
        assert_eq!(transmit_chain(parts), (true, 0), "{why}");
    }
    assert_eq!(
        transmit_chain(&[(BUF, 12, false)]),
        (false, 1),
        "a control: empty frame"
    );
}

/// A live device (with `features`) with one frame waiting and the receive chain `parts`:
/// returns whether it needs a reset and whether the frame left the backend.
fn receive_chain(features: u64, parts: &[(u64, u32, bool)]) -> (bool, usize) {
    let (mut d, wire, _) = net(features);
    wire.receive(&frame(100, 1));
    d.chain(0, parts);
    d.notify();
    (needs_reset(&mut d), wire.consumed())
}

#[test]
fn malformed_receive_chains_need_a_reset_and_the_frame_stays() {
    let end = MEM_SIZE as u64;
    for features in [0, MRG] {
        for (parts, why) in [
            (&[(RX_BUF, 2048, false)][..], "device-readable"),
            (
                &[(RX_BUF, 6, true), (RX_BUF + 6, 2048, false)][..],
                "readable after writable",
            ),
            (&[(end - 64, 2048, true)][..], "past guest memory"),
            (
                &[(u64::MAX - 4, 2048, true)][..],
                "at the end of the address space",
            ),
            (&[(RX_BUF, 8, true)][..], "shorter than the header"),
        ] {
            assert_eq!(receive_chain(features, parts), (true, 0), "{why}");
        }
        assert_eq!(receive_chain(features, &[(RX_BUF, 2048, true)]), (false, 1));
    }
}

#[test]
fn a_chain_longer_than_the_descriptor_bound_is_refused() {
    // An indirect table lets a chain have up to 65535 descriptors; the device stops at 256.
    let (mut d, wire, _) = net(0);
    let table = TX_BIG;
    for i in 0..300u64 {
        let at = table + 16 * i;
        d.memory.write_obj(BUF, GuestAddress(at)).unwrap();
        d.memory.write_obj(1u32, GuestAddress(at + 8)).unwrap();
        let flags: u16 = if i < 299 { 1 } else { 0 };
        d.memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
        d.memory
            .write_obj((i + 1) as u16, GuestAddress(at + 14))
            .unwrap();
    }
    d.select(TX_QUEUE as u16);
    // Descriptor 0: VIRTQ_DESC_F_INDIRECT (4), pointing at the table of 300.
    d.descriptor(0, table, 300 * 16, 4, 0);
    d.make_available(0);
    d.notify();
    assert!(needs_reset(&mut d));
    assert!(wire.sent().is_empty());
}

/// Whether `fd` is readable now (the event loop would wake for it).
fn readable(fd: RawFd) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut events = [EpollEvent::default()];
    epoll.wait(0, &mut events).unwrap() == 1
}

#[test]
fn host_events_reach_the_backend_live_or_not_and_frames_wait_for_the_driver() {
    let wire = Wire::new();
    let mut d = Driver::new(Box::new(Net::new(MAC, wire.backend())));
    let event = d.transport.host_event().expect("the backend's event fd");
    assert_eq!(event, wire.event.as_raw_fd());
    wire.arrive_on_process(b"early frame");
    assert!(readable(event));
    d.transport.process_host_event();
    assert_eq!(wire.processed(), 1, "processed before the driver is live");
    assert!(
        !readable(event),
        "the event was consumed: the loop does not spin"
    );
    assert_eq!(wire.consumed(), 0);
    d.start();
    d.chain(0, &[(RX_BUF, 256, true)]);
    d.notify();
    assert_eq!(used(&d, 0, 0), (1, (0, 12 + 11)));
    assert_eq!(read(&d, RX_BUF + 12, 11), b"early frame");
    // Live: a frame that arrives with the event goes straight into a waiting buffer.
    d.chain(1, &[(RX_BUF + 0x1000, 256, true)]);
    d.notify();
    interrupts(&d);
    wire.arrive_on_process(b"later");
    d.transport.process_host_event();
    assert_eq!(used(&d, 0, 1), (2, (1, 12 + 5)));
    assert_eq!(read(&d, RX_BUF + 0x1000 + 12, 5), b"later");
    assert_eq!(interrupts(&d), 1);
}

#[test]
fn replies_the_backend_has_at_once_are_received_in_the_same_transmit_notify() {
    let (mut d, wire, _) = net(0);
    wire.shared.lock().unwrap().echo = true;
    d.chain(0, &[(RX_BUF, 2048, true)]);
    d.notify();
    let ping = frame(98, 3);
    send(&mut d, 0, BUF, &ping, 4096);
    d.notify();
    assert_eq!(used(&d, 0, 0), (1, (0, 12 + 98)));
    assert_eq!(read(&d, RX_BUF + 12, 98), ping);
}

#[test]
fn a_reset_forgets_the_negotiated_features_but_keeps_the_backend() {
    let (mut d, wire, stats) = net(MRG);
    d.write(reg::STATUS, 0);
    d.start();
    // Without MRG_RXBUF now: 3012 bytes do not span the two chains, the frame is dropped.
    wire.receive(&frame(3000, 1));
    wire.receive(&frame(10, 2));
    d.chain(0, &[(RX_BUF, 2048, true)]);
    d.chain(1, &[(RX_BUF + 0x1000, 2048, true)]);
    d.notify();
    assert_eq!(stats.rx_dropped(), 1);
    assert_eq!(used(&d, 0, 0), (1, (0, 22)));
    assert_eq!(read(&d, RX_BUF, 12), rx_header(1));
    send(&mut d, 0, BUF, b"after reset", 4096);
    d.notify();
    assert_eq!(wire.sent(), vec![b"after reset".to_vec()]);
}

#[test]
fn a_frozen_device_continues_with_its_mac_and_a_backend_of_its_own() {
    let parent_wire = Wire::new();
    let mut parent = Net::new(MAC, parent_wire.backend());
    assert!(parent.fork_needs().network);
    let state = parent.freeze().unwrap();
    let DeviceState::Net(net_state) = &state else {
        panic!("not a network state: {state:?}");
    };
    assert_eq!(net_state.mac(), MAC);
    assert!(state.needs().network);

    let child_wire = Wire::new();
    let (device, _) = state
        .into_device(HostEnds {
            net_backend: Some(child_wire.backend()),
            ..HostEnds::default()
        })
        .unwrap();
    let mut d = Driver::new(device);
    d.start();
    let mut mac = [0u8; 6];
    d.transport.read_device_config(0, &mut mac);
    assert_eq!(mac, MAC);
    send(&mut d, 0, BUF, b"from the child", 4096);
    d.notify();
    assert_eq!(child_wire.sent(), vec![b"from the child".to_vec()]);
    assert!(parent_wire.sent().is_empty());

    // Without a backend it is unconnected: what it sends goes nowhere, nothing fails.
    let (device, _) = state.into_device(HostEnds::default()).unwrap();
    let mut d = Driver::new(device);
    d.start();
    send(&mut d, 0, BUF, b"into the void", 4096);
    d.notify();
    assert_eq!(used(&d, 1, 0), (1, (0, 0)));
    assert!(!needs_reset(&mut d));
}

#[test]
fn a_restored_transport_keeps_mrg_rxbuf_and_serves_what_the_driver_left_available() {
    let (mut d, _, _) = net(MRG);
    // Made available before the fork, not yet notified.
    d.chain(0, &[(RX_BUF, 1024, true)]);
    d.chain(1, &[(RX_BUF + 0x1000, 1024, true)]);
    let child_wire = Wire::new();
    child_wire.receive(&frame(1500, 7));
    continue_device(&mut d, child_wire.backend());
    // The restored queue events are signalled: the event loop serves the receive queue.
    d.transport.queue_events()[RX_QUEUE].read().unwrap();
    d.transport.process_queue(RX_QUEUE);
    assert_eq!(used(&d, 0, 0), (2, (0, 1024)));
    assert_eq!(used(&d, 0, 1).1, (1, 488));
    assert_eq!(read(&d, RX_BUF, 12), rx_header(2));
}

/// Checksum offload (`csum.rs`).
#[path = "csum_tests.rs"]
mod csum_tests;

mod limits;
