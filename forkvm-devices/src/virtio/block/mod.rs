//! virtio-blk (type 2) over a raw image file: read, write, flush, get-id, and, on writable images,
//! discard and write-zeroes (punching or zeroing ranges of the file).
//!
//! A notification is served in rounds (`device.rs`): parse every available chain, then read or
//! write the image straight from and into guest memory, then write the status bytes and used
//! entries, publish the used index and interrupt once. The pieces:
//!
//! - `ring.rs`: the split-ring reader of the fast path (available and used rings, descriptor
//!   table, guest memory as one pass sees it). A chain the device cannot use puts it into
//!   `DEVICE_NEEDS_RESET`: one that loops or is longer than the queue, names a descriptor
//!   outside the table, or uses an indirect descriptor (not offered); so does an available
//!   index more than a queue ahead. One notification serves requests while the transport's
//!   budget of descriptors lasts and at most [`MAX_BYTES_PER_TURN`] of data; the rest is
//!   served on the event loop's next turn.
//! - `request.rs`: a chain parsed into a request: segments checked to lie inside guest memory,
//!   the header, the status byte (a chain without a device-writable byte needs a reset too).
//! - `io.rs`: requests executed against the image (one `pread`/`pwrite` per plain request, no
//!   bounce copy unless the image is opened with `O_DIRECT`). Every request is checked before
//!   it touches the file (complete header, buffers in the right direction, whole sectors inside
//!   the image, no write on a read-only device, at most [`MAX_REQUEST_BYTES`]); a bad one
//!   completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for unknown types, and for discard and
//!   write-zeroes unless the driver accepted `VIRTIO_BLK_F_DISCARD` or `_WRITE_ZEROES`).
//! - `layers.rs`: copy-on-write storage of forked disks ([`Block::freeze`],
//!   [`Block::from_state`]); `docs/design/block-cow.md` describes how and at what cost. A disk
//!   never frozen pays nothing for it.
//! - `persist.rs`: a frozen disk as a snapshot records it ([`BlockState`], [`SavedBlock`]).
//! - `ring_check.rs` (tests and feature `test-utils`): the ring reader compared with
//!   virtio-queue's, for the differential test and the `block_ring` fuzz target.

mod device;
mod io;
mod layers;
mod persist;
mod request;
mod ring;
#[cfg(any(test, feature = "test-utils"))]
pub mod ring_check;

#[cfg(test)]
mod fork_tests;
#[cfg(test)]
mod tests;

pub use device::Block;
pub use layers::layer_file;
pub use persist::{BlockState, SavedBlock, SavedDiskError};

/// Virtio device type of block devices.
pub const BLOCK_DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Bytes per sector, the unit of every block request.
pub const SECTOR_SIZE: u64 = 512;
/// Most data one request may move (larger requests fail with IOERR).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Most data the requests served for one notification move (at least one request is served;
/// the rest waits for the event loop's next turn): about a millisecond of copying.
pub const MAX_BYTES_PER_TURN: usize = 4 << 20;
/// Length of the device ID returned by GET_ID.
pub const ID_LEN: usize = 20;
const QUEUE_SIZE: u16 = 256;
const BOUNCE_SIZE: usize = 256 << 10;
/// Discard and write-zeroes accept one segment per request, of at most this many sectors.
const MAX_RANGE_SECTORS: u32 = u32::MAX >> 9;
const SEGMENT_LEN: usize = 16;
