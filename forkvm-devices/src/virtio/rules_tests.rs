//! The transport's promises (`mmio` module docs) held by every device alike: blk, rng, console,
//! balloon, vsock and net, each driven through the register-level test driver.

use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::balloon::{Balloon, RamDiscard};
use super::block::Block;
use super::chains::MAX_DESCRIPTORS_PER_TURN;
use super::console::Console;
use super::net::{Net, Unconnected};
use super::rng::Rng;
use super::test_driver::{
    AVAIL, BUF, Driver, F_NEXT, F_WRITE, QUEUE_SIZE, QUEUE_STRIDE, S_NEEDS_RESET, reg,
};
use super::vsock::Vsock;
use super::{INT_CONFIG, VirtioDevice};

/// Descriptor flag: the buffer is a table of descriptors (`VIRTQ_DESC_F_INDIRECT`).
const F_INDIRECT: u16 = 4;

/// A balloon's discard that frees nothing (these tests look at the queues, not at memory).
struct NoDiscard;

impl RamDiscard for NoDiscard {
    fn discard(&self, _addr: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// A scratch disk image, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("forkvm-rules-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        Self(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One device under test: its name, the queue the test feeds, whether that queue's buffers
/// are device-writable, and the length of each buffer (a balloon PFN is 4 bytes).
struct Case {
    name: &'static str,
    device: Option<Box<dyn VirtioDevice>>,
    queue: u16,
    writable: bool,
    len: u32,
    _image: Option<Image>,
}

/// Every device, live behind a driver that accepted VERSION_1 only.
fn cases(test: &str) -> Vec<Case> {
    let image = Image::new(test);
    let block = Block::open(&image.0, false, false, "rules").unwrap();
    let case = |name, device: Box<dyn VirtioDevice>, queue, writable, len| Case {
        name,
        device: Some(device),
        queue,
        writable,
        len,
        _image: None,
    };
    vec![
        Case {
            _image: Some(image),
            ..case("blk", Box::new(block), 0, false, 0)
        },
        case("rng", Box::new(Rng::new()), 0, true, 1),
        case(
            "console",
            Box::new(Console::new(Box::new(std::io::sink())).unwrap()),
            1,
            false,
            1,
        ),
        case(
            "balloon",
            Box::new(Balloon::new(1 << 20, false, false, Arc::new(NoDiscard)).unwrap()),
            0,
            false,
            4,
        ),
        case("vsock", Box::new(Vsock::new(3, None).unwrap()), 1, false, 1),
        case(
            "net",
            Box::new(Net::new([2, 0, 0, 0, 0, 1], Box::new(Unconnected))),
            1,
            false,
            1,
        ),
    ]
}

/// A live driver for the case's device, its ring helpers on the case's queue.
fn start(mut case: Case) -> (Driver, Case) {
    let mut d = Driver::new(case.device.take().unwrap());
    d.start();
    d.select(case.queue);
    (d, case)
}

fn base(queue: u16) -> u64 {
    QUEUE_STRIDE * u64::from(queue)
}

fn needs_reset(d: &mut Driver) -> bool {
    d.read(reg::STATUS) & S_NEEDS_RESET != 0
}

/// Writes a chain of `n` descriptors from descriptor 0: for blk a request (header, data,
/// status byte), for the others `n` buffers of `case.len` bytes in the case's direction.
fn long_chain(d: &Driver, case: &Case, n: u16) {
    for i in 0..n {
        let last = i + 1 == n;
        let next = if last { 0 } else { F_NEXT };
        let addr = BUF + 16 * u64::from(i);
        let (len, flags) = match case.name {
            "blk" if i == 0 => (16, 0),
            "blk" => (1, F_WRITE),
            _ if case.writable => (case.len, F_WRITE),
            _ => (case.len, 0),
        };
        d.descriptor(i, addr, len, flags | next, i + 1);
    }
}

#[test]
fn an_available_index_beyond_the_ring_needs_reset_on_every_device() {
    for case in cases("avail") {
        let (mut d, case) = start(case);
        long_chain(&d, &case, 2);
        // The driver claims a queue and one more of new entries.
        let avail = AVAIL + base(case.queue);
        d.memory
            .write_obj(QUEUE_SIZE + 1, GuestAddress(avail + 2))
            .unwrap();
        d.notify();
        assert!(needs_reset(&mut d), "{}: not refused", case.name);
        assert_eq!(d.read(reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        assert_eq!(d.used(0).0, 0, "{}: something was served", case.name);
    }
}

#[test]
fn an_indirect_descriptor_needs_reset_on_every_device() {
    for case in cases("indirect") {
        let (mut d, case) = start(case);
        // A table of 4 well-formed descriptors at BUF + 0x1000, named by descriptor 0.
        let table = BUF + 0x1000;
        for i in 0..4u64 {
            let at = table + 16 * i;
            let flags = if case.writable || (case.name == "blk" && i > 0) {
                F_WRITE
            } else {
                0
            } | if i < 3 { F_NEXT } else { 0 };
            d.memory.write_obj(BUF + 64 * i, GuestAddress(at)).unwrap();
            d.memory.write_obj(16u32, GuestAddress(at + 8)).unwrap();
            d.memory.write_obj(flags, GuestAddress(at + 12)).unwrap();
            d.memory
                .write_obj((i + 1) as u16, GuestAddress(at + 14))
                .unwrap();
        }
        d.descriptor(0, table, 4 * 16, F_INDIRECT, 0);
        d.make_available(0);
        d.notify();
        assert!(
            needs_reset(&mut d),
            "{}: followed an indirect table it never offered",
            case.name
        );
        assert_eq!(d.used(0).0, 0, "{}: the chain was served", case.name);
    }
}

#[test]
fn a_flood_of_long_chains_is_served_over_several_bounded_turns_on_every_device() {
    // Every available entry names the same chain of a whole table's descriptors: 128 x 128
    // descriptors for one notification.
    let per_chain = usize::from(QUEUE_SIZE);
    let most_chains_per_turn = MAX_DESCRIPTORS_PER_TURN.div_ceil(per_chain) + 1;
    for case in cases("flood") {
        let (mut d, case) = start(case);
        long_chain(&d, &case, QUEUE_SIZE);
        for _ in 0..QUEUE_SIZE {
            d.make_available(0);
        }
        d.notify_once();
        let mut served = usize::from(d.used(0).0);
        assert!(
            served <= most_chains_per_turn,
            "{}: {served} chains of {per_chain} descriptors in one turn",
            case.name
        );
        let mut turns = 1;
        while d.turn_pending() {
            d.serve_turn();
            let now = usize::from(d.used(0).0);
            assert!(
                now - served <= most_chains_per_turn,
                "{}: {} chains in turn {turns}",
                case.name,
                now - served
            );
            served = now;
            turns += 1;
            assert!(
                turns <= usize::from(QUEUE_SIZE),
                "{}: no progress",
                case.name
            );
        }
        assert!(!needs_reset(&mut d), "{}: a flood is no error", case.name);
        assert_eq!(
            served,
            usize::from(QUEUE_SIZE),
            "{}: every chain is served in the end ({turns} turns)",
            case.name
        );
        assert!(turns > 1, "{}", case.name);
    }
}
