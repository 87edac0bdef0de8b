//! The block device's ring reader (`ring.rs`, the fast path of every request) side by side with
//! `virtio_queue::Queue::pop_descriptor_chain`, the reference it must agree with: for tests and
//! fuzzers (feature `test-utils`).
//!
//! [`device_walk`] and [`reference_walk`] read every chain the driver made available on a queue,
//! each on its own copy of the queue; [`compare`] says whether they agree. Both must yield the
//! same chains (head, then every descriptor's address, length, flags and next index, in order)
//! or refuse at the same point with the same descriptors before it. virtio-queue ends a refused
//! chain silently; here a chain counts as refused there when it ends on a descriptor that
//! names a next one (or has none at all), and the available ring as refused when
//! `Queue::iter` fails with `InvalidAvailRingIndex`. Two differences are by design:
//!
//! - An indirect descriptor: the device does not offer `VIRTIO_F_INDIRECT_DESC` and refuses
//!   it, virtio-queue follows it. Only the descriptors before it are compared.
//! - A chain of more than 2^32 - 1 bytes in all: virtio-queue ends it at the descriptor that
//!   crosses the limit (virtio 1.2 §2.7.5.2), the device reads it whole (and fails the request,
//!   which may move at most [`MAX_REQUEST_BYTES`](super::MAX_REQUEST_BYTES)). The comparison
//!   expects virtio-queue's refusal there.
//!
//! virtio-queue treats a queue whose available ring is at guest address 0 as not ready (it
//! yields nothing); [`compare_queue`] skips such queues.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::ring::{ChainError, DescriptorTable, GuestView, Rings};
use crate::virtio::GuestMemoryMmap;

/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

/// A descriptor as a reader yielded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor (meaningful with `VRING_DESC_F_NEXT`).
    pub next: u16,
}

impl From<&Descriptor> for Desc {
    fn from(desc: &Descriptor) -> Self {
        Self {
            addr: desc.addr().0,
            len: desc.len(),
            flags: desc.flags(),
            next: desc.next(),
        }
    }
}

/// A chain as a reader yielded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor (from the available ring).
    pub head: u16,
    /// The descriptors, in order.
    pub descriptors: Vec<Desc>,
}

/// Where a reader stopped short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The available index claims more new entries than the ring holds.
    AvailIndex,
    /// A chain that cannot be used, with the descriptors read before the culprit.
    Chain {
        /// The chain as far as it was read.
        chain: Chain,
        /// The culprit is an indirect descriptor (only the device refuses those).
        indirect: bool,
    },
}

/// Everything a reader made of a queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    /// The usable chains, in the order they were made available.
    pub chains: Vec<Chain>,
    /// Where the reader stopped short, if it did.
    pub refused: Option<Refusal>,
}

/// A copy of `queue` (its state and position) that a reader may advance.
fn copy_of(queue: &Queue) -> Option<Queue> {
    Queue::try_from(queue.state()).ok()
}

/// The chains available on `queue` as the device reads them: its ring reader pops each head,
/// its descriptor table walks each chain, until a chain or the available index is refused.
/// `queue` itself does not move; `None` if it cannot be copied.
pub fn device_walk(queue: &Queue, memory: &GuestMemoryMmap) -> Option<Walk> {
    let mut queue = copy_of(queue)?;
    let view = GuestView::new(memory);
    let table = DescriptorTable::new(&view, &queue);
    let mut rings = Rings::new(&view, &queue);
    let mut walk = Walk::default();
    // A static ring yields at most a queue's worth of chains; the bound only guards the test.
    for _ in 0..=usize::from(queue.size()) {
        let head = match rings.pop(&mut queue, memory) {
            Ok(Some(head)) => head,
            Ok(None) => {
                // Without its fast path the ring reader is `pop_descriptor_chain` itself, which
                // ends quietly where the fast path refuses: classify it the same way.
                if !rings.is_fast() && avail_index_refused(&mut queue, memory) {
                    walk.refused = Some(Refusal::AvailIndex);
                }
                return Some(walk);
            }
            Err(_) => {
                walk.refused = Some(Refusal::AvailIndex);
                return Some(walk);
            }
        };
        let mut descriptors = Vec::new();
        let walked = table.walk(&view, head, |desc| {
            descriptors.push(Desc::from(desc));
            Ok::<(), ChainError>(())
        });
        let chain = Chain { head, descriptors };
        match walked {
            Ok(()) => walk.chains.push(chain),
            Err(e) => {
                let indirect = matches!(e, ChainError::Indirect);
                walk.refused = Some(Refusal::Chain { chain, indirect });
                return Some(walk);
            }
        }
    }
    Some(walk)
}

/// Whether virtio-queue refuses `queue`'s available index (more new entries than the ring holds).
fn avail_index_refused(queue: &mut Queue, memory: &GuestMemoryMmap) -> bool {
    matches!(
        queue.iter(memory),
        Err(virtio_queue::Error::InvalidAvailRingIndex)
    )
}

/// The chains available on `queue` as `Queue::pop_descriptor_chain` reads them. `queue` itself
/// does not move; `None` if it cannot be copied.
pub fn reference_walk(queue: &Queue, memory: &GuestMemoryMmap) -> Option<Walk> {
    let mut queue = copy_of(queue)?;
    let mut walk = Walk::default();
    for _ in 0..=usize::from(queue.size()) {
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            if avail_index_refused(&mut queue, memory) {
                walk.refused = Some(Refusal::AvailIndex);
            }
            return Some(walk);
        };
        let head = chain.head_index();
        let descriptors: Vec<Desc> = chain.map(|desc| Desc::from(&desc)).collect();
        let ended = descriptors.last().is_some_and(|d| d.flags & F_NEXT == 0);
        let chain = Chain { head, descriptors };
        if !ended {
            walk.refused = Some(Refusal::Chain {
                chain,
                indirect: false,
            });
            return Some(walk);
        }
        walk.chains.push(chain);
    }
    Some(walk)
}

/// How many of `descriptors` virtio-queue yields before their lengths add up past `u32::MAX`.
fn within_chain_limit(descriptors: &[Desc]) -> usize {
    let mut total = 0u32;
    descriptors
        .iter()
        .take_while(|d| match total.checked_add(d.len) {
            Some(sum) => {
                total = sum;
                true
            }
            None => false,
        })
        .count()
}

/// Whether `device` (from [`device_walk`]) and `reference` (from [`reference_walk`]) of the
/// same queue agree, allowing for the differences the module describes; `Err` says where not.
pub fn compare(device: &Walk, reference: &Walk) -> Result<(), String> {
    let mismatch = |what: &str, index: usize| {
        Err(format!(
            "{what} at chain {index}:\n device:    {device:?}\n reference: {reference:?}"
        ))
    };
    for (index, ours) in device.chains.iter().enumerate() {
        let limit = within_chain_limit(&ours.descriptors);
        if limit < ours.descriptors.len() {
            // virtio-queue ends the chain where it crosses 4 GiB, and refuses it.
            let expected = Refusal::Chain {
                chain: Chain {
                    head: ours.head,
                    descriptors: ours.descriptors[..limit].to_vec(),
                },
                indirect: false,
            };
            return if reference.chains.len() == index
                && reference.refused.as_ref() == Some(&expected)
            {
                Ok(())
            } else {
                mismatch("a chain over 4 GiB", index)
            };
        }
        if reference.chains.get(index) != Some(ours) {
            return mismatch("different chains", index);
        }
    }
    let index = device.chains.len();
    match &device.refused {
        None | Some(Refusal::AvailIndex) => {
            if reference.chains.len() != index || reference.refused != device.refused {
                return mismatch("different ends", index);
            }
        }
        Some(Refusal::Chain { chain, indirect }) => {
            let limit = within_chain_limit(&chain.descriptors);
            let prefix = &chain.descriptors[..limit];
            if *indirect && limit == chain.descriptors.len() {
                // virtio-queue follows the indirect descriptor: only what came before it must
                // agree.
                let theirs = reference.chains.get(index).or(match &reference.refused {
                    Some(Refusal::Chain { chain, .. }) if reference.chains.len() == index => {
                        Some(chain)
                    }
                    _ => None,
                });
                if !theirs
                    .is_some_and(|c| c.head == chain.head && c.descriptors.starts_with(prefix))
                {
                    return mismatch("different descriptors before an indirect one", index);
                }
            } else {
                let expected = Refusal::Chain {
                    chain: Chain {
                        head: chain.head,
                        descriptors: prefix.to_vec(),
                    },
                    indirect: false,
                };
                if reference.chains.len() != index || reference.refused.as_ref() != Some(&expected)
                {
                    return mismatch("different refusals", index);
                }
            }
        }
    }
    Ok(())
}

/// Reads `queue` (ready, valid in `memory`) with both readers and compares them; `Ok` also when
/// the queue is one the comparison skips (see the module).
pub fn compare_queue(queue: &Queue, memory: &GuestMemoryMmap) -> Result<(), String> {
    if queue.avail_ring() == 0 || !queue.ready() {
        return Ok(());
    }
    let (Some(device), Some(reference)) =
        (device_walk(queue, memory), reference_walk(queue, memory))
    else {
        return Ok(());
    };
    compare(&device, &reference)
}

#[cfg(test)]
#[path = "ring_check_tests.rs"]
mod tests;
