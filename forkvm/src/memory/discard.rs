//! Giving the host memory behind guest RAM back, for the VM's balloon: the [`RamDiscard`] of one
//! [`GuestRam`], which frees pages of that RAM and nothing else, and counts the drops of copied
//! pages from that RAM mapped privately over a frozen image, which a freeze of that RAM must
//! know about (see [`GuestRam::private_discards`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use forkvm_devices::virtio::balloon::RamDiscard;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{GuestMemoryMmap, GuestRam, PAGE};

/// Frees the host memory behind ranges of one VM's guest RAM (see [`GuestRam::discarder`]).
struct RamDiscarder {
    /// The RAM's regions (re-mapped in place by freezes, so these stay its mappings).
    memory: GuestMemoryMmap,
    /// The RAM's count of drops from private mappings.
    private_discards: Arc<AtomicU64>,
}

impl GuestRam {
    /// What the VM's balloon frees pages of this RAM with: `len` bytes at a guest address, in
    /// whole pages inside one region. Shared RAM has the pages punched out of its file (it reads
    /// zeros there afterwards); RAM mapped privately over a frozen image drops the pages it copied
    /// (it reads the image's contents there again), and that is counted in
    /// [`GuestRam::private_discards`].
    pub fn discarder(&self) -> Arc<dyn RamDiscard> {
        Arc::new(RamDiscarder {
            memory: self.memory.clone(),
            private_discards: self.private_discards.clone(),
        })
    }

    /// How many times pages this RAM copied from its frozen image were dropped (through
    /// [`GuestRam::discarder`]), after which it reads the image's contents there again. A freeze
    /// that copied pages from this RAM re-checks them when this changed meanwhile; discards in
    /// other VMs' RAM do not count.
    pub(super) fn private_discards(&self) -> u64 {
        self.private_discards.load(Ordering::SeqCst)
    }
}

impl RamDiscard for RamDiscarder {
    fn discard(&self, addr: u64, len: u64) -> io::Result<()> {
        let page = PAGE as u64;
        if !addr.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr:#x}+{len:#x} is not whole pages"),
            ));
        }
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        // Fails unless the whole range lies in one region.
        let slice = self
            .memory
            .get_slice(GuestAddress(addr), len)
            .map_err(io::Error::other)?;
        let guard = slice.ptr_guard_mut();
        let advise = |advice| {
            // SAFETY: the pointer and length describe `len` bytes (whole pages, page-aligned as
            // the region's mapping is) of one live mapping of guest memory, which `self.memory`
            // keeps mapped for the duration of the call. Both advices free the pages backing it
            // and leave the mapping in place; guest memory is only ever accessed through volatile
            // accesses that expect its contents to change.
            if unsafe { libc::madvise(guard.as_ptr().cast(), len, advice) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // A shared mapping (a VM's own memfd) has its pages punched out (later reads see zeros).
        // A private one (RAM over a frozen image, see `freeze`) refuses that with EACCES — the
        // image must not change, other VMs read it — and drops its copied pages instead, falling
        // back to the image's contents.
        match advise(libc::MADV_REMOVE) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                let dropped = advise(libc::MADV_DONTNEED);
                // Counted after the pages are gone: a freeze that read the count before it copied
                // them sees it change.
                self.private_discards.fetch_add(1, Ordering::SeqCst);
                dropped
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::testutil::{MIB, read, write};

    #[test]
    fn shared_ram_reads_zeros_after_a_discard_and_counts_nothing() {
        let ram = GuestRam::new(4 * MIB).unwrap();
        for page in 1..4 {
            write(&ram, page * 4096, page);
        }
        let before = ram.allocated_bytes().unwrap();
        ram.discarder().discard(0x1000, 0x2000).unwrap();
        // (Before reading: a read of a hole of the memfd allocates a page.)
        assert_eq!(before - ram.allocated_bytes().unwrap(), 0x2000);
        assert_eq!([0x1000, 0x2000, 0x3000].map(|a| read(&ram, a)), [0, 0, 3]);
        assert_eq!(ram.private_discards(), 0);
    }

    #[test]
    fn a_discard_in_one_vm_s_ram_counts_in_that_ram_only() {
        let mut a = GuestRam::new(4 * MIB).unwrap();
        let mut b = GuestRam::new(4 * MIB).unwrap();
        for ram in [&a, &b] {
            write(ram, 0x1000, 1);
        }
        a.freeze().unwrap();
        b.freeze().unwrap();
        for ram in [&a, &b] {
            write(ram, 0x1000, 2);
        }
        a.discarder().discard(0x1000, 0x1000).unwrap();
        assert_eq!(read(&a, 0x1000), 1, "the image's page again");
        assert_eq!(a.private_discards(), 1);
        assert_eq!(
            b.private_discards(),
            0,
            "another VM's balloon forces no re-scan here"
        );
        assert_eq!(read(&b, 0x1000), 2);
        // A child of `a`'s image counts for itself too.
        let child = a.frozen().unwrap().map().unwrap();
        write(&child, 0x2000, 3);
        child.discarder().discard(0x2000, 0x1000).unwrap();
        assert_eq!(
            [
                a.private_discards(),
                b.private_discards(),
                child.private_discards()
            ],
            [1, 0, 1]
        );
    }

    #[test]
    fn ranges_that_are_not_whole_pages_of_one_region_are_refused() {
        let ram = GuestRam::new(crate::layout::MMIO_HOLE_START + MIB).unwrap();
        write(&ram, 0x1000, 1);
        let discard = ram.discarder();
        let hole = crate::layout::MMIO_HOLE_START;
        for (addr, len) in [
            (0x1001, 0x1000),
            (0x1000, 0x800),
            (hole - 0x1000, 0x2000),
            (hole, 0x1000),
            (!0xfff, 0x1000),
        ] {
            assert!(discard.discard(addr, len).is_err(), "{addr:#x}+{len:#x}");
        }
        assert_eq!(read(&ram, 0x1000), 1);
    }
}
