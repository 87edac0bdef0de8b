//! Which pages of a mapping this process holds, read from its page map: the `PAGEMAP_SCAN` ioctl
//! of `/proc/self/pagemap` (Linux 6.7), which reports runs of pages by category and skips
//! unpopulated page tables, or else the page map's 8-byte entry per page.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::PAGE;
use super::runs::runs;

// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` of `<linux/fs.h>` (a function: the
// macro makes one).
vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, u32::from(b'f'), 16, PmScanArg);
/// Page categories of `PAGEMAP_SCAN` (`<linux/fs.h>`).
pub(super) const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub(super) const PAGE_IS_FILE: u64 = 1 << 2;
pub(super) const PAGE_IS_PRESENT: u64 = 1 << 3;
pub(super) const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGEMAP_SCAN` flags of `<linux/fs.h>`.
pub(super) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub(super) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// What a [`scan_runs`] asks `PAGEMAP_SCAN` for: its flags and category masks (see the kernel's
/// `Documentation/admin-guide/mm/pagemap.rst`), and which of the regions it reports to keep.
pub(super) struct Scan {
    pub flags: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
    /// Whether to keep a region with these categories (of `return_mask`).
    pub keep: fn(u64) -> bool,
}

/// The runs of pages of the mapping at `host..host + size` that `scan` reports and keeps, as
/// (first page, count) from `host`, sorted and disjoint.
pub(super) fn scan_runs(
    pagemap: &File,
    host: u64,
    size: u64,
    scan: &Scan,
) -> io::Result<Vec<(usize, usize)>> {
    let end = host + size;
    let mut regions = vec![PageRegion::default(); 512];
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut at = host;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: scan.flags,
            start: at,
            end,
            walk_end: 0,
            vec: 0,
            vec_len: 0,
            max_pages: 0,
            category_inverted: scan.category_inverted,
            category_mask: scan.category_mask,
            category_anyof_mask: scan.category_anyof_mask,
            return_mask: scan.return_mask,
        };
        let found = pagemap_scan(pagemap, &mut arg, &mut regions)?;
        for region in regions[..found]
            .iter()
            .filter(|r| (scan.keep)(r.categories))
        {
            let first = ((region.start - host) / PAGE as u64) as usize;
            let count = ((region.end - region.start) / PAGE as u64) as usize;
            // Regions that touch but differ in category make one run.
            match runs.last_mut() {
                Some((f, c)) if *f + *c == first => *c += count,
                _ => runs.push((first, count)),
            }
        }
        if arg.walk_end <= at {
            return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        at = arg.walk_end;
    }
    Ok(runs)
}

/// Whether a page in these categories is one of the RAM's own (copy-on-write) pages: present or
/// swapped, and not a page of the file. (A uffd-wp marker on an empty entry counts as swapped.)
pub(super) fn is_own_page(categories: u64) -> bool {
    categories & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) != 0 && categories & PAGE_IS_FILE == 0
}

/// The runs of pages of the mapping at `host..host + size` that this process wrote since it was
/// mapped privately (present or swapped, and not a page of the file), as (first page, count).
/// Asks the kernel for them with `PAGEMAP_SCAN` (Linux 6.7), which skips unpopulated page
/// tables instead of reading 8 bytes per page, and falls back to reading the page map.
pub(super) fn written_runs(
    pagemap: &File,
    host: u64,
    size: u64,
) -> io::Result<Vec<(usize, usize)>> {
    match scan_written(pagemap, host, size) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            Ok(runs(&written_pages(pagemap, host, size)?))
        }
        result => result,
    }
}

/// [`written_runs`] through the `PAGEMAP_SCAN` ioctl of the page map.
fn scan_written(pagemap: &File, host: u64, size: u64) -> io::Result<Vec<(usize, usize)>> {
    let scan = Scan {
        flags: 0,
        // Not a page of the file, and present or swapped.
        category_inverted: PAGE_IS_FILE,
        category_mask: PAGE_IS_FILE,
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        keep: |_| true,
    };
    scan_runs(pagemap, host, size, &scan)
}

/// The pages of the mapping at `host..host + size` that are not the RAM's own present pages:
/// not present (empty, protected empty, swapped), or pages of the file.
pub(super) fn scan_not_held(
    pagemap: &File,
    host: u64,
    size: u64,
) -> io::Result<Vec<(usize, usize)>> {
    let scan = Scan {
        flags: 0,
        category_inverted: PAGE_IS_PRESENT,
        category_mask: 0,
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_FILE,
        return_mask: PAGE_IS_PRESENT,
        keep: |_| true,
    };
    scan_runs(pagemap, host, size, &scan)
}

/// For each page of the mapping at `host..host + size`, whether this process wrote it since it
/// was mapped privately: the page is present or swapped, and not a page of the file.
fn written_pages(pagemap: &File, host: u64, size: u64) -> io::Result<Vec<bool>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let pages = (size as usize).div_ceil(PAGE);
    let mut entries = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut entries, host / PAGE as u64 * 8)?;
    Ok(entries
        .chunks_exact(8)
        .map(|entry| {
            let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            entry & (PRESENT | SWAPPED) != 0 && entry & FILE_OR_SHARED == 0
        })
        .collect())
}

/// `struct page_region` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` of `<linux/fs.h>` (`vec` and `vec_len` are set by [`pagemap_scan`]).
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// Runs the `PAGEMAP_SCAN` ioctl of `pagemap` (`/proc/self/pagemap`) with `arg`, its output
/// going to `regions`; returns how many regions it filled.
fn pagemap_scan(
    pagemap: &File,
    arg: &mut PmScanArg,
    regions: &mut [PageRegion],
) -> io::Result<usize> {
    arg.vec = regions.as_mut_ptr() as u64;
    arg.vec_len = regions.len() as u64;
    // SAFETY: `arg` is a valid `pm_scan_arg` that names its own size and whose output vector is
    // `regions`: the kernel writes at most `vec_len` regions there, and `walk_end` into `arg`,
    // both of which outlive the call. It reads (and, with PM_SCAN_WP_MATCHING, write-protects in
    // a userfaultfd-registered range, which changes no contents) only this process's page tables.
    let found = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN(), arg as *mut PmScanArg) };
    let found = usize::try_from(found).map_err(|_| io::Error::last_os_error())?;
    Ok(found.min(regions.len()))
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::memory::GuestRam;
    use crate::memory::testutil::{MIB, read, write};

    #[test]
    fn the_ioctl_number_is_the_one_computed_by_hand_before() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN(), 0xc060_6610);
    }

    #[test]
    fn the_page_map_scan_finds_exactly_the_written_pages() {
        let mut ram = GuestRam::new(8 * MIB).unwrap();
        write(&ram, 0x3000, 1); // in the image, not written since the freeze
        ram.freeze().unwrap();
        for page in [0u64, 1, 2, 7, 300, 301, 2047] {
            write(&ram, page * 4096, page + 1);
        }
        let _ = read(&ram, 0x9000); // read, not written
        let host = ram.memory.get_host_address(GuestAddress(0)).unwrap() as u64;
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let scanned = scan_written(&pagemap, host, 8 * MIB).expect("PAGEMAP_SCAN on this kernel");
        assert_eq!(scanned, [(0, 3), (7, 1), (300, 2), (2047, 1)]);
        assert_eq!(
            runs(&written_pages(&pagemap, host, 8 * MIB).unwrap()),
            scanned
        );
    }
}
