//! Host input for the console: the bounded queue it waits in for the guest's receive buffers
//! ([`ConsoleInputQueue`]), and the host fd that fills it ([`HostInput`]), read on the VM's event
//! loop through the device's [`crate::virtio::VirtioDevice::host_event`] like every device's
//! host-side work.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::INPUT_BUFFER_SIZE;
use crate::sync::lock;

/// Input waiting for the guest, shared by the device and whoever feeds it.
#[derive(Clone)]
pub struct ConsoleInputQueue {
    pub(super) bytes: Arc<Mutex<VecDeque<u8>>>,
    /// Signalled when the device took bytes out, so the feeder may read again.
    pub(super) drained: Arc<EventFd>,
}

impl ConsoleInputQueue {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self {
            bytes: Arc::default(),
            drained: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Queues host input for the guest (at most [`INPUT_BUFFER_SIZE`] bytes wait; the rest is
    /// refused); returns how many bytes were taken.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut pending = self.lock();
        let n = bytes.len().min(INPUT_BUFFER_SIZE - pending.len());
        pending.extend(&bytes[..n]);
        n
    }

    /// How many more bytes the queue takes now.
    fn room(&self) -> usize {
        INPUT_BUFFER_SIZE - self.lock().len()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        lock(&self.bytes)
    }
}

/// Epoll data of the queue's `drained` event.
const DRAINED: u64 = 0;
/// Epoll data of the input fd.
const SOURCE: u64 = 1;
/// Most bytes read from the input fd per wake-up.
const READ_CHUNK: usize = 4096;

/// A host fd (pipe, terminal, socket) feeding a console's [`ConsoleInputQueue`]. Its epoll set
/// holds the queue's `drained` event and, while the queue has room and the input has not ended,
/// the fd: the event loop watches the set, so it sleeps while the queue is full (a fast producer
/// never makes the host buffer without bound) and wakes when the guest takes input.
pub(super) struct HostInput {
    source: File,
    epoll: Epoll,
    drained: Arc<EventFd>,
    /// The fd is in the epoll set.
    reading: bool,
    /// The input ended (or failed, or cannot be watched): it is never read again.
    eof: bool,
}

impl HostInput {
    /// Input from `source` for `queue`.
    pub(super) fn new(source: OwnedFd, queue: &ConsoleInputQueue) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let drained = queue.drained.clone();
        epoll.ctl(
            ControlOperation::Add,
            drained.as_raw_fd(),
            EpollEvent::new(EventSet::IN, DRAINED),
        )?;
        let mut input = Self {
            source: File::from(source),
            epoll,
            drained,
            reading: false,
            eof: false,
        };
        input.set_reading(true);
        Ok(input)
    }

    /// The epoll set's fd: readable when there is input to read or the guest made room.
    pub(super) fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn set_reading(&mut self, on: bool) {
        if self.reading == on || (on && self.eof) {
            return;
        }
        let fd = self.source.as_raw_fd();
        let result = if on {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, SOURCE),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        match result {
            Ok(()) => self.reading = on,
            Err(e) => {
                // A regular file cannot be polled; treat it like a closed input.
                crate::ratelimit::guest_warn!("virtio-console: cannot watch the input fd: {e}");
                self.eof = true;
            }
        }
    }

    /// Does what the event loop woke the device for: watches the fd again once the guest made
    /// room, and reads what the queue has room for. Returns whether it queued input.
    pub(super) fn process(&mut self, queue: &ConsoleInputQueue) -> bool {
        let mut events = [EpollEvent::default(); 2];
        let ready = match self.epoll.wait(0, &mut events) {
            Ok(ready) => ready,
            Err(e) => {
                crate::ratelimit::guest_warn!("virtio-console: cannot poll the input: {e}");
                return false;
            }
        };
        let mut queued = false;
        for event in &events[..ready] {
            if event.data() == DRAINED {
                // Drained whatever happens; EAGAIN only means nothing was pending.
                let _ = self.drained.read();
                self.set_reading(true);
            } else if event.event_set().contains(EventSet::IN) {
                queued |= self.pump(queue);
            } else {
                // Hang-up or error without data: the input is gone.
                self.set_reading(false);
                self.eof = true;
            }
        }
        queued
    }

    /// Reads at most what `queue` has room for into it; stops watching the fd while the queue is
    /// full, and for good at the end of input.
    fn pump(&mut self, queue: &ConsoleInputQueue) -> bool {
        let room = queue.room();
        if room == 0 {
            self.set_reading(false);
            return false;
        }
        let mut buf = [0u8; READ_CHUNK];
        match self.source.read(&mut buf[..room.min(READ_CHUNK)]) {
            Ok(0) => {
                self.set_reading(false);
                self.eof = true;
                false
            }
            Ok(n) => queue.push(&buf[..n]) > 0,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                false
            }
            Err(e) => {
                crate::ratelimit::guest_warn!(
                    "virtio-console: input read failed, input closed: {e}"
                );
                self.set_reading(false);
                self.eof = true;
                false
            }
        }
    }
}
