//! Tests of the device through a register-level driver, and of its parts.

use std::fs::File;
use std::path::PathBuf;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

use super::io::{Copy, Dir, copy_guest, transfer};
use super::request::{Request, RequestHeader, Segment};
use super::ring::GuestView;
use super::{BLOCK_DEVICE_TYPE, Block, MAX_REQUEST_BYTES, SECTOR_SIZE};
use crate::virtio::test_driver::{
    BUF, Driver, F_NEXT, F_WRITE, MEM_SIZE, QUEUE_SIZE as DRIVER_QUEUE_SIZE, S_NEEDS_RESET, reg,
};
use crate::virtio::{GuestMemoryMmap, VirtioDevice};

const HEADER: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const SECTORS: u64 = 64;

/// A disk image in the temporary directory, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("forkvm-blk-{}-{name}", std::process::id()));
        let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn driver(image: &Image, read_only: bool) -> Driver {
    let block = Block::open(&image.0, read_only, false, "forkvm-disk-0").unwrap();
    let mut d = Driver::new(Box::new(block));
    d.start_with(if read_only {
        1 << VIRTIO_BLK_F_RO
    } else {
        (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    });
    d
}

/// Submits request `n` (head descriptor `3 * n`) with a data buffer of `len` bytes at BUF
/// and returns (status, used length).
fn request(
    d: &mut Driver,
    n: u16,
    request_type: u32,
    sector: u64,
    len: u32,
    data_writable: bool,
) -> (u8, u32) {
    d.memory
        .write_obj(request_type, GuestAddress(HEADER))
        .unwrap();
    d.memory
        .write_obj(sector, GuestAddress(HEADER + 8))
        .unwrap();
    d.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut parts = vec![(HEADER, 16, false)];
    if len > 0 {
        parts.push((BUF, len, data_writable));
    }
    parts.push((STATUS, 1, true));
    d.chain(3 * n, &parts);
    d.notify();
    let (idx, used) = d.used(n);
    assert_eq!(idx, n + 1, "request {n} completed");
    (d.memory.read_obj(GuestAddress(STATUS)).unwrap(), used)
}

#[test]
fn reports_capacity_and_offers_discard_only_when_writable() {
    let image = Image::new("config");
    let mut d = driver(&image, false);
    assert_eq!(d.read(reg::DEVICE_ID), BLOCK_DEVICE_TYPE);
    assert_eq!(d.read(0x100), SECTORS as u32);
    d.write(reg::DEVICE_FEATURES_SEL, 0);
    let features = d.read(reg::DEVICE_FEATURES);
    assert_ne!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    let ro = Block::open(&image.0, true, false, "").unwrap();
    assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn writes_reach_the_image_and_read_back() {
    let image = Image::new("rw");
    let mut d = driver(&image, false);
    d.memory
        .write_slice(&[0xab; 1024], GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_OUT, 3, 1024, false),
        (VIRTIO_BLK_S_OK as u8, 1)
    );
    assert_eq!(
        request(&mut d, 1, VIRTIO_BLK_T_FLUSH, 0, 0, false).0,
        VIRTIO_BLK_S_OK as u8
    );
    let on_disk = std::fs::read(&image.0).unwrap();
    assert!(on_disk[3 * 512..5 * 512].iter().all(|b| *b == 0xab));
    assert_eq!(on_disk[5 * 512], 5, "the next sector is untouched");
    d.memory.write_slice(&[0; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(
        request(&mut d, 2, VIRTIO_BLK_T_IN, 5, 512, true),
        (VIRTIO_BLK_S_OK as u8, 513)
    );
    let mut sector = [0u8; 512];
    d.memory.read_slice(&mut sector, GuestAddress(BUF)).unwrap();
    assert_eq!(sector, [5; 512]);
}

#[test]
fn read_only_device_refuses_writes_with_ioerr() {
    let image = Image::new("ro");
    let mut d = driver(&image, true);
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_OUT, 0, 512, false).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    // Not offered on a read-only disk, so never negotiated: unsupported.
    assert_eq!(
        request(&mut d, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(std::fs::read(&image.0).unwrap()[0], 0);
}

#[test]
fn discard_and_write_zeroes_not_negotiated_are_unsupported() {
    let image = Image::new("unnegotiated");
    let block = Block::open(&image.0, false, false, "forkvm-disk-0").unwrap();
    assert_ne!(block.features() & (1 << VIRTIO_BLK_F_DISCARD), 0, "offered");
    let mut d = Driver::new(Box::new(block));
    d.start_with(1 << VIRTIO_BLK_F_FLUSH);
    // One segment: sector 2, 3 sectors, no flags.
    d.memory.write_obj(2u64, GuestAddress(BUF)).unwrap();
    d.memory.write_obj(3u32, GuestAddress(BUF + 8)).unwrap();
    d.memory.write_obj(0u32, GuestAddress(BUF + 12)).unwrap();
    for (n, request_type) in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            request(&mut d, n as u16, request_type, 0, 16, false),
            (VIRTIO_BLK_S_UNSUPP as u8, 1),
            "type {request_type}"
        );
    }
    assert_eq!(
        d.read(reg::STATUS) & S_NEEDS_RESET,
        0,
        "a request, not a driver error"
    );
    let on_disk = std::fs::read(&image.0).unwrap();
    assert_eq!(on_disk[2 * 512], 2, "the image is untouched");
    // Accepted after a reset: served.
    // The rings cleared before the driver goes live again.
    d.memory
        .write_obj(0u16, GuestAddress(crate::virtio::test_driver::AVAIL + 2))
        .unwrap();
    d.start_with((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES));
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(std::fs::read(&image.0).unwrap()[2 * 512], 0);
}

#[test]
fn out_of_range_and_partial_sectors_fail_with_ioerr() {
    let image = Image::new("range");
    let mut d = driver(&image, false);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_IN, SECTORS, 512, true).0,
        ioerr
    );
    assert_eq!(
        request(&mut d, 1, VIRTIO_BLK_T_IN, SECTORS - 1, 1024, true).0,
        ioerr
    );
    assert_eq!(
        request(&mut d, 2, VIRTIO_BLK_T_IN, u64::MAX, 512, true).0,
        ioerr
    );
    assert_eq!(request(&mut d, 3, VIRTIO_BLK_T_OUT, 0, 100, false).0, ioerr);
    assert_eq!(
        d.read(reg::STATUS) & S_NEEDS_RESET,
        0,
        "bad requests are not device errors"
    );
}

#[test]
fn get_id_unknown_types_and_write_zeroes() {
    let image = Image::new("misc");
    let mut d = driver(&image, false);
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_GET_ID, 0, 20, true),
        (VIRTIO_BLK_S_OK as u8, 21)
    );
    let mut id = [0u8; 20];
    d.memory.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id[..13], b"forkvm-disk-0");
    assert_eq!(
        request(&mut d, 1, 0x77, 0, 0, false).0,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    // One segment: sector 2, 3 sectors, no flags.
    d.memory.write_obj(2u64, GuestAddress(BUF)).unwrap();
    d.memory.write_obj(3u32, GuestAddress(BUF + 8)).unwrap();
    d.memory.write_obj(0u32, GuestAddress(BUF + 12)).unwrap();
    assert_eq!(
        request(&mut d, 2, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
        VIRTIO_BLK_S_OK as u8
    );
    let on_disk = std::fs::read(&image.0).unwrap();
    assert!(on_disk[2 * 512..5 * 512].iter().all(|b| *b == 0));
    assert_eq!(on_disk[5 * 512], 5);
}

#[test]
fn a_chain_without_a_status_byte_needs_reset() {
    let image = Image::new("nostatus");
    let mut d = driver(&image, false);
    d.memory
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
        .unwrap();
    d.descriptor(0, HEADER, 16, F_NEXT, 1);
    d.descriptor(1, BUF, 512, 0, 0); // data not writable, and no status descriptor
    d.make_available(0);
    d.notify();
    assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn buffers_outside_guest_memory_need_reset() {
    let image = Image::new("oob");
    let mut d = driver(&image, false);
    d.descriptor(0, HEADER, 16, F_NEXT, 1);
    d.descriptor(1, MEM_SIZE as u64 - 256, 512, F_WRITE | F_NEXT, 2);
    d.descriptor(2, STATUS, 1, F_WRITE, 0);
    d.make_available(0);
    d.notify();
    assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn direct_io_reads_and_writes_through_an_aligned_buffer() {
    let image = Image::new("direct");
    let block = Block::open(&image.0, false, true, "direct").unwrap();
    let mut d = Driver::new(Box::new(block));
    d.start();
    d.memory
        .write_slice(&[0x5a; 512], GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_OUT, 7, 512, false).0,
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        request(&mut d, 1, VIRTIO_BLK_T_IN, 6, 1024, true).0,
        VIRTIO_BLK_S_OK as u8
    );
    let mut two = [0u8; 1024];
    d.memory.read_slice(&mut two, GuestAddress(BUF)).unwrap();
    assert_eq!(two[..512], [6; 512]);
    assert_eq!(two[512..], [0x5a; 512]);
}

/// Writes a read request's header for `sector` at HEADER and clears the status byte.
fn read_header(d: &Driver, sector: u64) {
    d.memory
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
        .unwrap();
    d.memory
        .write_obj(sector, GuestAddress(HEADER + 8))
        .unwrap();
    d.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn needs_reset(d: &mut Driver) -> bool {
    d.read(reg::STATUS) & S_NEEDS_RESET != 0
}

fn status(d: &Driver) -> u8 {
    d.memory.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn looping_chains_need_reset() {
    let image = Image::new("loop");
    let mut d = driver(&image, false);
    read_header(&d, 0);
    d.descriptor(0, HEADER, 16, F_NEXT, 1);
    d.descriptor(1, BUF, 512, F_WRITE | F_NEXT, 0); // back to the head
    d.make_available(0);
    d.notify();
    assert!(needs_reset(&mut d));
}

#[test]
fn chains_longer_than_the_queue_need_reset() {
    let image = Image::new("long");
    let mut d = driver(&image, false);
    read_header(&d, 0);
    // Every descriptor of the table, the last one pointing back into it: the walk visits
    // more descriptors than the queue has.
    d.descriptor(0, HEADER, 16, F_NEXT, 1);
    for i in 1..DRIVER_QUEUE_SIZE {
        d.descriptor(
            i,
            BUF,
            512,
            F_WRITE | F_NEXT,
            (i + 1) % DRIVER_QUEUE_SIZE.max(2),
        );
    }
    d.descriptor(DRIVER_QUEUE_SIZE - 1, STATUS, 1, F_WRITE | F_NEXT, 5);
    d.make_available(0);
    d.notify();
    assert!(needs_reset(&mut d));
    assert_eq!(status(&d), 0xff, "nothing was completed");
}

#[test]
fn a_chain_of_a_whole_queue_is_served() {
    let image = Image::new("wholequeue");
    let mut d = driver(&image, false);
    // Header, 126 half-sector buffers (all the same guest buffer), status: 128 descriptors.
    read_header(&d, 1);
    d.descriptor(0, HEADER, 16, F_NEXT, 1);
    for i in 1..DRIVER_QUEUE_SIZE - 1 {
        d.descriptor(i, BUF, 256, F_WRITE | F_NEXT, i + 1);
    }
    d.descriptor(DRIVER_QUEUE_SIZE - 1, STATUS, 1, F_WRITE, 0);
    d.make_available(0);
    d.notify();
    assert!(!needs_reset(&mut d));
    assert_eq!(
        (status(&d), d.used(0)),
        (VIRTIO_BLK_S_OK as u8, (1, 126 * 256 + 1))
    );
    let mut last = [0u8; 256];
    d.memory.read_slice(&mut last, GuestAddress(BUF)).unwrap();
    assert_eq!(last, [63; 256], "the buffer holds the last half sector");
}

#[test]
fn next_outside_the_table_and_indirect_descriptors_need_reset() {
    for (name, flags, next) in [("next", F_NEXT, DRIVER_QUEUE_SIZE), ("indirect", 4, 0)] {
        let image = Image::new(name);
        let mut d = driver(&image, false);
        read_header(&d, 0);
        d.descriptor(0, HEADER, 16, F_NEXT, 1);
        d.descriptor(1, BUF, 512, F_WRITE | flags, next);
        d.descriptor(2, STATUS, 1, F_WRITE, 0);
        d.make_available(0);
        d.notify();
        assert!(needs_reset(&mut d), "{name}");
    }
}

#[test]
fn buffers_with_the_wrong_direction_fail_with_ioerr() {
    let image = Image::new("direction");
    let mut d = driver(&image, false);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    d.memory
        .write_slice(&[0xee; 512], GuestAddress(BUF))
        .unwrap();
    // A read into a buffer the device may only read, and a write from one it may only write.
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_IN, 1, 512, false),
        (ioerr, 1)
    );
    assert_eq!(
        request(&mut d, 1, VIRTIO_BLK_T_OUT, 1, 512, true),
        (ioerr, 1)
    );
    let mut buf = [0u8; 512];
    d.memory.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
    assert_eq!(buf, [0xee; 512], "the read buffer is untouched");
    assert_eq!(
        std::fs::read(&image.0).unwrap()[512],
        1,
        "the image is untouched"
    );
    // A device-readable descriptor after a device-writable one.
    read_header(&d, 1);
    d.descriptor(6, HEADER, 16, F_NEXT, 7);
    d.descriptor(7, BUF, 512, F_WRITE | F_NEXT, 8);
    d.descriptor(8, BUF + 0x1000, 16, F_NEXT, 9);
    d.descriptor(9, STATUS, 1, F_WRITE, 0);
    d.make_available(6);
    d.notify();
    assert_eq!(status(&d), ioerr);
    assert!(!needs_reset(&mut d));
}

#[test]
fn empty_descriptors_are_skipped_and_buffers_may_be_split() {
    let image = Image::new("split");
    let mut d = driver(&image, false);
    read_header(&d, 2);
    // The header in two halves, an empty descriptor with a bogus address, the data in
    // three pieces of which the last also holds the status byte.
    d.descriptor(0, HEADER, 8, F_NEXT, 1);
    d.descriptor(1, HEADER + 8, 8, F_NEXT, 2);
    d.descriptor(2, u64::MAX - 8, 0, F_WRITE | F_NEXT, 3);
    d.descriptor(3, BUF, 100, F_WRITE | F_NEXT, 4);
    d.descriptor(4, BUF + 0x1000, 412, F_WRITE | F_NEXT, 5);
    d.descriptor(5, BUF + 0x2000, 513, F_WRITE, 0);
    d.make_available(0);
    d.notify();
    assert!(!needs_reset(&mut d));
    assert_eq!(d.used(0), (1, 1025));
    let status: u8 = d.memory.read_obj(GuestAddress(BUF + 0x2000 + 512)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let mut piece = [0u8; 412];
    d.memory
        .read_slice(&mut piece[..100], GuestAddress(BUF))
        .unwrap();
    assert_eq!(piece[..100], [2; 100]);
    d.memory
        .read_slice(&mut piece, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert_eq!(piece, [2; 412]);
    let mut sector = [0u8; 512];
    d.memory
        .read_slice(&mut sector, GuestAddress(BUF + 0x2000))
        .unwrap();
    assert_eq!(sector, [3; 512]);
}

#[test]
fn split_writes_reach_the_image() {
    let image = Image::new("splitwrite");
    let mut d = driver(&image, false);
    d.memory
        .write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HEADER))
        .unwrap();
    d.memory.write_obj(4u64, GuestAddress(HEADER + 8)).unwrap();
    d.memory
        .write_slice(&[0x11; 24], GuestAddress(HEADER + 16))
        .unwrap();
    d.memory
        .write_slice(&[0x22; 1000], GuestAddress(BUF))
        .unwrap();
    // Header and the first 24 data bytes share a descriptor.
    d.chain(
        0,
        &[(HEADER, 40, false), (BUF, 1000, false), (STATUS, 1, true)],
    );
    d.notify();
    assert_eq!((status(&d), d.used(0)), (VIRTIO_BLK_S_OK as u8, (1, 1)));
    let on_disk = std::fs::read(&image.0).unwrap();
    assert_eq!(on_disk[4 * 512..4 * 512 + 24], [0x11; 24]);
    assert_eq!(on_disk[4 * 512 + 24..6 * 512], [0x22; 1000]);
    assert_eq!(on_disk[6 * 512], 6);
}

#[test]
fn oversized_requests_fail_before_touching_memory() {
    let image = Image::new("oversized");
    let mut d = driver(&image, false);
    read_header(&d, 0);
    // 34 writable descriptors of the same 1,000,000-byte buffer: over 32 MiB in all.
    let len = 1_000_000;
    assert!(34 * len as usize > MAX_REQUEST_BYTES && BUF as usize + len as usize <= MEM_SIZE);
    d.memory.write_obj(0x77u8, GuestAddress(BUF)).unwrap();
    d.descriptor(0, HEADER, 16, F_NEXT, 1);
    for i in 1..35 {
        d.descriptor(i, BUF, len, F_WRITE | F_NEXT, i + 1);
    }
    d.descriptor(35, STATUS, 1, F_WRITE, 0);
    d.make_available(0);
    d.notify();
    assert_eq!((status(&d), d.used(0)), (VIRTIO_BLK_S_IOERR as u8, (1, 1)));
    assert_eq!(d.memory.read_obj::<u8>(GuestAddress(BUF)).unwrap(), 0x77);
}

#[test]
fn a_bad_chain_ends_the_pass_after_the_requests_before_it() {
    let image = Image::new("midbatch");
    let mut d = driver(&image, false);
    read_header(&d, 3);
    d.chain(
        0,
        &[(HEADER, 16, false), (BUF, 512, true), (STATUS, 1, true)],
    );
    d.descriptor(3, HEADER, 16, F_NEXT, 3); // loops on itself
    d.make_available(3);
    d.notify();
    assert_eq!(d.used(0), (1, 513), "the first request completed");
    assert_eq!(status(&d), VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.memory.read_obj::<u8>(GuestAddress(BUF)).unwrap(), 3);
    assert!(needs_reset(&mut d));
}

#[test]
fn many_requests_complete_in_one_pass_with_one_interrupt() {
    let image = Image::new("batch");
    let mut d = driver(&image, false);
    for n in 0..40u16 {
        let header = HEADER + 16 * u64::from(n);
        d.memory
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
            .unwrap();
        d.memory
            .write_obj(u64::from(n % 64), GuestAddress(header + 8))
            .unwrap();
        let data = BUF + 512 * u64::from(n);
        d.chain(
            3 * n,
            &[
                (header, 16, false),
                (data, 512, true),
                (STATUS + u64::from(n), 1, true),
            ],
        );
    }
    d.notify();
    assert_eq!(d.used(39), (40, 513));
    for n in 0..40u64 {
        assert_eq!(
            d.memory.read_obj::<u8>(GuestAddress(STATUS + n)).unwrap(),
            0
        );
        assert_eq!(
            d.memory
                .read_obj::<u8>(GuestAddress(BUF + 512 * n + 511))
                .unwrap(),
            n as u8
        );
    }
    let irq = d.transport.interrupt().irq().eventfd().read().unwrap();
    assert_eq!(irq, 1, "one interrupt for the pass");
}

#[test]
fn transfers_and_copies_span_adjacent_regions() {
    let image = Image::new("regions");
    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap();
    let view = GuestView::new(&memory);
    let across = [Segment {
        addr: GuestAddress(0xe00),
        len: 1024,
    }];
    assert!(view.slice(GuestAddress(0xe00), 1024).is_none());
    assert!(view.check_range(GuestAddress(0xe00), 1024));
    assert!(!view.check_range(GuestAddress(0x1e00), 1024));
    let file = File::open(&image.0).unwrap();
    transfer(&file, &view, &across, 0, 1024, 7 * 512, Dir::Read).unwrap();
    let mut back = [0u8; 1024];
    copy_guest(&view, &across, 0, Copy::FromGuest(&mut back)).unwrap();
    assert_eq!(back[..512], [7; 512]);
    assert_eq!(back[512..], [8; 512]);
}

#[test]
fn an_available_index_beyond_the_queue_needs_reset() {
    let image = Image::new("availidx");
    let mut d = driver(&image, false);
    d.memory
        .write_obj(
            DRIVER_QUEUE_SIZE + 1,
            GuestAddress(crate::virtio::test_driver::AVAIL + 2),
        )
        .unwrap();
    d.notify();
    assert!(needs_reset(&mut d));
}

#[test]
fn a_write_with_its_header_in_its_own_descriptor_is_one_plain_write() {
    let image = Image::new("plainwrite");
    let mut d = driver(&image, false);
    d.memory
        .write_slice(&[0x33; 512], GuestAddress(BUF))
        .unwrap();
    assert_eq!(
        request(&mut d, 0, VIRTIO_BLK_T_OUT, 9, 512, false),
        (VIRTIO_BLK_S_OK as u8, 1)
    );
    let block = Block::open(&image.0, false, false, "").unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let view = GuestView::new(&memory);
    let mut request = Request {
        header: Some(RequestHeader {
            request_type: VIRTIO_BLK_T_OUT,
            _reserved: 0,
            sector: 9,
        }),
        readable: vec![
            Segment {
                addr: GuestAddress(HEADER),
                len: 16,
            },
            Segment {
                addr: GuestAddress(BUF),
                len: 512,
            },
        ],
        readable_len: 528,
        ..Request::default()
    };
    let io = block.plain_io(&view, &request).expect("a plain write");
    assert_eq!(
        (io.offset, io.len, io.file_offset),
        (BUF as usize, 512, 9 * 512)
    );
    request.readable[1].len = 500;
    request.readable_len = 516;
    assert!(
        block.plain_io(&view, &request).is_none(),
        "a partial sector"
    );
    assert_eq!(
        std::fs::read(&image.0).unwrap()[9 * 512..10 * 512],
        [0x33; 512]
    );
}
