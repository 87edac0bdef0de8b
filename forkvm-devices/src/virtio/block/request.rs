//! A request chain parsed once into the segments the device moves data from and into, its
//! header and where its status byte goes, with every guest address checked; and why a request
//! fails ([`RequestError`]).

use std::io;

use vm_memory::{Address, ByteValued, GuestAddress};

use super::io::{Copy, Dir, copy_guest};
use super::ring::{DescriptorTable, GuestView, load_16};
use crate::virtio::DeviceError;

/// The request header every chain starts with.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub(super) struct RequestHeader {
    pub(super) request_type: u32,
    pub(super) _reserved: u32,
    pub(super) sector: u64,
}

// SAFETY: plain integers with no padding; any byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

impl RequestHeader {
    /// Its size in guest memory.
    pub(super) const LEN: u64 = std::mem::size_of::<Self>() as u64;
}

/// One non-empty descriptor of a request, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    pub(super) addr: GuestAddress,
    pub(super) len: u32,
}

/// A request chain, parsed once into buffers the device reuses for every request: the
/// device-readable segments (header, then data for writes), the device-writable ones (data for
/// reads, without the status byte) and where the status byte goes.
#[derive(Default)]
pub(super) struct Request {
    /// The chain's head descriptor, its used-ring ID.
    pub(super) head: u16,
    /// The first 16 device-readable bytes (`None` when there are fewer).
    pub(super) header: Option<RequestHeader>,
    pub(super) readable: Vec<Segment>,
    pub(super) writable: Vec<Segment>,
    pub(super) readable_len: u64,
    pub(super) writable_len: u64,
    pub(super) status_addr: GuestAddress,
    /// The request's outcome: its virtio status and the used length (data written plus the
    /// status byte).
    pub(super) status: u32,
    pub(super) used: u32,
    /// A readable descriptor follows a writable one (virtio 1.1 §2.6.4.2 forbids it).
    pub(super) misordered: bool,
    /// The request as one plain read or write, if it is one (see `Block::plain_io`).
    pub(super) plain: Option<PlainIo>,
}

/// A read or write between the image and one buffer inside one guest memory region.
#[derive(Clone, Copy)]
pub(super) struct PlainIo {
    /// Index of the region in [`GuestView::regions`] and offset in it.
    pub(super) region: usize,
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) file_offset: u64,
    pub(super) dir: Dir,
}

impl Request {
    /// The non-empty descriptors of the parsed chain (its status byte's included).
    #[inline]
    pub(super) fn descriptors(&self) -> usize {
        self.readable.len() + self.writable.len() + 1
    }

    /// Bytes of the guest's buffers the request names, besides the status byte.
    #[inline]
    pub(super) fn data_len(&self) -> usize {
        usize::try_from(self.readable_len.saturating_add(self.writable_len)).unwrap_or(usize::MAX)
    }

    /// Walks the chain at `head` once. The chain is unusable — the device needs a reset — when
    /// a descriptor index lies outside the table, the chain loops or is longer than the queue,
    /// a descriptor is indirect (not offered), a buffer lies outside guest memory, or no byte
    /// is device-writable for the status. Empty descriptors are skipped; the status byte is the
    /// last device-writable byte.
    #[inline]
    pub(super) fn parse(
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
        table.walk(memory, head, |desc| {
            if desc.len() == 0 {
                return Ok(());
            }
            let segment = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if !memory.check_range(segment.addr, segment.len as usize) {
                return Err(DeviceError::BadRequest(format!(
                    "buffer {:#x}+{:#x} lies outside guest memory",
                    segment.addr.0, segment.len
                )));
            }
            if desc.is_write_only() {
                self.writable.push(segment);
                self.writable_len += u64::from(segment.len);
            } else {
                self.misordered |= !self.writable.is_empty();
                self.readable.push(segment);
                self.readable_len += u64::from(segment.len);
            }
            Ok(())
        })?;
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
    #[inline]
    pub(super) fn read_header(
        &self,
        memory: &GuestView<'_>,
    ) -> Result<RequestHeader, RequestError> {
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

/// Why a request failed (reported to the guest as IOERR).
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
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
