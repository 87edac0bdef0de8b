//! A rate-limited network device: frames the guest transmits beyond its bucket wait in the
//! ring until tokens are back.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::virtio::rate_limit::{Bucket, ManualClock, RateLimit};

#[test]
fn transmits_beyond_the_ops_bucket_wait_for_its_refill() {
    let (mut d, wire, stats) = net(0);
    let clock = Arc::new(ManualClock::default());
    d.transport.set_rate_limit_clock(clock.clone());
    let ops = Bucket::new(2, Duration::from_secs(1));
    d.transport
        .set_rate_limit(RateLimit {
            bytes: None,
            ops: Some(ops),
        })
        .unwrap();
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(100, i)).collect();
    for (i, f) in frames.iter().enumerate() {
        send(&mut d, i as u16, TX_BIG + 0x1000 * i as u64, f, 4096);
    }
    d.notify();
    assert_eq!(wire.sent(), frames[..2].to_vec());
    assert_eq!(stats.tx_frames(), 2);
    assert!(!d.turn_pending());

    clock.advance(Duration::from_secs(1));
    d.transport.rate_limit_timer_fired();
    while d.turn_pending() {
        d.serve_turn();
    }
    assert_eq!(wire.sent(), frames[..4].to_vec());
    clock.advance(Duration::from_secs(1));
    d.transport.rate_limit_timer_fired();
    while d.turn_pending() {
        d.serve_turn();
    }
    assert_eq!(wire.sent(), frames);
    assert_eq!(used_idx(&d, 1), 5);
}

/// Serves the receive direction as the event loop does when its timer fires, after `by`.
fn rx_timer_after(d: &mut Driver, clock: &ManualClock, by: Duration) {
    clock.advance(by);
    d.transport.rx_rate_limit_timer_fired();
}

#[test]
fn received_frames_beyond_the_rx_ops_bucket_wait_in_the_backend_for_its_refill() {
    let (mut d, wire, stats) = net(0);
    let clock = Arc::new(ManualClock::default());
    d.transport.set_rate_limit_clock(clock.clone());
    let limit = RateLimit {
        bytes: None,
        ops: Some(Bucket::new(2, Duration::from_secs(1))),
    };
    d.transport.set_rx_rate_limit(limit).unwrap();
    assert_eq!(d.transport.rx_rate_limit(), Some(limit));
    assert_eq!(
        d.transport.rate_limit(),
        RateLimit::unlimited(),
        "independent"
    );
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(100, i)).collect();
    frames.iter().for_each(|f| wire.receive(f));
    for i in 0..6u16 {
        d.chain(i, &[(RX_BUF + 0x1000 * u64::from(i), 2048, true)]);
    }
    d.notify();
    assert_eq!(
        (used_idx(&d, 0), wire.consumed(), stats.rx_frames()),
        (2, 2, 2)
    );
    // More host work or another notification delivers nothing while the bucket is empty.
    d.transport.process_host_event();
    d.notify();
    assert_eq!(wire.consumed(), 2, "the frames wait in the backend");

    rx_timer_after(&mut d, &clock, Duration::from_millis(500));
    assert_eq!(used_idx(&d, 0), 3, "half a second: one frame");
    rx_timer_after(&mut d, &clock, Duration::from_secs(1));
    assert_eq!(used_idx(&d, 0), 5);
    assert_eq!(wire.consumed(), 5);
    for (i, f) in frames.iter().enumerate() {
        let mut expected = rx_header(1);
        expected.extend_from_slice(f);
        assert_eq!(read(&d, RX_BUF + 0x1000 * i as u64, 12 + 100), expected);
    }
    // What the guest transmits is not held by the receive limit.
    let out = frame(60, 9);
    send(&mut d, 0, TX_BIG, &out, 4096);
    d.notify();
    assert_eq!(wire.sent(), vec![out]);
}

#[test]
fn a_frame_larger_than_the_rx_bytes_bucket_goes_whole_into_debt() {
    let (mut d, wire, _) = net(0);
    let clock = Arc::new(ManualClock::default());
    d.transport.set_rate_limit_clock(clock.clone());
    // 1000 bytes a second; frames of 1514 bytes.
    let bytes = Bucket::new(1000, Duration::from_secs(1));
    d.transport
        .set_rx_rate_limit(RateLimit {
            bytes: Some(bytes),
            ops: None,
        })
        .unwrap();
    (0..3).for_each(|i| wire.receive(&frame(1514, i)));
    for i in 0..3u16 {
        d.chain(i, &[(RX_BUF + 0x1000 * u64::from(i), 2048, true)]);
    }
    d.select(RX_QUEUE as u16);
    d.notify();
    assert_eq!(wire.consumed(), 1, "taken whole, 514 bytes owed");
    // The debt is paid back before the next frame: 514 + a sixteenth of the bucket.
    rx_timer_after(&mut d, &clock, Duration::from_millis(500));
    assert_eq!(wire.consumed(), 1);
    rx_timer_after(&mut d, &clock, Duration::from_millis(100));
    assert_eq!(wire.consumed(), 2);
    // Lifting the limit delivers the rest from the timer, armed to fire at once.
    d.transport
        .set_rx_rate_limit(RateLimit::unlimited())
        .unwrap();
    d.transport.rx_rate_limit_timer_fired();
    assert_eq!(wire.consumed(), 3);
}

#[test]
fn a_copy_keeps_the_rx_limit_and_a_device_without_a_receive_direction_refuses_one() {
    let (mut d, _, _) = net(0);
    let limit = RateLimit {
        bytes: Some(Bucket::new(4096, Duration::from_millis(10))),
        ops: None,
    };
    d.transport.set_rx_rate_limit(limit).unwrap();
    continue_device(&mut d, Wire::new().backend());
    assert_eq!(d.transport.rx_rate_limit(), Some(limit));
    assert_eq!(d.transport.rate_limit(), RateLimit::unlimited());

    let mut rng = Driver::new(Box::new(crate::virtio::rng::Rng::default()));
    assert_eq!(rng.transport.rx_rate_limit(), None);
    assert_eq!(
        rng.transport.set_rx_rate_limit(limit),
        Err(crate::virtio::rate_limit::RateLimitError::NoReceiveDirection)
    );
    let zero = RateLimit {
        bytes: Some(Bucket::new(0, Duration::from_secs(1))),
        ops: None,
    };
    assert!(d.transport.set_rx_rate_limit(zero).is_err());
}

#[test]
fn a_state_saved_before_rx_limits_restores_an_unlimited_receive_direction() {
    let (mut d, _, _) = net(0);
    let state = d.transport.freeze().unwrap();
    let mut json = serde_json::to_value(&state.transport).unwrap();
    json.as_object_mut()
        .unwrap()
        .remove("rx_rate_limit")
        .unwrap();
    let transport = serde_json::from_value(json).unwrap();
    let (device, _) = state
        .device
        .into_device(HostEnds {
            net_backend: Some(Wire::new().backend()),
            ..HostEnds::default()
        })
        .unwrap();
    let interrupt = d.transport.interrupt().clone();
    let copy = crate::virtio::mmio::MmioTransport::restore(
        device,
        d.memory.clone(),
        interrupt,
        &transport,
    )
    .unwrap();
    assert_eq!(copy.rx_rate_limit(), Some(RateLimit::unlimited()));
}
