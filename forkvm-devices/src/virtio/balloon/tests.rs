//! Tests of the balloon over a register-level driver and memfd-backed guest memory.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use super::device::{Rejected, page_runs};
use super::*;
use crate::bus::BusDevice;
use crate::virtio::test_driver::{
    AVAIL, BUF, Driver, MEM_SIZE, QUEUE_STRIDE, S_NEEDS_RESET, USED, reg,
};
use crate::virtio::{
    DeviceState, GuestMemoryMmap, INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1, VirtioDevice,
};

const PAGE: u64 = PAGE_SIZE;
const BALLOON_RAM: u64 = MEM_SIZE as u64;

/// Guest memory over a memfd mapped with `flags` (shared, as a VM has it, or private, as
/// over a frozen image), and the memfd.
fn memfd_memory(flags: i32) -> (GuestMemoryMmap, File) {
    // SAFETY: a valid NUL-terminated name and flags; no other memory effects.
    let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    let region = MmapRegionBuilder::new(MEM_SIZE)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .build()
        .unwrap();
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    (GuestMemoryMmap::from_regions(vec![region]).unwrap(), file)
}

/// What a VMM's [`RamDiscard`] does (forkvm's is `memory::discard`), over the tests' guest
/// memory: a shared mapping has its pages punched out of the memfd, a private one drops its
/// copied pages and reads the file again.
struct MadviseDiscard(GuestMemoryMmap);

impl RamDiscard for MadviseDiscard {
    fn discard(&self, addr: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let slice = self
            .0
            .get_slice(GuestAddress(addr), len)
            .map_err(io::Error::other)?;
        let guard = slice.ptr_guard_mut();
        let advise = |advice| {
            // SAFETY: the pointer and length describe `len` bytes of one live mapping of the
            // test's guest memory, which `self.0` keeps mapped; both advices free the pages and
            // leave the mapping in place, and guest memory is only accessed through volatile
            // copies.
            if unsafe { libc::madvise(guard.as_ptr().cast(), len, advice) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        match advise(libc::MADV_REMOVE) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => advise(libc::MADV_DONTNEED),
            other => other,
        }
    }
}

/// A [`RamDiscard`] that records what it is asked to discard and fails for `fail_at`.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(u64, u64)>>,
    fail_at: Option<u64>,
}

impl RamDiscard for Recorder {
    fn discard(&self, addr: u64, len: u64) -> io::Result<()> {
        self.calls.lock().unwrap().push((addr, len));
        match self.fail_at {
            Some(at) if at == addr => Err(io::Error::other("refused")),
            _ => Ok(()),
        }
    }
}

/// A balloon whose discards are recorded only.
fn recorded(ram_bytes: u64, deflate_on_oom: bool, reporting: bool) -> Balloon {
    Balloon::new(
        ram_bytes,
        deflate_on_oom,
        reporting,
        Arc::new(Recorder::default()),
    )
    .unwrap()
}

fn allocated(file: &File) -> u64 {
    file.metadata().unwrap().blocks() * 512
}

struct Setup {
    d: Driver,
    handle: BalloonHandle,
    file: File,
}

/// A live balloon (offering reporting when `reporting`) whose driver accepted `features`.
fn balloon(reporting: bool, features: u64) -> Setup {
    balloon_over(libc::MAP_SHARED, reporting, features)
}

/// [`balloon`] over guest memory mapped with `flags`.
fn balloon_over(flags: i32, reporting: bool, features: u64) -> Setup {
    let (memory, file) = memfd_memory(flags);
    let discard = Arc::new(MadviseDiscard(memory.clone()));
    let device = Balloon::new(BALLOON_RAM, false, reporting, discard).unwrap();
    let handle = device.handle();
    let mut d = Driver::with_memory(Box::new(device), memory);
    d.start_with(features);
    // The device writes the used rings: touch their pages now, so that the allocation counts
    // of the tests see only what the balloon frees.
    for q in 0..4 {
        d.memory
            .write_obj(0u16, GuestAddress(USED + QUEUE_STRIDE * q))
            .unwrap();
    }
    Setup { d, handle, file }
}

fn fill_page(d: &Driver, pfn: u64, byte: u8) {
    d.memory
        .write_slice(&[byte; PAGE as usize], GuestAddress(pfn * PAGE))
        .unwrap();
}

fn page_byte(d: &Driver, pfn: u64) -> u8 {
    d.memory.read_obj(GuestAddress(pfn * PAGE + 17)).unwrap()
}

fn write_pfns(d: &Driver, at: u64, pfns: &[u32]) -> u32 {
    for (i, pfn) in pfns.iter().enumerate() {
        d.memory
            .write_obj(*pfn, GuestAddress(at + 4 * i as u64))
            .unwrap();
    }
    4 * pfns.len() as u32
}

fn needs_reset(d: &mut Driver) -> bool {
    d.read(reg::STATUS) & S_NEEDS_RESET != 0
}

#[test]
fn offers_stats_always_and_deflate_on_oom_and_reporting_on_request() {
    let plain = recorded(BALLOON_RAM, false, false);
    assert_eq!(plain.device_type(), 5);
    assert_eq!(
        plain.features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << F_STATS_VQ)
    );
    assert_eq!(plain.queue_max_sizes().len(), 3);
    let full = recorded(BALLOON_RAM, true, true);
    assert_eq!(
        full.features(),
        (1 << VIRTIO_F_VERSION_1)
            | (1 << F_STATS_VQ)
            | (1 << F_DEFLATE_ON_OOM)
            | (1 << F_REPORTING)
    );
    assert_eq!(full.queue_max_sizes().len(), 4);
}

#[test]
fn inflate_over_a_private_mapping_drops_the_copied_pages() {
    let Setup { mut d, handle, .. } = balloon_over(libc::MAP_PRIVATE, false, 0);
    for pfn in 0x40..0x44 {
        fill_page(&d, pfn, 0xa5);
    }
    let len = write_pfns(&d, BUF, &[0x40, 0x41, 0x42, 0x43]);
    d.chain(0, &[(BUF, len, false)]);
    d.notify();
    assert!(!needs_reset(&mut d));
    assert_eq!(handle.inflated_bytes(), 4 * PAGE);
    for pfn in 0x40..0x44 {
        assert_eq!(
            page_byte(&d, pfn),
            0,
            "page {pfn:#x} reads the file's contents again"
        );
    }
}

#[test]
fn inflate_frees_the_pages_it_is_given() {
    let Setup {
        mut d,
        handle,
        file,
    } = balloon(false, 0);
    for pfn in 0x40..0x48 {
        fill_page(&d, pfn, 0xa5);
    }
    fill_page(&d, 0x60, 0xa5);
    fill_page(&d, 0x61, 0x5a);
    // Unordered, with a duplicate, split across two descriptors mid-PFN.
    let len = write_pfns(
        &d,
        BUF,
        &[0x47, 0x41, 0x40, 0x60, 0x42, 0x43, 0x44, 0x45, 0x46, 0x40],
    );
    d.chain(0, &[(BUF, 6, false), (BUF + 6, len - 6, false)]);
    let before = allocated(&file);
    d.notify();
    assert_eq!(d.used(0), (1, 0));
    assert!(!needs_reset(&mut d));
    assert_eq!(handle.inflated_bytes(), 9 * PAGE);
    assert_eq!(handle.rejected_requests(), 0);
    assert_eq!(
        before - allocated(&file),
        9 * PAGE,
        "the host got 9 pages back"
    );
    for pfn in (0x40..0x48).chain([0x60]) {
        assert_eq!(page_byte(&d, pfn), 0, "page {pfn:#x} reads as zeros");
    }
    assert_eq!(page_byte(&d, 0x61), 0x5a, "its neighbour is untouched");
}

#[test]
fn contiguous_pfns_coalesce_into_runs_within_one_region() {
    let (memory, _file) = memfd_memory(libc::MAP_SHARED);
    let mut runs = Vec::new();
    page_runs(&[1, 2, 3, 7, 8, 0xff], &memory, &mut runs).unwrap();
    assert_eq!(
        runs,
        vec![
            (PAGE, 3 * PAGE as usize),
            (7 * PAGE, 2 * PAGE as usize),
            (0xff * PAGE, PAGE as usize)
        ]
    );
    let two = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 2 * PAGE as usize),
        (GuestAddress(2 * PAGE), 2 * PAGE as usize),
    ])
    .unwrap();
    page_runs(&[0, 1, 2, 3], &two, &mut runs).unwrap();
    assert_eq!(
        runs,
        vec![(0, 2 * PAGE as usize), (2 * PAGE, 2 * PAGE as usize)],
        "a run never crosses a region boundary"
    );
    let last = BALLOON_RAM / PAGE;
    assert!(matches!(
        page_runs(&[1, last], &memory, &mut runs),
        Err(Rejected::OutsideRam(addr)) if addr == last * PAGE
    ));
}

#[test]
fn a_pfn_outside_guest_ram_drops_the_whole_request() {
    let Setup {
        mut d,
        handle,
        file,
    } = balloon(false, 0);
    fill_page(&d, 0x40, 0xa5);
    let len = write_pfns(&d, BUF, &[0x40, (BALLOON_RAM / PAGE) as u32, u32::MAX]);
    d.chain(0, &[(BUF, len, false)]);
    let before = allocated(&file);
    d.notify();
    assert_eq!(d.used(0), (1, 0), "the request is returned");
    assert!(!needs_reset(&mut d));
    assert_eq!(handle.rejected_requests(), 1);
    assert_eq!(handle.inflated_bytes(), 0);
    assert_eq!(page_byte(&d, 0x40), 0xa5, "nothing was discarded");
    assert_eq!(allocated(&file), before);
}

#[test]
fn partial_and_oversized_pfn_chains_are_dropped() {
    let Setup { mut d, handle, .. } = balloon(false, 0);
    fill_page(&d, 0x40, 0xa5);
    write_pfns(&d, BUF, &[0x40, 0x40]);
    d.chain(0, &[(BUF, 6, false)]);
    d.notify();
    let too_many = 4 * (MAX_PFNS_PER_CHAIN as u32 + 1);
    d.chain(1, &[(BUF, too_many, false)]);
    d.notify();
    assert_eq!(d.used(1), (2, 0));
    assert!(!needs_reset(&mut d));
    assert_eq!(handle.rejected_requests(), 2);
    assert_eq!(page_byte(&d, 0x40), 0xa5);
    // A chain with no PFNs is a valid, empty request.
    d.chain(2, &[(BUF, 0, false)]);
    d.notify();
    assert_eq!(d.used(2), (3, 0));
    assert_eq!(handle.rejected_requests(), 2);
}

#[test]
fn a_pfn_buffer_outside_guest_memory_needs_reset() {
    let Setup { mut d, .. } = balloon(false, 0);
    d.chain(0, &[(BALLOON_RAM - 2, 4, false)]);
    d.notify();
    assert!(needs_reset(&mut d));
}

#[test]
fn deflate_is_only_counted() {
    let Setup { mut d, handle, .. } = balloon(false, 0);
    fill_page(&d, 0x40, 0xa5);
    let len = write_pfns(&d, BUF, &[0x40, 0x41]);
    d.select(1);
    d.chain(0, &[(BUF, len, false)]);
    d.notify();
    assert_eq!(d.used(0), (1, 0));
    assert_eq!(handle.deflated_bytes(), 2 * PAGE);
    assert_eq!(handle.inflated_bytes(), 0);
    assert_eq!(page_byte(&d, 0x40), 0xa5);
}

#[test]
fn a_page_inflated_again_is_counted_once() {
    let Setup { mut d, handle, .. } = balloon(false, 0);
    let inflate = |d: &mut Driver, head: u16, pfns: &[u32]| {
        d.select(0);
        let len = write_pfns(d, BUF + 0x100 * u64::from(head), pfns);
        d.chain(head, &[(BUF + 0x100 * u64::from(head), len, false)]);
        d.notify();
    };
    inflate(&mut d, 0, &[0x40, 0x41]);
    assert_eq!(handle.inflated_bytes(), 2 * PAGE);
    inflate(&mut d, 1, &[0x40, 0x41]);
    inflate(&mut d, 2, &[0x41, 0x42]);
    assert_eq!(
        handle.inflated_bytes(),
        3 * PAGE,
        "pages already in the balloon count once"
    );
    // Deflated and inflated again: given back twice.
    d.select(1);
    let len = write_pfns(&d, BUF + 0x800, &[0x40]);
    d.chain(0, &[(BUF + 0x800, len, false)]);
    d.notify();
    inflate(&mut d, 3, &[0x40]);
    assert_eq!(handle.inflated_bytes(), 4 * PAGE);
    // A reset empties the balloon: the guest starts over with all of its memory (and rings,
    // cleared before it goes live again).
    for q in 0..2 {
        d.memory
            .write_obj(0u16, GuestAddress(AVAIL + QUEUE_STRIDE * q + 2))
            .unwrap();
    }
    d.start();
    inflate(&mut d, 0, &[0x41]);
    assert_eq!(handle.inflated_bytes(), 5 * PAGE);
}

fn write_stats(d: &Driver, at: u64, entries: &[(u16, u64)]) -> u32 {
    for (i, (tag, value)) in entries.iter().enumerate() {
        let e = at + (STAT_ENTRY_SIZE * i) as u64;
        d.memory.write_obj(*tag, GuestAddress(e)).unwrap();
        d.memory.write_obj(*value, GuestAddress(e + 2)).unwrap();
    }
    (STAT_ENTRY_SIZE * entries.len()) as u32
}

#[test]
fn stats_are_held_until_the_host_asks_for_fresh_ones() {
    let Setup { mut d, handle, .. } = balloon(true, 1 << F_STATS_VQ);
    assert_eq!(handle.stats(), None);
    d.select(2);
    let len = write_stats(
        &d,
        BUF,
        &[
            (stat_tag::FREE_MEMORY, 1 << 20),
            (stat_tag::TOTAL_MEMORY, 4 << 20),
        ],
    );
    // One odd byte at the end is not an entry.
    d.chain(0, &[(BUF, len + 1, false)]);
    d.notify();
    assert_eq!(d.used(0).0, 0, "the buffer is held");
    let stats = handle.stats().unwrap();
    assert_eq!(stats.entries().len(), 2);
    assert_eq!(stats.get(stat_tag::FREE_MEMORY), Some(1 << 20));
    assert_eq!(stats.get(stat_tag::TOTAL_MEMORY), Some(4 << 20));
    assert_eq!(stats.get(stat_tag::SWAP_IN), None);
    assert_eq!(handle.stats_updates(), 1);

    d.write(reg::INTERRUPT_ACK, u32::MAX);
    handle.request_stats();
    d.transport.process_host_event();
    assert_eq!(d.used(0), (1, 0), "returned for a refill");
    assert_eq!(d.read(reg::INTERRUPT_STATUS), INT_USED_RING);
    assert!(handle.shared.event.read().is_err(), "the event was drained");

    write_stats(
        &d,
        BUF,
        &[
            (stat_tag::FREE_MEMORY, 3 << 20),
            (stat_tag::TOTAL_MEMORY, 4 << 20),
        ],
    );
    d.chain(0, &[(BUF, len, false)]);
    d.notify();
    assert_eq!(
        handle.stats().unwrap().get(stat_tag::FREE_MEMORY),
        Some(3 << 20)
    );
    assert_eq!(handle.stats_updates(), 2);
    // Asking again without a buffer posted returns nothing twice.
    handle.request_stats();
    d.transport.process_host_event();
    handle.request_stats();
    d.transport.process_host_event();
    assert_eq!(d.used(0).0, 2);
    assert!(!needs_reset(&mut d));
}

#[test]
fn a_huge_stats_buffer_is_read_only_up_to_the_limit() {
    let Setup { mut d, handle, .. } = balloon(false, 1 << F_STATS_VQ);
    d.select(2);
    let entries: Vec<_> = (0..MAX_STATS as u16 + 10)
        .map(|t| (t, u64::from(t)))
        .collect();
    let len = write_stats(&d, BUF, &entries);
    d.chain(0, &[(BUF, len, false)]);
    d.notify();
    assert_eq!(handle.stats().unwrap().entries().len(), MAX_STATS);
    // A second buffer posted while one is held gives the first one back.
    d.chain(1, &[(BUF, 10, false)]);
    d.notify();
    assert_eq!(d.used(0), (1, 0));
    assert_eq!(handle.stats().unwrap().entries(), &[(0, 0)]);
}

#[test]
fn host_requests_before_the_driver_is_live_are_drained() {
    let (memory, _file) = memfd_memory(libc::MAP_SHARED);
    let discard = Arc::new(MadviseDiscard(memory.clone()));
    let device = Balloon::new(BALLOON_RAM, false, false, discard).unwrap();
    let handle = device.handle();
    let mut d = Driver::with_memory(Box::new(device), memory);
    handle.set_target_pages(16).unwrap();
    handle.request_stats();
    d.transport.process_host_event();
    assert!(handle.shared.event.read().is_err(), "the event was drained");
    assert_eq!(
        d.read(reg::INTERRUPT_STATUS),
        0,
        "no interrupt before DRIVER_OK"
    );
    d.start_with(1 << F_STATS_VQ);
    let mut num_pages = [0u8; 4];
    d.transport.read(0x100, &mut num_pages);
    assert_eq!(
        u32::from_le_bytes(num_pages),
        16,
        "the driver finds the target"
    );
}

#[test]
fn a_new_target_raises_the_config_interrupt() {
    let Setup { mut d, handle, .. } = balloon(false, 0);
    handle.set_target_mib(1).unwrap();
    assert_eq!(handle.target_pages(), 256);
    d.transport.process_host_event();
    assert_eq!(d.read(reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(d.read(0x100), 256);
    assert_eq!(
        handle.set_target_pages(BALLOON_RAM / PAGE + 1),
        Err(BalloonError::TargetTooLarge {
            requested: BALLOON_RAM / PAGE + 1,
            max: BALLOON_RAM / PAGE
        })
    );
    assert!(handle.set_target_mib(u64::MAX).is_err());
    assert_eq!(
        handle.target_pages(),
        256,
        "a refused target changes nothing"
    );
}

#[test]
fn config_space_is_num_pages_then_actual_little_endian() {
    assert_eq!((CONFIG_SIZE, ACTUAL_OFFSET), (8, 4));
    let mut device = recorded(BALLOON_RAM, false, false);
    device.handle().set_target_pages(0xf1).unwrap();
    device.write_config(ACTUAL_OFFSET, &0x0a0b_0c0du32.to_le_bytes());
    let mut config = [0xee; CONFIG_SIZE + 4];
    device.read_config(0, &mut config);
    // The layout the device had before it was built from `BalloonConfig`.
    let mut old = [0; CONFIG_SIZE];
    old[..4].copy_from_slice(&0xf1u32.to_le_bytes());
    old[4..].copy_from_slice(&0x0a0b_0c0du32.to_le_bytes());
    assert_eq!(config[..CONFIG_SIZE], old);
    assert_eq!(config[CONFIG_SIZE..], [0; 4], "nothing past `actual`");
}

#[test]
fn config_space_reads_safely_and_only_actual_is_writable() {
    let Setup { mut d, handle, .. } = balloon(false, 0);
    handle.set_target_pages(0xf1).unwrap();
    d.write(0x104, 0x0a0b_0c0d);
    assert_eq!(handle.actual_pages(), 0x0a0b_0c0d);
    let read = |d: &mut Driver, offset: u64, len: usize| {
        let mut data = vec![0xee; len];
        d.transport.read(0x100 + offset, &mut data);
        data
    };
    assert_eq!(read(&mut d, 0, 8), [0xf1, 0, 0, 0, 0x0d, 0x0c, 0x0b, 0x0a]);
    assert_eq!(read(&mut d, 0, 2), [0xf1, 0]);
    assert_eq!(read(&mut d, 3, 2), [0, 0x0d]);
    assert_eq!(read(&mut d, 6, 4), [0x0b, 0x0a, 0, 0]);
    assert_eq!(read(&mut d, 0xefc, 4), [0; 4]);
    let mut far = [0xee; 8];
    recorded(BALLOON_RAM, false, false).read_config(u64::MAX - 3, &mut far);
    assert_eq!(far, [0; 8], "offsets that overflow read as zero");

    d.write(0x100, 7);
    d.transport.write(0x104, &[1, 2]);
    d.transport.write(0x105, &[1, 2, 3, 4]);
    d.transport.write(0x104, &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(handle.target_pages(), 0xf1, "num_pages is the host's");
    assert_eq!(
        handle.actual_pages(),
        0x0a0b_0c0d,
        "partial writes are ignored"
    );
    d.write(reg::STATUS, 0);
    assert_eq!(handle.actual_pages(), 0, "a reset empties the balloon");
}

fn report_chain(d: &Driver, ranges: &[(u64, u32)]) {
    let parts: Vec<_> = ranges.iter().map(|(a, l)| (*a, *l, true)).collect();
    d.chain(0, &parts);
}

#[test]
fn reporting_is_queue_2_without_stats_and_frees_the_ranges() {
    let Setup {
        mut d,
        handle,
        file,
    } = balloon(true, 1 << F_REPORTING);
    for pfn in 0x40..0x44 {
        fill_page(&d, pfn, 0xa5);
    }
    fill_page(&d, 0x80, 0xa5);
    d.select(2);
    report_chain(
        &d,
        &[(0x40 * PAGE, 4 * PAGE as u32), (0x80 * PAGE, PAGE as u32)],
    );
    let before = allocated(&file);
    d.notify();
    assert_eq!(d.used(0), (1, 0));
    assert_eq!(handle.reported_bytes(), 5 * PAGE);
    assert_eq!(before - allocated(&file), 5 * PAGE);
    assert_eq!(page_byte(&d, 0x41), 0);
    assert!(handle.stats().is_none(), "queue 2 is not the stats queue");
}

#[test]
fn reporting_follows_stats_when_both_are_accepted() {
    let Setup { mut d, handle, .. } = balloon(true, (1 << F_STATS_VQ) | (1 << F_REPORTING));
    fill_page(&d, 0x40, 0xa5);
    d.select(3);
    report_chain(&d, &[(0x40 * PAGE, PAGE as u32)]);
    d.notify();
    assert_eq!(handle.reported_bytes(), PAGE);
    d.select(2);
    let len = write_stats(&d, BUF, &[(stat_tag::FREE_MEMORY, 5)]);
    d.chain(0, &[(BUF, len, false)]);
    d.notify();
    assert_eq!(handle.stats().unwrap().get(stat_tag::FREE_MEMORY), Some(5));
}

#[test]
fn bad_report_ranges_drop_the_report() {
    let Setup { mut d, handle, .. } = balloon(true, 1 << F_REPORTING);
    fill_page(&d, 0x40, 0xa5);
    d.select(2);
    let bad: [&[(u64, u32)]; 4] = [
        &[(0x40 * PAGE, PAGE as u32), (0x41 * PAGE + 8, PAGE as u32)],
        &[(0x40 * PAGE, 100)],
        &[(0x40 * PAGE, 0)],
        &[(0x40 * PAGE, 2 * PAGE as u32), (0x41 * PAGE, PAGE as u32)],
    ];
    for (i, ranges) in bad.iter().enumerate() {
        report_chain(&d, ranges);
        d.notify();
        assert_eq!(d.used(0).0, i as u16 + 1);
    }
    assert_eq!(handle.rejected_requests(), 4);
    assert_eq!(handle.reported_bytes(), 0);
    assert_eq!(page_byte(&d, 0x40), 0xa5);
    assert!(!needs_reset(&mut d));
    // A range past guest memory is a buffer outside it, as on every device: a reset.
    report_chain(
        &d,
        &[
            (0x40 * PAGE, PAGE as u32),
            (BALLOON_RAM - PAGE, 2 * PAGE as u32),
        ],
    );
    d.notify();
    assert!(needs_reset(&mut d));
    assert_eq!(handle.reported_bytes(), 0);
    assert_eq!(page_byte(&d, 0x40), 0xa5);
}

#[test]
fn random_chains_on_every_queue_never_panic_or_free_what_they_must_not() {
    let Setup { mut d, handle, .. } = balloon(true, (1 << F_STATS_VQ) | (1 << F_REPORTING));
    fill_page(&d, 0xf0, 0xa5);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..2_000u32 {
        let q = (next() % 4) as u16;
        d.select(q);
        // PFNs and ranges mostly inside RAM, never reaching page 0xf0 (addresses past it are
        // odd, so never a range); lengths and flags anything.
        for i in 0..64 {
            let pfn = (next() % 0xe0) as u32 | if next() % 16 == 0 { 0x8000 } else { 0 };
            d.memory.write_obj(pfn, GuestAddress(BUF + 4 * i)).unwrap();
        }
        let parts: Vec<_> = (0..1 + next() % 3)
            .map(|_| {
                let addr = match next() % 3 {
                    0 => BUF,
                    1 => (next() % 0xe0) * PAGE,
                    _ => (next() % (BALLOON_RAM + 0x1000)) | 1,
                };
                (addr, (next() % 0x3000) as u32, next() % 2 == 0)
            })
            .collect();
        let head = (round % 32) as u16 * 4;
        d.chain(head, &parts);
        d.notify();
        if next() % 8 == 0 {
            handle.request_stats();
            d.transport.process_host_event();
        }
        if needs_reset(&mut d) {
            d.start_with((1 << F_STATS_VQ) | (1 << F_REPORTING));
        }
    }
    assert_eq!(page_byte(&d, 0xf0), 0xa5, "a page never named stays");
}

#[test]
fn a_queue_of_a_feature_not_accepted_is_ignored() {
    // Offered reporting, accepted nothing: queues 2 and 3 have no role.
    let Setup { mut d, handle, .. } = balloon(true, 0);
    fill_page(&d, 0x40, 0xa5);
    for q in [2, 3] {
        d.select(q);
        report_chain(&d, &[(0x40 * PAGE, PAGE as u32)]);
        d.notify();
        assert_eq!(d.used(0).0, 0);
    }
    assert_eq!(handle.reported_bytes(), 0);
    assert!(handle.stats().is_none());
    assert_eq!(page_byte(&d, 0x40), 0xa5);
}

#[test]
fn the_ram_discard_gets_each_validated_run_and_only_what_it_freed_is_counted() {
    let (memory, _file) = memfd_memory(libc::MAP_SHARED);
    let recorder = Arc::new(Recorder {
        fail_at: Some(0x50 * PAGE),
        ..Recorder::default()
    });
    let device = Balloon::new(BALLOON_RAM, false, true, recorder.clone()).unwrap();
    let handle = device.handle();
    let mut d = Driver::with_memory(Box::new(device), memory);
    d.start_with(1 << F_REPORTING);
    let len = write_pfns(&d, BUF, &[0x41, 0x40, 0x50]);
    d.chain(0, &[(BUF, len, false)]);
    d.notify();
    assert_eq!(
        *recorder.calls.lock().unwrap(),
        [(0x40 * PAGE, 2 * PAGE), (0x50 * PAGE, PAGE)]
    );
    assert_eq!(
        handle.inflated_bytes(),
        2 * PAGE,
        "the refused run is not counted"
    );
    // A rejected request discards nothing; a report hands over its ranges in address order.
    let bad = write_pfns(&d, BUF, &[0x40, (BALLOON_RAM / PAGE) as u32]);
    d.chain(1, &[(BUF, bad, false)]);
    d.notify();
    d.select(2);
    report_chain(
        &d,
        &[(0x80 * PAGE, PAGE as u32), (0x60 * PAGE, 2 * PAGE as u32)],
    );
    d.notify();
    assert_eq!(handle.rejected_requests(), 1);
    assert_eq!(handle.reported_bytes(), 3 * PAGE);
    assert_eq!(
        recorder.calls.lock().unwrap()[2..],
        [(0x60 * PAGE, 2 * PAGE), (0x80 * PAGE, PAGE)]
    );
}

#[test]
fn a_child_continues_from_the_state_and_damaged_states_are_refused() {
    let Setup { mut d, handle, .. } = balloon(true, 1 << F_STATS_VQ);
    handle.set_target_pages(0x30).unwrap();
    d.write(0x104, 0x20);
    d.select(2);
    let len = write_stats(&d, BUF, &[(stat_tag::FREE_MEMORY, 7)]);
    d.chain(0, &[(BUF, len, false)]);
    d.notify();
    let DeviceState::Balloon(state) = d.transport.freeze().unwrap().device else {
        panic!("not a balloon state");
    };
    let child = Balloon::from_state(&state, Arc::new(Recorder::default())).unwrap();
    let child_handle = child.handle();
    assert_eq!(
        child.features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << F_STATS_VQ) | (1 << F_REPORTING)
    );
    assert_eq!(
        (child_handle.target_pages(), child_handle.actual_pages()),
        (0x30, 0x20)
    );
    assert_eq!(
        child_handle.stats().unwrap().get(stat_tag::FREE_MEMORY),
        Some(7)
    );
    assert_eq!(
        child_handle.inflated_bytes(),
        0,
        "counters are the child's own"
    );
    assert_eq!(
        child.stats_head,
        Some(0),
        "the guest's stats buffer stays with the child"
    );

    let too_large = BalloonState {
        target: u32::try_from(state.ram_pages + 1).unwrap(),
        ..state.clone()
    };
    let unknown_feature = BalloonState {
        features: state.features | 1 << 40,
        ..state.clone()
    };
    for damaged in [too_large, unknown_feature] {
        let refused = Balloon::from_state(&damaged, Arc::new(Recorder::default())).err();
        assert_eq!(
            refused.map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData),
            "{damaged:?}"
        );
    }
}
