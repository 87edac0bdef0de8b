//! Tests of stacked images (`layers.rs`).
use std::time::{Duration, Instant};

use super::*;
use crate::memory::testutil::{MIB, contents, drafted_freeze, read, tracked, write};

/// A re-freeze as a capture makes it: draft, pause, and what follows once the VM runs again.
fn refreeze(ram: &mut GuestRam) -> Arc<FrozenRam> {
    let image = drafted_freeze(ram, |_| {});
    ram.release_replaced();
    image
}

#[test]
fn each_re_freeze_stacks_only_the_pages_written_since_the_last() {
    let mut ram = GuestRam::new(8 * MIB).unwrap();
    ram.freeze().unwrap();
    for page in 1..=100u64 {
        write(&ram, page * 4096, page);
    }
    let first = refreeze(&mut ram);
    if !tracked(&ram) {
        return;
    }
    assert_eq!(first.overlays[0].runs, [vec![(1, 100)]]);
    write(&ram, 7 * 4096, 70);
    let second = refreeze(&mut ram);
    assert_eq!(second.depth(), 2);
    assert_eq!(second.overlays[1].runs, [vec![(7, 1)]], "not the 100 again");
    let m = second.map().unwrap();
    assert_eq!(
        [1u64, 7, 100, 101].map(|p| read(&m, p * 4096)),
        [1, 70, 100, 0]
    );
    assert_eq!(
        read(&first.map().unwrap(), 7 * 4096),
        7,
        "an image never changes"
    );
    assert!(
        contents(&second) == {
            let mut flat = contents(&first);
            flat[7 * 4096..7 * 4096 + 8].copy_from_slice(&70u64.to_le_bytes());
            flat
        }
    );
}

#[test]
fn a_page_the_balloon_drops_starts_the_stack_over() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    write(&ram, 0x1000, 1);
    ram.freeze().unwrap();
    write(&ram, 0x1000, 2);
    let first = refreeze(&mut ram);
    if !tracked(&ram) {
        return;
    }
    assert_eq!(read(&first.map().unwrap(), 0x1000), 2);
    // Dropped: the RAM reads its base's page again, which the first overlay would hide.
    ram.discarder().discard(0x1000, 4096).unwrap();
    assert_eq!(read(&ram, 0x1000), 1);
    write(&ram, 0x2000, 3);
    let second = refreeze(&mut ram);
    assert_eq!(
        second.depth(),
        1,
        "over the image the RAM maps, not the last one"
    );
    let m = second.map().unwrap();
    assert_eq!([read(&m, 0x1000), read(&m, 0x2000)], [1, 3]);
}

#[test]
fn a_deep_stack_is_flattened_in_the_background_and_the_next_stacks_on_that() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    ram.freeze().unwrap();
    let mut images = Vec::new();
    for round in 1..=COMPACT_DEPTH as u64 {
        write(&ram, round * 4096, round);
        images.push(refreeze(&mut ram));
    }
    if !tracked(&ram) {
        return;
    }
    let deep = images.last().unwrap().clone();
    assert_eq!(deep.depth(), COMPACT_DEPTH);
    let t0 = Instant::now();
    while lock(&ram.compaction.done).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never flattened");
        std::thread::sleep(Duration::from_millis(1));
    }
    write(&ram, 0x9000, 9);
    let next = refreeze(&mut ram);
    assert_eq!(next.depth(), 1, "the flat copy and one overlay");
    assert!(!Arc::ptr_eq(&next.file, &deep.file), "a new base");
    let m = next.map().unwrap();
    assert_eq!([1u64, 2, 4, 9].map(|p| read(&m, p * 4096)), [1, 2, 4, 9]);
    // What the stack held before is what the flat copy holds.
    assert!(
        contents(&deep)[..]
            == contents(&FrozenRam {
                file: next.file.clone(),
                ranges: next.ranges.clone(),
                overlays: Vec::new(),
            })[..]
    );
}

#[test]
fn an_overlay_newer_ones_hide_entirely_leaves_the_stack() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    ram.freeze().unwrap();
    write(&ram, 0x1000, 1);
    write(&ram, 0x2000, 2);
    let first = refreeze(&mut ram);
    if !tracked(&ram) {
        return;
    }
    write(&ram, 0x3000, 3);
    let second = refreeze(&mut ram);
    assert_eq!(second.depth(), 2);
    // Both pages of the first written again: the first shows nothing any more.
    write(&ram, 0x1000, 10);
    write(&ram, 0x2000, 20);
    let third = refreeze(&mut ram);
    assert_eq!(third.depth(), 2);
    assert!(
        !third
            .overlays
            .iter()
            .any(|o| Arc::ptr_eq(o, &first.overlays[0]))
    );
    let m = third.map().unwrap();
    assert_eq!([1u64, 2, 3].map(|p| read(&m, p * 4096)), [10, 20, 3]);
}
