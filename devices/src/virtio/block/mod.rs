//! virtio-blk (type 2) over a raw image file: read, write, flush, get-id, and, on writable images,
//! discard and write-zeroes (punching or zeroing ranges of the file).
//!
//! Each chain is walked once into a reused list of (address, length) segments, each checked to
//! lie inside guest memory. A chain the device cannot use puts it into `DEVICE_NEEDS_RESET`:
//! one that loops or is longer than the queue, names a descriptor outside the table, uses an
//! indirect descriptor (not offered), has a buffer outside guest memory, or has no
//! device-writable byte for the status. Every request is then checked before it touches the
//! file: the header must be complete, buffers in the right direction (device-readable before
//! device-writable; a read's data writable, a write's readable), data lengths whole sectors,
//! every sector inside the image, writes refused on a read-only device, and no request may move
//! more than [`MAX_REQUEST_BYTES`]. A bad request completes with `VIRTIO_BLK_S_IOERR` (or
//! `UNSUPP` for unknown types).
//!
//! A notification is served in rounds: parse every available chain, then read or write the
//! image straight from and into guest memory (one `pread`/`pwrite` per plain request, no bounce
//! copy unless the image is opened with `O_DIRECT`), then write the status bytes and used
//! entries, publish the used index and interrupt once.
//!
//! A disk can be forked: [`Block::freeze`] fixes its content for children, which
//! [`Block::from_state`] makes, each writing only its own copy-on-write overlay while the
//! parent keeps writing the user's image; the `layers` module (`block/layers.rs`) describes how
//! and at what cost. A disk never frozen makes the same system calls as before.

use std::fs::{File, OpenOptions};
use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    VolatileMemory, VolatileSlice,
};

use self::layers::{ChildCow, Cow, FrozenLayers, ImageCow};
use super::{
    DeviceError, DeviceState, GuestMemoryMmap, INT_USED_RING, Interrupt, VIRTIO_F_VERSION_1,
    VirtioDevice, read_config_bytes,
};

#[cfg(test)]
mod fork_tests;
mod layers;

pub use layers::layer_file;

/// Virtio device type of block devices.
pub const BLOCK_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Bytes per sector, the unit of every block request.
pub const SECTOR_SIZE: u64 = 512;
/// Most data one request may move (larger requests fail with IOERR).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Length of the device ID returned by GET_ID.
pub const ID_LEN: usize = 20;
const QUEUE_SIZE: u16 = 256;
const BOUNCE_SIZE: usize = 256 << 10;
/// Discard and write-zeroes accept one segment per request, of at most this many sectors.
const MAX_RANGE_SECTORS: u32 = u32::MAX >> 9;
const SEGMENT_LEN: usize = 16;

/// The request header every chain starts with.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: plain integers with no padding; any byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

impl RequestHeader {
    /// Its size in guest memory.
    const LEN: u64 = std::mem::size_of::<Self>() as u64;
}

/// A raw disk image behind a virtio-blk device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    config: Vec<u8>,
    /// The image was opened with `O_DIRECT`: data moves through `bounce`, which is aligned.
    direct_io: bool,
    bounce: AlignedBuffer,
    /// The requests of one round (their buffers are reused for every round).
    requests: Vec<Request>,
    /// Copy-on-write state, once the disk was frozen or if it is a child (then `file` is its
    /// own overlay); `None` for a disk never frozen (and for read-only disks, which need none).
    cow: Option<Cow>,
}

/// What a block device's children continue from (cheap to clone; `Send + Sync`): the disk's
/// content at [`Block::freeze`], and its configuration.
#[derive(Clone, Debug)]
pub struct BlockState {
    /// A handle on the user's image.
    base: Arc<File>,
    /// `base` was opened with `O_DIRECT`.
    direct_io: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    /// The layers over `base`; `None` for a read-only disk.
    layers: Option<FrozenLayers>,
}

/// A block device as a snapshot records it: its disk's content goes to a file of the snapshot,
/// named here, which a restored VM reads (and, if the disk is writable, overlays privately).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedBlock {
    /// The disk's file, relative to the snapshot.
    pub file: String,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
}

impl BlockState {
    /// The disk's size in bytes: what a child's overlay file ([`layer_file`]) is made for.
    pub fn disk_bytes(&self) -> u64 {
        self.capacity_sectors.saturating_mul(SECTOR_SIZE)
    }

    /// Writes the disk's content at the freeze into `to` (sparse: zeroes stay holes; the parent
    /// may go on writing its image meanwhile) and returns how a snapshot records the device,
    /// with `file` the name of `to` in the snapshot.
    pub fn save(&self, to: &File, file: String) -> io::Result<SavedBlock> {
        // A buffered handle on the image: the copy reads it at any offset and length.
        let image = if self.direct_io {
            File::open(format!("/proc/self/fd/{}", self.base.as_raw_fd()))?
        } else {
            self.base.try_clone()?
        };
        match &self.layers {
            Some(layers) => layers.save(&image, self.capacity_sectors, to)?,
            None => layers::FrozenLayers::empty(0).save(&image, self.capacity_sectors, to)?,
        }
        Ok(SavedBlock {
            file,
            read_only: self.layers.is_none(),
            capacity_sectors: self.capacity_sectors,
            id: self.id,
        })
    }

    /// The state a snapshot recorded as `saved`, over `file`, the disk content it saved: a
    /// writable disk's VM gets a private overlay over it, so the snapshot never changes.
    pub fn open_saved(saved: &SavedBlock, file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if len != saved.capacity_sectors * SECTOR_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "disk file of {len} bytes for {} sectors",
                    saved.capacity_sectors
                ),
            ));
        }
        Ok(Self {
            base: Arc::new(file),
            direct_io: false,
            capacity_sectors: saved.capacity_sectors,
            id: saved.id,
            layers: if saved.read_only {
                None
            } else {
                Some(layers::FrozenLayers::empty(saved.capacity_sectors))
            },
        })
    }
}

/// Alignment that `O_DIRECT` asks of buffers (a page covers every device's requirement).
const DIRECT_IO_ALIGN: usize = 4096;

/// A bounce buffer aligned for `O_DIRECT`: a larger allocation and an aligned window into it.
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_IO_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_IO_ALIGN);
        Self { storage, start }
    }

    fn len(&self) -> usize {
        self.storage.len() - DIRECT_IO_ALIGN
    }

    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.storage[self.start..self.start + len]
    }
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

    /// [`Block::from_state`], with `overlay`, an empty file from [`layer_file`] made ahead of
    /// the fork (sized to the disk, or it is sized here), as the child's overlay (a writable
    /// disk's child writes there).
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
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let end_sector = sector.checked_add(bytes.div_ceil(SECTOR_SIZE))?;
        (end_sector <= self.capacity_sectors).then_some(sector * SECTOR_SIZE)
    }

    /// Serves what the driver made available on `queue` in rounds of at most a queue's worth
    /// of requests: parse every chain of the round (descriptors, header), then execute the
    /// requests in order, then write their status bytes and used entries, and interrupt once.
    /// Keeping the ring and descriptor accesses together, away from the image I/O between
    /// them, is what makes a request cheap. A chain the device cannot use ends the pass with
    /// an error after the requests before it have completed.
    fn serve(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let view = GuestView::new(memory);
        let table = DescriptorTable::new(&view, queue);
        let mut rings = Rings::new(&view, queue);
        let mut requests = std::mem::take(&mut self.requests);
        let mut result = Ok(());
        let mut used_any = false;
        while result.is_ok() {
            let mut parsed = 0;
            while parsed < usize::from(table.size) {
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

    /// The common request — a read or write of whole sectors inside the image, between the
    /// image and one guest buffer, on a buffered image — worked out while the chain is at hand,
    /// so that executing it is one system call. `None` for every other request (including
    /// every request that fails), which [`Self::execute`] serves.
    fn plain_io(&self, memory: &GuestView<'_>, request: &Request) -> Option<PlainIo> {
        if self.direct_io || request.misordered {
            return None;
        }
        let header = request.header?;
        let (dir, segments, skip, len) = match header.request_type {
            VIRTIO_BLK_T_IN if request.readable_len == RequestHeader::LEN => {
                (Dir::Read, &request.writable, 0, request.writable_len)
            }
            VIRTIO_BLK_T_OUT if !self.read_only && request.writable_len == 0 => (
                Dir::Write,
                &request.readable,
                RequestHeader::LEN,
                request.readable_len - RequestHeader::LEN,
            ),
            _ => return None,
        };
        if len == 0 {
            return None;
        }
        // Writes of a frozen disk preserve what they overwrite; a child reads through layers.
        if let Some(cow) = &self.cow
            && (dir == Dir::Write || matches!(cow, Cow::Child(_)))
        {
            return None;
        }
        let file_offset = self.checked_len(header.sector, len).ok()?;
        let addr = single_piece(segments, skip, len)?;
        let (region, offset) = memory.locate(addr, len as usize)?;
        Some(PlainIo {
            region,
            offset,
            len: len as usize,
            file_offset,
            dir,
        })
    }

    /// Executes a request [`Self::plain_io`] worked out; returns the bytes it wrote into guest
    /// memory.
    fn execute_plain(&mut self, memory: &GuestView<'_>, io: PlainIo) -> Result<u32, RequestError> {
        let slice = memory.regions[io.region]
            .1
            .subslice(io.offset, io.len)
            .map_err(vm_memory::GuestMemoryError::from)?;
        if io.dir == Dir::Read {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        let guard = slice.ptr_guard_mut();
        let mut iov = [libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: guard.len(),
        }];
        // SAFETY: the vector is `slice`, guest memory that `guard` keeps mapped.
        unsafe { submit(&self.file, &mut iov, io.file_offset, io.dir) }?;
        // At most MAX_REQUEST_BYTES.
        Ok(if io.dir == Dir::Read {
            io.len as u32
        } else {
            0
        })
    }

    /// Executes a parsed request; returns the bytes it wrote into the guest's data buffers.
    fn execute(&mut self, memory: &GuestView<'_>, request: &Request) -> Result<u32, RequestError> {
        if request.misordered {
            return Err(RequestError::Direction);
        }
        let header = request
            .header
            .ok_or(RequestError::BadLength(request.readable_len))?;
        // What the driver gave besides the header and the status byte.
        let readable = request.readable_len - RequestHeader::LEN;
        let writable = request.writable_len;
        match header.request_type {
            VIRTIO_BLK_T_IN if readable != 0 => Err(RequestError::Direction),
            VIRTIO_BLK_T_IN => self.read_sectors(memory, request, header.sector),
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
                if self.read_only =>
            {
                Err(RequestError::ReadOnly)
            }
            VIRTIO_BLK_T_OUT if writable != 0 => Err(RequestError::Direction),
            VIRTIO_BLK_T_OUT => self
                .write_sectors(memory, request, header.sector)
                .map(|()| 0),
            // A child's overlay does not outlive the process: nothing to make durable.
            VIRTIO_BLK_T_FLUSH if matches!(self.cow, Some(Cow::Child(_))) => Ok(0),
            VIRTIO_BLK_T_FLUSH => self.file.sync_data().map(|()| 0).map_err(RequestError::Io),
            VIRTIO_BLK_T_GET_ID => {
                let len = ID_LEN.min(usize::try_from(writable).unwrap_or(ID_LEN));
                copy_guest(memory, &request.writable, 0, Copy::ToGuest(&self.id[..len]))?;
                Ok(len as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self
                .zero_range(memory, request, header.request_type)
                .map(|()| 0),
            _ => Err(RequestError::Unsupported),
        }
    }

    /// The image offset of `len` data bytes from `sector`, if the request may move them.
    fn checked_len(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len > MAX_REQUEST_BYTES as u64 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::BadLength(len));
        }
        self.range(sector, len)
            .ok_or(RequestError::OutOfRange(sector))
    }

    /// Reads into every writable buffer but the status byte; returns the bytes read.
    fn read_sectors(
        &mut self,
        memory: &GuestView<'_>,
        request: &Request,
        sector: u64,
    ) -> Result<u32, RequestError> {
        let len = request.writable_len;
        let offset = self.checked_len(sector, len)?;
        if let Some(Cow::Child(child)) = &self.cow {
            child.read(
                &self.file,
                memory,
                &request.writable,
                sector,
                len / SECTOR_SIZE,
                &mut self.bounce,
            )?;
            return Ok(len as u32);
        }
        if !self.direct_io {
            transfer(
                &self.file,
                memory,
                &request.writable,
                0,
                len,
                offset,
                Dir::Read,
            )?;
            return Ok(len as u32);
        }
        read_bounced(
            &self.file,
            memory,
            &request.writable,
            0,
            len,
            offset,
            &mut self.bounce,
        )?;
        Ok(len as u32)
    }

    /// Writes every readable buffer after the header to the image.
    fn write_sectors(
        &mut self,
        memory: &GuestView<'_>,
        request: &Request,
        sector: u64,
    ) -> Result<(), RequestError> {
        let len = request.readable_len - RequestHeader::LEN;
        let offset = self.checked_len(sector, len)?;
        self.before_write(sector, len / SECTOR_SIZE)?;
        let data = &request.readable;
        if !self.direct_io {
            transfer(
                &self.file,
                memory,
                data,
                RequestHeader::LEN,
                len,
                offset,
                Dir::Write,
            )?;
        } else {
            let mut done = 0;
            while done < len {
                let chunk = (len - done).min(self.bounce.len() as u64) as usize;
                let bounce = &mut self.bounce.as_mut()[..chunk];
                copy_guest(
                    memory,
                    data,
                    RequestHeader::LEN + done,
                    Copy::FromGuest(bounce),
                )?;
                self.file
                    .write_all_at(bounce, offset + done)
                    .map_err(RequestError::Io)?;
                done += chunk as u64;
            }
        }
        if let Some(Cow::Child(child)) = &mut self.cow {
            child.mark_written(sector, len / SECTOR_SIZE);
        }
        Ok(())
    }

    /// Discard (punch a hole) or write zeroes over the one segment the request carries.
    fn zero_range(
        &mut self,
        memory: &GuestView<'_>,
        request: &Request,
        request_type: u32,
    ) -> Result<(), RequestError> {
        let payload = request.readable_len - RequestHeader::LEN;
        if payload != SEGMENT_LEN as u64 {
            return Err(RequestError::BadLength(payload));
        }
        let mut segment = [0u8; SEGMENT_LEN];
        copy_guest(
            memory,
            &request.readable,
            RequestHeader::LEN,
            Copy::FromGuest(&mut segment),
        )?;
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, ..] = segment;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        if sectors > MAX_RANGE_SECTORS {
            return Err(RequestError::BadLength(u64::from(sectors)));
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let offset = self
            .range(sector, len)
            .ok_or(RequestError::OutOfRange(sector))?;
        if let Some(Cow::Child(child)) = &mut self.cow {
            // Both leave the range of the overlay present and reading as zeroes, so that it
            // does not show the layers below.
            if let Err(err) = fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE, offset, len) {
                log::debug!("virtio-blk: PUNCH_HOLE on an overlay failed ({err}); writing zeroes");
                write_zeroes(&self.file, offset, len, &mut self.bounce)?;
            }
            child.mark_written(sector, u64::from(sectors));
            return Ok(());
        }
        self.before_write(sector, u64::from(sectors))?;
        let mode = match request_type {
            VIRTIO_BLK_T_DISCARD => libc::FALLOC_FL_PUNCH_HOLE,
            _ => libc::FALLOC_FL_ZERO_RANGE,
        };
        let Err(err) = fallocate(&self.file, mode, offset, len) else {
            return Ok(());
        };
        if request_type == VIRTIO_BLK_T_DISCARD {
            // Discard is a hint: a file system without hole punching simply keeps the data.
            return Ok(());
        }
        log::debug!("virtio-blk: ZERO_RANGE unsupported ({err}); writing zeroes");
        write_zeroes(&self.file, offset, len, &mut self.bounce)
    }

    /// Before the image's `count` sectors from `start` change: copies what they hold for the
    /// children of the disk's freezes that are still alive (nothing to do on a disk never
    /// frozen, or a child, which writes only its overlay).
    fn before_write(&mut self, start: u64, count: u64) -> Result<(), RequestError> {
        if let Some(Cow::Image(image)) = &mut self.cow
            && !image.preserve(&self.file, start, count, &mut self.bounce)?
        {
            // No child is left: writes are as cheap as before the first freeze.
            self.cow = None;
        }
        Ok(())
    }
}

/// `fallocate(mode | FALLOC_FL_KEEP_SIZE)` of `len` bytes at `offset` of `file`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = i64::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: fallocate only reads its integer arguments; the fd is an open file of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `len` zero bytes at `offset` of `file` from `bounce` (aligned, for `O_DIRECT`).
fn write_zeroes(
    file: &File,
    offset: u64,
    len: u64,
    bounce: &mut AlignedBuffer,
) -> Result<(), RequestError> {
    bounce.as_mut().fill(0);
    let mut done = 0;
    while done < len {
        let chunk = (len - done).min(bounce.len() as u64) as usize;
        file.write_all_at(&bounce.as_mut()[..chunk], offset + done)
            .map_err(RequestError::Io)?;
        done += chunk as u64;
    }
    Ok(())
}

/// Reads `len` bytes of `file` at `offset` into the segments' bytes from byte `skip` on, through
/// the aligned `bounce` (for files opened with `O_DIRECT`).
fn read_bounced(
    file: &File,
    memory: &GuestView<'_>,
    segments: &[Segment],
    skip: u64,
    len: u64,
    offset: u64,
    bounce: &mut AlignedBuffer,
) -> Result<(), RequestError> {
    let mut done = 0;
    while done < len {
        let chunk = (len - done).min(bounce.len() as u64) as usize;
        let data = &mut bounce.as_mut()[..chunk];
        file.read_exact_at(data, offset + done)
            .map_err(RequestError::Io)?;
        copy_guest(memory, segments, skip + done, Copy::ToGuest(data))?;
        done += chunk as u64;
    }
    Ok(())
}

/// One non-empty descriptor of a request, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// A request chain, parsed once into buffers the device reuses for every request: the
/// device-readable segments (header, then data for writes), the device-writable ones (data for
/// reads, without the status byte) and where the status byte goes.
#[derive(Default)]
struct Request {
    /// The chain's head descriptor, its used-ring ID.
    head: u16,
    /// The first 16 device-readable bytes (`None` when there are fewer).
    header: Option<RequestHeader>,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
    status_addr: GuestAddress,
    /// The request's outcome: its virtio status and the used length (data written plus the
    /// status byte).
    status: u32,
    used: u32,
    /// A readable descriptor follows a writable one (virtio 1.1 §2.6.4.2 forbids it).
    misordered: bool,
    /// The request as one plain read or write, if it is one (see [`Block::plain_io`]).
    plain: Option<PlainIo>,
}

/// A read or write between the image and one buffer inside one guest memory region.
#[derive(Clone, Copy)]
struct PlainIo {
    /// Index of the region in [`GuestView::regions`] and offset in it.
    region: usize,
    offset: usize,
    len: usize,
    file_offset: u64,
    dir: Dir,
}

impl Request {
    /// Walks the chain at `head` once. The chain is unusable — the device needs a reset — when
    /// a descriptor index lies outside the table, the chain loops or is longer than the queue,
    /// a descriptor is indirect (not offered), a buffer lies outside guest memory, or no byte
    /// is device-writable for the status. Empty descriptors are skipped; the status byte is the
    /// last device-writable byte.
    fn parse(
        &mut self,
        memory: &GuestView<'_>,
        table: &DescriptorTable<'_>,
        head: u16,
    ) -> Result<(), DeviceError> {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.misordered = false;
        let mut index = head;
        let mut count = 0;
        loop {
            count += 1;
            if count > usize::from(table.size) {
                return Err(DeviceError::BadRequest(format!(
                    "descriptor chain from {head} loops or is longer than the queue"
                )));
            }
            let desc = table.get(memory, index)?;
            if desc.flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(DeviceError::BadRequest(
                    "indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered)".into(),
                ));
            }
            if desc.len != 0 {
                let segment = Segment {
                    addr: GuestAddress(desc.addr),
                    len: desc.len,
                };
                if !memory.check_range(segment.addr, segment.len as usize) {
                    return Err(DeviceError::BadRequest(format!(
                        "buffer {:#x}+{:#x} lies outside guest memory",
                        desc.addr, desc.len
                    )));
                }
                if desc.flags & VRING_DESC_F_WRITE != 0 {
                    self.writable.push(segment);
                    self.writable_len += u64::from(segment.len);
                } else {
                    self.misordered |= !self.writable.is_empty();
                    self.readable.push(segment);
                    self.readable_len += u64::from(segment.len);
                }
            }
            if desc.flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            index = desc.next;
        }
        let Some(last) = self.writable.last_mut() else {
            return Err(DeviceError::BadRequest("no writable status byte".into()));
        };
        last.len -= 1;
        self.status_addr = last.addr.unchecked_add(u64::from(last.len));
        self.writable_len -= 1;
        if last.len == 0 {
            self.writable.pop();
        }
        self.header = self.read_header(memory).ok();
        Ok(())
    }

    /// The request header: the first 16 device-readable bytes.
    fn read_header(&self, memory: &GuestView<'_>) -> Result<RequestHeader, RequestError> {
        if self.readable_len < RequestHeader::LEN {
            return Err(RequestError::BadLength(self.readable_len));
        }
        let first = self.readable[0];
        if u64::from(first.len) >= RequestHeader::LEN {
            let fast = memory.slice(first.addr, 16).and_then(|s| load_16(&s, 0));
            if let Some([low, sector]) = fast {
                return Ok(RequestHeader {
                    request_type: low as u32,
                    _reserved: (low >> 32) as u32,
                    sector,
                });
            }
            return Ok(memory.read_obj(first.addr)?);
        }
        let mut header = RequestHeader::default();
        copy_guest(
            memory,
            &self.readable,
            0,
            Copy::FromGuest(header.as_mut_slice()),
        )?;
        Ok(header)
    }
}

/// Guest memory as one pass over a queue sees it: every region's mapping as a volatile slice,
/// so that the small accesses of each request (descriptors, header, status byte, data buffers)
/// cost a bounds check rather than a region search through [`GuestMemoryMmap`]. A range that
/// spans regions goes through `GuestMemoryMmap` itself.
struct GuestView<'m> {
    memory: &'m GuestMemoryMmap,
    regions: Vec<(u64, VolatileSlice<'m, ()>)>,
}

impl<'m> GuestView<'m> {
    fn new(memory: &'m GuestMemoryMmap) -> Self {
        let regions = memory
            .iter()
            .filter_map(|r| Some((r.start_addr().0, r.as_volatile_slice().ok()?)))
            .collect();
        Self { memory, regions }
    }

    /// The `len` bytes at `addr`, if they lie inside one region.
    fn slice(&self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'m, ()>> {
        let (region, offset) = self.locate(addr, len)?;
        self.regions[region].1.subslice(offset, len).ok()
    }

    /// The region (index in `regions`) and offset of the `len` bytes at `addr`, if they lie
    /// inside one region.
    fn locate(&self, addr: GuestAddress, len: usize) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .enumerate()
            .find_map(|(index, (start, region))| {
                let offset = usize::try_from(addr.0.checked_sub(*start)?).ok()?;
                let end = offset.checked_add(len)?;
                (end <= region.len()).then_some((index, offset))
            })
    }

    fn check_range(&self, addr: GuestAddress, len: usize) -> bool {
        self.slice(addr, len).is_some() || self.memory.check_range(addr, len)
    }

    fn read_obj<T: ByteValued>(
        &self,
        addr: GuestAddress,
    ) -> Result<T, vm_memory::GuestMemoryError> {
        match self.slice(addr, size_of::<T>()) {
            Some(slice) => slice.read_obj(0).map_err(Into::into),
            None => self.memory.read_obj(addr),
        }
    }

    /// Writes one byte with a plain store (no byte-wise copy routine).
    fn write_byte(&self, value: u8, addr: GuestAddress) -> Result<(), vm_memory::GuestMemoryError> {
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

    fn read_slice(
        &self,
        buf: &mut [u8],
        addr: GuestAddress,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        match self.slice(addr, buf.len()) {
            Some(slice) => slice.read_slice(buf, 0).map_err(Into::into),
            None => self.memory.read_slice(buf, addr),
        }
    }

    fn write_slice(
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
    fn for_each_slice(
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
struct Rings<'m> {
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
    fn new(memory: &GuestView<'m>, queue: &Queue) -> Self {
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

    /// The head of the next chain the driver made available.
    fn pop(
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
    fn add_used(
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
    fn publish_used(&mut self, queue: &mut Queue) -> Result<(), DeviceError> {
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

/// A split virtqueue's descriptor table (virtio 1.1 §2.6.5).
struct DescriptorTable<'m> {
    addr: GuestAddress,
    size: u16,
    /// The whole table, when it lies inside one region.
    slice: Option<VolatileSlice<'m, ()>>,
}

/// A descriptor as the driver wrote it.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RawDescriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

// SAFETY: plain integers with no padding; any byte pattern is a valid value.
unsafe impl ByteValued for RawDescriptor {}

const DESCRIPTOR_LEN: usize = size_of::<RawDescriptor>();
const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const VRING_DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;

impl<'m> DescriptorTable<'m> {
    fn new(memory: &GuestView<'m>, queue: &Queue) -> Self {
        let addr = GuestAddress(queue.desc_table());
        let size = queue.size();
        let slice = memory.slice(addr, usize::from(size) * DESCRIPTOR_LEN);
        Self { addr, size, slice }
    }

    /// Descriptor `index` (little-endian fields, as virtio 1.x lays them out).
    fn get(&self, memory: &GuestView<'_>, index: u16) -> Result<RawDescriptor, DeviceError> {
        if index >= self.size {
            return Err(DeviceError::BadRequest(format!(
                "descriptor index {index} outside a table of {}",
                self.size
            )));
        }
        let offset = usize::from(index) * DESCRIPTOR_LEN;
        if let Some([addr, rest]) = self.slice.as_ref().and_then(|t| load_16(t, offset)) {
            return Ok(RawDescriptor {
                addr,
                len: rest as u32,
                flags: (rest >> 32) as u16,
                next: (rest >> 48) as u16,
            });
        }
        let desc: RawDescriptor = match &self.slice {
            Some(table) => table
                .read_obj(offset)
                .map_err(vm_memory::GuestMemoryError::from),
            None => memory.read_obj(self.addr.unchecked_add(offset as u64)),
        }
        .map_err(|e| DeviceError::BadRequest(format!("descriptor {index}: {e}")))?;
        Ok(RawDescriptor {
            addr: u64::from_le(desc.addr),
            len: u32::from_le(desc.len),
            flags: u16::from_le(desc.flags),
            next: u16::from_le(desc.next),
        })
    }
}

/// The 16 bytes at `offset` as two little-endian `u64`s, read with two aligned loads (virtio
/// aligns descriptors and request headers so); `None` when unaligned or out of bounds. A
/// 16-byte `read_obj` costs a byte-wise copy and a stalled reload of what it stored.
fn load_16(slice: &VolatileSlice<'_, ()>, offset: usize) -> Option<[u64; 2]> {
    let load = |offset| {
        let word = slice.get_atomic_ref::<AtomicU64>(offset).ok()?;
        Some(u64::from_le(word.load(Ordering::Relaxed)))
    };
    Some([load(offset)?, load(offset.checked_add(8)?)?])
}

/// Calls `f` with consecutive pieces (address, length) of `segments` that together cover
/// `len` bytes from byte `skip` of the segments.
fn for_each_piece<E>(
    segments: &[Segment],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), E>,
) -> Result<(), E> {
    for segment in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(segment.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let piece = (seg_len - skip).min(len);
        f(segment.addr.unchecked_add(skip), piece as usize)?;
        len -= piece;
        skip = 0;
    }
    Ok(())
}

/// A copy between host bytes and request segments.
enum Copy<'a> {
    ToGuest(&'a [u8]),
    FromGuest(&'a mut [u8]),
}

/// Copies between `bytes` and the segments' bytes from byte `skip` on.
fn copy_guest(
    memory: &GuestView<'_>,
    segments: &[Segment],
    skip: u64,
    copy: Copy<'_>,
) -> Result<(), RequestError> {
    let mut done = 0;
    match copy {
        Copy::ToGuest(bytes) => for_each_piece(segments, skip, bytes.len() as u64, |addr, len| {
            done += len;
            Ok(memory.write_slice(&bytes[done - len..done], addr)?)
        }),
        Copy::FromGuest(bytes) => {
            for_each_piece(segments, skip, bytes.len() as u64, |addr, len| {
                done += len;
                Ok(memory.read_slice(&mut bytes[done - len..done], addr)?)
            })
        }
    }
}

/// Direction of a [`transfer`].
#[derive(Clone, Copy, PartialEq)]
enum Dir {
    /// Image to guest memory (`preadv`).
    Read,
    /// Guest memory to image (`pwritev`).
    Write,
}

/// I/O vectors per `preadv`/`pwritev` call.
const IOV_BATCH: usize = 64;

/// Moves `len` bytes between the image at `offset` and the segments' bytes from byte `skip` on,
/// with `preadv`/`pwritev` straight on guest memory (no bounce copy).
fn transfer(
    file: &File,
    memory: &GuestView<'_>,
    segments: &[Segment],
    skip: u64,
    len: u64,
    mut offset: u64,
    dir: Dir,
) -> Result<(), RequestError> {
    // The common request: one buffer inside one region, one pread/pwrite, no vector arrays.
    if let Some(slice) = single_slice(memory, segments, skip, len) {
        if dir == Dir::Read {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        let guard = slice.ptr_guard_mut();
        let mut iov = [libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: guard.len(),
        }];
        // SAFETY: the vector is `slice`, guest memory that `guard` keeps mapped.
        unsafe { submit(file, &mut iov, offset, dir) }?;
        return Ok(());
    }
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iovs = [empty; IOV_BATCH];
    // The guards keep the slices' host mappings valid until the system call has returned.
    let mut guards: [Option<PtrGuardMut>; IOV_BATCH] = std::array::from_fn(|_| None);
    let mut n = 0;
    for_each_piece(segments, skip, len, |addr, piece| {
        memory.for_each_slice(addr, piece, |slice| {
            if dir == Dir::Read {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            let guard = slice.ptr_guard_mut();
            iovs[n] = libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: guard.len(),
            };
            guards[n] = Some(guard);
            n += 1;
            if n == IOV_BATCH {
                // SAFETY: every vector is a slice of guest memory whose guard is in `guards`.
                offset += unsafe { submit(file, &mut iovs, offset, dir) }?;
                guards.iter_mut().for_each(|g| *g = None);
                n = 0;
            }
            Ok(())
        })
    })?;
    if n > 0 {
        // SAFETY: as above, for the first `n` vectors.
        unsafe { submit(file, &mut iovs[..n], offset, dir) }?;
    }
    Ok(())
}

/// The `len` bytes from byte `skip` of `segments` as one slice, if they lie in one segment
/// and one region.
fn single_slice<'m>(
    memory: &GuestView<'m>,
    segments: &[Segment],
    skip: u64,
    len: u64,
) -> Option<VolatileSlice<'m, ()>> {
    let addr = single_piece(segments, skip, len)?;
    memory.slice(addr, usize::try_from(len).ok()?)
}

/// The address of the `len` bytes from byte `skip` of `segments`, if they lie in one segment.
fn single_piece(segments: &[Segment], mut skip: u64, len: u64) -> Option<GuestAddress> {
    for segment in segments {
        let seg_len = u64::from(segment.len);
        if skip < seg_len {
            return (skip + len <= seg_len).then(|| segment.addr.unchecked_add(skip));
        }
        skip -= seg_len;
    }
    None
}

/// One `preadv`/`pwritev` of all of `iovs` at `offset`, repeated over what a short transfer
/// left; returns the bytes moved.
///
/// # Safety
///
/// Each vector must describe memory that stays mapped, and that the caller may let the kernel
/// write (`Dir::Read`) or read (`Dir::Write`), for the whole call: a slice of guest memory whose
/// guard the caller holds.
unsafe fn submit(
    file: &File,
    iovs: &mut [libc::iovec],
    offset: u64,
    dir: Dir,
) -> Result<u64, RequestError> {
    let mut done = 0u64;
    let mut first = 0;
    while first < iovs.len() {
        let at = i64::try_from(offset + done).map_err(|_| RequestError::OutOfRange(offset))?;
        let rest = &iovs[first..];
        // At most IOV_BATCH vectors.
        let count = rest.len() as libc::c_int;
        let fd = file.as_raw_fd();
        // A single vector goes through pread/pwrite, which the kernel serves without importing
        // an iovec array (measurably cheaper for the common one-buffer request).
        // SAFETY: the vectors (advanced only past what the kernel already moved) describe memory
        // the kernel may write (reads) or read (writes) for the whole call, by this function's
        // contract; `count` is their number.
        let rc = unsafe {
            match (dir, rest) {
                (Dir::Read, [one]) => libc::pread(fd, one.iov_base, one.iov_len, at),
                (Dir::Read, _) => libc::preadv(fd, rest.as_ptr(), count, at),
                (Dir::Write, [one]) => libc::pwrite(fd, one.iov_base, one.iov_len, at),
                (Dir::Write, _) => libc::pwritev(fd, rest.as_ptr(), count, at),
            }
        };
        let mut moved = match usize::try_from(rc) {
            Ok(0) => {
                return Err(RequestError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the image ended before the request",
                )));
            }
            Ok(moved) => moved,
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RequestError::Io(err));
            }
        };
        done += moved as u64;
        while first < iovs.len() && moved >= iovs[first].iov_len {
            moved -= iovs[first].iov_len;
            first += 1;
        }
        if moved > 0 {
            let iov = &mut iovs[first];
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(moved).cast();
            iov.iov_len -= moved;
        }
    }
    Ok(done)
}

/// Why a request failed (reported to the guest as IOERR).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the device is read-only")]
    ReadOnly,
    #[error("length {0} is not a whole number of sectors within the request limit")]
    BadLength(u64),
    #[error("the request's buffers have the wrong device-readable/writable direction")]
    Direction,
    #[error("unsupported request type")]
    Unsupported,
    #[error("sector {0} lies outside the image")]
    OutOfRange(u64),
    #[error("image I/O failed: {0}")]
    Io(io::Error),
    #[error("guest memory access failed: {0}")]
    Guest(#[from] vm_memory::GuestMemoryError),
}

/// The virtio-blk configuration space (virtio 1.1 §5.2.4) for a disk of `capacity` sectors.
fn config_space(capacity: u64) -> Vec<u8> {
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

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_TYPE
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

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        self.serve(&mut queues[index], memory, interrupt)
    }

    fn freeze(&mut self) -> Result<DeviceState, DeviceError> {
        Ok(DeviceState::Block(Block::freeze(self)?))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::test_driver::{
        BUF, Driver, F_NEXT, F_WRITE, MEM_SIZE, QUEUE_SIZE as DRIVER_QUEUE_SIZE, S_NEEDS_RESET, reg,
    };

    const HEADER: u64 = 0x4000;
    const STATUS: u64 = 0x5000;
    const SECTORS: u64 = 64;

    /// A disk image in the temporary directory, removed on drop.
    struct Image(PathBuf);

    impl Image {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("forkvm-blk-{}-{name}", std::process::id()));
            let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
                .map(|i| (i / SECTOR_SIZE) as u8)
                .collect();
            std::fs::write(&path, bytes).unwrap();
            Self(path)
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn driver(image: &Image, read_only: bool) -> Driver {
        let block = Block::open(&image.0, read_only, false, "forkvm-disk-0").unwrap();
        let mut d = Driver::new(Box::new(block));
        d.start_with(if read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            1 << VIRTIO_BLK_F_FLUSH
        });
        d
    }

    /// Submits request `n` (head descriptor `3 * n`) with a data buffer of `len` bytes at BUF
    /// and returns (status, used length).
    fn request(
        d: &mut Driver,
        n: u16,
        request_type: u32,
        sector: u64,
        len: u32,
        data_writable: bool,
    ) -> (u8, u32) {
        d.memory
            .write_obj(request_type, GuestAddress(HEADER))
            .unwrap();
        d.memory
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        d.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut parts = vec![(HEADER, 16, false)];
        if len > 0 {
            parts.push((BUF, len, data_writable));
        }
        parts.push((STATUS, 1, true));
        d.chain(3 * n, &parts);
        d.notify();
        let (idx, used) = d.used(n);
        assert_eq!(idx, n + 1, "request {n} completed");
        (d.memory.read_obj(GuestAddress(STATUS)).unwrap(), used)
    }

    #[test]
    fn reports_capacity_and_offers_discard_only_when_writable() {
        let image = Image::new("config");
        let mut d = driver(&image, false);
        assert_eq!(d.read(reg::DEVICE_ID), BLOCK_DEVICE_TYPE);
        assert_eq!(d.read(0x100), SECTORS as u32);
        d.write(reg::DEVICE_FEATURES_SEL, 0);
        let features = d.read(reg::DEVICE_FEATURES);
        assert_ne!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = Block::open(&image.0, true, false, "").unwrap();
        assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn writes_reach_the_image_and_read_back() {
        let image = Image::new("rw");
        let mut d = driver(&image, false);
        d.memory
            .write_slice(&[0xab; 1024], GuestAddress(BUF))
            .unwrap();
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_OUT, 3, 1024, false),
            (VIRTIO_BLK_S_OK as u8, 1)
        );
        assert_eq!(
            request(&mut d, 1, VIRTIO_BLK_T_FLUSH, 0, 0, false).0,
            VIRTIO_BLK_S_OK as u8
        );
        let on_disk = std::fs::read(&image.0).unwrap();
        assert!(on_disk[3 * 512..5 * 512].iter().all(|b| *b == 0xab));
        assert_eq!(on_disk[5 * 512], 5, "the next sector is untouched");
        d.memory.write_slice(&[0; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(
            request(&mut d, 2, VIRTIO_BLK_T_IN, 5, 512, true),
            (VIRTIO_BLK_S_OK as u8, 513)
        );
        let mut sector = [0u8; 512];
        d.memory.read_slice(&mut sector, GuestAddress(BUF)).unwrap();
        assert_eq!(sector, [5; 512]);
    }

    #[test]
    fn read_only_device_refuses_writes_with_ioerr() {
        let image = Image::new("ro");
        let mut d = driver(&image, true);
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_OUT, 0, 512, false).0,
            VIRTIO_BLK_S_IOERR as u8
        );
        assert_eq!(
            request(&mut d, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
            VIRTIO_BLK_S_IOERR as u8
        );
        assert_eq!(std::fs::read(&image.0).unwrap()[0], 0);
    }

    #[test]
    fn out_of_range_and_partial_sectors_fail_with_ioerr() {
        let image = Image::new("range");
        let mut d = driver(&image, false);
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_IN, SECTORS, 512, true).0,
            ioerr
        );
        assert_eq!(
            request(&mut d, 1, VIRTIO_BLK_T_IN, SECTORS - 1, 1024, true).0,
            ioerr
        );
        assert_eq!(
            request(&mut d, 2, VIRTIO_BLK_T_IN, u64::MAX, 512, true).0,
            ioerr
        );
        assert_eq!(request(&mut d, 3, VIRTIO_BLK_T_OUT, 0, 100, false).0, ioerr);
        assert_eq!(
            d.read(reg::STATUS) & S_NEEDS_RESET,
            0,
            "bad requests are not device errors"
        );
    }

    #[test]
    fn get_id_unknown_types_and_write_zeroes() {
        let image = Image::new("misc");
        let mut d = driver(&image, false);
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_GET_ID, 0, 20, true),
            (VIRTIO_BLK_S_OK as u8, 21)
        );
        let mut id = [0u8; 20];
        d.memory.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..13], b"forkvm-disk-0");
        assert_eq!(
            request(&mut d, 1, 0x77, 0, 0, false).0,
            VIRTIO_BLK_S_UNSUPP as u8
        );
        // One segment: sector 2, 3 sectors, no flags.
        d.memory.write_obj(2u64, GuestAddress(BUF)).unwrap();
        d.memory.write_obj(3u32, GuestAddress(BUF + 8)).unwrap();
        d.memory.write_obj(0u32, GuestAddress(BUF + 12)).unwrap();
        assert_eq!(
            request(&mut d, 2, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).0,
            VIRTIO_BLK_S_OK as u8
        );
        let on_disk = std::fs::read(&image.0).unwrap();
        assert!(on_disk[2 * 512..5 * 512].iter().all(|b| *b == 0));
        assert_eq!(on_disk[5 * 512], 5);
    }

    #[test]
    fn a_chain_without_a_status_byte_needs_reset() {
        let image = Image::new("nostatus");
        let mut d = driver(&image, false);
        d.memory
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
            .unwrap();
        d.descriptor(0, HEADER, 16, F_NEXT, 1);
        d.descriptor(1, BUF, 512, 0, 0); // data not writable, and no status descriptor
        d.make_available(0);
        d.notify();
        assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
    }

    #[test]
    fn buffers_outside_guest_memory_need_reset() {
        let image = Image::new("oob");
        let mut d = driver(&image, false);
        d.descriptor(0, HEADER, 16, F_NEXT, 1);
        d.descriptor(1, MEM_SIZE as u64 - 256, 512, F_WRITE | F_NEXT, 2);
        d.descriptor(2, STATUS, 1, F_WRITE, 0);
        d.make_available(0);
        d.notify();
        assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
    }

    #[test]
    fn direct_io_reads_and_writes_through_an_aligned_buffer() {
        let image = Image::new("direct");
        let block = Block::open(&image.0, false, true, "direct").unwrap();
        let mut d = Driver::new(Box::new(block));
        d.start();
        d.memory
            .write_slice(&[0x5a; 512], GuestAddress(BUF))
            .unwrap();
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_OUT, 7, 512, false).0,
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(
            request(&mut d, 1, VIRTIO_BLK_T_IN, 6, 1024, true).0,
            VIRTIO_BLK_S_OK as u8
        );
        let mut two = [0u8; 1024];
        d.memory.read_slice(&mut two, GuestAddress(BUF)).unwrap();
        assert_eq!(two[..512], [6; 512]);
        assert_eq!(two[512..], [0x5a; 512]);
    }

    /// Writes a read request's header for `sector` at HEADER and clears the status byte.
    fn read_header(d: &Driver, sector: u64) {
        d.memory
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
            .unwrap();
        d.memory
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        d.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn needs_reset(d: &mut Driver) -> bool {
        d.read(reg::STATUS) & S_NEEDS_RESET != 0
    }

    fn status(d: &Driver) -> u8 {
        d.memory.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn looping_chains_need_reset() {
        let image = Image::new("loop");
        let mut d = driver(&image, false);
        read_header(&d, 0);
        d.descriptor(0, HEADER, 16, F_NEXT, 1);
        d.descriptor(1, BUF, 512, F_WRITE | F_NEXT, 0); // back to the head
        d.make_available(0);
        d.notify();
        assert!(needs_reset(&mut d));
    }

    #[test]
    fn chains_longer_than_the_queue_need_reset() {
        let image = Image::new("long");
        let mut d = driver(&image, false);
        read_header(&d, 0);
        // Every descriptor of the table, the last one pointing back into it: the walk visits
        // more descriptors than the queue has.
        d.descriptor(0, HEADER, 16, F_NEXT, 1);
        for i in 1..DRIVER_QUEUE_SIZE {
            d.descriptor(
                i,
                BUF,
                512,
                F_WRITE | F_NEXT,
                (i + 1) % DRIVER_QUEUE_SIZE.max(2),
            );
        }
        d.descriptor(DRIVER_QUEUE_SIZE - 1, STATUS, 1, F_WRITE | F_NEXT, 5);
        d.make_available(0);
        d.notify();
        assert!(needs_reset(&mut d));
        assert_eq!(status(&d), 0xff, "nothing was completed");
    }

    #[test]
    fn a_chain_of_a_whole_queue_is_served() {
        let image = Image::new("wholequeue");
        let mut d = driver(&image, false);
        // Header, 126 half-sector buffers (all the same guest buffer), status: 128 descriptors.
        read_header(&d, 1);
        d.descriptor(0, HEADER, 16, F_NEXT, 1);
        for i in 1..DRIVER_QUEUE_SIZE - 1 {
            d.descriptor(i, BUF, 256, F_WRITE | F_NEXT, i + 1);
        }
        d.descriptor(DRIVER_QUEUE_SIZE - 1, STATUS, 1, F_WRITE, 0);
        d.make_available(0);
        d.notify();
        assert!(!needs_reset(&mut d));
        assert_eq!(
            (status(&d), d.used(0)),
            (VIRTIO_BLK_S_OK as u8, (1, 126 * 256 + 1))
        );
        let mut last = [0u8; 256];
        d.memory.read_slice(&mut last, GuestAddress(BUF)).unwrap();
        assert_eq!(last, [63; 256], "the buffer holds the last half sector");
    }

    #[test]
    fn next_outside_the_table_and_indirect_descriptors_need_reset() {
        for (name, flags, next) in [("next", F_NEXT, DRIVER_QUEUE_SIZE), ("indirect", 4, 0)] {
            let image = Image::new(name);
            let mut d = driver(&image, false);
            read_header(&d, 0);
            d.descriptor(0, HEADER, 16, F_NEXT, 1);
            d.descriptor(1, BUF, 512, F_WRITE | flags, next);
            d.descriptor(2, STATUS, 1, F_WRITE, 0);
            d.make_available(0);
            d.notify();
            assert!(needs_reset(&mut d), "{name}");
        }
    }

    #[test]
    fn buffers_with_the_wrong_direction_fail_with_ioerr() {
        let image = Image::new("direction");
        let mut d = driver(&image, false);
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        d.memory
            .write_slice(&[0xee; 512], GuestAddress(BUF))
            .unwrap();
        // A read into a buffer the device may only read, and a write from one it may only write.
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_IN, 1, 512, false),
            (ioerr, 1)
        );
        assert_eq!(
            request(&mut d, 1, VIRTIO_BLK_T_OUT, 1, 512, true),
            (ioerr, 1)
        );
        let mut buf = [0u8; 512];
        d.memory.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
        assert_eq!(buf, [0xee; 512], "the read buffer is untouched");
        assert_eq!(
            std::fs::read(&image.0).unwrap()[512],
            1,
            "the image is untouched"
        );
        // A device-readable descriptor after a device-writable one.
        read_header(&d, 1);
        d.descriptor(6, HEADER, 16, F_NEXT, 7);
        d.descriptor(7, BUF, 512, F_WRITE | F_NEXT, 8);
        d.descriptor(8, BUF + 0x1000, 16, F_NEXT, 9);
        d.descriptor(9, STATUS, 1, F_WRITE, 0);
        d.make_available(6);
        d.notify();
        assert_eq!(status(&d), ioerr);
        assert!(!needs_reset(&mut d));
    }

    #[test]
    fn empty_descriptors_are_skipped_and_buffers_may_be_split() {
        let image = Image::new("split");
        let mut d = driver(&image, false);
        read_header(&d, 2);
        // The header in two halves, an empty descriptor with a bogus address, the data in
        // three pieces of which the last also holds the status byte.
        d.descriptor(0, HEADER, 8, F_NEXT, 1);
        d.descriptor(1, HEADER + 8, 8, F_NEXT, 2);
        d.descriptor(2, u64::MAX - 8, 0, F_WRITE | F_NEXT, 3);
        d.descriptor(3, BUF, 100, F_WRITE | F_NEXT, 4);
        d.descriptor(4, BUF + 0x1000, 412, F_WRITE | F_NEXT, 5);
        d.descriptor(5, BUF + 0x2000, 513, F_WRITE, 0);
        d.make_available(0);
        d.notify();
        assert!(!needs_reset(&mut d));
        assert_eq!(d.used(0), (1, 1025));
        let status: u8 = d.memory.read_obj(GuestAddress(BUF + 0x2000 + 512)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let mut piece = [0u8; 412];
        d.memory
            .read_slice(&mut piece[..100], GuestAddress(BUF))
            .unwrap();
        assert_eq!(piece[..100], [2; 100]);
        d.memory
            .read_slice(&mut piece, GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(piece, [2; 412]);
        let mut sector = [0u8; 512];
        d.memory
            .read_slice(&mut sector, GuestAddress(BUF + 0x2000))
            .unwrap();
        assert_eq!(sector, [3; 512]);
    }

    #[test]
    fn split_writes_reach_the_image() {
        let image = Image::new("splitwrite");
        let mut d = driver(&image, false);
        d.memory
            .write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HEADER))
            .unwrap();
        d.memory.write_obj(4u64, GuestAddress(HEADER + 8)).unwrap();
        d.memory
            .write_slice(&[0x11; 24], GuestAddress(HEADER + 16))
            .unwrap();
        d.memory
            .write_slice(&[0x22; 1000], GuestAddress(BUF))
            .unwrap();
        // Header and the first 24 data bytes share a descriptor.
        d.chain(
            0,
            &[(HEADER, 40, false), (BUF, 1000, false), (STATUS, 1, true)],
        );
        d.notify();
        assert_eq!((status(&d), d.used(0)), (VIRTIO_BLK_S_OK as u8, (1, 1)));
        let on_disk = std::fs::read(&image.0).unwrap();
        assert_eq!(on_disk[4 * 512..4 * 512 + 24], [0x11; 24]);
        assert_eq!(on_disk[4 * 512 + 24..6 * 512], [0x22; 1000]);
        assert_eq!(on_disk[6 * 512], 6);
    }

    #[test]
    fn oversized_requests_fail_before_touching_memory() {
        let image = Image::new("oversized");
        let mut d = driver(&image, false);
        read_header(&d, 0);
        // 34 writable descriptors of the same 1,000,000-byte buffer: over 32 MiB in all.
        let len = 1_000_000;
        assert!(34 * len as usize > MAX_REQUEST_BYTES && BUF as usize + len as usize <= MEM_SIZE);
        d.memory.write_obj(0x77u8, GuestAddress(BUF)).unwrap();
        d.descriptor(0, HEADER, 16, F_NEXT, 1);
        for i in 1..35 {
            d.descriptor(i, BUF, len, F_WRITE | F_NEXT, i + 1);
        }
        d.descriptor(35, STATUS, 1, F_WRITE, 0);
        d.make_available(0);
        d.notify();
        assert_eq!((status(&d), d.used(0)), (VIRTIO_BLK_S_IOERR as u8, (1, 1)));
        assert_eq!(d.memory.read_obj::<u8>(GuestAddress(BUF)).unwrap(), 0x77);
    }

    #[test]
    fn a_bad_chain_ends_the_pass_after_the_requests_before_it() {
        let image = Image::new("midbatch");
        let mut d = driver(&image, false);
        read_header(&d, 3);
        d.chain(
            0,
            &[(HEADER, 16, false), (BUF, 512, true), (STATUS, 1, true)],
        );
        d.descriptor(3, HEADER, 16, F_NEXT, 3); // loops on itself
        d.make_available(3);
        d.notify();
        assert_eq!(d.used(0), (1, 513), "the first request completed");
        assert_eq!(status(&d), VIRTIO_BLK_S_OK as u8);
        assert_eq!(d.memory.read_obj::<u8>(GuestAddress(BUF)).unwrap(), 3);
        assert!(needs_reset(&mut d));
    }

    #[test]
    fn many_requests_complete_in_one_pass_with_one_interrupt() {
        let image = Image::new("batch");
        let mut d = driver(&image, false);
        for n in 0..40u16 {
            let header = HEADER + 16 * u64::from(n);
            d.memory
                .write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
                .unwrap();
            d.memory
                .write_obj(u64::from(n % 64), GuestAddress(header + 8))
                .unwrap();
            let data = BUF + 512 * u64::from(n);
            d.chain(
                3 * n,
                &[
                    (header, 16, false),
                    (data, 512, true),
                    (STATUS + u64::from(n), 1, true),
                ],
            );
        }
        d.notify();
        assert_eq!(d.used(39), (40, 513));
        for n in 0..40u64 {
            assert_eq!(
                d.memory.read_obj::<u8>(GuestAddress(STATUS + n)).unwrap(),
                0
            );
            assert_eq!(
                d.memory
                    .read_obj::<u8>(GuestAddress(BUF + 512 * n + 511))
                    .unwrap(),
                n as u8
            );
        }
        let irq = d.transport.interrupt().irq().eventfd().read().unwrap();
        assert_eq!(irq, 1, "one interrupt for the pass");
    }

    #[test]
    fn transfers_and_copies_span_adjacent_regions() {
        let image = Image::new("regions");
        let memory = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let view = GuestView::new(&memory);
        let across = [Segment {
            addr: GuestAddress(0xe00),
            len: 1024,
        }];
        assert!(view.slice(GuestAddress(0xe00), 1024).is_none());
        assert!(view.check_range(GuestAddress(0xe00), 1024));
        assert!(!view.check_range(GuestAddress(0x1e00), 1024));
        let file = File::open(&image.0).unwrap();
        transfer(&file, &view, &across, 0, 1024, 7 * 512, Dir::Read).unwrap();
        let mut back = [0u8; 1024];
        copy_guest(&view, &across, 0, Copy::FromGuest(&mut back)).unwrap();
        assert_eq!(back[..512], [7; 512]);
        assert_eq!(back[512..], [8; 512]);
    }

    #[test]
    fn an_available_index_beyond_the_queue_needs_reset() {
        let image = Image::new("availidx");
        let mut d = driver(&image, false);
        d.memory
            .write_obj(
                DRIVER_QUEUE_SIZE + 1,
                GuestAddress(crate::virtio::test_driver::AVAIL + 2),
            )
            .unwrap();
        d.notify();
        assert!(needs_reset(&mut d));
    }

    #[test]
    fn a_write_with_its_header_in_its_own_descriptor_is_one_plain_write() {
        let image = Image::new("plainwrite");
        let mut d = driver(&image, false);
        d.memory
            .write_slice(&[0x33; 512], GuestAddress(BUF))
            .unwrap();
        assert_eq!(
            request(&mut d, 0, VIRTIO_BLK_T_OUT, 9, 512, false),
            (VIRTIO_BLK_S_OK as u8, 1)
        );
        let block = Block::open(&image.0, false, false, "").unwrap();
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let view = GuestView::new(&memory);
        let mut request = Request {
            header: Some(RequestHeader {
                request_type: VIRTIO_BLK_T_OUT,
                _reserved: 0,
                sector: 9,
            }),
            readable: vec![
                Segment {
                    addr: GuestAddress(HEADER),
                    len: 16,
                },
                Segment {
                    addr: GuestAddress(BUF),
                    len: 512,
                },
            ],
            readable_len: 528,
            ..Request::default()
        };
        let io = block.plain_io(&view, &request).expect("a plain write");
        assert_eq!(
            (io.offset, io.len, io.file_offset),
            (BUF as usize, 512, 9 * 512)
        );
        request.readable[1].len = 500;
        request.readable_len = 516;
        assert!(
            block.plain_io(&view, &request).is_none(),
            "a partial sector"
        );
        assert_eq!(
            std::fs::read(&image.0).unwrap()[9 * 512..10 * 512],
            [0x33; 512]
        );
    }
}
