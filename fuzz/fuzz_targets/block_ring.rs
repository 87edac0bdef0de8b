//! The virtio-blk device's own split-ring reader (the fast path of every request: available
//! ring, descriptor table, chains) on arbitrary queues and ring contents, side by side with
//! `virtio_queue::Queue::pop_descriptor_chain`. Neither may panic or hang, and both must read
//! the same chains or refuse at the same point (`forkvm_devices::virtio::block::ring_check`
//! describes the comparison and the two differences it allows by design).
//!
//! Input: 11 bytes of queue set-up (size, descriptor table, available and used ring addresses,
//! next available index, event index on or off, how many chains are available), then bytes
//! that seed guest memory: two adjacent regions, so that a table or ring may span them.

#![no_main]

use forkvm_devices::virtio::GuestMemoryMmap;
use forkvm_devices::virtio::block::ring_check;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x1_0000;
const BOUNDARY: usize = 0x8000;

fuzz_target!(|data: &[u8]| {
    let Some((setup, seed)) = data.split_first_chunk::<11>() else {
        return;
    };
    let memory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), BOUNDARY),
        (GuestAddress(BOUNDARY as u64), MEM_SIZE - BOUNDARY),
    ])
    .expect("guest memory");
    memory
        .write_slice(&seed[..seed.len().min(MEM_SIZE)], GuestAddress(0))
        .expect("seed guest memory");
    // Addresses below MEM_SIZE, aligned as virtio requires (the queue refuses others).
    let addr =
        |low: u8, high: u8, align: u16| u32::from(u16::from_le_bytes([low, high]) & !(align - 1));
    let mut queue = Queue::new(256).expect("a queue of 256");
    queue.set_size(1 << (setup[0] % 9));
    queue.set_desc_table_address(Some(addr(setup[1], setup[2], 16)), Some(0));
    queue.set_avail_ring_address(Some(addr(setup[3], setup[4], 2)), Some(0));
    queue.set_used_ring_address(Some(addr(setup[5], setup[6], 4)), Some(0));
    let next_avail = u16::from_le_bytes([setup[7], setup[8]]);
    queue.set_next_avail(next_avail);
    queue.set_event_idx(setup[9] & 1 == 1);
    queue.set_ready(true);
    if !queue.is_valid(&memory) {
        return;
    }
    // Mostly a plausible available index (up to a queue's worth of chains), else the one the
    // seed left in memory, which is mostly one the readers refuse.
    if setup[10] & 0x80 == 0 {
        let available = u16::from(setup[10]) % (queue.size() + 1);
        let idx = GuestAddress(queue.avail_ring() + 2);
        memory
            .write_obj(next_avail.wrapping_add(available).to_le(), idx)
            .expect("the available ring is in guest memory");
    }
    if let Err(e) = ring_check::compare_queue(&queue, &memory) {
        panic!("the ring reader and virtio-queue disagree: {e}");
    }
});
