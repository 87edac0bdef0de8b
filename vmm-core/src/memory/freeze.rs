//! Freezing guest RAM at an instant, so that several VMs can continue from it (fork, restore).
//!
//! # Design
//!
//! A fresh VM's RAM is one memfd mapped `MAP_SHARED`. [`GuestRam::freeze`] (with the VM paused)
//! replaces the VM's own mappings in place — `mmap(MAP_FIXED)` at the same addresses, so KVM's
//! memory slots stay valid and only re-fault — by `MAP_PRIVATE` mappings of the same file, then
//! seals the file against writes (`F_SEAL_WRITE`, which the kernel grants only once no shared
//! writable mapping of it is left). From then on the file holds exactly the memory of the freeze
//! point: the VM itself and every VM started from the image with [`FrozenRam::map`] write into
//! private copy-on-write pages, so a write by one is never seen by another, while pages nobody
//! writes stay one page-cache page shared by all of them.
//!
//! # Costs
//!
//! - Freezing a fresh VM's RAM: one `mmap` per region (two at most) and one `fcntl`; no guest
//!   memory is read, copied or written, whatever its size.
//! - A VM from a frozen image: one `mmap` per region, and no resident memory until it touches
//!   pages: reads share the frozen page, each first write copies one 4 KiB page.
//! - Freezing RAM that is already private (a second fork of the same VM, a fork of a fork): its
//!   copy-on-write pages exist only in this VM's mappings, so they go into a new file with the
//!   image's data: the image's allocated extents (`SEEK_DATA`/`SEEK_HOLE`; holes stay holes) and
//!   then the pages the VM wrote since (anonymous pages of its mappings, found with the
//!   `PAGEMAP_SCAN` ioctl of `/proc/self/pagemap`). The image's data is copied before the VM is
//!   paused ([`GuestRam::draft_freeze`]: nobody writes the image), so the pause costs O(pages
//!   written), the copy O(data in the image); neither is O(RAM). Sharing that copy between
//!   generations (layered images) is the next step.
//! - A frozen image lives as long as any VM or [`FrozenRam`] handle uses it.
//!
//! # While frozen
//!
//! Memory the guest gives back through the balloon cannot be punched out of a sealed image (and
//! must not be: other VMs read it); the balloon drops the VM's copied pages instead
//! (`MADV_DONTNEED`), and the guest reads the image's contents there again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{GuestRam, MemoryError, RamRange, create_memfd};

/// Guest RAM frozen at one instant: a sealed memfd that nobody writes any more.
pub struct FrozenRam {
    file: Arc<File>,
    ranges: Vec<RamRange>,
}

/// Bytes copied per step when a private RAM is frozen into a new file.
const COPY_CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

impl FrozenRam {
    /// New guest RAM that starts as this image: private copy-on-write mappings of it.
    pub fn map(self: &Arc<Self>) -> Result<GuestRam, MemoryError> {
        GuestRam::map(
            self.file.clone(),
            self.ranges.clone(),
            libc::MAP_PRIVATE,
            Some(self.clone()),
        )
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// An image read from `file`, which holds `size` bytes of RAM laid out as forkvm lays out
    /// its memory file (a snapshot's memory). Nothing writes it: VMs map it privately.
    pub fn from_file(file: File, size: u64) -> Arc<Self> {
        Arc::new(Self {
            file: Arc::new(file),
            ranges: super::ram_ranges(size),
        })
    }

    /// A new memory file holding the image's data.
    fn copy_into_new_file(&self) -> Result<File, MemoryError> {
        let file = create_memfd()?;
        self.copy_data_to(&file)
            .map_err(|source| MemoryError::Freeze {
                what: "copying the image",
                source,
            })?;
        Ok(file)
    }

    /// Writes the image's data into `to` at the same offsets (holes stay holes).
    pub fn copy_data_to(&self, to: &File) -> io::Result<()> {
        to.set_len(self.size())?;
        for (start, end) in data_extents(&self.file)? {
            copy_range(&self.file, to, start, end)?;
        }
        Ok(())
    }
}

/// The part of freezing private RAM that does not need the VM paused: a new file holding the
/// data of the image the RAM maps privately (which nobody writes). [`GuestRam::freeze_from`]
/// then adds only the pages the VM wrote.
pub struct FreezeDraft {
    file: Arc<File>,
    base: Arc<FrozenRam>,
}

impl GuestRam {
    /// Freezes the RAM's current contents into an image and keeps this RAM running over it
    /// privately (see the module docs for what it costs). Every vCPU and device of the VM must be
    /// stopped (`Vm::pause`) while this runs.
    pub fn freeze(&mut self) -> Result<Arc<FrozenRam>, MemoryError> {
        self.freeze_from(None)
    }

    /// Starts a freeze while the VM still runs: for RAM that maps an image privately, copies
    /// that image's data into a new file (`None` for RAM that was never frozen, which needs no
    /// copy). Pass it to [`GuestRam::freeze_from`] with the VM paused.
    pub fn draft_freeze(&self) -> Result<Option<FreezeDraft>, MemoryError> {
        let Some(base) = self.frozen.clone() else {
            return Ok(None);
        };
        Ok(Some(FreezeDraft {
            file: Arc::new(base.copy_into_new_file()?),
            base,
        }))
    }

    /// [`GuestRam::freeze`], finishing `draft` if it was made from the image this RAM maps now.
    pub fn freeze_from(
        &mut self,
        draft: Option<FreezeDraft>,
    ) -> Result<Arc<FrozenRam>, MemoryError> {
        if let Some(image) = self.frozen.clone() {
            // This RAM's contents: the image it maps privately, then what it wrote since.
            let file = match draft {
                Some(draft) if Arc::ptr_eq(&draft.base, &image) => draft.file,
                _ => Arc::new(image.copy_into_new_file()?),
            };
            self.copy_written_pages(&file)?;
            self.file = file;
        }
        self.remap_private()?;
        seal(&self.file)?;
        let frozen = Arc::new(FrozenRam {
            file: self.file.clone(),
            ranges: self.ranges.clone(),
        });
        self.frozen = Some(frozen.clone());
        Ok(frozen)
    }

    /// Guest RAM of `size` bytes that maps no image yet (a private mapping of an empty file), for
    /// a VM created ahead of need; [`GuestRam::adopt`] maps an image into it later, in place.
    pub fn placeholder(size: u64) -> Result<Self, MemoryError> {
        Self::with_new_file(size, libc::MAP_PRIVATE)
    }

    /// Maps `image` privately into this RAM in place: the same addresses, so the memory slots
    /// of a VM created over this RAM stay valid. The image must have this RAM's layout, and no
    /// vCPU may run meanwhile.
    pub fn adopt(&mut self, image: &Arc<FrozenRam>) -> Result<(), MemoryError> {
        if image.ranges != self.ranges {
            return Err(MemoryError::Freeze {
                what: "adopting an image",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("image of {} bytes, RAM of {}", image.size(), self.size()),
                ),
            });
        }
        self.file = image.file.clone();
        self.remap_private()?;
        self.frozen = Some(image.clone());
        Ok(())
    }

    /// The image this RAM maps privately, if it was frozen or started from one.
    pub fn frozen(&self) -> Option<&Arc<FrozenRam>> {
        self.frozen.as_ref()
    }

    /// Writes into `file`, at their offsets, the pages this VM has written since it began to map
    /// its image privately (its anonymous copy-on-write pages, found through `/proc/self/pagemap`).
    fn copy_written_pages(&self, file: &File) -> Result<(), MemoryError> {
        let err = |what| move |source| MemoryError::Freeze { what, source };
        let pagemap = File::open("/proc/self/pagemap").map_err(err("opening the page map"))?;
        let mut chunk = vec![0u8; COPY_CHUNK];
        for range in &self.ranges {
            let host = self
                .memory
                .get_host_address(GuestAddress(range.guest_addr))
                .map_err(|e| err("finding a region")(io::Error::other(e.to_string())))?;
            let written = written_runs(&pagemap, host as u64, range.size)
                .map_err(err("reading the page map"))?;
            for (first, count) in written {
                for part in (first..first + count).step_by(COPY_CHUNK / PAGE) {
                    let pages = (first + count - part).min(COPY_CHUNK / PAGE);
                    let offset = (part * PAGE) as u64;
                    let bytes = &mut chunk[..pages * PAGE];
                    self.memory
                        .read_slice(bytes, GuestAddress(range.guest_addr + offset))
                        .map_err(|e| {
                            err("copying guest memory")(io::Error::other(e.to_string()))
                        })?;
                    file.write_all_at(bytes, range.file_offset + offset)
                        .map_err(err("copying guest memory"))?;
                }
            }
        }
        Ok(())
    }

    /// Replaces each region's mapping, in place, by a private mapping of `self.file`.
    fn remap_private(&self) -> Result<(), MemoryError> {
        for range in &self.ranges {
            let host = self
                .memory
                .get_host_address(GuestAddress(range.guest_addr))
                .map_err(|e| MemoryError::Freeze {
                    what: "finding a region",
                    source: io::Error::other(e.to_string()),
                })?;
            let offset =
                libc::off_t::try_from(range.file_offset).map_err(|_| MemoryError::Freeze {
                    what: "region offset",
                    source: io::Error::from(io::ErrorKind::InvalidInput),
                })?;
            // SAFETY: `host..host + range.size` is exactly one mapping that `self.memory` made
            // for this range and owns (it unmaps it on drop, whatever backs it). MAP_FIXED swaps
            // what backs it in one step, at the same address and size, so every pointer into it
            // stays valid; guest memory is only ever accessed through volatile copies, never
            // through Rust references, and the caller has stopped the vCPUs and devices. KVM's
            // memory slot keeps the address and re-faults through its MMU notifier.
            let mapped = unsafe {
                libc::mmap(
                    host.cast(),
                    range.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    self.file.as_raw_fd(),
                    offset,
                )
            };
            if mapped != host.cast() {
                return Err(MemoryError::Freeze {
                    what: "re-mapping guest memory privately",
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }
}

/// The `[start, end)` byte ranges of `file` that hold data (holes skipped).
fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let size = file.metadata()?.len();
    let seek = |offset: u64, whence| -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: lseek on an open fd has no memory effects.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        match at {
            // ENXIO: no data (or hole) at or after `offset`.
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Ok(None),
            -1 => Err(io::Error::last_os_error()),
            at => Ok(Some(at as u64)),
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        extents.push((start, end));
        at = end;
    }
    Ok(extents)
}

/// Copies bytes `start..end` of `from` to the same offsets of `to`.
fn copy_range(from: &File, to: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buffer = vec![0u8; COPY_CHUNK];
    let mut at = start;
    while at < end {
        let len = (end - at).min(COPY_CHUNK as u64) as usize;
        from.read_exact_at(&mut buffer[..len], at)?;
        to.write_all_at(&buffer[..len], at)?;
        at += len as u64;
    }
    Ok(())
}

/// The runs of pages of the mapping at `host..host + size` that this process wrote since it was
/// mapped privately (present or swapped, and not a page of the file), as (first page, count).
/// Asks the kernel for them with `PAGEMAP_SCAN` (Linux 6.7), which skips unpopulated page
/// tables instead of reading 8 bytes per page, and falls back to reading the page map.
fn written_runs(pagemap: &File, host: u64, size: u64) -> io::Result<Vec<(usize, usize)>> {
    match scan_written(pagemap, host, size) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            Ok(runs(&written_pages(pagemap, host, size)?))
        }
        result => result,
    }
}

/// `struct page_region` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` of `<linux/fs.h>`.
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

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// [`written_runs`] through the `PAGEMAP_SCAN` ioctl of the page map.
fn scan_written(pagemap: &File, host: u64, size: u64) -> io::Result<Vec<(usize, usize)>> {
    let end = host + size;
    let mut regions = vec![PageRegion::default(); 512];
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut at = host;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: at,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            // Not a page of the file, and present or swapped.
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        };
        // SAFETY: `arg` is a valid `pm_scan_arg` that names its own size; the kernel writes at
        // most `vec_len` regions into `regions`, which outlives the call, and `walk_end` into
        // `arg`. It only reads this process's page tables over `at..end`.
        let found = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        let found = usize::try_from(found).map_err(|_| io::Error::last_os_error())?;
        for region in regions.iter().take(found.min(regions.len())) {
            let first = ((region.start - host) / PAGE as u64) as usize;
            let count = ((region.end - region.start) / PAGE as u64) as usize;
            // Regions that touch but differ in category (present, swapped) make one run.
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

/// Runs of `true` in `flags`, as (first index, length).
fn runs(flags: &[bool]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if flags[i] {
            let first = i;
            while i < flags.len() && flags[i] {
                i += 1;
            }
            runs.push((first, i - first));
        } else {
            i += 1;
        }
    }
    runs
}

/// Seals `file` against any further change of contents or size.
fn seal(file: &File) -> Result<(), MemoryError> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an owned, open memfd; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(MemoryError::Freeze {
            what: "sealing the frozen memory file",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn read(ram: &GuestRam, addr: u64) -> u64 {
        ram.memory.read_obj(GuestAddress(addr)).unwrap()
    }

    fn write(ram: &GuestRam, addr: u64, value: u64) {
        ram.memory.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// Resident and anonymous (copied-on-write) kB of the mapping at guest address `addr`, from
    /// /proc/self/smaps.
    fn mapping_kb(ram: &GuestRam, addr: u64) -> (u64, u64) {
        let host = ram.memory.get_host_address(GuestAddress(addr)).unwrap() as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                continue;
            };
            if !(start..end).contains(&host) {
                continue;
            }
            let mut rss = 0;
            let mut anon = 0;
            for field in lines.by_ref() {
                let value = || {
                    field
                        .split_whitespace()
                        .nth(1)
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                };
                if field.starts_with("Rss:") {
                    rss = value();
                } else if field.starts_with("Anonymous:") {
                    anon = value();
                } else if field.starts_with("VmFlags:") {
                    return (rss, anon);
                }
            }
        }
        panic!("no mapping holds {host:#x}");
    }

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
    fn the_image_is_sealed_against_writes() {
        let mut ram = GuestRam::new(2 * MIB).unwrap();
        ram.freeze().unwrap();
        let err = ram.file.write_all_at(&[1], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert!(ram.file.set_len(4 * MIB).is_err(), "the image cannot grow");
    }

    #[test]
    fn a_new_vm_from_an_image_holds_no_memory_until_it_writes() {
        let mut parent = GuestRam::new(8 * MIB).unwrap();
        for page in 0..256 {
            write(&parent, page * 4096, page + 1);
        }
        let image = parent.freeze().unwrap();
        let child = image.map().unwrap();
        assert_eq!(
            mapping_kb(&child, 0),
            (0, 0),
            "nothing resident before it runs"
        );
        for page in 0..256 {
            assert_eq!(read(&child, page * 4096), page + 1);
        }
        let (_, anon) = mapping_kb(&child, 0);
        assert_eq!(anon, 0, "reads share the image's pages");
        for page in 0..3 {
            write(&child, page * 4096, 0);
        }
        assert_eq!(
            mapping_kb(&child, 0).1,
            12,
            "each first write copies one page"
        );
        assert_eq!(
            mapping_kb(&parent, 0).1,
            0,
            "the frozen parent copied nothing"
        );
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
        assert!(ram.draft_freeze().unwrap().is_none(), "nothing to copy");
        write(&ram, 0x1000, 1);
        ram.freeze().unwrap();
        write(&ram, 0x2000, 2);
        let draft = ram.draft_freeze().unwrap();
        // Written while the VM still ran, after the draft.
        write(&ram, 0x3000, 3);
        let second = ram.freeze_from(draft).unwrap();
        let m = second.map().unwrap();
        assert_eq!(
            [read(&m, 0x1000), read(&m, 0x2000), read(&m, 0x3000)],
            [1, 2, 3]
        );

        // A draft of an image the RAM no longer maps is not used.
        let stale = ram.draft_freeze().unwrap();
        write(&ram, 0x4000, 4);
        ram.freeze().unwrap();
        write(&ram, 0x5000, 5);
        let third = ram.freeze_from(stale).unwrap();
        let m = third.map().unwrap();
        assert_eq!([read(&m, 0x4000), read(&m, 0x5000)], [4, 5]);
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

    #[test]
    fn placeholder_ram_adopts_an_image_in_place() {
        let mut parent = GuestRam::new(4 * MIB).unwrap();
        write(&parent, 0x1000, 5);
        let image = parent.freeze().unwrap();
        let mut shell = GuestRam::placeholder(4 * MIB).unwrap();
        let before = shell.memory.get_host_address(GuestAddress(0)).unwrap();
        assert_eq!(read(&shell, 0x1000), 0);
        shell.adopt(&image).unwrap();
        assert_eq!(
            shell.memory.get_host_address(GuestAddress(0)).unwrap(),
            before
        );
        assert_eq!(read(&shell, 0x1000), 5);
        write(&shell, 0x1000, 6);
        assert_eq!(
            read(&image.map().unwrap(), 0x1000),
            5,
            "adopting RAM writes privately"
        );
        let mut small = GuestRam::placeholder(2 * MIB).unwrap();
        assert!(small.adopt(&image).is_err(), "layouts must match");
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
}
