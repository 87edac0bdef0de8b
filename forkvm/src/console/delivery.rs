//! Console output for a callback, delivered on a thread of its own: the embedder's code never
//! runs on a VMM thread, which is under a seccomp filter ([`crate::seccomp`]) and must not block
//! on the embedder (a Python callback waits for the GIL). The device thread appends to a
//! bounded buffer and goes on; the delivery thread hands what waits to the callback in one call.
//! The thread is started where the writer is made (the thread building or forking the VM, which
//! forkvm never filters), so it is unfiltered. Added latency from the guest's write to the
//! callback: see `docs/seccomp.md`.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};

use super::ConsoleCallback;

/// Bytes waiting for the callback at most; a writer finding this many waits for the callback
/// (so a slow callback slows the guest's console, as when it ran on the device thread, and a
/// chatty guest cannot grow host memory).
const PENDING_LIMIT: usize = 64 << 10;

/// What a writer and its delivery thread share.
#[derive(Default)]
pub(crate) struct Delivery {
    state: Mutex<Pending>,
    changed: Condvar,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Whether the callback is running.
    busy: bool,
    /// Set when the writer is dropped: the thread delivers what waits, then ends.
    closed: bool,
}

thread_local! {
    /// The deliveries made on this thread since [`take_deliveries`], for the VM being built.
    static MADE: RefCell<Vec<Weak<Delivery>>> = const { RefCell::new(Vec::new()) };
}

/// The deliveries made on this thread since the last call: a VM's assembly takes those of its
/// consoles, made earlier in the same build or fork, to drain them in [`crate::Vm::wait`].
pub(crate) fn take_deliveries() -> Vec<Weak<Delivery>> {
    MADE.with(|made| std::mem::take(&mut *made.borrow_mut()))
}

impl Delivery {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        forkvm_devices::sync::lock(&self.state)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Pending>) -> MutexGuard<'a, Pending> {
        self.changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until everything written so far has been handed to the callback and it returned.
    pub(crate) fn drain(&self) {
        let mut pending = self.lock();
        while !pending.bytes.is_empty() || pending.busy {
            pending = self.wait(pending);
        }
    }

    /// The delivery thread: calls `callback` with what waits, until closed and drained.
    fn run(&self, mut callback: ConsoleCallback) {
        let mut pending = self.lock();
        loop {
            if !pending.bytes.is_empty() {
                let chunk = std::mem::take(&mut pending.bytes);
                pending.busy = true;
                drop(pending);
                self.changed.notify_all();
                let call = std::panic::AssertUnwindSafe(|| callback(&chunk));
                if std::panic::catch_unwind(call).is_err() {
                    log::error!("a console callback panicked");
                }
                pending = self.lock();
                pending.busy = false;
                self.changed.notify_all();
                continue;
            }
            if pending.closed {
                return;
            }
            pending = self.wait(pending);
        }
    }
}

/// The writer a device gets for a [`super::ConsoleOutput::Callback`].
pub(super) struct CallbackWriter {
    delivery: Arc<Delivery>,
    thread: Option<JoinHandle<()>>,
}

impl CallbackWriter {
    /// Starts the delivery thread of `callback` (on the calling thread's behalf: it must be an
    /// unfiltered one).
    pub(super) fn new(callback: ConsoleCallback) -> io::Result<Self> {
        let delivery = Arc::new(Delivery::default());
        let shared = delivery.clone();
        let thread = thread::Builder::new()
            .name("forkvm-console".into())
            .spawn(move || shared.run(callback))?;
        MADE.with(|made| made.borrow_mut().push(Arc::downgrade(&delivery)));
        Ok(Self {
            delivery,
            thread: Some(thread),
        })
    }
}

impl Write for CallbackWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = self.delivery.lock();
        while !pending.bytes.is_empty() && pending.bytes.len() + buf.len() > PENDING_LIMIT {
            pending = self.delivery.wait(pending);
        }
        pending.bytes.extend_from_slice(buf);
        drop(pending);
        self.delivery.changed.notify_all();
        Ok(buf.len())
    }

    /// Does not wait for the callback (the UART flushes after every byte).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for CallbackWriter {
    fn drop(&mut self) {
        self.delivery.lock().closed = true;
        self.delivery.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread only delivers; a panic in it was logged.
            let _ = thread.join();
        }
    }
}
