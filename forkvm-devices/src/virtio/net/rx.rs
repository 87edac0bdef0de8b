//! The receive path: places one frame from the backend into the guest's receive buffers, or
//! says why not. Chains are taken off the available ring until they hold the header and the
//! whole frame (one chain without `MRG_RXBUF`, as many as needed with it); if they do not, every
//! chain taken is put back (the ring is rewound) so the guest loses no buffer, and the frame
//! stays in the backend. Only a frame that a whole ring of such buffers cannot hold (without
//! `MRG_RXBUF`: that one chain) is given up, or it would wedge the queue forever.
//!
//! The buffers are checked and recorded once ([`Segment`]) and then written from the record, so
//! a guest rewriting its descriptors meanwhile changes nothing.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{MAX_CHAIN_DESCRIPTORS, MAX_FRAME_LEN, NET_HDR_LEN};
use crate::virtio::chains::next_chain;
use crate::virtio::{Budget, Chain, DeviceError, GuestMemoryMmap};

/// Where `num_buffers` lies in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize =
    std::mem::offset_of!(virtio_bindings::virtio_net::virtio_net_hdr_v1, num_buffers);

fn bad(why: String) -> DeviceError {
    DeviceError::BadRequest(why)
}

/// A checked, device-writable piece of guest memory the frame may be written into.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// A receive chain taken for the frame being placed, and how many bytes of it were recorded.
#[derive(Clone, Copy, Debug)]
struct Taken {
    head: u16,
    capacity: usize,
}

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placed {
    /// Written into the guest's buffers, whose chains were added to the used ring.
    Delivered,
    /// The buffers available now do not hold it; it must wait for more.
    NoRoom,
    /// No buffers the guest can post would hold it: it must be dropped.
    NeverFits,
}

/// The receive path's records, reused from frame to frame: at most a ring's worth of chains,
/// and segments of at least one byte each (zero-length descriptors are skipped) that together
/// hold at most the header and the largest frame, plus one header's room.
#[derive(Default)]
pub(super) struct Receiver {
    segments: Vec<Segment>,
    taken: Vec<Taken>,
}

impl Receiver {
    /// Forgets what the last frame used (after a reset).
    pub(super) fn clear(&mut self) {
        self.segments.clear();
        self.taken.clear();
    }

    /// Writes the virtio-net header and `frame` into the receive buffers available on `queue`
    /// and adds the chains used to the used ring (the caller notifies the driver). With
    /// `mergeable` (`MRG_RXBUF`), the frame may span several chains and the header's
    /// `num_buffers` says how many. `flags` goes into the header's `flags` (`DATA_VALID` or 0).
    pub(super) fn place(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        frame: &[u8],
        mergeable: bool,
        flags: u8,
    ) -> Result<Placed, DeviceError> {
        if frame.len() > MAX_FRAME_LEN {
            return Ok(Placed::NeverFits);
        }
        let needed = NET_HDR_LEN + frame.len();
        let most_chains = if mergeable {
            usize::from(queue.size())
        } else {
            1
        };
        self.clear();
        let mut capacity = 0usize;
        // The frames waiting in the backend bound this work, not the guest: a frame takes at
        // most a ring's worth of chains, each at most a queue's worth of descriptors.
        let budget = Budget::unlimited();
        while capacity < needed && self.taken.len() < most_chains {
            let Some(chain) = next_chain(queue, memory, &budget)? else {
                break;
            };
            let head = chain.head();
            let want = (needed - capacity).max(NET_HDR_LEN);
            let got = self.take_buffers(&chain, memory, want)?;
            self.taken.push(Taken {
                head,
                capacity: got,
            });
            capacity += got;
        }
        if capacity < needed {
            // Put back every chain taken: the guest keeps its buffers for the next frame.
            for _ in 0..self.taken.len() {
                queue.go_to_previous_position();
            }
            return Ok(if self.taken.len() == most_chains {
                Placed::NeverFits
            } else {
                Placed::NoRoom
            });
        }

        let num_buffers = u16::try_from(self.taken.len())
            .map_err(|_| bad("more receive chains than a queue holds".into()))?;
        let mut header = [0u8; NET_HDR_LEN];
        header[0] = flags;
        header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut cursor = Cursor {
            segments: self.segments.iter(),
            at: GuestAddress(0),
            room: 0,
        };
        cursor.write(memory, &header)?;
        cursor.write(memory, frame)?;
        // Chains are filled in order, each to what was recorded of it: all but the last fully.
        let mut left = needed;
        for taken in &self.taken {
            let written = taken.capacity.min(left);
            left -= written;
            let len = u32::try_from(written)
                .map_err(|_| bad(format!("{written} bytes written into one chain")))?;
            queue.add_used(memory, taken.head, len)?;
        }
        Ok(Placed::Delivered)
    }

    /// Records the device-writable buffers of `chain` until they hold `want` bytes (or the chain
    /// ends); returns how many bytes were recorded. Refuses a chain with a device-readable
    /// descriptor, a buffer outside guest memory, more than [`MAX_CHAIN_DESCRIPTORS`]
    /// descriptors, or less room than the virtio-net header (`want` is at least its size).
    fn take_buffers(
        &mut self,
        chain: &Chain<'_>,
        memory: &GuestMemoryMmap,
        want: usize,
    ) -> Result<usize, DeviceError> {
        let mut got = 0usize;
        for (n, descriptor) in chain.descriptors().iter().enumerate() {
            if n >= MAX_CHAIN_DESCRIPTORS {
                return Err(bad(format!(
                    "receive chain of more than {MAX_CHAIN_DESCRIPTORS} descriptors"
                )));
            }
            if !descriptor.is_write_only() {
                return Err(bad("device-readable descriptor in a receive chain".into()));
            }
            let len = usize::try_from(descriptor.len())
                .map_err(|_| bad("receive buffer larger than the host's address space".into()))?;
            if !memory.check_range(descriptor.addr(), len) {
                return Err(bad(format!(
                    "receive buffer of {len} bytes at {:#x} outside guest memory",
                    descriptor.addr().raw_value()
                )));
            }
            let take = len.min(want - got);
            if take > 0 {
                self.segments.push(Segment {
                    addr: descriptor.addr(),
                    len: take,
                });
                got += take;
            }
            if got >= want {
                break;
            }
        }
        if got < NET_HDR_LEN {
            return Err(bad(format!(
                "receive chain of {got} bytes, shorter than the virtio-net header"
            )));
        }
        Ok(got)
    }
}

/// Writes bytes one after the other into recorded segments.
struct Cursor<'s> {
    segments: std::slice::Iter<'s, Segment>,
    at: GuestAddress,
    room: usize,
}

impl Cursor<'_> {
    fn write(&mut self, memory: &GuestMemoryMmap, mut data: &[u8]) -> Result<(), DeviceError> {
        while !data.is_empty() {
            if self.room == 0 {
                let segment = self
                    .segments
                    .next()
                    .ok_or_else(|| bad("receive buffers ran out while writing a frame".into()))?;
                self.at = segment.addr;
                self.room = segment.len;
                continue;
            }
            let (now, rest) = data.split_at(data.len().min(self.room));
            memory
                .write_slice(now, self.at)
                .map_err(|e| DeviceError::Queue(virtio_queue::Error::GuestMemory(e)))?;
            self.room -= now.len();
            if self.room > 0 {
                self.at = self
                    .at
                    .checked_add(now.len() as u64)
                    .ok_or_else(|| bad("receive buffer wraps the address space".into()))?;
            }
            data = rest;
        }
        Ok(())
    }
}
