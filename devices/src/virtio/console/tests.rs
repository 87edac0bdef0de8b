//! Tests of the console over the register-level test driver.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_util::SharedWriter;
use crate::virtio::test_driver::{BUF, Driver};

fn console() -> (Driver, SharedWriter, ConsoleInputQueue) {
    let out = SharedWriter::default();
    let console = Console::new(Box::new(out.clone())).unwrap();
    let input = console.input();
    let mut d = Driver::new(Box::new(console));
    d.start();
    (d, out, input)
}

#[test]
fn guest_output_reaches_the_sink() {
    let (mut d, out, _) = console();
    d.memory.write_slice(b"hello, ", GuestAddress(BUF)).unwrap();
    d.memory
        .write_slice(b"host\n", GuestAddress(BUF + 0x100))
        .unwrap();
    d.select(TX_QUEUE as u16);
    d.chain(0, &[(BUF, 7, false), (BUF + 0x100, 5, false)]);
    d.notify();
    assert_eq!(d.used(0), (1, 0));
    assert_eq!(&*out.contents(), b"hello, host\n");
}

#[test]
fn host_input_waits_for_receive_buffers_and_is_never_lost() {
    let (mut d, _, input) = console();
    assert_eq!(input.push(b"abcdef"), 6);
    d.transport.process_queue(RX_QUEUE);
    assert_eq!(d.used(0).0, 0, "no receive buffer yet");
    d.chain(0, &[(BUF, 4, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, 4));
    assert_eq!(
        input.drained.read().unwrap(),
        1,
        "the feeder is told there is room"
    );
    d.chain(1, &[(BUF + 0x100, 64, true)]);
    d.notify();
    assert_eq!(d.used(1), (2, 2));
    let mut got = [0u8; 6];
    d.memory
        .read_slice(&mut got[..4], GuestAddress(BUF))
        .unwrap();
    d.memory
        .read_slice(&mut got[4..], GuestAddress(BUF + 0x100))
        .unwrap();
    assert_eq!(&got, b"abcdef");
    assert!(input.lock().is_empty());
}

#[test]
fn host_input_survives_a_driver_reset() {
    // Every driver resets the device as it starts: input typed before then must wait for
    // it, as on a serial line.
    let (mut d, _, input) = console();
    input.push(b"early");
    d.write(crate::virtio::mmio::reg::STATUS, 0);
    d.start();
    d.chain(0, &[(BUF, 64, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, 5));
    let mut got = [0u8; 5];
    d.memory.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(&got, b"early");
}
