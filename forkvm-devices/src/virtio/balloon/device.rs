//! The balloon device: its queues (inflate, deflate, statistics, free page reporting), the
//! validation of what the guest sends on them, and the host's requests from the event loop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::handle::{BalloonHandle, BalloonStats, PENDING_STATS, PENDING_TARGET, Shared};
use super::{
    ACTUAL_OFFSET, BALLOON_DEVICE_TYPE, BalloonConfig, CONFIG_SIZE, F_DEFLATE_ON_OOM, F_REPORTING,
    F_STATS_VQ, MAX_PFNS_PER_CHAIN, MAX_REPORT_RANGES, MAX_STATS, PAGE_SIZE, QUEUE_SIZE,
    RamDiscard, STAT_ENTRY_SIZE,
};
use crate::virtio::chains::next_chain;
use crate::virtio::{
    Budget, Chain, DeviceError, DeviceState, GuestMemoryMmap, INT_CONFIG, INT_USED_RING, Interrupt,
    VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes, serve_queue,
};

/// Why a request was dropped.
#[derive(Debug, Error)]
pub(super) enum Rejected {
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
pub(super) enum QueueRole {
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

/// The balloon device.
pub struct Balloon {
    pub(super) shared: Arc<Shared>,
    pub(super) features: u64,
    pub(super) queue_sizes: Vec<u16>,
    pub(super) roles: Vec<QueueRole>,
    /// The stats buffer the driver posted, held until the host wants fresh statistics.
    pub(super) stats_head: Option<u16>,
    pub(super) bytes: Vec<u8>,
    pub(super) pfns: Vec<u64>,
    /// Validated page runs or ranges: (guest address, length).
    pub(super) ranges: Vec<(u64, usize)>,
    /// Frees the host memory behind the pages the guest gives up.
    pub(super) discard: Arc<dyn RamDiscard>,
    /// The pages in the balloon (inflated and not deflated since), one bit per page frame of
    /// guest memory, so that a page inflated again is not counted again. Sized to guest memory
    /// (one bit per 4 KiB page: 32 KiB per GiB) at the first inflation.
    pub(super) in_balloon: Vec<u64>,
}

impl Balloon {
    /// A balloon for a guest with `ram_bytes` of RAM, offering statistics, deflate-on-OOM if
    /// `deflate_on_oom`, and free page reporting if `free_page_reporting`; `discard` frees the
    /// pages its guest gives up (it must discard that guest's RAM and nothing else).
    pub fn new(
        ram_bytes: u64,
        deflate_on_oom: bool,
        free_page_reporting: bool,
        discard: Arc<dyn RamDiscard>,
    ) -> io::Result<Self> {
        let mut features = (1 << VIRTIO_F_VERSION_1) | (1 << F_STATS_VQ);
        if deflate_on_oom {
            features |= 1 << F_DEFLATE_ON_OOM;
        }
        if free_page_reporting {
            features |= 1 << F_REPORTING;
        }
        Self::with_features(ram_bytes / PAGE_SIZE, features, discard)
    }

    pub(super) fn with_features(
        ram_pages: u64,
        features: u64,
        discard: Arc<dyn RamDiscard>,
    ) -> io::Result<Self> {
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
            discard,
            in_balloon: Vec::new(),
        })
    }

    /// The host's handle to this balloon.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    /// The config space: the host's target and the guest's balloon, now.
    fn config(&self) -> BalloonConfig {
        BalloonConfig {
            num_pages: self.shared.target.load(Ordering::SeqCst).to_le(),
            actual: self.shared.actual.load(Ordering::SeqCst).to_le(),
            ..BalloonConfig::default()
        }
    }

    fn reject(&self, why: Rejected) {
        crate::ratelimit::guest_warn!("virtio-balloon: request dropped: {why}");
        self.shared.rejected.fetch_add(1, Ordering::SeqCst);
    }

    /// Reads the PFNs of an inflate or deflate chain and turns them into validated runs of
    /// contiguous pages in `self.ranges`, each inside one memory region.
    fn read_page_runs(
        &mut self,
        chain: &Chain<'_>,
        memory: &GuestMemoryMmap,
        budget: &Budget,
    ) -> Result<Result<(), Rejected>, DeviceError> {
        let len = chain.readable_len();
        if len > MAX_PFNS_PER_CHAIN * 4 {
            return Ok(Err(Rejected::TooManyPfns(len)));
        }
        if !len.is_multiple_of(4) {
            return Ok(Err(Rejected::PartialPfn(len)));
        }
        self.bytes.resize(len, 0);
        budget.charge_bytes(chain.read(memory, &mut self.bytes)?);
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
    fn read_report(&mut self, chain: &Chain<'_>, memory: &GuestMemoryMmap) -> Result<(), Rejected> {
        self.ranges.clear();
        for desc in chain.descriptors().iter().take(MAX_REPORT_RANGES + 1) {
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

    /// Frees the host memory behind `self.ranges`; returns the bytes freed and, with
    /// `inflating`, of those the bytes of pages that were not in the balloon yet (which join
    /// it).
    fn discard_ranges(&mut self, inflating: bool, memory: &GuestMemoryMmap) -> (u64, u64) {
        if inflating {
            self.size_in_balloon(memory);
        }
        let (mut freed, mut fresh) = (0, 0);
        for (addr, len) in &self.ranges {
            match self.discard.discard(*addr, *len as u64) {
                Ok(()) => {
                    freed += *len as u64;
                    if inflating {
                        let first = addr / PAGE_SIZE;
                        for pfn in first..first + *len as u64 / PAGE_SIZE {
                            if mark(&mut self.in_balloon, pfn, true) {
                                fresh += PAGE_SIZE;
                            }
                        }
                    }
                }
                Err(e) => crate::ratelimit::guest_warn!(
                    "virtio-balloon: cannot free {addr:#x}+{len:#x}: {e}"
                ),
            }
        }
        (freed, fresh)
    }

    /// Sizes the page bitmap to guest memory (the memory never changes size).
    fn size_in_balloon(&mut self, memory: &GuestMemoryMmap) {
        let frames = memory.last_addr().0 / PAGE_SIZE + 1;
        let words = usize::try_from(frames.div_ceil(64)).unwrap_or(usize::MAX);
        if self.in_balloon.len() < words {
            self.in_balloon.resize(words, 0);
        }
    }

    fn inflate_or_deflate(
        &mut self,
        inflate: bool,
        chain: &Chain<'_>,
        memory: &GuestMemoryMmap,
        budget: &Budget,
    ) -> Result<u32, DeviceError> {
        if let Err(why) = self.read_page_runs(chain, memory, budget)? {
            self.reject(why);
        } else if inflate {
            // A page inflated again (without a deflation between) is freed again but counted
            // once.
            let (_, fresh) = self.discard_ranges(true, memory);
            self.shared.inflated.fetch_add(fresh, Ordering::SeqCst);
        } else {
            for pfn in &self.pfns {
                mark(&mut self.in_balloon, *pfn, false);
            }
            let bytes = self.pfns.len() as u64 * PAGE_SIZE;
            self.shared.deflated.fetch_add(bytes, Ordering::SeqCst);
        }
        Ok(0)
    }

    fn report(&mut self, chain: &Chain<'_>, memory: &GuestMemoryMmap) -> Result<u32, DeviceError> {
        match self.read_report(chain, memory) {
            Err(why) => self.reject(why),
            Ok(()) => {
                let (freed, _) = self.discard_ranges(false, memory);
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
        budget: &Budget,
    ) -> Result<(), DeviceError> {
        let mut returned = false;
        while let Some(chain) = next_chain(queue, memory, budget)? {
            let head = chain.head();
            let count = (chain.readable_len() / STAT_ENTRY_SIZE).min(MAX_STATS);
            self.bytes.resize(count * STAT_ENTRY_SIZE, 0);
            budget.charge_bytes(chain.read(memory, &mut self.bytes)?);
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

/// Sets (`on`) or clears the bit of page frame `pfn` in `bitmap`; whether it changed. Frames
/// past the bitmap change nothing (the device checked them against guest memory already).
fn mark(bitmap: &mut [u64], pfn: u64, on: bool) -> bool {
    let Some(word) = usize::try_from(pfn / 64)
        .ok()
        .and_then(|w| bitmap.get_mut(w))
    else {
        return false;
    };
    let bit = 1u64 << (pfn % 64);
    let was = *word & bit != 0;
    if on {
        *word |= bit;
    } else {
        *word &= !bit;
    }
    was != on
}

/// Turns sorted, distinct `pfns` into runs of contiguous pages in `runs`, each inside one memory
/// region; fails on the first page that is not guest RAM.
pub(super) fn page_runs(
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
        read_config_bytes(&self.config().as_slice()[..CONFIG_SIZE], offset, data);
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
        Ok(DeviceState::Balloon(self.state()))
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
        _rx: &Budget,
    ) -> Result<(), DeviceError> {
        let (Some(role), Some(queue)) = (self.roles.get(index).copied(), queues.get_mut(index))
        else {
            // A queue of a feature the driver did not accept: nothing is read from it.
            return Ok(());
        };
        match role {
            QueueRole::Inflate | QueueRole::Deflate => {
                let inflate = role == QueueRole::Inflate;
                serve_queue(queue, memory, interrupt, budget, |chain| {
                    self.inflate_or_deflate(inflate, &chain, memory, budget)
                })
            }
            QueueRole::Stats => self.take_stats(queue, memory, interrupt, budget),
            QueueRole::Reporting => serve_queue(queue, memory, interrupt, budget, |chain| {
                self.report(&chain, memory)
            }),
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
        _rx: &Budget,
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
        self.in_balloon.clear();
        self.shared.actual.store(0, Ordering::SeqCst);
    }
}
