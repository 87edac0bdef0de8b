//! Guest RAM: one memfd, mapped shared and split around the 32-bit MMIO hole.
//!
//! The memfd is the single owner of guest memory. Mapping it `MAP_SHARED` lets the VMM, devices
//! and KVM see the same pages; [`freeze`] turns it into an image several VMs continue from by
//! mapping the same file privately, which is why anonymous memory is not used.

mod adopt;
pub(crate) use adopt::{Expected, PlaceholderRam};
mod dirty;
mod discard;
pub mod freeze;
mod image;
mod layers;
mod overlay;
mod pagemap;
mod remap;
mod runs;
mod seal;
#[cfg(test)]
mod testutil;

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use pagemap::written_runs;

/// Guest memory as the VMM and devices access it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Size of a page.
pub(super) const PAGE: usize = 4096;

/// Smallest guest RAM accepted: room for the boot structures and a tiny kernel.
pub const MIN_MEMORY_MIB: u64 = 2;
/// Largest guest RAM accepted: 64 TiB, what an x86-64 guest with 4-level paging can address
/// (46 physical address bits).
pub const MAX_MEMORY_MIB: u64 = 1 << 26;

/// Errors creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("cannot create the guest memory file (memfd_create)")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file to {size} bytes")]
    Resize {
        /// Requested size.
        size: u64,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a region of the memfd failed.
    #[error("cannot map {size} bytes of guest memory at {addr:#x}")]
    Map {
        /// Guest address of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
        /// Why it failed.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A region would wrap around the guest address space.
    #[error("guest memory region at {addr:#x} of {size} bytes wraps the address space")]
    RegionOverflow {
        /// Guest address of the region.
        addr: u64,
        /// Size of the region.
        size: u64,
    },
    /// Guest RAM could not be frozen (re-mapped, copied or sealed).
    #[error("cannot freeze guest memory: {what}")]
    Freeze {
        /// The step that failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest memory file could not be inspected.
    #[error("cannot stat the guest memory file")]
    Stat(#[source] std::io::Error),
    /// The regions did not form a valid guest memory.
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// One contiguous piece of guest RAM and where it lives in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the range in the memory file.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the MMIO hole: up to 3 GiB at address 0, the rest at 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        ranges.push(RamRange {
            guest_addr: MMIO_HOLE_END,
            size: size - low,
            file_offset: low,
        });
    }
    ranges
}

/// One range of guest RAM as a KVM memory slot takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RamSlot {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host address of the range's mapping.
    pub host_addr: u64,
}

/// RAM a KVM VM can have memory slots over: a [`GuestRam`], or a [`PlaceholderRam`] that will
/// adopt an image at the same addresses.
pub(crate) trait RamSlots {
    /// One slot per range of the RAM, in guest-address order.
    fn slots(&self) -> io::Result<Vec<RamSlot>>;
}

impl RamSlots for GuestRam {
    fn slots(&self) -> io::Result<Vec<RamSlot>> {
        Ok(self
            .ranges
            .iter()
            .zip(self.hosts()?)
            .map(|(range, host_addr)| RamSlot {
                guest_addr: range.guest_addr,
                size: range.size,
                host_addr,
            })
            .collect())
    }
}

/// Guest RAM backed by one memfd.
pub struct GuestRam {
    /// The mapped regions, shared with devices.
    pub memory: GuestMemoryMmap,
    /// The ranges the regions cover, in guest-address order.
    pub ranges: Vec<RamRange>,
    /// The file behind every region.
    pub file: Arc<File>,
    /// The frozen image the regions map privately, or `None` while they map `file` shared or,
    /// with `privatized`, privately (see [`GuestRam::draft_freeze`]).
    mapped: Option<Arc<image::FrozenRam>>,
    /// The regions map their own `file` privately, not yet sealed: the draft of a first freeze
    /// re-mapped them so, and the file changes only where the RAM holds its own pages.
    privatized: bool,
    /// The image of the RAM's last freeze (the RAM goes on mapping the image it mapped before).
    latest: Option<Arc<image::FrozenRam>>,
    /// The images the last freeze replaced as `latest` or `mapped`, and the pages it moved out of
    /// the RAM's mappings, kept until [`GuestRam::release_replaced`] so that freeing them does
    /// not add to the pause.
    replaced: Vec<Arc<image::FrozenRam>>,
    moved: Vec<remap::MovedPages>,
    /// Tracking of the pages written since a draft of a freeze began (see [`freeze`]).
    tracking: freeze::Tracking,
    /// Changes whenever the regions are re-mapped or their write tracking starts again: a draft
    /// of a freeze made at another epoch cannot be finished with the pages written since.
    epoch: u64,
    /// Drops of copied pages from this RAM mapped privately, by its balloon (see
    /// [`GuestRam::discarder`]); shared with the discarders it handed out.
    private_discards: Arc<AtomicU64>,
    /// The overlay mappings this RAM holds (counted against the process's budget).
    overlay_mappings: Option<overlay::OverlayMappings>,
    /// The image of its last re-freeze, which the next may stack on (`layers.rs`).
    chain: Option<layers::Chain>,
    /// Its stacks flattened in the background.
    compaction: Arc<layers::Compaction>,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM in a new memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_new_file(size, libc::MAP_SHARED)
    }

    /// RAM of `size` bytes over a new, empty memfd mapped with `flags`.
    fn with_new_file(size: u64, flags: i32) -> Result<Self, MemoryError> {
        let file = Arc::new(create_memfd()?);
        file.set_len(size)
            .map_err(|source| MemoryError::Resize { size, source })?;
        Self::map(file, ram_ranges(size), flags, None)
    }

    /// Maps `ranges` of `file` with `flags` (`MAP_SHARED`, or `MAP_PRIVATE` over `mapped`).
    fn map(
        file: Arc<File>,
        ranges: Vec<RamRange>,
        flags: i32,
        mapped: Option<Arc<image::FrozenRam>>,
    ) -> Result<Self, MemoryError> {
        let regions = ranges
            .iter()
            .map(|r| map_file(&file, r, flags))
            .collect::<Result<Vec<_>, _>>()?;
        let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)?;
        Ok(Self {
            memory,
            ranges,
            file,
            mapped,
            privatized: false,
            latest: None,
            replaced: Vec::new(),
            moved: Vec::new(),
            tracking: freeze::Tracking::Untried,
            epoch: 0,
            private_discards: Arc::default(),
            overlay_mappings: None,
            chain: None,
            compaction: Arc::default(),
        })
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// Host memory this RAM holds on its own now, in bytes: while it maps its file shared, what
    /// the file holds (pages never touched or given back by the guest take none); once it maps a
    /// frozen image privately, the pages it copied on write (those of the image, shared with
    /// every VM that maps it, are not counted).
    pub fn allocated_bytes(&self) -> Result<u64, MemoryError> {
        let own = || -> Result<u64, MemoryError> {
            let pages = self.own_pages().map_err(MemoryError::Stat)?;
            Ok((pages * PAGE) as u64)
        };
        if self.mapped.is_none() {
            let metadata = self.file.metadata().map_err(MemoryError::Stat)?;
            // Re-mapped privately for a freeze: its own pages too.
            let own = if self.privatized { own()? } else { 0 };
            return Ok(metadata.blocks() * 512 + own);
        }
        own()
    }

    /// How many pages of its own (written since it began to map its image privately) the RAM
    /// holds, present or swapped.
    fn own_pages(&self) -> io::Result<usize> {
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut pages = 0;
        for (range, host) in self.ranges.iter().zip(self.hosts()?) {
            pages += written_runs(&pagemap, host, range.size)?
                .iter()
                .map(|&(_, count)| count)
                .sum::<usize>();
        }
        Ok(pages)
    }

    /// The host address of each range of the RAM.
    fn hosts(&self) -> io::Result<Vec<u64>> {
        self.ranges
            .iter()
            .map(|range| {
                self.memory
                    .get_host_address(GuestAddress(range.guest_addr))
                    .map(|host| host as u64)
                    .map_err(|e| io::Error::other(e.to_string()))
            })
            .collect()
    }

    /// End of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.ranges[0].size
    }
}

pub(crate) fn create_memfd() -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the call has no
    // other memory effects.
    let fd = unsafe {
        libc::memfd_create(
            c"forkvm-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn map_file(
    file: &Arc<File>,
    range: &RamRange,
    flags: i32,
) -> Result<GuestRegionMmap<()>, MemoryError> {
    let map_err = |source| MemoryError::Map {
        addr: range.guest_addr,
        size: range.size,
        source,
    };
    let region = MmapRegionBuilder::new(range.size as usize)
        .with_file_offset(FileOffset::from_arc(file.clone(), range.file_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags | libc::MAP_NORESERVE)
        .build()
        .map_err(map_err)?;
    GuestRegionMmap::new(region, GuestAddress(range.guest_addr)).ok_or(
        MemoryError::RegionOverflow {
            addr: range.guest_addr,
            size: range.size,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_ram_is_one_range_at_zero() {
        assert_eq!(
            ram_ranges(256 << 20),
            vec![RamRange {
                guest_addr: 0,
                size: 256 << 20,
                file_offset: 0
            }]
        );
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRange {
                guest_addr: 0,
                size: MMIO_HOLE_START,
                file_offset: 0
            }
        );
        assert_eq!(
            r[1],
            RamRange {
                guest_addr: MMIO_HOLE_END,
                size: (4 << 30) - MMIO_HOLE_START,
                file_offset: MMIO_HOLE_START
            }
        );
    }

    #[test]
    fn allocation_counts_touched_pages_only() {
        let ram = GuestRam::new(4 << 20).unwrap();
        assert_eq!(ram.allocated_bytes().unwrap(), 0);
        for page in 0..3u64 {
            ram.memory
                .write_obj(1u8, GuestAddress(0x10_0000 + page * 4096))
                .unwrap();
        }
        assert_eq!(ram.allocated_bytes().unwrap(), 3 * 4096);
    }

    #[test]
    fn regions_share_one_file() {
        let ram = GuestRam::new(MMIO_HOLE_START + (1 << 20)).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        ram.memory
            .write_obj(0xabcdu32, GuestAddress(MMIO_HOLE_END))
            .unwrap();
        let mut word = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut word, MMIO_HOLE_START).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xabcd);
        assert!(
            ram.memory
                .read_obj::<u8>(GuestAddress(MMIO_HOLE_START))
                .is_err(),
            "hole is not RAM"
        );
    }
}
