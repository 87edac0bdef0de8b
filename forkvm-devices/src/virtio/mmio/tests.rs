//! Tests of the virtio-mmio transport: register semantics, the status machine, queues.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::trigger::IrqTrigger;
use crate::virtio::rng::{RNG_DEVICE_TYPE, Rng};
use crate::virtio::test_driver::{AVAIL, BUF, DESC, Driver, MEM_SIZE, QUEUE_SIZE, USED, reg};
use crate::virtio::{INT_USED_RING, VIRTIO_F_VERSION_1};

fn rng_driver() -> Driver {
    Driver::new(Box::new(Rng::new()))
}

#[test]
fn a_restored_transport_continues_where_the_frozen_one_left_off() {
    let mut d = rng_driver();
    d.start();
    d.chain(0, &[(BUF, 16, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, 16));
    // Made available but not yet notified when the VM is frozen.
    d.chain(1, &[(BUF + 0x100, 8, true)]);
    let state = d.transport.freeze().unwrap();
    assert!(matches!(state.device, DeviceState::Rng));
    let interrupt = Interrupt::new(IrqTrigger::new().unwrap());
    d.transport = MmioTransport::restore(
        Box::new(Rng::new()),
        d.memory.clone(),
        interrupt,
        &state.transport,
    )
    .unwrap();
    assert_eq!(
        d.read(reg::STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    );
    assert_eq!(d.read(reg::QUEUE_READY), 1);
    assert_eq!(
        d.read(reg::INTERRUPT_STATUS),
        INT_USED_RING,
        "the unacknowledged interrupt is still pending"
    );
    // The request made before the freeze is served without a new notification.
    assert_eq!(d.transport.queue_events()[0].read().unwrap(), 1);
    d.transport.process_queue(0);
    assert_eq!(d.used(1), (2, 8));
    d.chain(2, &[(BUF + 0x200, 4, true)]);
    d.notify();
    assert_eq!(d.used(2), (3, 4));
}

#[test]
fn restoring_state_onto_a_device_with_other_queues_fails() {
    let mut d = rng_driver();
    d.start();
    let state = d.transport.freeze().unwrap();
    let console = crate::virtio::console::Console::new(Box::new(std::io::sink())).unwrap();
    let interrupt = Interrupt::new(IrqTrigger::new().unwrap());
    let restored = MmioTransport::restore(
        Box::new(console),
        d.memory.clone(),
        interrupt,
        &state.transport,
    );
    assert!(restored.is_err());
}

#[test]
fn identifies_itself_as_a_version_2_entropy_device() {
    let mut d = rng_driver();
    assert_eq!(d.read(reg::MAGIC), MAGIC_VALUE);
    assert_eq!(d.read(reg::VERSION), 2);
    assert_eq!(d.read(reg::DEVICE_ID), RNG_DEVICE_TYPE);
    d.write(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(d.read(reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    d.write(reg::QUEUE_SEL, 0);
    assert_eq!(d.read(reg::QUEUE_NUM_MAX), 256);
    d.write(reg::QUEUE_SEL, 1);
    assert_eq!(d.read(reg::QUEUE_NUM_MAX), 0, "no second queue");
}

#[test]
fn serves_random_bytes_and_interrupts() {
    let mut d = rng_driver();
    d.start();
    assert_eq!(d.transport.status() & S_NEEDS_RESET, 0);
    d.descriptor(0, BUF, 64, 2 /* WRITE */, 0);
    d.make_available(0);
    d.notify();
    assert_eq!(d.used(0), (1, 64));
    let mut bytes = [0u8; 64];
    d.memory.read_slice(&mut bytes, GuestAddress(BUF)).unwrap();
    assert!(bytes.iter().any(|b| *b != 0));
    assert_eq!(d.read(reg::INTERRUPT_STATUS), INT_USED_RING);
    assert_eq!(d.transport.interrupt().irq().eventfd().read().unwrap(), 1);
    d.write(reg::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(d.read(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn features_without_version_1_or_not_offered_are_refused() {
    let mut d = rng_driver();
    assert_eq!(d.negotiate(0) & S_FEATURES_OK, 0, "legacy driver");
    assert_eq!(
        d.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 5)) & S_FEATURES_OK,
        0,
        "unoffered bit"
    );
    assert_ne!(d.negotiate(1 << VIRTIO_F_VERSION_1) & S_FEATURES_OK, 0);
}

#[test]
fn out_of_order_status_and_late_writes_are_ignored() {
    let mut d = rng_driver();
    d.write(reg::STATUS, S_DRIVER_OK);
    assert_eq!(d.read(reg::STATUS), 0, "DRIVER_OK before negotiation");
    d.write(reg::STATUS, S_ACKNOWLEDGE);
    d.write(reg::QUEUE_NUM, 8);
    d.write(reg::QUEUE_READY, 1);
    assert_eq!(
        d.read(reg::QUEUE_READY),
        0,
        "queue set-up before FEATURES_OK"
    );
    d.start();
    d.write(reg::STATUS, S_ACKNOWLEDGE);
    assert_ne!(
        d.read(reg::STATUS) & S_DRIVER_OK,
        0,
        "status bits cannot be dropped"
    );
    d.write(reg::QUEUE_DESC_LOW, 0x5000);
    assert_eq!(
        d.transport.queues[0].desc_table(),
        DESC,
        "queue address frozen once live"
    );
    d.write(reg::STATUS, 0);
    assert_eq!(d.read(reg::STATUS), 0);
    assert_eq!(d.read(reg::QUEUE_READY), 0, "reset clears the queues");
}

#[test]
fn a_queue_outside_guest_memory_needs_reset() {
    let mut d = rng_driver();
    assert_ne!(d.negotiate(1 << VIRTIO_F_VERSION_1) & S_FEATURES_OK, 0);
    d.setup_queue(MEM_SIZE as u64 - 16, AVAIL, USED);
    d.write(
        reg::STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(d.read(reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
}

#[test]
fn a_buffer_outside_guest_memory_needs_reset() {
    let mut d = rng_driver();
    d.start();
    d.descriptor(0, MEM_SIZE as u64 - 16, 64, 2, 0);
    d.make_available(0);
    d.notify();
    assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
    assert_eq!(d.used(0).0, 0, "nothing was used");
    // A device needing reset ignores further notifications until the driver resets it.
    d.descriptor(1, BUF, 64, 2, 0);
    d.make_available(1);
    d.notify();
    assert_eq!(d.used(0).0, 0);
}

#[test]
fn a_looping_chain_is_cut_off() {
    let mut d = rng_driver();
    d.start();
    d.descriptor(0, BUF, 64, 2 | 1 /* NEXT */, 1);
    d.descriptor(1, BUF + 64, 64, 2 | 1, 0);
    d.make_available(0);
    d.notify();
    // Either refused (needs reset) or served with a bounded length: never a hang.
    let (idx, len) = d.used(0);
    assert!(
        d.read(reg::STATUS) & S_NEEDS_RESET != 0 || (idx == 1 && len <= 64 * u32::from(QUEUE_SIZE))
    );
}

#[test]
fn odd_width_and_unaligned_register_accesses_are_harmless() {
    let mut d = rng_driver();
    let mut byte = [0u8; 1];
    d.transport.read(reg::MAGIC, &mut byte);
    assert_eq!(byte, [0xff]);
    assert_eq!(d.read(reg::MAGIC + 1), u32::MAX);
    d.transport.write(reg::STATUS, &[1]);
    assert_eq!(d.read(reg::STATUS), 0);
    let mut config = [0xaau8; 8];
    d.transport.read(0x100, &mut config);
    assert_eq!(config, [0; 8], "the entropy device has no config space");
}

/// xorshift64: deterministic pseudo-random register traffic.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_register_traffic_never_panics() {
    let mut d = rng_driver();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200_000 {
        let r = next(&mut rng);
        let offset = (r % 0x110) & !3;
        let value = match r >> 60 {
            0..=3 => (r >> 16) as u32 & 0xff,
            4..=7 => (r >> 16) as u32 & 0xffff,
            _ => (r >> 16) as u32,
        };
        if r & (1 << 9) == 0 {
            d.read(offset);
        } else {
            d.write(offset, value);
            if offset == reg::QUEUE_NOTIFY {
                let _ = d.transport.queue_events()[0].read();
                d.transport.process_queue(0);
            }
        }
    }
}

/// A driver that accepted VERSION_1 and may now set up queue 0.
fn in_queue_setup() -> Driver {
    let mut d = rng_driver();
    assert_ne!(d.negotiate(1 << VIRTIO_F_VERSION_1) & S_FEATURES_OK, 0);
    d
}

#[test]
fn a_misaligned_ring_is_refused_at_queue_ready_and_needs_reset() {
    for (desc, avail, used) in [
        (DESC + 8, AVAIL, USED),
        (DESC, AVAIL + 1, USED),
        (DESC, AVAIL, USED + 2),
        (DESC + (1 << 32) + 4, AVAIL, USED),
    ] {
        let mut d = in_queue_setup();
        d.setup_queue(desc, avail, used);
        assert_eq!(
            d.read(reg::QUEUE_READY),
            0,
            "rings at {desc:#x} {avail:#x} {used:#x} made ready"
        );
        assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
        assert_eq!(d.read(reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        // DRIVER_OK changes nothing: no queue runs, at guest address 0 or anywhere.
        d.write(
            reg::STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        d.memory.write_obj(1u16, GuestAddress(2)).unwrap();
        d.write(reg::QUEUE_NOTIFY, 0);
        let _ = d.transport.queue_events()[0].read();
        d.transport.process_queue(0);
        assert_eq!(d.memory.read_obj::<u16>(GuestAddress(2)).unwrap(), 1);
        assert_eq!(d.transport.queues[0].next_avail(), 0, "nothing was taken");
    }
}

#[test]
fn an_invalid_queue_size_is_refused_at_queue_ready_and_needs_reset() {
    for size in [0, 3, 100, 512, 65_536, u32::MAX] {
        let mut d = in_queue_setup();
        d.program_queue(size, DESC, AVAIL, USED);
        assert_eq!(d.read(reg::QUEUE_READY), 0, "size {size} made ready");
        assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0, "size {size}");
    }
    // Every power of two up to the maximum is fine, and is the size the queue runs with.
    for size in [1, 2, 64, 256] {
        let mut d = in_queue_setup();
        d.program_queue(size, DESC, AVAIL, USED);
        assert_eq!(d.read(reg::QUEUE_READY), 1, "size {size}");
        assert_eq!(d.read(reg::STATUS) & S_NEEDS_RESET, 0, "size {size}");
        assert_eq!(u32::from(d.transport.queues[0].size()), size);
    }
}

#[test]
fn an_available_ring_at_address_0_is_refused_rather_than_left_idle() {
    let mut d = in_queue_setup();
    // Also what a driver that never wrote the ring addresses would have.
    d.setup_queue(DESC, 0, USED);
    assert_eq!(d.read(reg::QUEUE_READY), 0);
    assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
}

#[test]
fn a_reset_clears_a_refused_set_up() {
    let mut d = in_queue_setup();
    d.setup_queue(DESC + 8, AVAIL, USED);
    assert_ne!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
    d.start();
    assert_eq!(d.read(reg::STATUS) & S_NEEDS_RESET, 0);
    d.chain(0, &[(BUF, 16, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, 16));
}

#[test]
fn driver_ok_needs_features_ok_accepted_first() {
    let mut d = rng_driver();
    d.write(reg::STATUS, 0x0f);
    assert_eq!(d.read(reg::STATUS), 0, "0x0f from reset");
    // Features written, then FEATURES_OK and DRIVER_OK in one write: refused whole.
    d.write(reg::STATUS, S_ACKNOWLEDGE);
    d.write(reg::STATUS, S_ACKNOWLEDGE | S_DRIVER);
    d.write(reg::DRIVER_FEATURES_SEL, 1);
    d.write(reg::DRIVER_FEATURES, 1);
    d.write(
        reg::STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(d.read(reg::STATUS), S_ACKNOWLEDGE | S_DRIVER);
    // Refused features and DRIVER_OK: FEATURES_OK stays clear, and so does DRIVER_OK.
    let mut d = rng_driver();
    d.write(reg::STATUS, S_ACKNOWLEDGE);
    d.write(reg::STATUS, S_ACKNOWLEDGE | S_DRIVER);
    d.write(
        reg::STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(d.read(reg::STATUS) & (S_FEATURES_OK | S_DRIVER_OK), 0);
}

#[test]
fn undefined_status_bits_do_not_stick() {
    let mut d = rng_driver();
    d.write(reg::STATUS, S_ACKNOWLEDGE | 0x10 | 0x20 | 0x100 | (1 << 31));
    assert_eq!(d.read(reg::STATUS), S_ACKNOWLEDGE);
    d.write(reg::STATUS, S_ACKNOWLEDGE | S_NEEDS_RESET);
    assert_eq!(
        d.read(reg::STATUS),
        S_ACKNOWLEDGE,
        "NEEDS_RESET is the device's"
    );
    d.start();
    assert_eq!(
        d.read(reg::STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    );
}

#[test]
fn after_needs_reset_the_driver_may_still_set_failed() {
    let mut d = in_queue_setup();
    d.setup_queue(DESC + 8, AVAIL, USED);
    let status = d.read(reg::STATUS);
    assert_ne!(status & S_NEEDS_RESET, 0);
    // Written back without NEEDS_RESET, as a driver masking to its own bits would.
    d.write(reg::STATUS, (status & !S_NEEDS_RESET) | S_FAILED);
    assert_eq!(d.read(reg::STATUS), status | S_FAILED);
}

/// Going live does no device work on the thread writing the status (a vCPU thread, whose seccomp
/// filter allows no device I/O): it signals every queue, and the request the driver made
/// available before is served when the event loop serves the queue.
#[test]
fn going_live_signals_the_queues_instead_of_serving_them_on_the_writing_thread() {
    let mut d = rng_driver();
    assert_ne!(d.negotiate(1 << VIRTIO_F_VERSION_1) & S_FEATURES_OK, 0);
    d.setup_queue(DESC, AVAIL, USED);
    d.chain(0, &[(BUF, 16, true)]);
    d.write(
        reg::STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
    assert_eq!(d.used(0).0, 0, "nothing served on the writing thread");
    assert_eq!(d.transport.queue_events()[0].read().unwrap(), 1);
    d.transport.process_queue(0);
    assert_eq!(d.used(0), (1, 16));
}
