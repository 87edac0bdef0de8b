//! virtio-net's transmit and receive paths, against a device whose backend echoes every frame
//! the guest sends (after its next `process`) and holds frames of its own for the guest. The
//! device must never panic, never hand the backend a frame over `MAX_FRAME_LEN`, and never write
//! a used length larger than the chain it used.
//!
//! The first input byte picks the mode. Odd: the shared register-level harness
//! (`virtio_harness.rs`: arbitrary register accesses and memory). Even: a guest that builds
//! rings the way a driver does, with hostile contents, so the frame paths are reached at once:
//! each operation (one byte, then its arguments) transmits a chain of 1 to 4 descriptors of
//! fuzzed lengths, kinds and addresses carrying fuzzed frames, posts such a receive chain,
//! gives the backend a frame of a fuzzed length, runs the host event, writes a raw descriptor
//! and makes any head available, or resets the device and negotiates MRG_RXBUF or not.

#![no_main]

#[path = "virtio_harness.rs"]
mod virtio_harness;

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use forkvm_devices::virtio::net::{
    MAX_FRAME_LEN, NET_HDR_LEN, Net, NetBackend, RX_QUEUE, TX_QUEUE,
};
use forkvm_devices::virtio::test_driver::{Driver, MEM_SIZE, QUEUE_SIZE, QUEUE_STRIDE, USED};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Most frames the backend holds for the guest; what the guest sends beyond is dropped.
const BACKEND_QUEUE: usize = 64;
/// Where the guest's buffers lie: clear of both queues' rings, within guest memory.
const DATA: u64 = 0x2_0000;
/// Most operations per input.
const MAX_OPS: usize = 64;
/// VIRTIO_NET_F_MRG_RXBUF.
const MRG_RXBUF: u64 = 1 << 15;

#[derive(Default)]
struct Frames {
    sent: VecDeque<Vec<u8>>,
    inbox: VecDeque<Vec<u8>>,
}

/// A backend that sends back what the guest transmits.
struct Echo {
    frames: Arc<Mutex<Frames>>,
    current: Option<Vec<u8>>,
}

impl NetBackend for Echo {
    fn transmit(&mut self, frame: &[u8]) {
        assert!(
            frame.len() <= MAX_FRAME_LEN,
            "the device passed an oversized frame"
        );
        let mut frames = self.frames.lock().unwrap();
        if frames.sent.len() + frames.inbox.len() < BACKEND_QUEUE {
            frames.sent.push_back(frame.to_vec());
        }
    }

    fn peek_receive(&mut self) -> Option<&[u8]> {
        if self.current.is_none() {
            self.current = self.frames.lock().unwrap().inbox.pop_front();
        }
        self.current.as_deref()
    }

    fn consume_receive(&mut self) {
        assert!(
            self.current.take().is_some(),
            "consumed a frame never peeked"
        );
    }

    fn event_fd(&self) -> Option<RawFd> {
        None
    }

    fn process(&mut self) {
        let mut frames = self.frames.lock().unwrap();
        let sent = std::mem::take(&mut frames.sent);
        frames.inbox.extend(sent);
    }
}

/// The rest of the input, read a field at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn bytes(&mut self, len: usize) -> &[u8] {
        let (now, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        now
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Writes a chain of 1 to 4 descriptors from `input` at descriptor `head` of the selected queue
/// and makes it available; returns the descriptors it used. Lengths are up to 64 KiB; kinds are
/// fuzzed (`writable` is the right one); addresses lie in the data area, past the end of guest
/// memory, or at the end of the address space, and transmit buffers get fuzzed bytes.
fn chain(d: &Driver, input: &mut Input, head: u16, writable: bool) -> u16 {
    let shape = input.byte();
    let count = 1 + usize::from(shape % 4);
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = input.byte();
        let len = match kind % 4 {
            0 => u32::from(input.byte()),
            1 => u32::from(input.u16() % 2048),
            _ => u32::from(input.u16()),
        };
        let addr = match (kind >> 2) % 16 {
            0 => MEM_SIZE as u64 - u64::from(input.byte()),
            1 => u64::MAX - u64::from(input.byte()),
            _ => DATA + u64::from(input.u16()) * 8,
        };
        let wrong_kind = (kind >> 6) == 3;
        if !writable && (DATA..MEM_SIZE as u64 - 0x1_0000).contains(&addr) {
            let fill = usize::from(input.byte());
            let bytes = input.bytes(fill.min(len as usize)).to_vec();
            d.memory.write_slice(&bytes, GuestAddress(addr)).unwrap();
        }
        parts.push((addr, len, writable != wrong_kind));
    }
    d.chain(head, &parts);
    count as u16
}

/// Checks the used ring of queue `q`: no used length beyond the largest a chain can carry.
fn check_used(d: &Driver, q: u64) {
    let used = USED + QUEUE_STRIDE * q;
    for n in 0..u64::from(QUEUE_SIZE) {
        let len: u32 = d.memory.read_obj(GuestAddress(used + 8 + 8 * n)).unwrap();
        assert!(
            len as usize <= NET_HDR_LEN + MAX_FRAME_LEN,
            "used length {len} beyond a whole frame"
        );
    }
}

fn structured(data: &[u8]) {
    let frames = Arc::new(Mutex::new(Frames::default()));
    let echo = Echo {
        frames: frames.clone(),
        current: None,
    };
    let mut d = Driver::new(Box::new(Net::new([2, 0, 0, 0, 0, 1], Box::new(echo))));
    let mut input = Input(data);
    d.start_with(if input.byte() & 1 == 1 { MRG_RXBUF } else { 0 });
    // The next free descriptor of each queue (chains wrap around the table, overwriting).
    let mut next = [0u16; 2];
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.byte() % 8 {
            0 | 1 => {
                d.select(TX_QUEUE as u16);
                let head = next[TX_QUEUE] % (QUEUE_SIZE - 4);
                next[TX_QUEUE] = head + chain(&d, &mut input, head, false);
                d.notify();
            }
            2 | 3 => {
                d.select(RX_QUEUE as u16);
                let head = next[RX_QUEUE] % (QUEUE_SIZE - 4);
                next[RX_QUEUE] = head + chain(&d, &mut input, head, true);
                d.notify();
            }
            4 => {
                let len = match input.byte() % 4 {
                    0 => usize::from(input.byte()),
                    1 => MAX_FRAME_LEN + usize::from(input.byte() % 4),
                    _ => usize::from(input.u16()),
                };
                let fill = input.byte();
                frames.lock().unwrap().inbox.push_back(vec![fill; len]);
            }
            5 => d.transport.process_host_event(),
            6 => {
                // A raw descriptor, then any head made available on either queue.
                let q = u16::from(input.byte() & 1);
                d.select(q);
                let index = input.u16() % QUEUE_SIZE;
                let addr = DATA + u64::from(input.u16()) * 8;
                let (len, flags, link) = (u32::from(input.u16()), input.u16(), input.u16());
                d.descriptor(index, addr, len, flags, link);
                d.make_available(input.u16());
                d.notify();
            }
            _ => {
                let features = if input.byte() & 1 == 1 { MRG_RXBUF } else { 0 };
                d.start_with(features);
                next = [0; 2];
            }
        }
        check_used(&d, RX_QUEUE as u64);
        check_used(&d, TX_QUEUE as u64);
    }
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 0 => structured(rest),
        _ => {
            let frames = Arc::new(Mutex::new(Frames::default()));
            // A short frame from the input, and one whose length the input picks (up to twice
            // the largest, so some never fit).
            let mut waiting = frames.lock().unwrap();
            waiting.inbox.push_back(data[..data.len().min(64)].to_vec());
            let len = data
                .get(1..3)
                .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])) * 2);
            waiting.inbox.push_back(vec![0x5a; len]);
            drop(waiting);
            let echo = Echo {
                frames,
                current: None,
            };
            let net = Net::new([2, 0, 0, 0, 0, 1], Box::new(echo));
            virtio_harness::run(Box::new(net), data.get(1..).unwrap_or_default());
        }
    }
});
