//! Tests of the console over the register-level test driver.

use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::*;
use crate::test_util::SharedWriter;
use crate::virtio::VirtioDevice;
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

/// A live console fed from a socket, and the host's end of it.
fn console_with_input() -> (Driver, ConsoleInputQueue, UnixStream) {
    let (host, device_end) = UnixStream::pair().unwrap();
    let console = Console::new(Box::new(std::io::sink()))
        .unwrap()
        .with_input(OwnedFd::from(device_end))
        .unwrap();
    let input = console.input();
    let mut d = Driver::new(Box::new(console));
    d.start();
    (d, input, host)
}

/// Whether `fd` is readable now (the event loop would wake for it).
fn readable(fd: RawFd) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut events = [EpollEvent::default()];
    epoll.wait(0, &mut events).unwrap() == 1
}

fn received(d: &Driver, at: u64, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    d.memory.read_slice(&mut got, GuestAddress(at)).unwrap();
    got
}

#[test]
fn host_input_arrives_through_the_host_event_like_other_devices() {
    let (mut d, _, mut host) = console_with_input();
    let event = d
        .transport
        .host_event()
        .expect("a console with input has a host event");
    assert!(!readable(event), "nothing to do yet");
    d.chain(0, &[(BUF, 64, true)]);
    d.notify();
    host.write_all(b"typed").unwrap();
    assert!(readable(event));
    d.transport.process_host_event();
    assert_eq!(d.used(0), (1, 5));
    assert_eq!(received(&d, BUF, 5), b"typed");
    // The guest took it: the device was woken for that (its queue drained) and has no more.
    d.transport.process_host_event();
    assert!(!readable(event));
    let without = Console::new(Box::new(std::io::sink())).unwrap();
    assert_eq!(without.host_event(), None, "no input, no host event");
}

#[test]
fn host_input_is_not_read_while_the_queue_is_full_and_again_once_the_guest_takes_some() {
    let (mut d, input, mut host) = console_with_input();
    let event = d.transport.host_event().unwrap();
    assert_eq!(
        input.push(&vec![b'a'; INPUT_BUFFER_SIZE]),
        INPUT_BUFFER_SIZE
    );
    host.write_all(b"z").unwrap();
    d.transport.process_host_event();
    assert_eq!(
        input.lock().len(),
        INPUT_BUFFER_SIZE,
        "no room: nothing read"
    );
    assert!(
        !readable(event),
        "full: the fd is not watched, the loop sleeps"
    );
    d.chain(0, &[(BUF, 16, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, 16));
    assert!(readable(event), "the guest made room: the device is woken");
    d.transport.process_host_event();
    d.transport.process_host_event();
    let pending = input.lock();
    assert_eq!(pending.len(), INPUT_BUFFER_SIZE - 16 + 1);
    assert_eq!(pending.back(), Some(&b'z'), "read again, after what waited");
}

#[test]
fn host_input_before_the_driver_is_live_waits_for_it() {
    let (host, device_end) = UnixStream::pair().unwrap();
    let console = Console::new(Box::new(std::io::sink()))
        .unwrap()
        .with_input(OwnedFd::from(device_end))
        .unwrap();
    let mut d = Driver::new(Box::new(console));
    (&host).write_all(b"early").unwrap();
    d.transport.process_host_event();
    d.start();
    d.chain(0, &[(BUF, 64, true)]);
    d.notify();
    assert_eq!(d.used(0), (1, 5));
    assert_eq!(received(&d, BUF, 5), b"early");
}

#[test]
fn the_end_of_host_input_is_not_watched_again() {
    let (mut d, input, mut host) = console_with_input();
    let event = d.transport.host_event().unwrap();
    host.write_all(b"last").unwrap();
    drop(host);
    d.transport.process_host_event();
    d.transport.process_host_event();
    assert_eq!(&*input.lock(), b"last");
    assert!(!readable(event), "ended: the loop does not spin on it");
    // A regular file cannot be watched: it counts as ended at once.
    let file = std::fs::File::open("/proc/self/stat").unwrap();
    let console = Console::new(Box::new(std::io::sink()))
        .unwrap()
        .with_input(OwnedFd::from(file))
        .unwrap();
    assert!(!readable(console.host_event().unwrap()));
}
