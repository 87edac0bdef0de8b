//! Tests of freezing guest RAM (`freeze.rs`).
use vm_memory::{Bytes, GuestMemoryBackend};

use super::*;
use crate::memory::testutil::{MIB, contents, mapping_kb, read, tracked, write};

#[test]
fn after_a_freeze_no_writer_sees_another_writers_pages() {
    let mut parent = GuestRam::new(4 * MIB).unwrap();
    write(&parent, 0x1000, 1);
    write(&parent, 0x2000, 2);
    let image = parent.freeze().unwrap();
    let a = image.map().unwrap();
    let b = image.map().unwrap();
    write(&parent, 0x1000, 10);
    write(&a, 0x2000, 20);
    write(&b, 0x3000, 30);
    assert_eq!([read(&parent, 0x1000), read(&parent, 0x2000)], [10, 2]);
    assert_eq!(
        [read(&a, 0x1000), read(&a, 0x2000), read(&a, 0x3000)],
        [1, 20, 0]
    );
    assert_eq!(
        [read(&b, 0x1000), read(&b, 0x2000), read(&b, 0x3000)],
        [1, 2, 30]
    );
    assert_eq!(read(&parent, 0x3000), 0);
}

#[test]
fn freezing_again_and_freezing_a_child_carry_their_writes() {
    let mut parent = GuestRam::new(4 * MIB).unwrap();
    write(&parent, 0x1000, 1);
    let first = parent.freeze().unwrap();
    let mut child = first.map().unwrap();
    write(&parent, 0x1000, 2);
    let second = parent.freeze().unwrap();
    assert_eq!(read(&second.map().unwrap(), 0x1000), 2);
    assert_eq!(
        read(&first.map().unwrap(), 0x1000),
        1,
        "an image never changes"
    );
    write(&parent, 0x1000, 3);
    assert_eq!(read(&second.map().unwrap(), 0x1000), 2);

    write(&child, 0x5000, 5);
    let grandchildren = child.freeze().unwrap();
    write(&child, 0x5000, 6);
    let g = grandchildren.map().unwrap();
    assert_eq!([read(&g, 0x1000), read(&g, 0x5000)], [1, 5]);
    assert_eq!(read(&child, 0x5000), 6);
    assert_eq!(grandchildren.size(), 4 * MIB);
}

#[test]
fn a_freeze_drafted_before_more_writes_carries_them_all() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    write(&ram, 0x1000, 1);
    ram.freeze().unwrap();
    write(&ram, 0x2000, 2);
    let draft = Some(ram.draft_freeze().unwrap());
    // Written while the VM still ran, after the draft.
    write(&ram, 0x3000, 3);
    let second = ram.freeze_from(draft).unwrap();
    let m = second.map().unwrap();
    assert_eq!(
        [read(&m, 0x1000), read(&m, 0x2000), read(&m, 0x3000)],
        [1, 2, 3]
    );

    // A draft of an image the RAM no longer maps is not used.
    let stale = Some(ram.draft_freeze().unwrap());
    write(&ram, 0x4000, 4);
    ram.freeze().unwrap();
    write(&ram, 0x5000, 5);
    let third = ram.freeze_from(stale).unwrap();
    let m = third.map().unwrap();
    assert_eq!([read(&m, 0x4000), read(&m, 0x5000)], [4, 5]);
}

/// Whether `ram` tracks its writes (after a draft); says so when it does not, since the
/// tests then check only what an image holds.
/// The pages a draft copied from RAM, for the first range.
fn precopied(draft: &Option<FreezeDraft>) -> Vec<(usize, usize)> {
    let precopy = draft.as_ref().unwrap().precopy.as_ref().unwrap();
    precopy.copied[0].clone()
}

#[test]
fn a_draft_copies_the_pages_written_since_the_last_freeze_and_the_pause_those_since_the_draft() {
    let mut ram = GuestRam::new(8 * MIB).unwrap();
    write(&ram, 3 * 4096, 3); // before the first freeze: in the image
    ram.freeze().unwrap();
    let _ = read(&ram, 9 * 4096); // read only
    for page in [1u64, 2, 700] {
        write(&ram, page * 4096, page);
    }
    let draft = Some(ram.draft_freeze().unwrap());
    if tracked(&ram) {
        assert_eq!(
            precopied(&draft),
            [(1, 2), (700, 1)],
            "nothing else from RAM"
        );
        // Written after the draft: what the pause copies, and only that.
        write(&ram, 2 * 4096, 20);
        write(&ram, 5 * 4096, 5);
        let Tracking::On(tracker) = &ram.tracking else {
            unreachable!()
        };
        let host = ram.hosts().unwrap()[0];
        assert_eq!(tracker.written(host, 8 * MIB).unwrap(), [(2, 1), (5, 1)]);
        assert_eq!(tracker.written(host, 8 * MIB).unwrap(), []);
    }
    // (The scans above took these: written again, they are reported again.)
    write(&ram, 2 * 4096, 21);
    write(&ram, 5 * 4096, 5);
    write(&ram, 700 * 4096, 70);
    let image = ram.freeze_from(draft).unwrap();
    let m = image.map().unwrap();
    let pages = [1u64, 2, 3, 5, 9, 700].map(|page| read(&m, page * 4096));
    assert_eq!(pages, [1, 21, 3, 5, 0, 70]);
}

#[test]
fn a_draft_finds_the_pages_written_far_apart_and_a_scan_protects_each_again() {
    // Windows of existing pages megabytes apart are scanned one by one: each run is reported
    // from the start of the RAM, and a page written in a hole after the draft is found.
    let mut ram = GuestRam::new(64 * MIB).unwrap();
    ram.freeze().unwrap();
    for page in [1u64, 2, 3000, 9000, 16383] {
        write(&ram, page * 4096, page);
    }
    let draft = Some(ram.draft_freeze().unwrap());
    if tracked(&ram) {
        assert_eq!(
            precopied(&draft),
            [(1, 2), (3000, 1), (9000, 1), (16383, 1)]
        );
        for page in [2u64, 6000, 9000, 16383] {
            write(&ram, page * 4096, page + 1);
        }
        let Tracking::On(tracker) = &ram.tracking else {
            unreachable!()
        };
        let host = ram.hosts().unwrap()[0];
        assert_eq!(
            tracker.written(host, 64 * MIB).unwrap(),
            [(2, 1), (6000, 1), (9000, 1), (16383, 1)]
        );
        assert_eq!(tracker.written(host, 64 * MIB).unwrap(), []);
    }
    // (The scans above took these: written again, they are reported again.)
    for page in [2u64, 6000, 9000, 12000] {
        write(&ram, page * 4096, page + 2);
    }
    let image = ram.freeze_from(draft).unwrap();
    let m = image.map().unwrap();
    let pages = [1u64, 2, 3000, 6000, 9000, 12000, 16383].map(|page| read(&m, page * 4096));
    assert_eq!(pages, [1, 4, 3000, 6002, 9002, 12002, 16383]);
}

#[test]
fn pages_written_while_a_draft_copies_are_in_the_image() {
    let mut ram = GuestRam::new(16 * MIB).unwrap();
    ram.freeze().unwrap();
    for page in 0..4096 {
        write(&ram, page * 4096, page);
    }
    let host = ram.hosts().unwrap()[0] as usize;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut value = 1u64 << 32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for page in (0..4096).step_by(37) {
                    let at = (host + page * 4096) as *mut u64;
                    // SAFETY: the page lies in the RAM's mapping, which stays mapped at this
                    // address while the thread runs (the draft does not re-map it, and the
                    // thread is joined before the freeze does).
                    unsafe { at.write_volatile(value) };
                    value += 1;
                }
            }
        })
    };
    let draft = Some(ram.draft_freeze().unwrap());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let mut now = vec![0u8; 16 * MIB as usize];
    ram.memory.read_slice(&mut now, GuestAddress(0)).unwrap();
    let image = ram.freeze_from(draft).unwrap();
    assert!(
        contents(&image) == now,
        "the image is the RAM at the freeze"
    );
}

#[test]
fn a_page_dropped_after_a_draft_copied_it_is_the_image_s_again() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    write(&ram, 0x1000, 1);
    ram.freeze().unwrap();
    write(&ram, 0x1000, 2);
    write(&ram, 0x2000, 3);
    let draft = Some(ram.draft_freeze().unwrap());
    ram.discarder().discard(0x1000, 4096).unwrap();
    assert_eq!(read(&ram, 0x1000), 1, "the image's page again");
    let image = ram.freeze_from(draft).unwrap();
    let m = image.map().unwrap();
    assert_eq!([read(&m, 0x1000), read(&m, 0x2000)], [1, 3]);
}

#[test]
fn a_child_of_a_child_freezes_with_its_writes_tracked() {
    let mut parent = GuestRam::new(4 * MIB).unwrap();
    write(&parent, 0x1000, 1);
    let first = parent.freeze().unwrap();
    let mut child = first.map().unwrap();
    write(&child, 0x2000, 2);
    let draft = Some(child.draft_freeze().unwrap());
    write(&child, 0x3000, 3);
    let second = child.freeze_from(draft).unwrap();
    let mut grandchild = second.map().unwrap();
    write(&grandchild, 0x4000, 4);
    write(&child, 0x4000, 40);
    let draft = Some(grandchild.draft_freeze().unwrap());
    if tracked(&grandchild) {
        assert_eq!(precopied(&draft), [(4, 1)]);
    }
    write(&grandchild, 0x5000, 5);
    let third = grandchild.freeze_from(draft).unwrap();
    let m = third.map().unwrap();
    assert_eq!(
        [0x1000, 0x2000, 0x3000, 0x4000, 0x5000].map(|a| read(&m, a)),
        [1, 2, 3, 4, 5]
    );
    let m = second.map().unwrap();
    assert_eq!([read(&m, 0x4000), read(&m, 0x5000)], [0, 0]);
    let draft = Some(child.draft_freeze().unwrap());
    let fourth = child.freeze_from(draft).unwrap();
    assert_eq!(read(&fourth.map().unwrap(), 0x4000), 40);
}

#[test]
fn images_are_the_same_with_writes_tracked_or_not() {
    let run = |track: bool| {
        let mut ram = GuestRam::new(8 * MIB).unwrap();
        if !track {
            ram.tracking = Tracking::Off;
        }
        let mut images = Vec::new();
        for round in 0..4u64 {
            for page in (round..2048).step_by(5 + round as usize) {
                write(&ram, page * 4096 + round * 8, round * 10_000 + page);
            }
            let draft = Some(ram.draft_freeze().unwrap());
            assert_eq!(track && round > 0, tracked(&ram) && round > 0);
            for page in (0..2048).step_by(97) {
                write(&ram, page * 4096, page + round);
            }
            images.push(contents(&ram.freeze_from(draft).unwrap()));
        }
        images
    };
    assert!(run(true) == run(false));
}

#[test]
fn an_older_draft_of_the_same_image_is_not_finished_with_a_newer_one_s_scans() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    ram.freeze().unwrap();
    write(&ram, 0x1000, 1);
    let older = Some(ram.draft_freeze().unwrap());
    write(&ram, 0x2000, 2);
    let newer = Some(ram.draft_freeze().unwrap());
    drop(newer);
    write(&ram, 0x3000, 3);
    let image = ram.freeze_from(older).unwrap();
    let m = image.map().unwrap();
    assert_eq!([0x1000, 0x2000, 0x3000].map(|a| read(&m, a)), [1, 2, 3]);
}

#[test]
fn a_first_freeze_re_maps_in_its_draft_and_seals_the_ram_s_own_file() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    let file = ram.file.clone();
    write(&ram, 0x1000, 1);
    let draft = Some(ram.draft_freeze().unwrap());
    assert!(ram.privatized && ram.mapped.is_none());
    assert_eq!(read(&ram, 0x1000), 1, "the re-map keeps the contents");
    // Written while the VM still runs, after the draft: pages of the RAM's own.
    write(&ram, 0x1000, 3);
    write(&ram, 0x2000, 2);
    let epoch = ram.epoch;
    let image = ram.freeze_from(draft).unwrap();
    assert_eq!(ram.epoch, epoch, "no re-map in the pause");
    assert!(
        Arc::ptr_eq(image.file(), &file),
        "the RAM's own file is the image"
    );
    let m = image.map().unwrap();
    assert_eq!([read(&m, 0x1000), read(&m, 0x2000)], [3, 2]);
    assert!(file.write_all_at(&[1], 0).is_err(), "sealed");
    write(&ram, 0x1000, 4);
    assert_eq!(
        [read(&ram, 0x1000), read(&image.map().unwrap(), 0x1000)],
        [4, 3]
    );
    assert!(!ram.privatized && ram.mapped.is_some());
    // A draft abandoned before its pause leaves the RAM re-mapped; the next freeze finishes.
    let mut fresh = GuestRam::new(4 * MIB).unwrap();
    drop(fresh.draft_freeze().unwrap());
    write(&fresh, 0x3000, 5);
    let image = fresh.freeze().unwrap();
    assert_eq!(read(&image.map().unwrap(), 0x3000), 5);
}

#[test]
fn a_re_freeze_leaves_the_ram_mapped_as_it_was() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    write(&ram, 0, 1);
    let first = ram.freeze().unwrap();
    // 100 pages of 1,024: fewer than one in REMAP_RATIO.
    for page in 1..=100 {
        write(&ram, page * 4096, page + 1);
    }
    let second = ram.freeze().unwrap();
    assert_eq!(
        mapping_kb(&ram, 0).1,
        100 * 4,
        "the RAM keeps its own pages"
    );
    assert_eq!(ram.allocated_bytes().unwrap(), 100 * 4096);
    assert!(Arc::ptr_eq(ram.mapped.as_ref().unwrap(), &first));
    assert!(Arc::ptr_eq(ram.frozen().unwrap(), &second));
    ram.release_replaced();
    let m = second.map().unwrap();
    for page in [0, 1, 100] {
        assert_eq!(
            [read(&ram, page * 4096), read(&m, page * 4096)],
            [page + 1; 2]
        );
    }
    // What it wrote before the last freeze is in the next image too.
    write(&ram, 600 * 4096, 9);
    let third = ram.freeze().unwrap();
    let m = third.map().unwrap();
    assert_eq!([0, 4096, 600 * 4096].map(|a| read(&m, a)), [1, 2, 9]);
    assert_eq!(read(&first.map().unwrap(), 4096), 0, "images never change");
}

#[test]
fn a_re_freeze_re_maps_ram_that_holds_many_pages_of_its_own() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    ram.freeze().unwrap();
    let before = ram.memory.get_host_address(GuestAddress(0)).unwrap();
    for page in 0..200 {
        write(&ram, page * 4096, page + 1);
    }
    let image = ram.freeze().unwrap();
    assert!(Arc::ptr_eq(ram.mapped.as_ref().unwrap(), &image));
    assert_eq!(
        ram.memory.get_host_address(GuestAddress(0)).unwrap(),
        before,
        "re-mapped in place"
    );
    assert_eq!(mapping_kb(&ram, 0), (0, 0), "its pages were moved out");
    assert_eq!(ram.moved.len(), 1);
    ram.release_replaced();
    assert!(ram.moved.is_empty() && ram.replaced.is_empty());
    let m = image.map().unwrap();
    for page in [0, 1, 199] {
        assert_eq!(
            [read(&ram, page * 4096), read(&m, page * 4096)],
            [page + 1; 2]
        );
    }
}

#[test]
fn ram_above_the_mmio_hole_freezes_too() {
    // (Not frozen twice: that copies all 3 GiB.)
    let mut ram = GuestRam::new(3 * 1024 * MIB + 2 * MIB).unwrap();
    let high = crate::layout::MMIO_HOLE_END;
    write(&ram, high + 0x1000, 7);
    let image = ram.freeze().unwrap();
    write(&ram, high + 0x1000, 8);
    let child = image.map().unwrap();
    assert_eq!(read(&child, high + 0x1000), 7);
    assert_eq!(read(&ram, high + 0x1000), 8);
}
