//! The differential test of the ring reader against `virtio_queue::Queue::pop_descriptor_chain`
//! on seeded pseudo-random rings built with `virtio_queue::mock::MockSplitQueue`.

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::*;

const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Rings per run of the test.
const RINGS: usize = 3000;
/// Guest memory: two adjacent regions, so that a table may span them.
const BOUNDARY: u64 = 0x1_0000;
const MEM_END: u64 = 0x4_0000;

/// xorshift64*: deterministic, good enough to shape rings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What one ring exercised, to check that the run covered every case.
#[derive(Default, Debug)]
struct Seen {
    chains: usize,
    multi_descriptor_chains: usize,
    avail_refused: usize,
    chain_refused: usize,
    indirect: usize,
    over_4_gib: usize,
    table_spanning_regions: usize,
    slow_rings: usize,
    empty: usize,
}

/// A descriptor with random fields, `next` mostly inside the table.
fn random_descriptor(rng: &mut Rng, size: u16) -> Desc {
    let addr = match rng.below(4) {
        0 => rng.next(),
        _ => rng.below(MEM_END + 0x1000),
    };
    let len = match rng.below(10) {
        0 => 0,
        1 => u32::MAX - rng.below(0x1000) as u32,
        2 => rng.next() as u32,
        _ => rng.below(0x2000) as u32,
    };
    let mut flags = 0;
    if rng.chance(70) {
        flags |= F_NEXT;
    }
    if rng.chance(50) {
        flags |= F_WRITE;
    }
    if rng.chance(4) {
        flags |= F_INDIRECT;
    }
    if rng.chance(3) {
        flags |= 1 << rng.below(16);
    }
    let next = if rng.chance(5) {
        rng.next() as u16
    } else {
        rng.below(u64::from(size)) as u16
    };
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/// Links `count` distinct descriptors from `first` into a well-formed chain (the last one
/// without NEXT), in a shuffled order of table slots; returns the head.
fn link_chain(table: &mut [Desc], rng: &mut Rng, count: usize) -> u16 {
    let size = table.len();
    let mut slots: Vec<usize> = (0..size).collect();
    for i in (1..size).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let slots = &slots[..count.clamp(1, size)];
    for (i, slot) in slots.iter().enumerate() {
        let desc = &mut table[*slot];
        desc.flags &= !F_INDIRECT;
        desc.len %= 0x1000;
        match slots.get(i + 1) {
            Some(next) => {
                desc.flags |= F_NEXT;
                desc.next = *next as u16;
            }
            None => desc.flags &= !F_NEXT,
        }
    }
    slots[0] as u16
}

/// Builds one random ring in `memory`, compares both readers on it and records what it saw.
fn check_one(rng: &mut Rng, memory: &GuestMemoryMmap, seen: &mut Seen) {
    let size = 1u16 << rng.below(9);
    let table_len = 16 * u64::from(size);
    // The table inside the first region, across the boundary, or in the second region.
    let start = match rng.below(3) {
        0 => 0x1000,
        1 if size > 1 => BOUNDARY - 16 * (1 + rng.below(u64::from(size) - 1)),
        _ => BOUNDARY + 0x2000,
    };
    if start < BOUNDARY && start + table_len > BOUNDARY {
        seen.table_spanning_regions += 1;
    }
    let mock = MockSplitQueue::create(memory, GuestAddress(start), size);
    let mut table: Vec<Desc> = (0..size).map(|_| random_descriptor(rng, size)).collect();
    // Some well-formed chains too, long ones included, so that not every ring is refused early.
    let mut heads = Vec::new();
    if rng.chance(60) {
        for _ in 0..=rng.below(4) {
            let count = match rng.below(4) {
                0 => usize::from(size),
                _ => 1 + rng.below(u64::from(size).min(8)) as usize,
            };
            heads.push(link_chain(&mut table, rng, count));
        }
    }
    for (index, desc) in table.iter().enumerate() {
        let raw = RawDescriptor::from(Descriptor::new(desc.addr, desc.len, desc.flags, desc.next));
        mock.desc_table().store(index as u16, raw).unwrap();
    }
    let next_avail = rng.next() as u16;
    let available = match rng.below(10) {
        0 => u64::from(size) + 1 + rng.below(0x1_0000 - u64::from(size) - 1),
        1 => 0,
        _ => rng.below(u64::from(size) + 1),
    } as u16;
    for n in 0..available.min(size) {
        let slot = usize::from(next_avail.wrapping_add(n) % size);
        let head = match heads.get(usize::from(n)) {
            Some(head) if rng.chance(80) => *head,
            _ if rng.chance(5) => rng.next() as u16,
            _ => rng.below(u64::from(size)) as u16,
        };
        mock.avail()
            .ring()
            .ref_at(slot)
            .unwrap()
            .store(head.to_le());
    }
    mock.avail()
        .idx()
        .store(next_avail.wrapping_add(available).to_le());
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_next_avail(next_avail);
    queue.set_next_used(next_avail);
    if rng.chance(10) {
        queue.set_event_idx(true);
        seen.slow_rings += 1;
    }
    assert!(queue.is_valid(memory));

    let device = device_walk(&queue, memory).unwrap();
    let reference = reference_walk(&queue, memory).unwrap();
    if let Err(e) = compare(&device, &reference) {
        panic!("size {size}, table at {start:#x}, next_avail {next_avail}: {e}");
    }
    seen.chains += device.chains.len();
    seen.multi_descriptor_chains += device
        .chains
        .iter()
        .filter(|c| c.descriptors.len() > 1)
        .count();
    seen.over_4_gib += device
        .chains
        .iter()
        .filter(|c| within_chain_limit(&c.descriptors) < c.descriptors.len())
        .count();
    match &device.refused {
        None if device.chains.is_empty() => seen.empty += 1,
        None => {}
        Some(Refusal::AvailIndex) => seen.avail_refused += 1,
        Some(Refusal::Chain { indirect: true, .. }) => seen.indirect += 1,
        Some(Refusal::Chain { .. }) => seen.chain_refused += 1,
    }
}

#[test]
fn the_ring_reader_agrees_with_virtio_queue_on_random_rings() {
    let memory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), BOUNDARY as usize),
        (GuestAddress(BOUNDARY), (MEM_END - BOUNDARY) as usize),
    ])
    .unwrap();
    let mut rng = Rng(0x5eed_b10c_0000_0001);
    let mut seen = Seen::default();
    for _ in 0..RINGS {
        check_one(&mut rng, &memory, &mut seen);
    }
    // Every case the comparison distinguishes came up.
    let counts = [
        seen.chains,
        seen.multi_descriptor_chains,
        seen.avail_refused,
        seen.chain_refused,
        seen.indirect,
        seen.over_4_gib,
        seen.table_spanning_regions,
        seen.slow_rings,
        seen.empty,
    ];
    assert!(counts.iter().all(|n| *n >= 5), "{seen:?}");
}

#[test]
fn compare_notices_a_different_chain() {
    let desc = Desc {
        addr: 0x1000,
        len: 16,
        flags: 0,
        next: 0,
    };
    let chain = Chain {
        head: 0,
        descriptors: vec![desc],
    };
    let walk = Walk {
        chains: vec![chain.clone()],
        refused: None,
    };
    assert_eq!(compare(&walk, &walk), Ok(()));
    let mut other = walk.clone();
    other.chains[0].descriptors[0].len = 17;
    assert!(compare(&walk, &other).is_err());
    let refused = Walk {
        chains: Vec::new(),
        refused: Some(Refusal::Chain {
            chain,
            indirect: false,
        }),
    };
    assert!(compare(&walk, &refused).is_err());
    assert!(compare(&refused, &walk).is_err());
}
