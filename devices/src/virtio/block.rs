//! virtio-blk (type 2) over a raw image file: read, write, flush, get-id, and, on writable images,
//! discard and write-zeroes (punching or zeroing ranges of the file).
//!
//! Every request is checked before it touches the file: the header must be complete, data
//! lengths whole sectors, every sector inside the image, writes refused on a read-only device,
//! and no request may move more than [`MAX_REQUEST_BYTES`]. A bad request completes with
//! `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for unknown types); a chain with no room for the status
//! byte cannot be completed at all and puts the device into `DEVICE_NEEDS_RESET`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, Reader, Writer};

use super::{
    DeviceError, GuestMemoryMmap, Interrupt, VIRTIO_F_VERSION_1, VirtioDevice, read_config_bytes,
    serve_queue,
};

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
unsafe impl vm_memory::ByteValued for RequestHeader {}

/// A raw disk image behind a virtio-blk device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    config: Vec<u8>,
    bounce: AlignedBuffer,
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
        let config = config_space(capacity_sectors);
        Ok(Self {
            file,
            read_only,
            capacity_sectors,
            id,
            config,
            bounce: AlignedBuffer::new(BOUNCE_SIZE),
        })
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

    /// Executes one request; returns its virtio status.
    fn execute(
        &mut self,
        header: RequestHeader,
        reader: &mut Reader<'_>,
        data: &mut Writer<'_>,
    ) -> u32 {
        let result = match header.request_type {
            VIRTIO_BLK_T_IN => self.read_sectors(header.sector, data),
            VIRTIO_BLK_T_OUT if !self.read_only => self.write_sectors(header.sector, reader),
            VIRTIO_BLK_T_FLUSH => self.file.sync_data().map_err(RequestError::Io),
            VIRTIO_BLK_T_GET_ID => data
                .write_all(&self.id[..ID_LEN.min(data.available_bytes())])
                .map_err(RequestError::Io),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if !self.read_only => {
                self.zero_range(header.request_type, reader)
            }
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                Err(RequestError::ReadOnly)
            }
            _ => return VIRTIO_BLK_S_UNSUPP,
        };
        match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::debug!(
                    "virtio-blk: request type {} sector {} failed: {e}",
                    header.request_type,
                    header.sector
                );
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    fn checked_len(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::BadLength(len));
        }
        self.range(sector, len as u64)
            .ok_or(RequestError::OutOfRange(sector))
    }

    fn read_sectors(&mut self, sector: u64, data: &mut Writer<'_>) -> Result<(), RequestError> {
        let mut offset = self.checked_len(sector, data.available_bytes())?;
        while data.available_bytes() > 0 {
            let chunk = data.available_bytes().min(self.bounce.len());
            self.file
                .read_exact_at(&mut self.bounce.as_mut()[..chunk], offset)
                .map_err(RequestError::Io)?;
            data.write_all(&self.bounce.as_mut()[..chunk])
                .map_err(RequestError::Io)?;
            offset += chunk as u64;
        }
        Ok(())
    }

    fn write_sectors(&mut self, sector: u64, data: &mut Reader<'_>) -> Result<(), RequestError> {
        let mut offset = self.checked_len(sector, data.available_bytes())?;
        while data.available_bytes() > 0 {
            let chunk = data.available_bytes().min(self.bounce.len());
            data.read_exact(&mut self.bounce.as_mut()[..chunk])
                .map_err(RequestError::Io)?;
            self.file
                .write_all_at(&self.bounce.as_mut()[..chunk], offset)
                .map_err(RequestError::Io)?;
            offset += chunk as u64;
        }
        Ok(())
    }

    /// Discard (punch a hole) or write zeroes over the one segment the request carries.
    fn zero_range(&mut self, request_type: u32, data: &mut Reader<'_>) -> Result<(), RequestError> {
        if data.available_bytes() != SEGMENT_LEN {
            return Err(RequestError::BadLength(data.available_bytes()));
        }
        let sector: u64 = data.read_obj().map_err(RequestError::Io)?;
        let sectors: u32 = data.read_obj().map_err(RequestError::Io)?;
        let _flags: u32 = data.read_obj().map_err(RequestError::Io)?;
        if sectors > MAX_RANGE_SECTORS {
            return Err(RequestError::BadLength(sectors as usize));
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let offset = self
            .range(sector, len)
            .ok_or(RequestError::OutOfRange(sector))?;
        let mode = match request_type {
            VIRTIO_BLK_T_DISCARD => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            _ => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is our open image.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if request_type == VIRTIO_BLK_T_DISCARD {
            // Discard is a hint: a file system without hole punching simply keeps the data.
            return Ok(());
        }
        log::debug!("virtio-blk: ZERO_RANGE unsupported ({err}); writing zeroes");
        self.bounce.as_mut().fill(0);
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(self.bounce.len() as u64) as usize;
            self.file
                .write_all_at(&self.bounce.as_mut()[..chunk], offset + done)
                .map_err(RequestError::Io)?;
            done += chunk as u64;
        }
        Ok(())
    }

    /// Serves one descriptor chain; returns the bytes written into guest buffers.
    fn serve(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, DeviceError> {
        let mut reader = Reader::new(memory, chain.clone())?;
        let mut writer = Writer::new(memory, chain)?;
        let Some(status_at) = writer.available_bytes().checked_sub(1) else {
            return Err(DeviceError::BadRequest("no writable status byte".into()));
        };
        let mut status_writer = writer.split_at(status_at)?;
        let status = match reader.read_obj::<RequestHeader>() {
            Ok(header) => self.execute(header, &mut reader, &mut writer),
            Err(_) => VIRTIO_BLK_S_IOERR,
        };
        status_writer.write_all(&[status as u8])?;
        // Both lengths are bounded by MAX_REQUEST_BYTES or the 20-byte ID.
        Ok((writer.bytes_written() + 1) as u32)
    }
}

/// Why a request failed (reported to the guest as IOERR).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the device is read-only")]
    ReadOnly,
    #[error("length {0} is not a whole number of sectors within the request limit")]
    BadLength(usize),
    #[error("sector {0} lies outside the image")]
    OutOfRange(u64),
    #[error("image I/O failed: {0}")]
    Io(io::Error),
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
        serve_queue(&mut queues[index], memory, interrupt, |chain| {
            self.serve(memory, chain)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::test_driver::{BUF, Driver, F_NEXT, F_WRITE, MEM_SIZE, S_NEEDS_RESET, reg};

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
}
