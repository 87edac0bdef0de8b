//! The harness shared by the virtio fuzz targets: a guest driving a virtio-mmio window with
//! arbitrary register accesses and arbitrary queue contents in its memory. The transport and
//! device must never panic, hang or touch memory outside the guest's.
//!
//! Input: a 2-byte operation count, that many 6-byte operations, then bytes that seed guest
//! memory (descriptor tables, rings, buffers).

use forkvm_devices::bus::BusDevice;
use forkvm_devices::trigger::IrqTrigger;
use forkvm_devices::virtio::mmio::MmioTransport;
use forkvm_devices::virtio::{GuestMemoryMmap, Interrupt, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x1_0000;
const STATUS: u64 = 0x70;

/// Most queues a fuzzed device has (balloon: inflate, deflate, statistics, reporting).
const QUEUES: u32 = 4;

/// The register writes of a well-behaved driver up to DRIVER_OK, with queue size and ring
/// addresses taken from the fuzzer (queue `n`'s rings `n` pages after queue 0's; misaligned
/// ones put the device into `DEVICE_NEEDS_RESET` at `QueueReady`), so that the
/// queue-processing paths are reached quickly. With `all_features`, the driver accepts every
/// feature the device offers in the low 32 bits (virtio-net's MRG_RXBUF, virtio-blk's
/// read-only and discard, ...); otherwise VERSION_1 only.
fn driver_init(transport: &mut MmioTransport, value: [u8; 4], all_features: bool) {
    let size = 1u32 << (value[0] % 10);
    let addr = |b: u8, queue: u32| (u32::from(b) << 8).wrapping_add(queue << 12) % MEM_SIZE as u32;
    transport.write(0x14, &0u32.to_le_bytes());
    let mut offered = [0u8; 4];
    transport.read(0x10, &mut offered);
    let low = if all_features {
        u32::from_le_bytes(offered)
    } else {
        0
    };
    for (reg, v) in [
        (STATUS, 0u32),
        (STATUS, 1),
        (STATUS, 3),
        (0x24, 0),
        (0x20, low),
        (0x24, 1),
        (0x20, 1),
        (STATUS, 0xb),
    ] {
        transport.write(reg, &v.to_le_bytes());
    }
    for queue in 0..QUEUES {
        for (reg, v) in [
            (0x30, queue),
            (0x38, size),
            (0x80, addr(value[1], queue)),
            (0x90, addr(value[2], queue)),
            (0xa0, addr(value[3], queue)),
            (0x44, 1),
        ] {
            transport.write(reg, &v.to_le_bytes());
        }
    }
    transport.write(STATUS, &0xfu32.to_le_bytes());
}

/// Runs one fuzz input against `device`.
pub fn run(device: Box<dyn VirtioDevice>, data: &[u8]) {
    let Some((count, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let ops_len = (usize::from(u16::from_le_bytes(*count)) * 6).min(rest.len());
    let (ops, seed) = rest.split_at(ops_len);
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    memory
        .write_slice(&seed[..seed.len().min(MEM_SIZE)], GuestAddress(0))
        .unwrap();
    let Ok(irq) = IrqTrigger::new() else { return };
    let mut transport = MmioTransport::new(device, memory, Interrupt::new(irq)).unwrap();
    for op in ops.chunks_exact(6) {
        let offset = u64::from(op[1]) * 4;
        let value = [op[2], op[3], op[4], op[5]];
        match op[0] % 6 {
            0 => transport.write(offset, &value),
            1 => {
                let mut out = [0u8; 4];
                transport.read(offset, &mut out);
            }
            2 => transport.write(offset, &value[..usize::from(op[2] % 4) + 1]),
            3 => driver_init(&mut transport, value, op[1] & 1 == 1),
            4 => transport.process_queue(usize::from(op[1]) % QUEUES as usize),
            _ => transport.process_host_event(),
        }
    }
}
