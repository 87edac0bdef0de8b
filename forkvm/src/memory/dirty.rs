//! Which pages of guest RAM were written since a point in time, without stopping the VM:
//! userfaultfd write-protection in asynchronous mode, read back with `PAGEMAP_SCAN`.
//!
//! A [`WriteTracker`] registers guest RAM's mappings with a userfaultfd in write-protect mode
//! with `UFFD_FEATURE_WP_ASYNC` (Linux 6.7): a write to a protected page is resolved by the
//! kernel itself — no thread handles faults — by clearing the page's protection, and the
//! `PAGEMAP_SCAN` ioctl reports pages without protection as `PAGE_IS_WRITTEN`. With
//! `PM_SCAN_WP_MATCHING` one scan reports those pages and protects them again, atomically per
//! page, so a page written after the scan read it is reported by the next scan. Writes by KVM
//! are tracked as well: protecting a page invalidates KVM's mapping of it (MMU notifiers), so
//! the guest's next write to it faults through the host's page tables.
//!
//! Only pages that exist are protected. An empty entry (a page never touched since the mapping
//! was made, or dropped) needs no protection: it reads the mapped file, and a write there makes a
//! new page without protection, which the next scan reports. So no uffd-wp markers are asked for
//! (`UFFD_FEATURE_WP_UNPOPULATED`), and scans match only pages that exist: protecting holes would
//! populate the page tables of the whole RAM with markers, and every later scan and the unmap at
//! the next freeze would walk all of them (`docs/design/memory-freeze.md` has what that cost on
//! the development host).
//!
//! A scan that protects makes KVM drop its mappings of the whole range it covers (one MMU
//! notifier invalidation, whose cost on a shadow-paging host grows with the range, not with
//! the pages in it: 0.26 ms for 4 GiB on the development host). So the windows that hold pages
//! are found first by a scan that protects nothing (it invalidates nothing and skips
//! unpopulated page tables), and only they are scanned with protection. A page made in a
//! hole between the two scans is not protected: it is reported as written by the next scan.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::PAGE;
use super::pagemap::{
    PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING, Scan, is_own_page, scan_runs,
};

/// `UFFD_API` of `<linux/userfaultfd.h>`.
const UFFD_API: u64 = 0xaa;
/// `UFFDIO` of `<linux/userfaultfd.h>`: the type of its ioctls.
const UFFDIO: u32 = 0xaa;
// `UFFDIO_API`: `_IOWR(UFFDIO, 0x3f, struct uffdio_api)` (a function: the macro makes one).
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
// `UFFDIO_REGISTER`: `_IOWR(UFFDIO, 0x00, struct uffdio_register)`.
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// Runs of existing pages closer than this many pages (2 MiB) are scanned with protection as
/// one window: each scan has a fixed cost, and the gap it covers costs little.
const WINDOW_GAP: usize = 512;

/// `struct uffdio_api`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// A userfaultfd in asynchronous write-protect mode, and the page map that reads it back.
pub(super) struct WriteTracker {
    uffd: OwnedFd,
    pagemap: File,
}

impl WriteTracker {
    /// A new tracker, or an error if this kernel (or its configuration: userfaultfd may be
    /// restricted to privileged users) does not offer asynchronous write-protection.
    pub(super) fn new() -> io::Result<Self> {
        // SAFETY: userfaultfd takes only flags and returns a new file descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        let fd = i32::try_from(fd).map_err(|_| io::Error::last_os_error())?;
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by userfaultfd and is owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
        let wanted = UFFD_FEATURE_WP_ASYNC;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is and which
        // outlives the call.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API(), &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if api.features & wanted != wanted {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no asynchronous userfaultfd write-protection",
            ));
        }
        Ok(Self {
            uffd,
            pagemap: File::open("/proc/self/pagemap")?,
        })
    }

    /// Registers the mapping at `host..host + size` (whole pages of one mapping) and
    /// write-protects every page of it that exists; returns the runs of pages (first page, count
    /// from `host`) that the mapping holds as its own (copy-on-write) pages, each reported as it
    /// was protected (atomically, so a write after that is reported later). From then on
    /// [`WriteTracker::written`] reports the pages written since.
    pub(super) fn start(&self, host: u64, size: u64) -> io::Result<Vec<(usize, usize)>> {
        let mut register = UffdioRegister {
            range: UffdioRange {
                start: host,
                len: size,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`, which
        // `register` is and which outlives the call. It changes only how the kernel handles
        // write faults in the range: with WP_ASYNC it resolves them itself, so every access to
        // the memory behaves as before.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER(), &mut register) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let scan = Scan {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_inverted: 0,
            category_mask: 0,
            // Pages that exist: not holes, which would get markers.
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE,
            keep: is_own_page,
        };
        self.scan_populated(host, size, &scan)
    }

    /// The runs of pages of `host..host + size` (a range [`WriteTracker::start`]ed) that the
    /// mapping holds as its own pages and that were written since they were last protected, as
    /// (first page, count) from `host`; protects every written page again in the same step, page
    /// by page under the page table lock, so a write after a page was reported is reported by the
    /// next call. (Pages of the file that were only read are protected, not reported.)
    ///
    /// Protecting makes KVM drop its mappings of the windows of the range that hold pages: with
    /// the VM paused, use [`WriteTracker::written_since_scan`].
    pub(super) fn written(&self, host: u64, size: u64) -> io::Result<Vec<(usize, usize)>> {
        let scan = Scan {
            flags: PM_SCAN_CHECK_WPASYNC | PM_SCAN_WP_MATCHING,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            // Pages that exist. Without it, holes would match (nothing protects them) and get
            // uffd-wp markers, and the kernel's fast path for PAGE_IS_WRITTEN alone would
            // report every empty entry of a page table as written.
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_FILE,
            keep: is_own_page,
        };
        self.scan_populated(host, size, &scan)
    }

    /// `scan` (one that protects) of the windows of `host..host + size` that hold pages, found
    /// by a scan that protects nothing; its runs as (first page, count) from `host`.
    fn scan_populated(&self, host: u64, size: u64, scan: &Scan) -> io::Result<Vec<(usize, usize)>> {
        let span = crate::phases::span("tracker.windows");
        let existing = Scan {
            flags: PM_SCAN_CHECK_WPASYNC,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            keep: |_| true,
        };
        let windows = windows(
            &scan_runs(&self.pagemap, host, size, &existing)?,
            WINDOW_GAP,
        );
        drop(span);
        crate::phases::count("tracker.window_runs", windows.len() as u64);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (first, count) in windows {
            let start = host + (first * PAGE) as u64;
            for (f, c) in scan_runs(&self.pagemap, start, (count * PAGE) as u64, scan)? {
                let f = f + first;
                match runs.last_mut() {
                    Some((rf, rc)) if *rf + *rc == f => *rc += c,
                    _ => runs.push((f, c)),
                }
            }
        }
        Ok(runs)
    }

    /// The runs of pages of `host..host + size` (a range [`WriteTracker::start`]ed) that exist and
    /// were written since they were last protected, protecting nothing: for a paused VM. Pages of
    /// the mapped file read since are reported too: telling them apart from the RAM's own reads
    /// each page's `struct page`, which costs several times as much per page of the range, and
    /// copying one of them copies what the RAM reads there.
    pub(super) fn written_since_scan(
        &self,
        host: u64,
        size: u64,
    ) -> io::Result<Vec<(usize, usize)>> {
        let scan = Scan {
            flags: PM_SCAN_CHECK_WPASYNC,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_WRITTEN,
            keep: |_| true,
        };
        scan_runs(&self.pagemap, host, size, &scan)
    }
}

/// `runs` (sorted, disjoint) joined where fewer than `gap` pages lie between them.
fn windows(runs: &[(usize, usize)], gap: usize) -> Vec<(usize, usize)> {
    let mut windows: Vec<(usize, usize)> = Vec::new();
    for &(first, count) in runs {
        match windows.last_mut() {
            Some((wf, wc)) if first - (*wf + *wc) < gap => *wc = first + count - *wf,
            _ => windows.push((first, count)),
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_closer_than_the_gap_make_one_window() {
        let runs = [(0, 1), (3, 2), (600, 4), (1200, 1), (1711, 1)];
        assert_eq!(windows(&runs, 512), [(0, 5), (600, 4), (1200, 512)]);
        assert_eq!(
            windows(&runs, 1),
            [(0, 1), (3, 2), (600, 4), (1200, 1), (1711, 1)]
        );
        assert_eq!(windows(&[], 512), []);
    }

    #[test]
    fn the_ioctl_numbers_are_the_ones_computed_by_hand_before() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
    }
}
