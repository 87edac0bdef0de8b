//! Host input for a legacy device (the UART): an event-loop subscriber that
//! reads a host fd only while the device has room, so a fast producer never makes the host
//! buffer without bound, and that stops at end of input. (Virtio devices read their host input
//! themselves, through `VirtioDevice::host_event`: virtio-console does so in `virtio::console`.)

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Where an [`InputFeeder`] delivers host input.
pub trait InputSink: Send {
    /// How many bytes the device can take now.
    fn room(&self) -> usize;
    /// Hands the device at most [`Self::room`] bytes.
    fn deliver(&mut self, bytes: &[u8]);
    /// Signalled when the device has made room (the guest consumed input).
    fn room_made(&self) -> &EventFd;
}

/// Moves bytes from a host fd into an [`InputSink`], pausing while the sink is full.
pub struct InputFeeder<S> {
    sink: S,
    source: File,
    reading: bool,
    eof: bool,
}

impl<S: InputSink> InputFeeder<S> {
    /// Feeds `source` (a pipe, terminal or socket) into `sink`.
    pub fn new(sink: S, source: OwnedFd) -> Self {
        Self {
            sink,
            source: File::from(source),
            reading: false,
            eof: false,
        }
    }

    fn set_reading(&mut self, ops: &mut EventOps, on: bool) {
        if self.reading == on || (on && self.eof) {
            return;
        }
        let events = Events::new(&self.source, EventSet::IN);
        match if on {
            ops.add(events)
        } else {
            ops.remove(events)
        } {
            Ok(()) => self.reading = on,
            Err(e) => {
                // A regular file cannot be polled; treat it like a closed input.
                crate::ratelimit::guest_warn!("input: cannot watch the input fd: {e:?}");
                self.eof = true;
            }
        }
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let room = self.sink.room();
        if room == 0 {
            self.set_reading(ops, false);
            return;
        }
        let mut buf = [0u8; 4096];
        match self.source.read(&mut buf[..room.min(4096)]) {
            Ok(0) => {
                self.set_reading(ops, false);
                self.eof = true;
            }
            Ok(n) => self.sink.deliver(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => {
                crate::ratelimit::guest_warn!("input: read failed, input closed: {e}");
                self.set_reading(ops, false);
                self.eof = true;
            }
        }
    }
}

impl<S: InputSink> MutEventSubscriber for InputFeeder<S> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.sink.room_made(), EventSet::IN)) {
            crate::ratelimit::guest_warn!("input: cannot watch the device's wake-up: {e:?}");
        }
        self.set_reading(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.sink.room_made().as_raw_fd() {
            let _ = self.sink.room_made().read();
            self.set_reading(ops, true);
        } else if events.event_set().contains(EventSet::IN) {
            self.pump(ops);
        } else {
            // Hang-up or error without data: the input is gone.
            self.set_reading(ops, false);
            self.eof = true;
        }
    }
}
