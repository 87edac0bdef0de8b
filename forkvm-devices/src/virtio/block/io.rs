//! Requests executed against the image: plain reads and writes in one system call, sector I/O
//! through copy-on-write layers or an `O_DIRECT` bounce buffer, discard and write-zeroes with
//! `fallocate`, and `preadv`/`pwritev` straight on guest memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Address, GuestAddress, VolatileSlice};

use super::device::Block;
use super::layers::Cow;
use super::request::{PlainIo, Request, RequestError, RequestHeader, Segment};
use super::ring::GuestView;
use super::{ID_LEN, MAX_RANGE_SECTORS, MAX_REQUEST_BYTES, SECTOR_SIZE, SEGMENT_LEN};

/// Alignment that `O_DIRECT` asks of buffers (a page covers every device's requirement).
const DIRECT_IO_ALIGN: usize = 4096;

/// A bounce buffer aligned for `O_DIRECT`: a larger allocation and an aligned window into it.
pub(super) struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBuffer {
    pub(super) fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_IO_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_IO_ALIGN);
        Self { storage, start }
    }

    pub(super) fn len(&self) -> usize {
        self.storage.len() - DIRECT_IO_ALIGN
    }

    pub(super) fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.storage[self.start..self.start + len]
    }
}

impl Block {
    /// The common request — a read or write of whole sectors inside the image, between the
    /// image and one guest buffer, on a buffered image — worked out while the chain is at hand,
    /// so that executing it is one system call. `None` for every other request (including
    /// every request that fails), which [`Self::execute`] serves.
    #[inline]
    pub(super) fn plain_io(&self, memory: &GuestView<'_>, request: &Request) -> Option<PlainIo> {
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
    #[inline]
    pub(super) fn execute_plain(
        &mut self,
        memory: &GuestView<'_>,
        io: PlainIo,
    ) -> Result<u32, RequestError> {
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
    pub(super) fn execute(
        &mut self,
        memory: &GuestView<'_>,
        request: &Request,
    ) -> Result<u32, RequestError> {
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
            // Not negotiated: as unknown to this driver as an undefined type.
            VIRTIO_BLK_T_DISCARD if !self.accepted(VIRTIO_BLK_F_DISCARD) => {
                Err(RequestError::Unsupported)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if !self.accepted(VIRTIO_BLK_F_WRITE_ZEROES) => {
                Err(RequestError::Unsupported)
            }
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

    /// Whether the driver accepted feature bit `feature`.
    fn accepted(&self, feature: u32) -> bool {
        self.acked_features & (1 << feature) != 0
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
pub(super) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
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
pub(super) fn write_zeroes(
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
pub(super) fn read_bounced(
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

/// Calls `f` with consecutive pieces (address, length) of `segments` that together cover
/// `len` bytes from byte `skip` of the segments.
pub(super) fn for_each_piece<E>(
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
pub(super) enum Copy<'a> {
    ToGuest(&'a [u8]),
    FromGuest(&'a mut [u8]),
}

/// Copies between `bytes` and the segments' bytes from byte `skip` on.
pub(super) fn copy_guest(
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
pub(super) enum Dir {
    /// Image to guest memory (`preadv`).
    Read,
    /// Guest memory to image (`pwritev`).
    Write,
}

/// I/O vectors per `preadv`/`pwritev` call.
const IOV_BATCH: usize = 64;

/// Moves `len` bytes between the image at `offset` and the segments' bytes from byte `skip` on,
/// with `preadv`/`pwritev` straight on guest memory (no bounce copy).
pub(super) fn transfer(
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
pub(super) unsafe fn submit(
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
