//! The device: [`Block`] over its image (or, for a child of a fork, its overlay), the round
//! loop that serves a notification, and the [`VirtioDevice`] implementation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    virtio_blk_config,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;

use super::io::AlignedBuffer;
use super::layers::{ChildCow, Cow, ImageCow};
use super::persist::BlockState;
use super::request::{Request, RequestError};
use super::ring::{DescriptorTable, GuestView, Rings, has_available};
use super::{
    BLOCK_DEVICE_TYPE, BOUNCE_SIZE, ID_LEN, MAX_BYTES_PER_TURN, MAX_RANGE_SECTORS, QUEUE_SIZE,
    SECTOR_SIZE,
};
use crate::virtio::{
    Budget, DeviceError, DeviceState, GuestMemoryMmap, INT_USED_RING, Interrupt,
    VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
};

/// A raw disk image behind a virtio-blk device.
pub struct Block {
    pub(super) file: File,
    pub(super) read_only: bool,
    pub(super) capacity_sectors: u64,
    pub(super) id: [u8; ID_LEN],
    config: Vec<u8>,
    /// The image was opened with `O_DIRECT`: data moves through `bounce`, which is aligned.
    pub(super) direct_io: bool,
    pub(super) bounce: AlignedBuffer,
    /// The requests of one round (their buffers are reused for every round).
    requests: Vec<Request>,
    /// Copy-on-write state, once the disk was frozen or if it is a child (then `file` is its
    /// own overlay); `None` for a disk never frozen (and for read-only disks, which need none).
    pub(super) cow: Option<Cow>,
    /// The features the driver accepted: discard and write-zeroes are served only if it
    /// accepted theirs (otherwise they complete with `VIRTIO_BLK_S_UNSUPP`).
    pub(super) acked_features: u64,
}

impl Block {
    /// Opens `path` (read-only or read-write; with `direct_io`, bypassing the host page cache
    /// with `O_DIRECT`). `serial` (at most 20 bytes are kept) is what GET_ID returns, e.g.
    /// `/dev/disk/by-id/virtio-<serial>` in Linux.
    pub fn open(path: &Path, read_only: bool, direct_io: bool, serial: &str) -> io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct_io {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path)?;
        let capacity_sectors = file.metadata()?.len() / SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        let serial = serial.as_bytes();
        id[..serial.len().min(ID_LEN)].copy_from_slice(&serial[..serial.len().min(ID_LEN)]);
        Ok(Self::with_file(
            file,
            read_only,
            direct_io,
            capacity_sectors,
            id,
            None,
        ))
    }

    /// A device over `file` (for a child, its overlay).
    fn with_file(
        file: File,
        read_only: bool,
        direct_io: bool,
        capacity_sectors: u64,
        id: [u8; ID_LEN],
        cow: Option<Cow>,
    ) -> Self {
        Self {
            file,
            read_only,
            capacity_sectors,
            id,
            config: config_space(capacity_sectors),
            direct_io,
            bounce: AlignedBuffer::new(BOUNCE_SIZE),
            requests: Vec::new(),
            cow,
            acked_features: 0,
        }
    }

    /// Freezes the disk's content as it is now (called while the VM is paused; must be O(1) in
    /// disk size and data written — no copying of disk data here) and returns what children
    /// start from. The device itself carries on: over the user's image, it keeps writing the
    /// image and first copies what it overwrites for the children; as a child, its overlay so
    /// far becomes shared with its own children, and it writes a fresh one.
    pub fn freeze(&mut self) -> io::Result<BlockState> {
        let (base, direct_io, layers) = if self.read_only {
            (Arc::new(self.file.try_clone()?), self.direct_io, None)
        } else {
            let cow = match self.cow.take() {
                Some(cow) => cow,
                None => Cow::Image(ImageCow::new(&self.file)?),
            };
            match self.cow.insert(cow) {
                Cow::Image(image) => {
                    let (base, layers) = image.freeze(self.capacity_sectors)?;
                    (base, self.direct_io, Some(layers))
                }
                Cow::Child(child) => {
                    let (base, direct_io, layers) =
                        child.freeze(&mut self.file, self.capacity_sectors)?;
                    (base, direct_io, Some(layers))
                }
            }
        };
        Ok(BlockState {
            base,
            direct_io,
            capacity_sectors: self.capacity_sectors,
            id: self.id,
            layers,
        })
    }

    /// A device for a child: reads see the disk as it was at `freeze`, writes go to the child's
    /// own private overlay (a read-only disk's child is a read-only handle on the same image).
    /// A state read back from a snapshot ([`BlockState::open_saved`]) works the same way.
    pub fn from_state(state: &BlockState) -> io::Result<Block> {
        Self::continue_from(state, None)
    }

    /// [`Block::from_state`], with `overlay`, an empty file from
    /// [`layer_file`](super::layer_file) made ahead of the fork (sized to the disk, or it is sized
    /// here), as the child's overlay (a writable disk's child writes there).
    pub fn from_state_over(state: &BlockState, overlay: File) -> io::Result<Block> {
        Self::continue_from(state, Some(overlay))
    }

    fn continue_from(state: &BlockState, overlay: Option<File>) -> io::Result<Block> {
        let (file, read_only, direct_io, cow) = match &state.layers {
            None => (state.base.try_clone()?, true, state.direct_io, None),
            Some(layers) => {
                let (child, overlay) = ChildCow::new(
                    state.base.clone(),
                    state.direct_io,
                    layers.clone(),
                    state.capacity_sectors,
                    overlay,
                )?;
                (overlay, false, false, Some(Cow::Child(child)))
            }
        };
        Ok(Self::with_file(
            file,
            read_only,
            direct_io,
            state.capacity_sectors,
            state.id,
            cow,
        ))
    }

    /// Capacity in 512-byte sectors (the image size rounded down).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Byte offset of `sectors` starting at `sector`, if the whole range lies inside the image.
    pub(super) fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let end_sector = sector.checked_add(bytes.div_ceil(SECTOR_SIZE))?;
        (end_sector <= self.capacity_sectors).then_some(sector * SECTOR_SIZE)
    }

    /// Serves what the driver made available on `queue` in rounds of at most a queue's worth
    /// of requests: parse every chain of the round (descriptors, header), then execute the
    /// requests in order, then write their status bytes and used entries, and interrupt once.
    /// Keeping the ring and descriptor accesses together, away from the image I/O between
    /// them, is what makes a request cheap. A chain the device cannot use ends the pass with
    /// an error after the requests before it have completed. Rounds go on while `budget` lasts
    /// (each charged its descriptors and data bytes); requests left then are marked for the
    /// next turn of the event loop.
    fn serve(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: &Budget,
    ) -> Result<(), DeviceError> {
        let view = GuestView::new(memory);
        let table = DescriptorTable::new(&view, queue);
        let mut rings = Rings::new(&view, queue);
        let mut requests = std::mem::take(&mut self.requests);
        let mut result = Ok(());
        let mut used_any = false;
        let mut bytes = 0usize;
        let spent = |bytes: usize| budget.spent() || bytes >= MAX_BYTES_PER_TURN;
        while result.is_ok() {
            if spent(bytes) {
                if has_available(queue, memory)? {
                    budget.leave_more();
                }
                break;
            }
            let mut parsed = 0;
            while parsed < usize::from(table.size()) && !spent(bytes) {
                let head = match rings.pop(queue, memory) {
                    Ok(Some(head)) => head,
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                if parsed == requests.len() {
                    requests.push(Request::default());
                }
                if let Err(e) = requests[parsed].parse(&view, &table, head) {
                    result = Err(e);
                    break;
                }
                requests[parsed].plain = self.plain_io(&view, &requests[parsed]);
                let request = &requests[parsed];
                budget.charge_descriptors(request.descriptors());
                budget.charge_op();
                budget.charge_limited_bytes(request.data_len());
                bytes = bytes.saturating_add(request.data_len());
                parsed += 1;
            }
            if parsed == 0 {
                break;
            }
            // Nothing but the image I/O happens between the system calls of this loop.
            for request in &mut requests[..parsed] {
                let outcome = match request.plain {
                    Some(io) => self.execute_plain(&view, io),
                    None => self.execute(&view, request),
                };
                (request.status, request.used) = match outcome {
                    Ok(written) => (VIRTIO_BLK_S_OK, written + 1),
                    Err(RequestError::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 1),
                    Err(e) => {
                        log::debug!("virtio-blk: request failed: {e}");
                        (VIRTIO_BLK_S_IOERR, 1)
                    }
                };
            }
            for request in &requests[..parsed] {
                let completed = view
                    .write_byte(request.status as u8, request.status_addr)
                    .map_err(|e| DeviceError::BadRequest(format!("status byte: {e}")))
                    .and_then(|()| rings.add_used(queue, memory, request.head, request.used));
                if let Err(e) = completed {
                    result = Err(e);
                    break;
                }
                used_any = true;
            }
            // Publishes the round's used entries.
            if let Err(e) = rings.publish_used(queue) {
                result = Err(e);
            }
        }
        self.requests = requests;
        if used_any && queue.needs_notification(memory)? {
            interrupt.raise(INT_USED_RING);
        }
        result
    }
}

/// `struct virtio_blk_config` as the driver reads it (virtio 1.1 §5.2.4).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct BlockConfig(virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` and made of integers and arrays and structs
// of integers only, so it has no padding and every byte pattern is a valid value.
unsafe impl ByteValued for BlockConfig {}

/// The virtio-blk configuration space for a disk of `capacity` sectors: up to
/// `write_zeroes_may_unmap` and its padding (the device offers neither secure erase nor zoned
/// storage, whose fields follow; a read past the end reads zeroes).
fn config_space(capacity: u64) -> Vec<u8> {
    let config = BlockConfig(virtio_blk_config {
        capacity: capacity.to_le(),
        seg_max: u32::from(QUEUE_SIZE - 2).to_le(),
        max_discard_sectors: MAX_RANGE_SECTORS.to_le(),
        max_discard_seg: 1u32.to_le(),
        discard_sector_alignment: 1u32.to_le(),
        max_write_zeroes_sectors: MAX_RANGE_SECTORS.to_le(),
        max_write_zeroes_seg: 1u32.to_le(),
        write_zeroes_may_unmap: 1,
        ..virtio_blk_config::default()
    });
    let len = std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);
    config.as_slice()[..len].to_vec()
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_TYPE
    }

    fn fork_needs(&self) -> crate::virtio::persist::HostNeeds {
        crate::virtio::persist::HostNeeds {
            overlay_bytes: Some(self.capacity_sectors().saturating_mul(SECTOR_SIZE)),
            ..Default::default()
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features =
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn reset(&mut self) {
        self.acked_features = 0;
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
        let Some(queue) = queues.get_mut(index) else {
            return Ok(());
        };
        self.serve(queue, memory, interrupt, budget)
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Block(Block::freeze(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration space as it was written before, at hand-computed offsets.
    fn config_space_by_hand(capacity: u64) -> Vec<u8> {
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        config[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        config[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        config[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        config[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        config
    }

    #[test]
    fn the_config_space_is_the_same_bytes_as_before() {
        for capacity in [0, 1, 64, 0x0123_4567_89ab_cdef, u64::MAX / SECTOR_SIZE] {
            assert_eq!(config_space(capacity), config_space_by_hand(capacity));
        }
    }
}
