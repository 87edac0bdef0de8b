//! Re-mapping guest RAM in place: each region's mapping replaced, at the same address, by a
//! private mapping of the RAM's file ([`GuestRam::remap_private`]), and the pages a mapping held
//! moved out of the way first with `mremap(MREMAP_DONTUNMAP)` ([`MovedPages`]), to be freed later.

use std::io;
use std::os::fd::AsRawFd;

use super::{GuestRam, MemoryError};

impl GuestRam {
    /// Replaces each region's mapping, in place, by a private mapping of `self.file`. Starts a
    /// new epoch: the mappings are new, so no write tracking is set up on them.
    pub(super) fn remap_private(&mut self) -> Result<(), MemoryError> {
        self.epoch += 1;
        // One mapping per range again: an overlay's mappings go with the old ones.
        self.overlay_mappings = None;
        let hosts = self.hosts().map_err(|source| MemoryError::Freeze {
            what: "finding a region",
            source,
        })?;
        for (range, host) in self.ranges.iter().zip(hosts) {
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
                    host as *mut libc::c_void,
                    range.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    self.file.as_raw_fd(),
                    offset,
                )
            };
            if mapped != host as *mut libc::c_void {
                return Err(MemoryError::Freeze {
                    what: "re-mapping guest memory privately",
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Moves each range's pages out of its mapping ([`MovedPages`]), to be freed by
    /// [`GuestRam::release_replaced`]; where that fails, the re-map that follows frees them.
    pub(super) fn move_own_pages_out(&mut self) {
        let Ok(hosts) = self.hosts() else {
            return;
        };
        for (range, host) in self.ranges.iter().zip(hosts) {
            if let Ok(moved) = MovedPages::take(host, range.size) {
                self.moved.push(moved);
            }
        }
    }
}

/// The pages of one of guest RAM's mappings, moved to an address of their own so that a re-freeze
/// re-maps the RAM without freeing them while the VM is paused (freeing pages takes time in
/// proportion to their number); unmapped when dropped.
pub(super) struct MovedPages {
    addr: usize,
    len: usize,
}

impl MovedPages {
    /// Moves the page tables of the mapping at `host..host + size` (with the pages they map) to
    /// a new place, leaving the mapping in place, empty: it reads its file again.
    fn take(host: u64, size: u64) -> io::Result<Self> {
        const PMD: usize = 2 << 20;
        let (host, size) = (host as usize, size as usize);
        let len = size + PMD;
        // SAFETY: a new anonymous mapping at an address the kernel picks; it touches no memory
        // of ours.
        let area = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if area == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let moved = Self {
            addr: area as usize,
            len,
        };
        // At the same offset within 2 MiB as `host`, so that whole page tables can move.
        let target = moved.addr + (host % PMD + PMD - moved.addr % PMD) % PMD;
        // SAFETY: `host..host + size` is one mapping of guest RAM (see `remap_private`, whose
        // caller has stopped every user of it); DONTUNMAP leaves it mapped, so no pointer into
        // it dangles, and it reads its file where it read its own pages. `target..target + size`
        // lies within `moved`'s reservation, which nothing else uses.
        let to = unsafe {
            libc::mremap(
                host as *mut libc::c_void,
                size,
                size,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                target as *mut libc::c_void,
            )
        };
        if to == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(moved)
    }
}

impl Drop for MovedPages {
    fn drop(&mut self) {
        // SAFETY: `addr..addr + len` is the reservation `take` made and everything moved into
        // it; nothing else maps there or points into it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::memory::testutil::{MIB, mapping_kb, read, write};

    #[test]
    fn a_private_re_map_keeps_the_address_and_the_contents_and_writes_privately() {
        let mut ram = GuestRam::new(4 * MIB).unwrap();
        write(&ram, 0x1000, 1);
        let before = ram.hosts().unwrap();
        let epoch = ram.epoch;
        ram.remap_private().unwrap();
        assert_eq!(ram.hosts().unwrap(), before, "re-mapped in place");
        assert_eq!(ram.epoch, epoch + 1, "a new epoch");
        assert_eq!(read(&ram, 0x1000), 1, "the file's contents");
        write(&ram, 0x1000, 2);
        let mut word = [0u8; 8];
        ram.file.read_exact_at(&mut word, 0x1000).unwrap();
        assert_eq!(
            u64::from_le_bytes(word),
            1,
            "the file does not see the write"
        );
    }

    #[test]
    fn moved_pages_leave_the_mapping_reading_its_file_again() {
        let mut ram = GuestRam::new(4 * MIB).unwrap();
        write(&ram, 0x1000, 1);
        ram.freeze().unwrap();
        write(&ram, 0x1000, 2);
        write(&ram, 0x2000, 3);
        assert_eq!(mapping_kb(&ram, 0).1, 8, "two pages of its own");
        let host = ram.hosts().unwrap()[0];
        let moved = MovedPages::take(host, 4 * MIB).unwrap();
        assert_eq!(mapping_kb(&ram, 0), (0, 0), "its pages were moved out");
        assert_eq!(
            [read(&ram, 0x1000), read(&ram, 0x2000)],
            [1, 0],
            "the image's"
        );
        drop(moved);
        assert_eq!(read(&ram, 0x1000), 1);
    }
}
