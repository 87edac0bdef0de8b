//! The block device's own reader and writer of split virtqueues (virtio 1.1 §2.6): the fast
//! path of every request. It reads the available ring, the descriptor table and the chains, and
//! writes the used ring, through one volatile slice each, checking every index and address the
//! guest wrote; a chain it cannot use (outside the table, looping or longer than the queue,
//! indirect) is refused, and the device then needs a reset. `ring_check` compares it with
//! `virtio_queue::Queue::pop_descriptor_chain`.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    VolatileMemory, VolatileSlice,
};

use super::request::RequestError;
use crate::virtio::{DeviceError, GuestMemoryMmap};

/// Guest memory as one pass over a queue sees it: every region's mapping as a volatile slice,
/// so that the small accesses of each request (descriptors, header, status byte, data buffers)
/// cost a bounds check rather than a region search through [`GuestMemoryMmap`]. A range that
/// spans regions goes through `GuestMemoryMmap` itself.
pub(super) struct GuestView<'m> {
    memory: &'m GuestMemoryMmap,
    pub(super) regions: Vec<(u64, VolatileSlice<'m, ()>)>,
}

impl<'m> GuestView<'m> {
    #[inline]
    pub(super) fn new(memory: &'m GuestMemoryMmap) -> Self {
        let regions = memory
            .iter()
            .filter_map(|r| Some((r.start_addr().0, r.as_volatile_slice().ok()?)))
            .collect();
        Self { memory, regions }
    }

    /// The `len` bytes at `addr`, if they lie inside one region.
    #[inline]
    pub(super) fn slice(&self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'m, ()>> {
        let (region, offset) = self.locate(addr, len)?;
        self.regions[region].1.subslice(offset, len).ok()
    }

    /// The region (index in `regions`) and offset of the `len` bytes at `addr`, if they lie
    /// inside one region.
    #[inline]
    pub(super) fn locate(&self, addr: GuestAddress, len: usize) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .enumerate()
            .find_map(|(index, (start, region))| {
                let offset = usize::try_from(addr.0.checked_sub(*start)?).ok()?;
                let end = offset.checked_add(len)?;
                (end <= region.len()).then_some((index, offset))
            })
    }

    #[inline]
    pub(super) fn check_range(&self, addr: GuestAddress, len: usize) -> bool {
        self.slice(addr, len).is_some() || self.memory.check_range(addr, len)
    }

    #[inline]
    pub(super) fn read_obj<T: ByteValued>(
        &self,
        addr: GuestAddress,
    ) -> Result<T, vm_memory::GuestMemoryError> {
        match self.slice(addr, size_of::<T>()) {
            Some(slice) => slice.read_obj(0).map_err(Into::into),
            None => self.memory.read_obj(addr),
        }
    }

    /// Writes one byte with a plain store (no byte-wise copy routine).
    #[inline]
    pub(super) fn write_byte(
        &self,
        value: u8,
        addr: GuestAddress,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        match self.slice(addr, 1) {
            Some(slice) => {
                slice
                    .get_atomic_ref::<AtomicU8>(0)?
                    .store(value, Ordering::Relaxed);
                Ok(())
            }
            None => self.memory.write_obj(value, addr),
        }
    }

    #[inline]
    pub(super) fn read_slice(
        &self,
        buf: &mut [u8],
        addr: GuestAddress,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        match self.slice(addr, buf.len()) {
            Some(slice) => slice.read_slice(buf, 0).map_err(Into::into),
            None => self.memory.read_slice(buf, addr),
        }
    }

    #[inline]
    pub(super) fn write_slice(
        &self,
        buf: &[u8],
        addr: GuestAddress,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        match self.slice(addr, buf.len()) {
            Some(slice) => slice.write_slice(buf, 0).map_err(Into::into),
            None => self.memory.write_slice(buf, addr),
        }
    }

    /// Calls `f` with slices that together cover the `len` bytes at `addr`.
    pub(super) fn for_each_slice(
        &self,
        addr: GuestAddress,
        len: usize,
        mut f: impl FnMut(VolatileSlice<'m, ()>) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        if let Some(slice) = self.slice(addr, len) {
            return f(slice);
        }
        for slice in self.memory.get_slices(addr, len) {
            f(slice?)?;
        }
        Ok(())
    }
}

/// A split virtqueue's available and used rings (virtio 1.1 §2.6.6, §2.6.8), read and written
/// through one slice each: the next head is a bounds-checked load, and the used index is
/// published once per round rather than after every entry. Without such slices (a ring that
/// spans regions), or with event suppression (`VIRTIO_F_EVENT_IDX`, which `Queue` tracks per
/// entry), the queue's own methods do the work.
pub(super) struct Rings<'m> {
    fast: Option<(VolatileSlice<'m, ()>, VolatileSlice<'m, ()>)>,
    size: u16,
    /// The available index as last read.
    avail_idx: Wrapping<u16>,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
}

/// Offset of the `ring` array in both rings (after `flags` and `idx`).
const RING_HEADER: usize = 4;
/// Offset of `idx` in both rings.
const RING_IDX: usize = 2;

impl<'m> Rings<'m> {
    pub(super) fn new(memory: &GuestView<'m>, queue: &Queue) -> Self {
        let size = queue.size();
        let fast = if queue.event_idx_enabled() {
            None
        } else {
            let avail = GuestAddress(queue.avail_ring());
            let used = GuestAddress(queue.used_ring());
            let n = usize::from(size);
            memory
                .slice(avail, RING_HEADER + 2 * n)
                .zip(memory.slice(used, RING_HEADER + 8 * n))
        };
        Self {
            fast,
            size,
            avail_idx: Wrapping(queue.next_avail()),
            next_avail: Wrapping(queue.next_avail()),
            next_used: Wrapping(queue.next_used()),
        }
    }

    /// Whether the rings are read through their own slices (else through the queue's methods).
    #[cfg(any(test, feature = "test-utils"))]
    pub(super) fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The head of the next chain the driver made available.
    #[inline]
    pub(super) fn pop(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
    ) -> Result<Option<u16>, DeviceError> {
        let Some((avail, _)) = &self.fast else {
            return Ok(queue
                .pop_descriptor_chain(memory)
                .map(|chain| chain.head_index()));
        };
        if self.next_avail == self.avail_idx {
            let idx: u16 = avail
                .load(RING_IDX, Ordering::Acquire)
                .map_err(vm_memory::GuestMemoryError::from)
                .map_err(virtio_queue::Error::GuestMemory)?;
            self.avail_idx = Wrapping(u16::from_le(idx));
            if (self.avail_idx - self.next_avail).0 > self.size {
                // The driver claims more new entries than the ring holds.
                return Err(virtio_queue::Error::InvalidAvailRingIndex.into());
            }
            if self.next_avail == self.avail_idx {
                return Ok(None);
            }
        }
        // The size is a power of two (the queue refuses others).
        let slot = RING_HEADER + 2 * usize::from(self.next_avail.0 & (self.size - 1));
        // The driver wrote the entry before it published `idx`, which we loaded with Acquire.
        let head = avail
            .get_atomic_ref::<AtomicU16>(slot)
            .map_err(vm_memory::GuestMemoryError::from)
            .map_err(virtio_queue::Error::GuestMemory)?
            .load(Ordering::Relaxed);
        self.next_avail += 1;
        queue.set_next_avail(self.next_avail.0);
        Ok(Some(u16::from_le(head)))
    }

    /// Puts a used entry in the ring (the driver sees it after [`Self::publish_used`]).
    #[inline]
    pub(super) fn add_used(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), DeviceError> {
        let Some((_, used)) = &self.fast else {
            return Ok(queue.add_used(memory, head, len)?);
        };
        let slot = RING_HEADER + 8 * usize::from(self.next_used.0 & (self.size - 1));
        // struct virtq_used_elem { le32 id; le32 len; }
        // The ring is 4-aligned (virtio 1.1 §2.6), so the entry may not be 8-aligned.
        for (offset, value) in [(slot, u32::from(head)), (slot + 4, len)] {
            used.get_atomic_ref::<AtomicU32>(offset)
                .map_err(vm_memory::GuestMemoryError::from)
                .map_err(virtio_queue::Error::GuestMemory)?
                .store(value.to_le(), Ordering::Relaxed);
        }
        self.next_used += 1;
        Ok(())
    }

    /// Makes the used entries added so far visible to the driver.
    #[inline]
    pub(super) fn publish_used(&mut self, queue: &mut Queue) -> Result<(), DeviceError> {
        let Some((_, used)) = &self.fast else {
            return Ok(());
        };
        if queue.next_used() == self.next_used.0 {
            return Ok(());
        }
        // Release: the entries are written before the driver can see the new index.
        used.store(self.next_used.0.to_le(), RING_IDX, Ordering::Release)
            .map_err(vm_memory::GuestMemoryError::from)
            .map_err(virtio_queue::Error::GuestMemory)?;
        queue.set_next_used(self.next_used.0);
        Ok(())
    }
}

/// Whether the driver made requests available on `queue` that the device has not taken.
pub(super) fn has_available(queue: &Queue, memory: &GuestMemoryMmap) -> Result<bool, DeviceError> {
    let idx = queue.avail_idx(memory, Ordering::Acquire)?;
    Ok(idx.0 != queue.next_avail())
}

/// A split virtqueue's descriptor table (virtio 1.1 §2.6.5).
pub(super) struct DescriptorTable<'m> {
    addr: GuestAddress,
    size: u16,
    /// The whole table, when it lies inside one region.
    slice: Option<VolatileSlice<'m, ()>>,
}

/// Bytes of a descriptor as the driver writes it (`struct virtq_desc`: le64 addr, le32 len,
/// le16 flags, le16 next), which [`Descriptor`] lays out the same way.
const DESCRIPTOR_LEN: usize = size_of::<Descriptor>();

/// Why a chain cannot be used (the device then needs a reset).
#[derive(Debug, thiserror::Error)]
pub(super) enum ChainError {
    #[error("descriptor index {index} outside a table of {size}")]
    OutsideTable { index: u16, size: u16 },
    #[error("descriptor chain from {head} loops or is longer than the queue")]
    TooLong { head: u16 },
    #[error("indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered)")]
    Indirect,
    #[error("descriptor {index}: {source}")]
    Unreadable {
        index: u16,
        source: vm_memory::GuestMemoryError,
    },
}

impl From<ChainError> for DeviceError {
    fn from(e: ChainError) -> Self {
        DeviceError::BadRequest(e.to_string())
    }
}

impl<'m> DescriptorTable<'m> {
    pub(super) fn new(memory: &GuestView<'m>, queue: &Queue) -> Self {
        let addr = GuestAddress(queue.desc_table());
        let size = queue.size();
        let slice = memory.slice(addr, usize::from(size) * DESCRIPTOR_LEN);
        Self { addr, size, slice }
    }

    /// The queue size: the number of descriptors, and the most a chain may have.
    #[inline]
    pub(super) fn size(&self) -> u16 {
        self.size
    }

    /// Calls `f` with every descriptor of the chain at `head`, in order, empty ones included.
    /// Refuses — after the descriptors before the culprit — a chain that names a descriptor
    /// outside the table, loops or is longer than the queue, or has an indirect descriptor
    /// (`VIRTIO_F_INDIRECT_DESC` is not offered).
    #[inline]
    pub(super) fn walk<E: From<ChainError>>(
        &self,
        memory: &GuestView<'_>,
        head: u16,
        mut f: impl FnMut(&Descriptor) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut index = head;
        let mut count = 0;
        loop {
            count += 1;
            if count > usize::from(self.size) {
                return Err(ChainError::TooLong { head }.into());
            }
            let desc = self.get(memory, index)?;
            if desc.refers_to_indirect_table() {
                return Err(ChainError::Indirect.into());
            }
            f(&desc)?;
            if !desc.has_next() {
                return Ok(());
            }
            index = desc.next();
        }
    }

    /// Descriptor `index`.
    #[inline]
    fn get(&self, memory: &GuestView<'_>, index: u16) -> Result<Descriptor, ChainError> {
        if index >= self.size {
            return Err(ChainError::OutsideTable {
                index,
                size: self.size,
            });
        }
        let offset = usize::from(index) * DESCRIPTOR_LEN;
        if let Some([addr, rest]) = self.slice.as_ref().and_then(|t| load_16(t, offset)) {
            return Ok(Descriptor::new(
                addr,
                rest as u32,
                (rest >> 32) as u16,
                (rest >> 48) as u16,
            ));
        }
        match &self.slice {
            Some(table) => table
                .read_obj(offset)
                .map_err(vm_memory::GuestMemoryError::from),
            None => memory.read_obj(self.addr.unchecked_add(offset as u64)),
        }
        .map_err(|source| ChainError::Unreadable { index, source })
    }
}

/// The 16 bytes at `offset` as two little-endian `u64`s, read with two aligned loads (virtio
/// aligns descriptors and request headers so); `None` when unaligned or out of bounds. A
/// 16-byte `read_obj` costs a byte-wise copy and a stalled reload of what it stored.
#[inline]
pub(super) fn load_16(slice: &VolatileSlice<'_, ()>, offset: usize) -> Option<[u64; 2]> {
    let load = |offset| {
        let word = slice.get_atomic_ref::<AtomicU64>(offset).ok()?;
        Some(u64::from_le(word.load(Ordering::Relaxed)))
    };
    Some([load(offset)?, load(offset.checked_add(8)?)?])
}
