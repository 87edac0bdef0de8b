//! Tests of the checksum offloads: offered only with a backend that can take them, frames with
//! partial checksums passed on untouched to such a backend and completed (or dropped) for one
//! that cannot, `DATA_VALID` only with `GUEST_CSUM`.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
};

use super::*;

const CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;
const GUEST_CSUM: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM;

/// A backend that can (or cannot) take checksum offloads.
fn wire(offload: bool) -> Wire {
    let wire = Wire::new();
    wire.shared.lock().unwrap().offload = offload;
    wire
}

fn offered(wire: &Wire) -> u64 {
    let mut d = Driver::new(Box::new(Net::new(MAC, wire.backend())));
    d.write(reg::DEVICE_FEATURES_SEL, 0);
    let low = u64::from(d.read(reg::DEVICE_FEATURES));
    d.write(reg::DEVICE_FEATURES_SEL, 1);
    low | u64::from(d.read(reg::DEVICE_FEATURES)) << 32
}

/// A live device on `wire` with `features` beyond VERSION_1.
fn net_on(wire: &Wire, features: u64) -> (Driver, NetStats) {
    let net = Net::new(MAC, wire.backend());
    let stats = net.stats();
    let mut d = Driver::new(Box::new(net));
    d.start_with(features);
    (d, stats)
}

/// Transmits `frame` behind a header asking for its checksum from `start` to go at
/// `start + offset`, as the chain at descriptor `head`.
fn send_partial(d: &mut Driver, head: u16, frame: &[u8], start: u16, offset: u16) {
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    bytes[6..8].copy_from_slice(&start.to_le_bytes());
    bytes[8..10].copy_from_slice(&offset.to_le_bytes());
    bytes.extend_from_slice(frame);
    let at = BUF + u64::from(head) * 0x1000;
    d.memory.write_slice(&bytes, GuestAddress(at)).unwrap();
    d.select(TX_QUEUE as u16);
    d.chain(head, &[(at, bytes.len() as u32, false)]);
}

/// The header flags of the frame received into the first receive buffer.
fn received_flags(d: &mut Driver, wire: &Wire) -> u8 {
    wire.receive(&frame(60, 3));
    d.select(RX_QUEUE as u16);
    d.chain(0, &[(RX_BUF, 2048, true)]);
    d.notify();
    assert_eq!(used(d, 0, 0), (1, (0, 72)));
    read(d, RX_BUF, 1)[0]
}

#[test]
fn the_offloads_are_offered_only_with_a_backend_that_can_take_them() {
    let without = offered(&wire(false));
    assert_eq!(without & (CSUM | GUEST_CSUM), 0);
    let with = offered(&wire(true));
    assert_eq!(with, without | CSUM | GUEST_CSUM);
    // The default backends say no.
    assert!(!Unconnected.checksum_offload());
}

#[test]
fn the_backend_learns_what_the_driver_accepted_and_forgets_it_at_a_reset() {
    for (features, told) in [
        (0, (false, false)),
        (CSUM, (true, false)),
        (GUEST_CSUM, (false, true)),
        (CSUM | GUEST_CSUM, (true, true)),
    ] {
        let wire = wire(true);
        let (mut d, _) = net_on(&wire, MRG | features);
        // (Starting resets the device first: that says no offloads.)
        assert_eq!(wire.shared.lock().unwrap().told.last(), Some(&told));
        d.write(reg::STATUS, 0);
        assert_eq!(
            wire.shared.lock().unwrap().told.last(),
            Some(&(false, false))
        );
    }
}

#[test]
fn partial_checksums_reach_a_capable_backend_untouched_whatever_their_fields() {
    let wire = wire(true);
    let (mut d, stats) = net_on(&wire, MRG | CSUM | GUEST_CSUM);
    let sent = frame(60, 1);
    // Sensible fields, fields past the end, the largest values: the device never reads them.
    for (head, (start, offset)) in [(34, 16), (59, 1), (u16::MAX, u16::MAX)]
        .into_iter()
        .enumerate()
    {
        send_partial(&mut d, head as u16, &sent, start, offset);
    }
    d.notify();
    assert_eq!(wire.sent(), vec![sent.clone(), sent.clone(), sent]);
    assert_eq!((stats.tx_frames(), stats.tx_dropped()), (3, 0));
    assert!(!needs_reset(&mut d));
}

#[test]
fn data_valid_is_set_only_with_guest_csum_and_a_capable_backend() {
    let data_valid = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    let wire_ = wire(true);
    let (mut d, _) = net_on(&wire_, MRG | CSUM | GUEST_CSUM);
    assert_eq!(received_flags(&mut d, &wire_), data_valid);
    let wire_ = wire(true);
    let (mut d, _) = net_on(&wire_, MRG | CSUM);
    assert_eq!(received_flags(&mut d, &wire_), 0);
    let wire_ = wire(false);
    let (mut d, _) = net_on(&wire_, MRG);
    assert_eq!(received_flags(&mut d, &wire_), 0);
}

/// A device whose driver negotiated both offloads, continued (as a fork child does) on `child`.
fn continued_on(child: &Wire) -> Driver {
    let (mut d, _) = net_on(&wire(true), MRG | CSUM | GUEST_CSUM);
    continue_device(&mut d, child.backend());
    // The restored queue events are signalled (the event loop would serve them): taken here.
    for event in d.transport.queue_events() {
        let _ = event.read();
    }
    d
}

#[test]
fn a_continued_device_tells_its_new_backend_what_the_driver_accepted() {
    let child = wire(true);
    let mut d = continued_on(&child);
    assert_eq!(
        child.shared.lock().unwrap().told.last(),
        Some(&(true, true))
    );
    assert_eq!(
        received_flags(&mut d, &child),
        VIRTIO_NET_HDR_F_DATA_VALID as u8
    );
}

#[test]
fn a_continued_device_on_an_incapable_backend_completes_checksums_or_drops_the_frame() {
    let child = wire(false);
    let mut d = continued_on(&child);
    // A UDP-like frame: the checksum (at 40) covers from 34 on; the field holds the
    // pseudo-header's sum.
    let mut sent = frame(60, 5);
    sent[40..42].copy_from_slice(&[0x12, 0x34]);
    send_partial(&mut d, 0, &sent, 34, 6);
    send_partial(&mut d, 1, &sent, 34, 25);
    send_partial(&mut d, 2, &sent, u16::MAX, u16::MAX);
    d.notify();
    let got = wire_sent_one(&child);
    assert_eq!(got[..40], sent[..40]);
    assert_eq!(got[42..], sent[42..]);
    let mut total: u32 = 0x1234;
    for pair in got[34..].chunks(2) {
        total += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    assert_eq!(total, 0xffff, "the completed checksum verifies");
    // The two frames with fields outside them were used and dropped; nothing needs a reset.
    assert_eq!(used_idx(&d, TX_QUEUE as u64), 3);
    assert!(!needs_reset(&mut d));
    // No DATA_VALID: the backend does not leave checksums to the device.
    assert_eq!(received_flags(&mut d, &child), 0);
}

fn wire_sent_one(wire: &Wire) -> Vec<u8> {
    let sent = wire.sent();
    assert_eq!(sent.len(), 1, "one frame of three reached the backend");
    sent.into_iter().next().unwrap()
}
