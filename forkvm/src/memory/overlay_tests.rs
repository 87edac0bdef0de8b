//! Tests of overlays and stacked images (`overlay.rs`, `adopt.rs`; made by `freeze.rs`).
use std::os::unix::fs::FileExt;

use super::*;
use crate::memory::adopt::PlaceholderRam;
use crate::memory::testutil::{MIB, contents, drafted_freeze, read, tracked, write};

#[test]
fn a_re_freeze_of_few_runs_is_the_base_and_an_overlay_of_the_ram_s_own_pages() {
    let mut ram = GuestRam::new(8 * MIB).unwrap();
    write(&ram, 0x1000, 1);
    write(&ram, 0x9000, 9);
    let base = ram.freeze().unwrap();
    for page in [2u64, 3, 4, 600] {
        write(&ram, page * 4096, page);
    }
    let first = drafted_freeze(&mut ram, |ram| write(ram, 0x5000, 5));
    if !tracked(&ram) {
        return;
    }
    assert_eq!(first.overlay_runs(), Some(2), "pages 2-5 and 600");
    assert!(
        Arc::ptr_eq(&first.file, &base.file),
        "the base is shared, not copied"
    );
    assert!(
        Arc::ptr_eq(ram.mapped.as_ref().unwrap(), &base),
        "the RAM maps its base still"
    );
    let child = first.map().unwrap();
    let pages = [1u64, 2, 3, 4, 5, 6, 9, 600].map(|page| read(&child, page * 4096));
    assert_eq!(pages, [1, 2, 3, 4, 5, 0, 9, 600]);

    // Writes after the freeze reach no image; the next overlay, stacked on the first, holds the
    // pages written since (and page 5, copied in the first's pause without a scan).
    write(&ram, 0x2000, 20);
    write(&child, 0x3000, 30);
    let second = drafted_freeze(&mut ram, |_| {});
    assert_eq!(second.depth(), 2);
    assert!(
        Arc::ptr_eq(&second.overlays[0], &first.overlays[0]),
        "the first is shared"
    );
    assert_eq!(second.overlays[1].runs, [vec![(2, 1), (5, 1)]]);
    let grandchild = second.map().unwrap();
    assert_eq!(
        [2u64, 3, 5, 600].map(|page| read(&grandchild, page * 4096)),
        [20, 3, 5, 600]
    );
    assert_eq!([read(&child, 0x2000), read(&child, 0x3000)], [2, 30]);
    assert_eq!(
        read(&first.map().unwrap(), 0x2000),
        2,
        "an image never changes"
    );

    // Flattened (a snapshot's memory file), it is what a VM reads.
    let flat = contents(&second);
    let at = |addr: usize| u64::from_le_bytes(flat[addr..addr + 8].try_into().unwrap());
    assert_eq!(
        [at(0x1000), at(0x2000), at(0x9000), at(600 * 4096)],
        [1, 20, 9, 600]
    );
}

#[test]
fn a_prepared_child_that_maps_the_base_adopts_the_overlay_without_a_re_map() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    write(&ram, 0x1000, 1);
    ram.freeze().unwrap();
    write(&ram, 0x2000, 2);
    let expected = ram.next_image();
    let placeholder = PlaceholderRam::new(4 * MIB, expected).unwrap();
    let image = drafted_freeze(&mut ram, |_| {});
    if !tracked(&ram) {
        return;
    }
    assert!(image.overlay_runs().is_some());
    let child = placeholder.adopt(&image).unwrap();
    assert_eq!([read(&child, 0x1000), read(&child, 0x2000)], [1, 2]);
}

#[test]
fn a_child_of_a_layered_image_stacks_its_own_pages_on_it() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    write(&ram, 0x1000, 1);
    ram.freeze().unwrap();
    write(&ram, 0x2000, 2);
    let image = drafted_freeze(&mut ram, |_| {});
    let mut child = image.map().unwrap();
    write(&child, 0x3000, 3);
    let grandchildren = drafted_freeze(&mut child, |child| write(child, 0x4000, 4));
    if tracked(&child) {
        assert_eq!(grandchildren.depth(), 2);
        assert!(Arc::ptr_eq(&grandchildren.overlays[0], &image.overlays[0]));
    }
    let g = grandchildren.map().unwrap();
    assert_eq!(
        [1u64, 2, 3, 4].map(|page| read(&g, page * 4096)),
        [1, 2, 3, 4]
    );
}

#[test]
fn scattered_pages_make_a_full_image() {
    let mut ram = GuestRam::new(8 * MIB).unwrap();
    ram.freeze().unwrap();
    // Every other page: more runs than a child should map.
    let pages = MAX_MAPPED_RUNS as u64 + 40;
    for page in 0..pages {
        write(&ram, page * 2 * 4096, page + 1);
    }
    let image = drafted_freeze(&mut ram, |_| {});
    if !tracked(&ram) {
        return;
    }
    assert_eq!(image.overlay_runs(), None);
    let m = image.map().unwrap();
    let last = (pages - 1) * 2;
    assert_eq!(
        [0u64, 2, last].map(|page| read(&m, page * 4096)),
        [1, 2, pages]
    );
    // (More than one page in eight of its own: the RAM was re-mapped over the image, and the
    // next re-freeze starts from few runs again.)
    assert!(Arc::ptr_eq(ram.mapped.as_ref().unwrap(), &image));
    write(&ram, 0x1000, 7);
    let next = drafted_freeze(&mut ram, |_| {});
    assert_eq!(next.overlay_runs(), Some(1));
    assert_eq!(read(&next.map().unwrap(), 0x1000), 7);
}

#[test]
fn an_overlay_of_many_runs_is_copied_in_and_reads_the_same() {
    let base = {
        let mut ram = GuestRam::new(4 * MIB).unwrap();
        write(&ram, 0, 1);
        ram.freeze().unwrap()
    };
    let file = create_memfd().unwrap();
    file.set_len(4 * MIB).unwrap();
    let runs: Vec<(usize, usize)> = (0..MAX_MAPPED_RUNS + 10).map(|i| (2 * i + 1, 1)).collect();
    for &(page, _) in &runs {
        file.write_all_at(&(page as u64).to_le_bytes(), (page * PAGE) as u64)
            .unwrap();
    }
    super::super::seal::seal(&file).unwrap();
    let image = Arc::new(super::super::image::FrozenRam {
        file: base.file.clone(),
        ranges: base.ranges.clone(),
        overlays: vec![Arc::new(Overlay {
            file: Arc::new(file),
            runs: vec![runs],
        })],
    });
    let m = image.map().unwrap();
    assert_eq!(
        [0u64, 1, 2, 3, 531].map(|page| read(&m, page * 4096)),
        [1, 1, 0, 3, 531]
    );
    // A run past the RAM is an error, not a mapping elsewhere.
    let bad = Arc::new(Overlay {
        file: image.overlays[0].file.clone(),
        runs: vec![vec![(1023, 2)]],
    });
    let mut m = m;
    assert!(m.apply_overlays(&[bad]).is_err());
}

#[test]
fn overlay_mappings_are_counted_against_a_budget_and_given_back() {
    static BUDGET: AtomicUsize = AtomicUsize::new(0);
    let a = OverlayMappings::reserve(&BUDGET, 60, 100).unwrap();
    assert!(
        OverlayMappings::reserve(&BUDGET, 41, 100).is_none(),
        "past the budget"
    );
    // (`OverlayMappings` gives back to the process's counter; here by hand.)
    std::mem::forget(a);
    BUDGET.fetch_sub(60, Ordering::SeqCst);
    assert!(
        OverlayMappings::reserve(&BUDGET, 100, 100)
            .map(std::mem::forget)
            .is_some()
    );
}

#[test]
fn a_vm_maps_of_each_overlay_only_what_no_newer_one_covers() {
    let overlay = |runs: Vec<(usize, usize)>| {
        Arc::new(Overlay {
            file: Arc::new(create_memfd().unwrap()),
            runs: vec![runs],
        })
    };
    let stack = [
        overlay(vec![(0, 10), (20, 1)]),
        overlay(vec![(5, 10)]),
        overlay(vec![(20, 1), (2, 1)].into_iter().rev().collect()),
    ];
    let shown = visible(&stack);
    assert_eq!(shown[2], [vec![(2, 1), (20, 1)]]);
    assert_eq!(shown[1], [vec![(5, 10)]]);
    assert_eq!(shown[0], [vec![(0, 2), (3, 2)]]);
    assert_eq!(shown.iter().flatten().map(Vec::len).sum::<usize>(), 5);
}

#[test]
fn a_placeholder_over_the_last_image_maps_only_the_next_overlay() {
    let mut ram = GuestRam::new(4 * MIB).unwrap();
    write(&ram, 0x1000, 1);
    ram.freeze().unwrap();
    write(&ram, 0x2000, 2);
    let first = drafted_freeze(&mut ram, |_| {});
    if !tracked(&ram) {
        return;
    }
    let placeholder = PlaceholderRam::new(4 * MIB, ram.next_image()).unwrap();
    write(&ram, 0x3000, 3);
    let second = drafted_freeze(&mut ram, |_| {});
    assert_eq!(second.depth(), 2);
    let held = |ram: &GuestRam| ram.overlay_mappings.as_ref().map_or(0, |m| m.0);
    // One run mapped ahead (page 2), one more at adoption (page 3): each counted for two
    // mappings, and what the placeholder holds stays counted.
    assert_eq!(held(placeholder.ram()), 2);
    let child = placeholder.adopt(&second).unwrap();
    assert_eq!(held(&child), 4);
    assert_eq!([1u64, 2, 3].map(|p| read(&child, p * 4096)), [1, 2, 3]);
    assert_eq!(first.depth(), 1);

    // One prepared over an image the next does not stack on (the balloon broke the chain):
    // re-mapped, and it reads what the image holds.
    let stale = PlaceholderRam::new(4 * MIB, ram.next_image()).unwrap();
    ram.discarder().discard(0x2000, 4096).unwrap();
    write(&ram, 0x4000, 4);
    let third = drafted_freeze(&mut ram, |_| {});
    let child = stale.adopt(&third).unwrap();
    assert_eq!(
        [1u64, 2, 3, 4].map(|p| read(&child, p * 4096)),
        [1, 0, 3, 4]
    );
}
