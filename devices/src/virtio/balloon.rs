//! virtio-balloon (type 5): the guest gives pages back to the host on request (inflate), takes
//! them again (deflate), reports its memory statistics, and reports ranges of free memory that
//! the host may reclaim (free page reporting).
//!
//! Guest RAM is a memfd mapped `MAP_SHARED`, so `madvise(MADV_REMOVE)` over the pages the guest
//! gave up frees their backing memory; the guest reads zeros if it touches them again. The host
//! drives the device through a [`BalloonHandle`]: it sets the target size, reads what the guest
//! reports, and asks for fresh statistics; those requests reach the device on the VM's event loop
//! through the eventfd of [`VirtioDevice::host_event`].
//!
//! Nothing the guest sends can make the host loop without bound or allocate without bound: a PFN
//! chain holds at most [`MAX_PFNS_PER_CHAIN`] entries, a report at most [`MAX_REPORT_RANGES`]
//! ranges and a statistics buffer at most [`MAX_STATS`] entries are read. A malformed request
//! (a PFN outside guest RAM, a length that is not whole PFNs, an unaligned or overlapping range)
//! is dropped whole: nothing of it is discarded, and the handle counts it in
//! [`BalloonHandle::rejected_requests`]. Buffers outside guest memory are the transport's
//! business: the device needs a reset, as with every device.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    DeviceError, DeviceState, GuestMemoryMmap, INT_CONFIG, INT_USED_RING, Interrupt,
    VIRTIO_F_VERSION_1, VirtioDevice, serve_queue,
};

/// Virtio device type of the memory balloon.
pub const BALLOON_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// Feature bit: the driver posts memory statistics on a stats queue.
pub const F_STATS_VQ: u32 = 1;
/// Feature bit: the guest may deflate the balloon when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: the guest reports free page ranges on a reporting queue.
pub const F_REPORTING: u32 = 5;
/// Size of the pages a PFN counts (`VIRTIO_BALLOON_PFN_SHIFT` = 12), whatever the guest's.
pub const PAGE_SIZE: u64 = 1 << 12;
/// Pages in a MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// Most PFNs read from one inflate or deflate chain (Linux sends at most 256).
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most ranges read from one free page report (Linux sends at most 32).
pub const MAX_REPORT_RANGES: usize = 256;
/// Most statistics entries read from one stats buffer (Linux 6.x knows 16 tags).
pub const MAX_STATS: usize = 64;

const QUEUE_SIZE: u16 = 256;
/// One statistics entry: le16 tag, le64 value, packed.
const STAT_ENTRY_SIZE: usize = 10;
/// Config space: le32 `num_pages` (the host's target), le32 `actual` (the guest's balloon).
const CONFIG_SIZE: usize = 8;
const ACTUAL_OFFSET: u64 = 4;

/// Host requests waiting for the event loop.
const PENDING_TARGET: u32 = 1 << 0;
const PENDING_STATS: u32 = 1 << 1;

/// Tags of the statistics a Linux guest reports (virtio 1.2 §5.5.6.3).
pub mod stat_tag {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJOR_FAULTS: u16 = 2;
    /// Minor page faults.
    pub const MINOR_FAULTS: u16 = 3;
    /// Free memory in bytes.
    pub const FREE_MEMORY: u16 = 4;
    /// Total memory in bytes.
    pub const TOTAL_MEMORY: u16 = 5;
    /// Available memory in bytes (as the guest's `MemAvailable`).
    pub const AVAILABLE_MEMORY: u16 = 6;
    /// Disk caches in bytes.
    pub const DISK_CACHES: u16 = 7;
    /// Successful hugetlb page allocations.
    pub const HUGETLB_ALLOCATIONS: u16 = 8;
    /// Failed hugetlb page allocations.
    pub const HUGETLB_FAILURES: u16 = 9;
}

/// Errors of the host's balloon requests.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BalloonError {
    /// The target is larger than the guest's RAM.
    #[error("a balloon of {requested} pages does not fit in the guest's {max} pages of RAM")]
    TargetTooLarge {
        /// Requested target in 4 KiB pages.
        requested: u64,
        /// Guest RAM in 4 KiB pages.
        max: u64,
    },
}

/// Memory statistics the guest reported, as (tag, value) pairs in the guest's order.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonStats {
    entries: Vec<(u16, u64)>,
}

impl BalloonStats {
    /// The value reported for `tag` (see [`stat_tag`]); the last one wins if repeated.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| *v)
    }

    /// Every reported entry.
    pub fn entries(&self) -> &[(u16, u64)] {
        &self.entries
    }
}

/// State shared by the device and its handles.
struct Shared {
    ram_pages: u64,
    target: AtomicU32,
    actual: AtomicU32,
    stats: Mutex<Option<BalloonStats>>,
    stats_updates: AtomicU64,
    inflated: AtomicU64,
    deflated: AtomicU64,
    reported: AtomicU64,
    rejected: AtomicU64,
    pending: AtomicU32,
    event: EventFd,
}

impl Shared {
    fn request(&self, what: u32) {
        self.pending.fetch_or(what, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            log::warn!("virtio-balloon: cannot signal the device: {e}");
        }
    }

    fn lock_stats(&self) -> MutexGuard<'_, Option<BalloonStats>> {
        crate::sync::lock(&self.stats)
    }
}

/// The host's side of a balloon: set its target, read what the guest did. Cloneable, `Send` and
/// `Sync`; requests take effect on the VM's event loop.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Asks the guest to hold `pages` 4 KiB pages in its balloon (0 deflates it completely).
    pub fn set_target_pages(&self, pages: u64) -> Result<(), BalloonError> {
        let max = self.shared.ram_pages;
        let too_large = BalloonError::TargetTooLarge {
            requested: pages,
            max,
        };
        if pages > max {
            return Err(too_large);
        }
        let pages = u32::try_from(pages).map_err(|_| too_large)?;
        self.shared.target.store(pages, Ordering::SeqCst);
        self.shared.request(PENDING_TARGET);
        Ok(())
    }

    /// Asks the guest to hold `mib` MiB in its balloon.
    pub fn set_target_mib(&self, mib: u64) -> Result<(), BalloonError> {
        self.set_target_pages(mib.saturating_mul(PAGES_PER_MIB))
    }

    /// The target the host set, in pages.
    pub fn target_pages(&self) -> u64 {
        u64::from(self.shared.target.load(Ordering::SeqCst))
    }

    /// The balloon's size as the guest last wrote it (`actual`), in pages.
    pub fn actual_pages(&self) -> u64 {
        u64::from(self.shared.actual.load(Ordering::SeqCst))
    }

    /// Asks the guest for fresh statistics: the device returns the guest's stats buffer, and the
    /// guest posts it again filled in. Watch [`Self::stats_updates`] to see it arrive. Ignored
    /// while the driver is not live or has no buffer posted.
    pub fn request_stats(&self) {
        self.shared.request(PENDING_STATS);
    }

    /// The statistics the guest last posted, if any.
    pub fn stats(&self) -> Option<BalloonStats> {
        self.shared.lock_stats().clone()
    }

    /// How many statistics buffers the guest has posted.
    pub fn stats_updates(&self) -> u64 {
        self.shared.stats_updates.load(Ordering::SeqCst)
    }

    /// Bytes of guest memory given back to the host by inflating, in total.
    pub fn inflated_bytes(&self) -> u64 {
        self.shared.inflated.load(Ordering::SeqCst)
    }

    /// Bytes the guest took back by deflating, in total.
    pub fn deflated_bytes(&self) -> u64 {
        self.shared.deflated.load(Ordering::SeqCst)
    }

    /// Bytes of free memory the guest reported and the host reclaimed, in total.
    pub fn reported_bytes(&self) -> u64 {
        self.shared.reported.load(Ordering::SeqCst)
    }

    /// Malformed requests the device dropped.
    pub fn rejected_requests(&self) -> u64 {
        self.shared.rejected.load(Ordering::SeqCst)
    }
}

/// Why a request was dropped.
#[derive(Debug, Error)]
enum Rejected {
    #[error("{0} bytes of PFNs is more than {MAX_PFNS_PER_CHAIN} PFNs")]
    TooManyPfns(usize),
    #[error("{0} bytes is not a whole number of PFNs")]
    PartialPfn(usize),
    #[error("page {0:#x} is not guest RAM")]
    OutsideRam(u64),
    #[error("range {addr:#x}+{len:#x} is not whole pages")]
    Unaligned { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not guest RAM")]
    RangeOutsideRam { addr: u64, len: u64 },
    #[error("range at {0:#x} overlaps another one of the report")]
    Overlapping(u64),
    #[error("more than {MAX_REPORT_RANGES} ranges in one report")]
    TooManyRanges,
}

/// What a queue is for; its index depends on the features the driver accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueueRole {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The queues in index order for the driver's `features` (virtio 1.2 §5.5.2: queues of features
/// not negotiated take no index).
fn queue_roles(features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if features & (1 << F_STATS_VQ) != 0 {
        roles.push(QueueRole::Stats);
    }
    if features & (1 << F_REPORTING) != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles
}

/// A balloon at a fork: what it offers, its target and size, the statistics it holds and the
/// statistics buffer the guest left with it. Each child gets its own handle and counters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    ram_pages: u64,
    features: u64,
    target: u32,
    actual: u32,
    stats: Option<BalloonStats>,
    stats_head: Option<u16>,
}

/// The balloon device.
pub struct Balloon {
    shared: Arc<Shared>,
    features: u64,
    queue_sizes: Vec<u16>,
    roles: Vec<QueueRole>,
    /// The stats buffer the driver posted, held until the host wants fresh statistics.
    stats_head: Option<u16>,
    bytes: Vec<u8>,
    pfns: Vec<u64>,
    /// Validated page runs or ranges: (guest address, length).
    ranges: Vec<(u64, usize)>,
}

impl Balloon {
    /// A balloon for a guest with `ram_bytes` of RAM, offering statistics, deflate-on-OOM if
    /// `deflate_on_oom`, and free page reporting if `free_page_reporting`.
    pub fn new(
        ram_bytes: u64,
        deflate_on_oom: bool,
        free_page_reporting: bool,
    ) -> io::Result<Self> {
        let mut features = (1 << VIRTIO_F_VERSION_1) | (1 << F_STATS_VQ);
        if deflate_on_oom {
            features |= 1 << F_DEFLATE_ON_OOM;
        }
        if free_page_reporting {
            features |= 1 << F_REPORTING;
        }
        Self::with_features(ram_bytes / PAGE_SIZE, features)
    }

    /// A forked child's balloon, continuing from `state` (the transport tells it the features
    /// the driver accepted). A state no balloon could have been in (read back from a damaged
    /// snapshot) is refused.
    pub fn from_state(state: &BalloonState) -> io::Result<Self> {
        let known = (1 << VIRTIO_F_VERSION_1)
            | (1 << F_STATS_VQ)
            | (1 << F_DEFLATE_ON_OOM)
            | (1 << F_REPORTING);
        if state.features & !known != 0 || u64::from(state.target) > state.ram_pages {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "balloon state with features {:#x} and target {} of {} pages",
                    state.features, state.target, state.ram_pages
                ),
            ));
        }
        let mut balloon = Self::with_features(state.ram_pages, state.features)?;
        balloon.shared.target.store(state.target, Ordering::SeqCst);
        balloon.shared.actual.store(state.actual, Ordering::SeqCst);
        *balloon.shared.lock_stats() = state.stats.clone();
        balloon.stats_head = state.stats_head;
        Ok(balloon)
    }

    fn with_features(ram_pages: u64, features: u64) -> io::Result<Self> {
        let shared = Shared {
            ram_pages,
            target: AtomicU32::new(0),
            actual: AtomicU32::new(0),
            stats: Mutex::new(None),
            stats_updates: AtomicU64::new(0),
            inflated: AtomicU64::new(0),
            deflated: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            pending: AtomicU32::new(0),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        };
        Ok(Self {
            shared: Arc::new(shared),
            features,
            queue_sizes: vec![QUEUE_SIZE; queue_roles(features).len()],
            roles: queue_roles(0),
            stats_head: None,
            bytes: Vec::new(),
            pfns: Vec::new(),
            ranges: Vec::new(),
        })
    }

    /// The host's handle to this balloon.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0; CONFIG_SIZE];
        config[..4].copy_from_slice(&self.shared.target.load(Ordering::SeqCst).to_le_bytes());
        config[4..].copy_from_slice(&self.shared.actual.load(Ordering::SeqCst).to_le_bytes());
        config
    }

    fn reject(&self, why: Rejected) {
        log::warn!("virtio-balloon: request dropped: {why}");
        self.shared.rejected.fetch_add(1, Ordering::SeqCst);
    }

    /// Reads the PFNs of an inflate or deflate chain and turns them into validated runs of
    /// contiguous pages in `self.ranges`, each inside one memory region.
    fn read_page_runs(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<Result<(), Rejected>, DeviceError> {
        let mut reader = chain.reader(memory)?;
        let len = reader.available_bytes();
        if len > MAX_PFNS_PER_CHAIN * 4 {
            return Ok(Err(Rejected::TooManyPfns(len)));
        }
        if len % 4 != 0 {
            return Ok(Err(Rejected::PartialPfn(len)));
        }
        self.bytes.resize(len, 0);
        reader.read_exact(&mut self.bytes)?;
        self.pfns.clear();
        self.pfns.extend(
            self.bytes
                .chunks_exact(4)
                .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        );
        self.pfns.sort_unstable();
        self.pfns.dedup();
        Ok(page_runs(&self.pfns, memory, &mut self.ranges))
    }

    /// Reads the ranges of a free page report into `self.ranges`.
    fn read_report(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<(), Rejected> {
        self.ranges.clear();
        for desc in chain.take(MAX_REPORT_RANGES + 1) {
            if self.ranges.len() == MAX_REPORT_RANGES {
                return Err(Rejected::TooManyRanges);
            }
            let (addr, len) = (desc.addr().0, u64::from(desc.len()));
            if len == 0 || addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(Rejected::Unaligned { addr, len });
            }
            // `len` came from a u32.
            let len = len as usize;
            if memory.get_slice(GuestAddress(addr), len).is_err() {
                return Err(Rejected::RangeOutsideRam {
                    addr,
                    len: len as u64,
                });
            }
            self.ranges.push((addr, len));
        }
        // Overlapping ranges would be counted twice.
        self.ranges.sort_unstable();
        match self
            .ranges
            .windows(2)
            .find(|w| w[0].0 + w[0].1 as u64 > w[1].0)
        {
            Some(w) => Err(Rejected::Overlapping(w[1].0)),
            None => Ok(()),
        }
    }

    /// Frees the host memory behind `self.ranges`; returns the bytes freed.
    fn discard_ranges(&self, memory: &GuestMemoryMmap) -> u64 {
        let mut freed = 0;
        for (addr, len) in &self.ranges {
            match discard(memory, *addr, *len) {
                Ok(()) => freed += *len as u64,
                Err(e) => log::warn!("virtio-balloon: cannot free {addr:#x}+{len:#x}: {e}"),
            }
        }
        freed
    }

    fn inflate_or_deflate(
        &mut self,
        inflate: bool,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<u32, DeviceError> {
        if let Err(why) = self.read_page_runs(chain, memory)? {
            self.reject(why);
        } else if inflate {
            let freed = self.discard_ranges(memory);
            self.shared.inflated.fetch_add(freed, Ordering::SeqCst);
        } else {
            let bytes = self.pfns.len() as u64 * PAGE_SIZE;
            self.shared.deflated.fetch_add(bytes, Ordering::SeqCst);
        }
        Ok(0)
    }

    fn report(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        memory: &GuestMemoryMmap,
    ) -> Result<u32, DeviceError> {
        match self.read_report(chain, memory) {
            Err(why) => self.reject(why),
            Ok(()) => {
                let freed = self.discard_ranges(memory);
                self.shared.reported.fetch_add(freed, Ordering::SeqCst);
            }
        }
        Ok(0)
    }

    /// Takes the stats buffers the driver posted: parses each and holds the last one.
    fn take_stats(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let mut returned = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let mut reader = chain.reader(memory)?;
            let count = (reader.available_bytes() / STAT_ENTRY_SIZE).min(MAX_STATS);
            self.bytes.resize(count * STAT_ENTRY_SIZE, 0);
            reader.read_exact(&mut self.bytes)?;
            let entries = self
                .bytes
                .chunks_exact(STAT_ENTRY_SIZE)
                .map(|e| {
                    let tag = u16::from_le_bytes([e[0], e[1]]);
                    let mut value = [0; 8];
                    value.copy_from_slice(&e[2..]);
                    (tag, u64::from_le_bytes(value))
                })
                .collect();
            *self.shared.lock_stats() = Some(BalloonStats { entries });
            self.shared.stats_updates.fetch_add(1, Ordering::SeqCst);
            // A driver keeps one buffer posted; an older one still held goes back to it.
            if let Some(old) = self.stats_head.replace(head) {
                queue.add_used(memory, old, 0)?;
                returned = true;
            }
        }
        if returned && queue.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        Ok(())
    }

    /// Gives the held stats buffer back, so the driver refills and posts it again.
    fn return_stats(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let Some(index) = self.roles.iter().position(|r| *r == QueueRole::Stats) else {
            return Ok(());
        };
        let Some(queue) = queues.get_mut(index).filter(|q| q.ready()) else {
            return Ok(());
        };
        if let Some(head) = self.stats_head.take() {
            queue.add_used(memory, head, 0)?;
            if queue.needs_notification(memory)? {
                interrupt.raise(INT_USED_RING);
            }
        }
        Ok(())
    }
}

/// Turns sorted, distinct `pfns` into runs of contiguous pages in `runs`, each inside one memory
/// region; fails on the first page that is not guest RAM.
fn page_runs(
    pfns: &[u64],
    memory: &GuestMemoryMmap,
    runs: &mut Vec<(u64, usize)>,
) -> Result<(), Rejected> {
    runs.clear();
    let page = PAGE_SIZE as usize;
    for pfn in pfns {
        let addr = pfn * PAGE_SIZE;
        if memory.get_slice(GuestAddress(addr), page).is_err() {
            return Err(Rejected::OutsideRam(addr));
        }
        match runs.last_mut() {
            Some((start, len))
                if *start + *len as u64 == addr
                    && memory.get_slice(GuestAddress(*start), *len + page).is_ok() =>
            {
                *len += page
            }
            _ => runs.push((addr, page)),
        }
    }
    Ok(())
}

/// Frees the host memory behind `len` bytes of guest RAM at `addr` (within one region), as the
/// balloon does with the pages its guest gives up: shared RAM reads zeros there afterwards, RAM
/// mapped privately over a frozen image reads the image's contents.
pub fn discard(memory: &GuestMemoryMmap, addr: u64, len: usize) -> io::Result<()> {
    let slice = memory
        .get_slice(GuestAddress(addr), len)
        .map_err(io::Error::other)?;
    let guard = slice.ptr_guard_mut();
    let advise = |advice| {
        // SAFETY: the pointer and length describe `len` bytes of one live mapping of guest
        // memory, which `memory` keeps mapped for the duration of the call. Both advices free
        // the pages backing it and leave the mapping in place; guest memory is only ever accessed
        // through volatile accesses that expect its contents to change.
        if unsafe { libc::madvise(guard.as_ptr().cast(), len, advice) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // A shared mapping (a VM's own memfd) has its pages punched out (later reads see zeros). A
    // private one (RAM over a frozen image, see forkvm's memory::freeze) refuses that with
    // EACCES — the image must not change, other VMs read it — and drops its copied pages
    // instead, falling back to the image's contents.
    match advise(libc::MADV_REMOVE) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            let dropped = advise(libc::MADV_DONTNEED);
            // Counted after the pages are gone: a freeze that read the count before it copied
            // them sees it change.
            PRIVATE_DISCARDS.fetch_add(1, Ordering::SeqCst);
            dropped
        }
        other => other,
    }
}

/// Drops of copied pages from privately mapped guest RAM (`MADV_DONTNEED`), by any balloon in
/// this process.
static PRIVATE_DISCARDS: AtomicU64 = AtomicU64::new(0);

/// How many times a balloon in this process has dropped copied pages from guest RAM mapped
/// privately over a frozen image, after which that RAM reads the image's contents there again.
/// A freeze that copied pages from such RAM re-checks them when this changed meanwhile.
pub fn private_discards() -> u64 {
    PRIVATE_DISCARDS.load(Ordering::SeqCst)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        BALLOON_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is writable, and only as a whole (virtio 1.2 §5.5.4).
        if let (ACTUAL_OFFSET, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.shared
                .actual
                .store(u32::from_le_bytes(bytes), Ordering::SeqCst);
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.roles = queue_roles(features);
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Balloon(BalloonState {
            ram_pages: self.shared.ram_pages,
            features: self.features,
            target: self.shared.target.load(Ordering::SeqCst),
            actual: self.shared.actual.load(Ordering::SeqCst),
            stats: self.shared.lock_stats().clone(),
            stats_head: self.stats_head,
        }))
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let (Some(role), Some(queue)) = (self.roles.get(index).copied(), queues.get_mut(index))
        else {
            // A queue of a feature the driver did not accept: nothing is read from it.
            return Ok(());
        };
        match role {
            QueueRole::Inflate | QueueRole::Deflate => {
                let inflate = role == QueueRole::Inflate;
                serve_queue(queue, memory, interrupt, |chain| {
                    self.inflate_or_deflate(inflate, chain, memory)
                })
            }
            QueueRole::Stats => self.take_stats(queue, memory, interrupt),
            QueueRole::Reporting => {
                serve_queue(queue, memory, interrupt, |chain| self.report(chain, memory))
            }
        }
    }

    fn host_event(&self) -> Option<RawFd> {
        Some(self.shared.event.as_raw_fd())
    }

    fn process_host_event(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        // Drained whatever happens; EAGAIN only means another wake-up already consumed it.
        let _ = self.shared.event.read();
        let pending = self.shared.pending.swap(0, Ordering::SeqCst);
        if queues.is_empty() {
            // Not live: the driver reads the target when it starts; a stats request lapses.
            return Ok(());
        }
        if pending & PENDING_TARGET != 0 {
            interrupt.raise(INT_CONFIG);
        }
        if pending & PENDING_STATS != 0 {
            self.return_stats(queues, memory, interrupt)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        // The guest starts over with all of its memory; the statistics stay for the host.
        self.roles = queue_roles(0);
        self.stats_head = None;
        self.shared.actual.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;

    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{Bytes, FileOffset, GuestRegionMmap};

    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::test_driver::{
        BUF, Driver, MEM_SIZE, QUEUE_STRIDE, S_NEEDS_RESET, USED, reg,
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
        let device = Balloon::new(BALLOON_RAM, false, reporting).unwrap();
        let handle = device.handle();
        let (memory, file) = memfd_memory(flags);
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
        let plain = Balloon::new(BALLOON_RAM, false, false).unwrap();
        assert_eq!(plain.device_type(), 5);
        assert_eq!(
            plain.features(),
            (1 << VIRTIO_F_VERSION_1) | (1 << F_STATS_VQ)
        );
        assert_eq!(plain.queue_max_sizes().len(), 3);
        let full = Balloon::new(BALLOON_RAM, true, true).unwrap();
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
        let device = Balloon::new(BALLOON_RAM, false, false).unwrap();
        let handle = device.handle();
        let (memory, _file) = memfd_memory(libc::MAP_SHARED);
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
        Balloon::new(BALLOON_RAM, false, false)
            .unwrap()
            .read_config(u64::MAX - 3, &mut far);
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
        let bad: [&[(u64, u32)]; 5] = [
            &[(0x40 * PAGE, PAGE as u32), (0x41 * PAGE + 8, PAGE as u32)],
            &[(0x40 * PAGE, 100)],
            &[(0x40 * PAGE, 0)],
            &[(0x40 * PAGE, 2 * PAGE as u32), (0x41 * PAGE, PAGE as u32)],
            &[
                (0x40 * PAGE, PAGE as u32),
                (BALLOON_RAM - PAGE, 2 * PAGE as u32),
            ],
        ];
        for (i, ranges) in bad.iter().enumerate() {
            report_chain(&d, ranges);
            d.notify();
            assert_eq!(d.used(0).0, i as u16 + 1);
        }
        assert_eq!(handle.rejected_requests(), 5);
        assert_eq!(handle.reported_bytes(), 0);
        assert_eq!(page_byte(&d, 0x40), 0xa5);
        assert!(!needs_reset(&mut d));
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
}
