//! Rate limits through the transport, on virtio-blk driven by the register-level test driver,
//! with a clock moved by hand.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::block::{Block, SECTOR_SIZE};
use super::mmio::MmioTransport;
use super::rate_limit::{Bucket, ManualClock, RateLimit};
use super::test_driver::{BUF, Driver, QUEUE_SIZE};

const SECOND: Duration = Duration::from_secs(1);
const HEADERS: u64 = 0x4_0000;
const STATUS: u64 = 0x5_0000;
const SECTORS: u64 = 256;

/// A disk image in the temporary directory, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("forkvm-rl-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![7u8; (SECTORS * SECTOR_SIZE) as usize]).unwrap();
        Self(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A live block device limited by `limit` on a clock moved by hand.
fn limited(image: &Image, limit: RateLimit) -> (Driver, Arc<ManualClock>) {
    let block = Block::open(&image.0, true, false, "forkvm-disk-0").unwrap();
    let mut d = Driver::new(Box::new(block));
    let clock = Arc::new(ManualClock::default());
    d.transport.set_rate_limit_clock(clock.clone());
    d.transport.set_rate_limit(limit).unwrap();
    d.start();
    (d, clock)
}

/// Makes `count` reads of `len` bytes each available (request `n` uses descriptors `3n..3n+3`).
fn queue_reads(d: &Driver, first: u16, count: u16, len: u32) {
    for n in first..first + count {
        let header = HEADERS + 16 * u64::from(n);
        d.memory
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
            .unwrap();
        d.memory.write_obj(0u64, GuestAddress(header + 8)).unwrap();
        let slot = 3 * (n % (QUEUE_SIZE / 3));
        d.chain(
            slot,
            &[
                (header, 16, false),
                (BUF, len, true),
                (STATUS + u64::from(n), 1, true),
            ],
        );
    }
}

fn completed(d: &Driver) -> u16 {
    d.used(0).0
}

/// The "event loop": the timer fired (whatever the real time), then every turn it asks for.
fn timer_fires(d: &mut Driver) {
    d.transport.rate_limit_timer_fired();
    while d.turn_pending() {
        d.serve_turn();
    }
}

#[test]
fn an_ops_limit_serves_the_bucket_then_what_each_refill_allows() {
    let image = Image::new("ops");
    let ops = Bucket::new(4, SECOND);
    let (mut d, clock) = limited(
        &image,
        RateLimit {
            bytes: None,
            ops: Some(ops),
        },
    );
    queue_reads(&d, 0, 10, 512);
    d.notify();
    assert_eq!(
        completed(&d),
        4,
        "the bucket's 4 operations, the rest left in the ring"
    );
    assert!(!d.turn_pending(), "no busy retry while the bucket is empty");
    d.notify();
    assert_eq!(completed(&d), 4, "a notify without tokens serves nothing");

    clock.advance(SECOND / 2);
    timer_fires(&mut d);
    assert_eq!(completed(&d), 6, "half a refill time: half the bucket");
    clock.advance(10 * SECOND);
    timer_fires(&mut d);
    assert_eq!(completed(&d), 10);
    for n in 0..10 {
        let status: u8 = d.memory.read_obj(GuestAddress(STATUS + n)).unwrap();
        assert_eq!(status, 0, "request {n} succeeded");
    }
}

#[test]
fn a_bytes_limit_counts_data_and_a_request_above_the_bucket_goes_into_debt() {
    let image = Image::new("bytes");
    let bytes = Bucket::new(4096, SECOND);
    let (mut d, clock) = limited(
        &image,
        RateLimit {
            bytes: Some(bytes),
            ops: None,
        },
    );
    queue_reads(&d, 0, 8, 1024);
    d.notify();
    assert_eq!(completed(&d), 4, "4 KiB of 1 KiB reads");
    clock.advance(SECOND / 4);
    timer_fires(&mut d);
    assert_eq!(completed(&d), 5, "a quarter second: 1 KiB more");
    clock.advance(SECOND);
    timer_fires(&mut d);
    assert_eq!(completed(&d), 8);

    // 16 KiB at once, with 1 KiB in the bucket: served whole, then the 15 KiB of debt is paid
    // back (3.75 s) before anything else.
    queue_reads(&d, 8, 1, 16 << 10);
    queue_reads(&d, 9, 1, 512);
    d.notify();
    assert_eq!(completed(&d), 9);
    clock.advance(3 * SECOND);
    timer_fires(&mut d);
    assert_eq!(completed(&d), 9, "still in debt");
    clock.advance(SECOND);
    timer_fires(&mut d);
    assert_eq!(completed(&d), 10);
}

#[test]
fn the_timer_is_armed_when_a_queue_waits_for_tokens() {
    let image = Image::new("timer");
    // 16 tokens a second, resuming at one token: the timer is armed for 62.5 ms.
    let ops = Bucket::new(16, SECOND);
    let (mut d, _clock) = limited(
        &image,
        RateLimit {
            bytes: None,
            ops: Some(ops),
        },
    );
    let epoll = Epoll::new().unwrap();
    let timer = d.transport.rate_limit_timer();
    epoll
        .ctl(
            ControlOperation::Add,
            timer,
            EpollEvent::new(EventSet::IN, 1),
        )
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    assert_eq!(epoll.wait(0, &mut events).unwrap(), 0, "not armed yet");
    queue_reads(&d, 0, 20, 512);
    d.notify();
    assert_eq!(completed(&d), 16);
    // Real time passes for the timer (the manual clock does not move): it fires once.
    assert_eq!(
        epoll.wait(10_000, &mut events).unwrap(),
        1,
        "the timer fired"
    );
    d.transport.rate_limit_timer_fired();
    assert_eq!(
        epoll.wait(0, &mut events).unwrap(),
        0,
        "cleared without a read"
    );
    assert!(d.turn_pending(), "the waiting queue is signalled");
}

#[test]
fn a_limit_changed_at_run_time_applies_at_once() {
    let image = Image::new("runtime");
    let ops = Bucket::new(2, SECOND);
    let (mut d, _clock) = limited(
        &image,
        RateLimit {
            bytes: None,
            ops: Some(ops),
        },
    );
    queue_reads(&d, 0, 6, 512);
    d.notify();
    assert_eq!(completed(&d), 2);
    d.transport.set_rate_limit(RateLimit::unlimited()).unwrap();
    assert!(d.turn_pending(), "the waiting queue is served again");
    d.serve_turn();
    assert_eq!(completed(&d), 6);
    let bad = RateLimit {
        bytes: Some(Bucket::new(0, SECOND)),
        ops: None,
    };
    assert!(d.transport.set_rate_limit(bad).is_err());
    assert_eq!(d.transport.rate_limit(), RateLimit::unlimited(), "kept");
}

#[test]
fn a_copy_of_the_device_keeps_its_limit() {
    let image = Image::new("copy");
    let limit = RateLimit {
        bytes: Some(Bucket::new(1 << 20, SECOND).with_one_time_burst(1 << 20)),
        ops: Some(Bucket::new(100, SECOND / 10)),
    };
    let (mut d, _clock) = limited(&image, limit);
    let state = d.transport.freeze().unwrap();
    let json = serde_json::to_string(&state.transport).unwrap();
    let transport = serde_json::from_str(&json).unwrap();
    let block = Block::open(&image.0, true, false, "forkvm-disk-0").unwrap();
    let interrupt = d.transport.interrupt().clone();
    let copy =
        MmioTransport::restore(Box::new(block), d.memory.clone(), interrupt, &transport).unwrap();
    assert_eq!(copy.rate_limit(), limit);
}

#[test]
fn a_state_saved_before_rate_limits_restores_unlimited() {
    let image = Image::new("old-state");
    let (mut d, _clock) = limited(&image, RateLimit::unlimited());
    let state = d.transport.freeze().unwrap();
    let mut json: serde_json::Value = serde_json::to_value(&state.transport).unwrap();
    json.as_object_mut().unwrap().remove("rate_limit").unwrap();
    let transport = serde_json::from_value(json).unwrap();
    let block = Block::open(&image.0, true, false, "forkvm-disk-0").unwrap();
    let interrupt = d.transport.interrupt().clone();
    let copy =
        MmioTransport::restore(Box::new(block), d.memory.clone(), interrupt, &transport).unwrap();
    assert_eq!(copy.rate_limit(), RateLimit::unlimited());
}

#[test]
fn saved_limits_are_checked_and_a_receive_limit_needs_a_receive_direction() {
    use super::saved::VirtioStateCheck;

    let mut d = Driver::new(Box::new(super::rng::Rng::new()));
    d.start();
    let state = d.transport.freeze().unwrap();
    let check = |state: &super::mmio::VirtioState| {
        state.check_saved(&VirtioStateCheck {
            index: 0,
            ram_bytes: 1 << 20,
            in_ram: &|_, _| true,
        })
    };
    let tampered = |field: &str, bucket: serde_json::Value| {
        let mut json = serde_json::to_value(&state).unwrap();
        json["transport"][field] = serde_json::json!({ "bytes": bucket, "ops": null });
        serde_json::from_value::<super::mmio::VirtioState>(json).unwrap()
    };
    let bucket = |size: u64, secs: u64| {
        serde_json::json!({ "size": size, "one_time_burst": 0,
            "refill_time": { "secs": secs, "nanos": 0 } })
    };
    let zero = tampered("rate_limit", bucket(0, 1));
    assert_eq!(check(&zero).unwrap_err().field, "transport.rate_limit");
    let instant = tampered("rx_rate_limit", bucket(1, 0));
    assert_eq!(
        check(&instant).unwrap_err().field,
        "transport.rx_rate_limit"
    );
    // virtio-rng pushes nothing to the guest on its own: a receive limit for it is refused, by
    // the check and by a transport restored from it all the same.
    let on_disk = tampered("rx_rate_limit", bucket(u64::MAX, u64::MAX));
    let refused = check(&on_disk).unwrap_err();
    assert_eq!(
        (refused.field.as_str(), refused.reason),
        (
            "transport.rx_rate_limit",
            "a receive limit on a device without a receive direction"
        )
    );
    let interrupt = d.transport.interrupt().clone();
    let restored = MmioTransport::restore(
        Box::new(super::rng::Rng::new()),
        d.memory.clone(),
        interrupt,
        &on_disk.transport,
    );
    assert!(restored.is_err());
}
