//! Tests of forked block devices: frozen content, private writes, layers, races.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress};

use super::layers::Cow;
use super::request::{Request, RequestError, RequestHeader, Segment};
use super::ring::GuestView;
use super::*;
use crate::virtio::test_driver::{BUF, Driver, MEM_SIZE};
use crate::virtio::{GuestMemoryMmap, VirtioDevice};

/// A disk image in the temporary directory whose sector `i` holds `i % 251` in every byte,
/// removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, sectors: u64) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "forkvm-blkcow-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| original(i / SECTOR_SIZE))
            .collect();
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    fn open(&self, read_only: bool, direct_io: bool) -> Block {
        Block::open(&self.0, read_only, direct_io, "cow").unwrap()
    }

    /// Sector `sector` of the file itself.
    fn sector(&self, sector: u64) -> Vec<u8> {
        let bytes = std::fs::read(&self.0).unwrap();
        let at = (sector * SECTOR_SIZE) as usize;
        bytes[at..at + SECTOR_SIZE as usize].to_vec()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The byte every byte of sector `sector` holds in a fresh [`Image`].
fn original(sector: u64) -> u8 {
    (sector % 251) as u8
}

const SECTORS: u64 = 64;
/// Where request headers and discard segments go in guest memory.
const HEADER: u64 = 0x4000;

/// Guest memory and requests executed straight on a device, the way `Block::serve` executes
/// each parsed request (plain I/O when the device allows it).
struct Io {
    memory: GuestMemoryMmap,
}

impl Io {
    fn new() -> Self {
        Self {
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        }
    }

    fn execute(
        &self,
        block: &mut Block,
        request_type: u32,
        sector: u64,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u32, RequestError> {
        let segments = |parts: &[(u64, u32)]| -> Vec<Segment> {
            parts
                .iter()
                .map(|&(addr, len)| Segment {
                    addr: GuestAddress(addr),
                    len,
                })
                .collect()
        };
        let mut readable_segments = vec![Segment {
            addr: GuestAddress(HEADER),
            len: 16,
        }];
        readable_segments.extend(segments(readable));
        let request = Request {
            header: Some(RequestHeader {
                request_type,
                _reserved: 0,
                sector,
            }),
            readable_len: readable_segments.iter().map(|s| u64::from(s.len)).sum(),
            readable: readable_segments,
            writable_len: writable.iter().map(|s| u64::from(s.1)).sum(),
            writable: segments(writable),
            ..Request::default()
        };
        // As a driver that accepted discard and write-zeroes (on a read-only disk too, which
        // does not offer them: these tests reach the device's own checks beneath negotiation).
        crate::virtio::VirtioDevice::ack_features(block, u64::MAX);
        let view = GuestView::new(&self.memory);
        match block.plain_io(&view, &request) {
            Some(io) => block.execute_plain(&view, io),
            None => block.execute(&view, &request),
        }
    }

    /// Writes `sectors` sectors from `sector`, every byte `value`.
    fn write(&self, block: &mut Block, sector: u64, sectors: u64, value: u8) {
        let len = (sectors * SECTOR_SIZE) as usize;
        self.memory
            .write_slice(&vec![value; len], GuestAddress(BUF))
            .unwrap();
        self.execute(block, VIRTIO_BLK_T_OUT, sector, &[(BUF, len as u32)], &[])
            .unwrap();
    }

    /// Reads `sectors` sectors from `sector` into one buffer.
    fn read(&self, block: &mut Block, sector: u64, sectors: u64) -> Vec<u8> {
        let len = (sectors * SECTOR_SIZE) as u32;
        self.read_into(block, sector, &[(BUF, len)])
    }

    /// Reads from `sector` into `buffers`; returns their bytes, concatenated.
    fn read_into(&self, block: &mut Block, sector: u64, buffers: &[(u64, u32)]) -> Vec<u8> {
        for &(addr, len) in buffers {
            self.memory
                .write_slice(&vec![0xee; len as usize], GuestAddress(addr))
                .unwrap();
        }
        let len = self
            .execute(block, VIRTIO_BLK_T_IN, sector, &[], buffers)
            .unwrap();
        assert_eq!(len, buffers.iter().map(|b| b.1).sum::<u32>());
        let mut bytes = Vec::new();
        for &(addr, len) in buffers {
            let mut buffer = vec![0; len as usize];
            self.memory
                .read_slice(&mut buffer, GuestAddress(addr))
                .unwrap();
            bytes.extend(buffer);
        }
        bytes
    }

    /// The byte each of `sectors` sectors from `sector` holds (all of its bytes must agree).
    fn sectors(&self, block: &mut Block, sector: u64, sectors: u64) -> Vec<u8> {
        let bytes = self.read(block, sector, sectors);
        bytes
            .chunks(SECTOR_SIZE as usize)
            .map(|s| {
                assert!(s.iter().all(|b| *b == s[0]), "a sector of mixed bytes");
                s[0]
            })
            .collect()
    }

    /// Discards or zeroes `sectors` sectors from `sector`.
    fn zero(
        &self,
        block: &mut Block,
        request_type: u32,
        sector: u64,
        sectors: u32,
    ) -> Result<u32, RequestError> {
        let segment = HEADER + 0x100;
        self.memory
            .write_obj(sector, GuestAddress(segment))
            .unwrap();
        self.memory
            .write_obj(sectors, GuestAddress(segment + 8))
            .unwrap();
        self.memory
            .write_obj(0u32, GuestAddress(segment + 12))
            .unwrap();
        self.execute(block, request_type, 0, &[(segment, 16)], &[])
    }
}

fn originals(from: u64, count: u64) -> Vec<u8> {
    (from..from + count).map(original).collect()
}

#[test]
fn a_child_sees_the_frozen_content_after_the_parent_overwrites_it() {
    let image = Image::new("frozen", SECTORS);
    let io = Io::new();
    let mut parent = image.open(false, false);
    let state = parent.freeze().unwrap();
    let mut child = Block::from_state(&state).unwrap();
    io.write(&mut parent, 3, 2, 0xaa);
    assert_eq!(io.sectors(&mut child, 2, 4), originals(2, 4));
    assert_eq!(io.sectors(&mut parent, 2, 4), [2, 0xaa, 0xaa, 5]);
    assert_eq!(image.sector(3), [0xaa; 512], "the parent writes the image");
    // A second freeze sees the parent's writes; the first freeze's children still do not.
    let mut second = Block::from_state(&parent.freeze().unwrap()).unwrap();
    io.write(&mut parent, 2, 3, 0xbb);
    assert_eq!(io.sectors(&mut second, 2, 4), [2, 0xaa, 0xaa, 5]);
    assert_eq!(io.sectors(&mut child, 2, 4), originals(2, 4));
    assert_eq!(io.sectors(&mut parent, 2, 4), [0xbb, 0xbb, 0xbb, 5]);
    // Discard and write-zeroes on the parent preserve too.
    io.zero(&mut parent, VIRTIO_BLK_T_WRITE_ZEROES, 5, 2)
        .unwrap();
    io.zero(&mut parent, VIRTIO_BLK_T_DISCARD, 7, 1).unwrap();
    assert_eq!(io.sectors(&mut parent, 5, 2), [0, 0]);
    assert_eq!(io.sectors(&mut child, 5, 3), originals(5, 3));
    assert_eq!(io.sectors(&mut second, 5, 3), originals(5, 3));
}

#[test]
fn states_are_send_and_sync_and_children_start_on_other_threads() {
    fn send_sync<T: Send + Sync + Clone>(_: &T) {}
    let image = Image::new("threads", SECTORS);
    let mut parent = image.open(false, false);
    let state = parent.freeze().unwrap();
    send_sync(&state);
    let copy = state.clone();
    let sectors = std::thread::spawn(move || {
        let mut child = Block::from_state(&copy).unwrap();
        Io::new().sectors(&mut child, 0, 4)
    })
    .join()
    .unwrap();
    assert_eq!(sectors, originals(0, 4));
}

#[test]
fn child_writes_reach_neither_the_parent_nor_a_sibling() {
    let image = Image::new("private", SECTORS);
    let io = Io::new();
    let mut parent = image.open(false, false);
    let state = parent.freeze().unwrap();
    let mut one = Block::from_state(&state).unwrap();
    let mut two = Block::from_state(&state).unwrap();
    assert_eq!(one.capacity_sectors(), SECTORS);
    assert_eq!(one.features(), parent.features());
    io.write(&mut one, 7, 1, 0x11);
    io.write(&mut two, 8, 1, 0x22);
    assert_eq!(io.sectors(&mut one, 6, 4), [6, 0x11, 8, 9]);
    assert_eq!(io.sectors(&mut two, 6, 4), [6, 7, 0x22, 9]);
    assert_eq!(io.sectors(&mut parent, 6, 4), originals(6, 4));
    assert_eq!(image.sector(7), [7; 512]);
    assert_eq!(
        io.execute(&mut one, VIRTIO_BLK_T_FLUSH, 0, &[], &[])
            .unwrap(),
        0
    );
}

#[test]
fn grandchildren_see_their_parents_writes_from_before_their_freeze_only() {
    let image = Image::new("grand", SECTORS);
    let io = Io::new();
    let mut parent = image.open(false, false);
    let mut child = Block::from_state(&parent.freeze().unwrap()).unwrap();
    io.write(&mut child, 1, 1, 0x21);
    let mut grandchild = Block::from_state(&child.freeze().unwrap()).unwrap();
    io.write(&mut child, 1, 2, 0x22);
    io.write(&mut parent, 3, 1, 0x30);
    assert_eq!(io.sectors(&mut grandchild, 0, 4), [0, 0x21, 2, 3]);
    assert_eq!(io.sectors(&mut child, 0, 4), [0, 0x22, 0x22, 3]);
    // Deeper: the grandchild's own writes, then a great-grandchild.
    io.write(&mut grandchild, 0, 1, 0x40);
    let mut great = Block::from_state(&grandchild.freeze().unwrap()).unwrap();
    io.write(&mut grandchild, 0, 2, 0x41);
    io.write(&mut great, 3, 1, 0x50);
    assert_eq!(io.sectors(&mut great, 0, 5), [0x40, 0x21, 2, 0x50, 4]);
    assert_eq!(io.sectors(&mut grandchild, 0, 5), [0x41, 0x41, 2, 3, 4]);
    assert_eq!(io.sectors(&mut child, 0, 5), [0, 0x22, 0x22, 3, 4]);
    assert_eq!(io.sectors(&mut parent, 0, 5), [0, 1, 2, 0x30, 4]);
    // A freeze without writes since the last one adds no layer, and sees the same.
    let mut again = Block::from_state(&grandchild.freeze().unwrap()).unwrap();
    let mut again2 = Block::from_state(&grandchild.freeze().unwrap()).unwrap();
    assert_eq!(io.sectors(&mut again, 0, 3), [0x41, 0x41, 2]);
    assert_eq!(io.sectors(&mut again2, 0, 3), [0x41, 0x41, 2]);
}

/// A child whose sectors 9..14 come from: the image, its frozen overlay, its own overlay, the
/// preserve layer, the image.
fn layered_child(image: &Image, io: &Io) -> (Block, Block) {
    let mut parent = image.open(false, false);
    let mut child = Block::from_state(&parent.freeze().unwrap()).unwrap();
    io.write(&mut child, 10, 1, 0xf0);
    io.write(&mut child, 11, 1, 0xf0);
    let _sibling_state = child.freeze().unwrap();
    io.write(&mut child, 11, 1, 0x0f);
    io.write(&mut parent, 12, 2, 0xcc);
    (parent, child)
}

#[test]
fn one_read_spans_every_layer_and_segment_boundaries() {
    let image = Image::new("span", SECTORS);
    let io = Io::new();
    let (_parent, mut child) = layered_child(&image, &io);
    let expected: Vec<u8> = [9, 0xf0, 0x0f, 12, 13]
        .iter()
        .flat_map(|b| [*b; 512])
        .collect();
    assert_eq!(io.read(&mut child, 9, 5), expected);
    // Buffers that split sectors, out of address order.
    let buffers = [
        (BUF + 0x4000, 700),
        (BUF, 1000),
        (BUF + 0x2000, 100),
        (BUF + 0x3000, 760),
    ];
    assert_eq!(io.read_into(&mut child, 9, &buffers), expected);
}

#[test]
fn a_child_serves_a_split_read_through_its_virtqueue() {
    let image = Image::new("queue", SECTORS);
    let io = Io::new();
    let (_parent, child) = layered_child(&image, &io);
    let mut d = Driver::new(Box::new(child));
    d.start();
    d.memory
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
        .unwrap();
    d.memory.write_obj(9u64, GuestAddress(HEADER + 8)).unwrap();
    d.chain(
        0,
        &[
            (HEADER, 16, false),
            (BUF, 1000, true),
            (BUF + 0x1000, 1560, true),
            (HEADER + 0x200, 1, true),
        ],
    );
    d.notify();
    assert_eq!(d.used(0), (1, 2561));
    let status: u8 = d.memory.read_obj(GuestAddress(HEADER + 0x200)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let mut bytes = vec![0u8; 2560];
    d.memory
        .read_slice(&mut bytes[..1000], GuestAddress(BUF))
        .unwrap();
    d.memory
        .read_slice(&mut bytes[1000..], GuestAddress(BUF + 0x1000))
        .unwrap();
    let expected: Vec<u8> = [9, 0xf0, 0x0f, 12, 13]
        .iter()
        .flat_map(|b| [*b; 512])
        .collect();
    assert_eq!(bytes, expected);
}

#[test]
fn discard_and_write_zeroes_in_a_child_hide_the_layers_below() {
    let image = Image::new("zero", SECTORS);
    let io = Io::new();
    let (mut parent, mut child) = layered_child(&image, &io);
    for (request_type, sector) in [(VIRTIO_BLK_T_DISCARD, 9), (VIRTIO_BLK_T_WRITE_ZEROES, 11)] {
        io.zero(&mut child, request_type, sector, 2).unwrap();
    }
    assert_eq!(io.sectors(&mut child, 8, 7), [8, 0, 0, 0, 0, 13, 14]);
    assert_eq!(io.sectors(&mut parent, 9, 4), [9, 10, 11, 0xcc]);
    // A sibling from the child's earlier freeze still reads what the child wrote before it.
    let mut grandchild = Block::from_state(&child.freeze().unwrap()).unwrap();
    io.zero(&mut child, VIRTIO_BLK_T_DISCARD, 13, 1).unwrap();
    assert_eq!(io.sectors(&mut grandchild, 8, 7), [8, 0, 0, 0, 0, 13, 14]);
    assert_eq!(io.sectors(&mut child, 13, 2), [0, 14]);
    // Out of range or malformed: refused without effect.
    assert!(
        io.zero(&mut child, VIRTIO_BLK_T_DISCARD, SECTORS, 1)
            .is_err()
    );
    assert!(
        io.zero(&mut child, VIRTIO_BLK_T_DISCARD, u64::MAX, 2)
            .is_err()
    );
    assert!(
        io.zero(&mut child, VIRTIO_BLK_T_DISCARD, 1, u32::MAX)
            .is_err()
    );
    assert_eq!(io.sectors(&mut child, 0, 2), [0, 1]);
}

#[test]
fn a_read_only_disk_forks_into_read_only_children() {
    let image = Image::new("ro", SECTORS);
    let io = Io::new();
    let mut parent = image.open(true, false);
    let state = parent.freeze().unwrap();
    assert!(parent.cow.is_none() && state.layers.is_none());
    let mut child = Block::from_state(&state).unwrap();
    assert_ne!(child.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert!(matches!(
        io.execute(&mut child, VIRTIO_BLK_T_OUT, 0, &[(BUF, 512)], &[]),
        Err(RequestError::ReadOnly)
    ));
    assert!(matches!(
        io.zero(&mut child, VIRTIO_BLK_T_WRITE_ZEROES, 0, 1),
        Err(RequestError::ReadOnly)
    ));
    let mut grandchild = Block::from_state(&child.freeze().unwrap()).unwrap();
    assert_eq!(io.sectors(&mut grandchild, 0, 3), originals(0, 3));
    assert_eq!(image.sector(0), [0; 512]);
}

#[test]
fn the_parent_stops_preserving_once_a_freezes_children_are_gone() {
    let image = Image::new("weak", SECTORS);
    let io = Io::new();
    let mut parent = image.open(false, false);
    let live = |parent: &Block| match &parent.cow {
        Some(Cow::Image(image)) => image.live_layers(),
        _ => 0,
    };
    let first = parent.freeze().unwrap();
    // No write in between: the same layer serves both freezes.
    let again = parent.freeze().unwrap();
    assert_eq!(live(&parent), 1);
    io.write(&mut parent, 0, 1, 1);
    let second = parent.freeze().unwrap();
    assert_eq!(live(&parent), 2);
    let child = Block::from_state(&first).unwrap();
    drop((first, again));
    io.write(&mut parent, 1, 1, 1);
    assert_eq!(live(&parent), 2, "the child keeps its freeze's layer alive");
    drop(child);
    io.write(&mut parent, 2, 1, 1);
    assert_eq!(live(&parent), 1);
    let mut grandchild = {
        let mut child = Block::from_state(&second).unwrap();
        drop(second);
        Block::from_state(&child.freeze().unwrap()).unwrap()
    };
    io.write(&mut parent, 3, 1, 0x77);
    assert_eq!(live(&parent), 1, "a grandchild keeps the layer alive");
    assert_eq!(io.sectors(&mut grandchild, 3, 1), [3]);
    drop(grandchild);
    io.write(&mut parent, 4, 1, 1);
    assert!(
        parent.cow.is_none(),
        "without children, writes are plain again"
    );
    assert_eq!(io.sectors(&mut parent, 0, 5), [1, 1, 1, 0x77, 1]);
}

#[test]
fn a_freeze_reuses_only_the_latest_freezes_layer() {
    let image = Image::new("reuse", SECTORS);
    let io = Io::new();
    let mut parent = image.open(false, false);
    let mut first = Block::from_state(&parent.freeze().unwrap()).unwrap();
    io.write(&mut parent, 0, 1, 0x10);
    // The second freeze's children are gone before the third, with no write in between.
    drop(parent.freeze().unwrap());
    let mut third = Block::from_state(&parent.freeze().unwrap()).unwrap();
    io.write(&mut parent, 0, 1, 0x20);
    assert_eq!(io.sectors(&mut first, 0, 1), [0]);
    assert_eq!(io.sectors(&mut third, 0, 1), [0x10]);
    assert_eq!(io.sectors(&mut parent, 0, 1), [0x20]);
}

#[test]
fn zeroes_the_parent_overwrites_are_preserved_as_zeroes() {
    let image = Image::new("zeroes", SECTORS);
    let io = Io::new();
    let mut parent = image.open(false, false);
    io.zero(&mut parent, VIRTIO_BLK_T_DISCARD, 8, 8).unwrap();
    io.write(&mut parent, 12, 1, 0);
    let mut child = Block::from_state(&parent.freeze().unwrap()).unwrap();
    // Only zeroes to preserve, then a mix.
    io.write(&mut parent, 8, 4, 0x33);
    io.write(&mut parent, 6, 12, 0x33);
    let mut expected = originals(6, 12);
    expected[2..10].fill(0);
    assert_eq!(io.sectors(&mut child, 6, 12), expected);
    assert_eq!(io.sectors(&mut parent, 6, 12), [0x33; 12]);
}

#[test]
fn large_parent_writes_preserve_in_bounce_sized_pieces() {
    const DISK: u64 = 2048;
    let image = Image::new("large", DISK);
    let io = Io::new();
    let mut parent = image.open(false, false);
    let mut child = Block::from_state(&parent.freeze().unwrap()).unwrap();
    io.write(&mut parent, 100, 1, 0x44);
    // 384 KiB from sector 90: more than the bounce buffer, around a preserved sector.
    io.write(&mut parent, 90, 768, 0x55);
    io.zero(&mut parent, VIRTIO_BLK_T_WRITE_ZEROES, 0, DISK as u32)
        .unwrap();
    for start in (0..DISK).step_by(512) {
        assert_eq!(io.sectors(&mut child, start, 512), originals(start, 512));
        assert_eq!(io.sectors(&mut parent, start, 512), [0; 512]);
    }
}

#[test]
fn direct_io_disks_fork_through_the_bounce_buffer() {
    let image = Image::new("direct", SECTORS);
    let io = Io::new();
    let mut parent = image.open(false, true);
    let mut child = Block::from_state(&parent.freeze().unwrap()).unwrap();
    io.write(&mut parent, 5, 2, 0x99);
    io.write(&mut child, 6, 1, 0x66);
    let buffers = [(BUF + 3, 700), (BUF + 0x1003, 836)];
    let expected: Vec<u8> = [4, 5, 0x66].iter().flat_map(|b| [*b; 512]).collect();
    assert_eq!(io.read_into(&mut child, 4, &buffers), expected);
    assert_eq!(io.sectors(&mut parent, 4, 4), [4, 0x99, 0x99, 7]);
    let mut grandchild = Block::from_state(&child.freeze().unwrap()).unwrap();
    assert_eq!(io.sectors(&mut grandchild, 4, 4), [4, 5, 0x66, 7]);
}

#[test]
fn malformed_requests_to_a_child_fail_without_effect() {
    let image = Image::new("malformed", SECTORS);
    let io = Io::new();
    let (_parent, mut child) = layered_child(&image, &io);
    let ioerr = |r: Result<u32, RequestError>| r.is_err();
    assert!(ioerr(io.execute(
        &mut child,
        VIRTIO_BLK_T_IN,
        SECTORS,
        &[],
        &[(BUF, 512)]
    )));
    assert!(ioerr(io.execute(
        &mut child,
        VIRTIO_BLK_T_IN,
        u64::MAX,
        &[],
        &[(BUF, 512)]
    )));
    assert!(ioerr(io.execute(
        &mut child,
        VIRTIO_BLK_T_IN,
        SECTORS - 1,
        &[],
        &[(BUF, 1024)]
    )));
    assert!(ioerr(io.execute(
        &mut child,
        VIRTIO_BLK_T_OUT,
        0,
        &[(BUF, 100)],
        &[]
    )));
    assert!(ioerr(io.execute(
        &mut child,
        VIRTIO_BLK_T_OUT,
        u64::MAX / 512,
        &[(BUF, 512)],
        &[]
    )));
    assert!(ioerr(io.execute(
        &mut child,
        VIRTIO_BLK_T_IN,
        0,
        &[(BUF, 512)],
        &[(BUF, 512)]
    )));
    assert!(matches!(
        io.execute(&mut child, 0x77, 0, &[], &[]),
        Err(RequestError::Unsupported)
    ));
    assert_eq!(
        io.execute(&mut child, VIRTIO_BLK_T_GET_ID, 0, &[], &[(BUF, 20)])
            .unwrap(),
        20
    );
    assert_eq!(io.sectors(&mut child, 9, 5), [9, 0xf0, 0x0f, 12, 13]);
}

/// The parent writes a sector while a child has looked it up as unpreserved and is about to
/// read it from the image: the write must wait until the child's read is done.
#[test]
fn a_parent_cannot_overwrite_a_sector_a_child_is_about_to_read() {
    let image = Image::new("interleave", SECTORS);
    let mut parent = image.open(false, false);
    let mut child = Block::from_state(&parent.freeze().unwrap()).unwrap();
    let (to_parent, requests) = mpsc::channel::<u64>();
    let (wrote, written) = mpsc::channel::<()>();
    let written = Rc::new(written);
    let io = Io::new();
    let (during, after) = std::thread::scope(|scope| {
        scope.spawn(move || {
            let io = Io::new();
            for offset in requests {
                io.write(&mut parent, offset / SECTOR_SIZE, 1, 0xaa);
                if wrote.send(()).is_err() {
                    break;
                }
            }
        });
        let waiting = written.clone();
        layers::BEFORE_IMAGE_READ.set(Some(Box::new(move |offset| {
            let _ = to_parent.send(offset);
            // Time for the parent to overwrite the sector, if it could.
            let _ = waiting.recv_timeout(std::time::Duration::from_millis(200));
        })));
        let during = io.sectors(&mut child, 5, 1);
        // Ends the parent's loop (nothing is asserted before, so that a failure cannot leave
        // the parent's thread waiting).
        layers::BEFORE_IMAGE_READ.set(None);
        let _ = written.recv_timeout(std::time::Duration::from_secs(10));
        (during, io.sectors(&mut child, 5, 1))
    });
    assert_eq!(during, [5], "the child read the parent's write");
    assert_eq!(after, [5]);
    assert_eq!(image.sector(5), [0xaa; 512]);
}

/// A child reads the whole disk over and over while the parent, on another thread, overwrites
/// every sector once (each overwrite preserves the sector first): every read must find the
/// content of the freeze. Reading the image between the child's look-up and the parent's
/// overwrite would show the new content.
#[test]
fn child_reads_race_parent_overwrites_safely() {
    const DISK: u64 = 2048;
    let image = Image::new("race", DISK);
    for round in 0..4u8 {
        let mut parent = image.open(false, false);
        let mut child = Block::from_state(&parent.freeze().unwrap()).unwrap();
        let frozen: Vec<u8> = match round {
            0 => originals(0, DISK),
            _ => vec![round - 1; DISK as usize],
        };
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let io = Io::new();
                // Interleaved orders, 4 KiB at a time, so that the child meets fresh overwrites.
                for pass in 0..8 {
                    for chunk in (pass..DISK / 8).step_by(8) {
                        io.write(&mut parent, chunk * 8, 8, round);
                    }
                }
                done.store(true, Ordering::Release);
            });
            let io = Io::new();
            let mut reads = 0;
            while !done.load(Ordering::Acquire) || reads < 2 {
                for start in (0..DISK).step_by(128) {
                    assert_eq!(
                        io.sectors(&mut child, start, 128),
                        frozen[start as usize..start as usize + 128],
                        "round {round}, sectors from {start}"
                    );
                }
                reads += 1;
            }
        });
    }
}
