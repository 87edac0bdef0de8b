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
