//! Where the guest's serial console goes and where its input comes from. Output for a callback
//! is delivered on a thread of its own ([`delivery`]), never on a VMM thread.

mod delivery;

pub(crate) use delivery::{Delivery, take_deliveries};

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// A function receiving console output.
pub type ConsoleCallback = Box<dyn FnMut(&[u8]) + Send>;

/// Destination of the guest's serial console output.
pub enum ConsoleOutput {
    /// The host process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// An in-memory buffer the caller reads through its [`ConsoleBuffer`] handle.
    Buffer(ConsoleBuffer),
    /// A callback receiving the output in chunks, in order, on a thread forkvm starts for it
    /// (unfiltered by seccomp, so the callback may make any system call). A slow callback
    /// slows the guest's console once 64 KiB wait; [`crate::Vm::wait`] returns once the
    /// output written so far reached the callback.
    Callback(ConsoleCallback),
    /// Dropped.
    Discard,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("Stdout"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Buffer(_) => f.write_str("Buffer"),
            Self::Callback(_) => f.write_str("Callback"),
            Self::Discard => f.write_str("Discard"),
        }
    }
}

impl ConsoleOutput {
    /// Opens the destination as a writer for the UART.
    pub(crate) fn into_writer(self) -> Result<Box<dyn Write + Send>, Error> {
        Ok(match self {
            Self::Stdout => Box::new(io::stdout()),
            Self::File(path) => {
                let file =
                    File::create(&path).map_err(|source| Error::ConsoleFile { path, source })?;
                Box::new(file)
            }
            Self::Buffer(buffer) => Box::new(buffer),
            Self::Callback(callback) => Box::new(delivery::CallbackWriter::new(callback).map_err(
                |e| Error::Setup {
                    what: "console callback thread",
                    reason: e.to_string(),
                },
            )?),
            Self::Discard => Box::new(io::sink()),
        })
    }
}

/// Source of the guest's serial console input.
#[derive(Debug)]
pub enum ConsoleInput {
    /// The host process's standard input (duplicated; the process keeps its own).
    Stdin,
    /// Any readable file descriptor: a pipe, socket or terminal.
    Fd(OwnedFd),
}

impl ConsoleInput {
    /// The fd the input is read from.
    pub(crate) fn into_fd(self) -> Result<OwnedFd, Error> {
        match self {
            Self::Stdin => io::stdin().as_fd().try_clone_to_owned(),
            Self::Fd(fd) => Ok(fd),
        }
        .map_err(|e| Error::Setup {
            what: "console input",
            reason: e.to_string(),
        })
    }
}

/// Default cap of a [`ConsoleBuffer`]: enough for a Linux boot log.
pub const DEFAULT_CONSOLE_BUFFER_LIMIT: usize = 1 << 20;

/// Console output kept in memory, shared between the VM and the caller. It keeps the last
/// `limit` bytes so a chatty guest cannot grow host memory without bound.
#[derive(Clone)]
pub struct ConsoleBuffer {
    bytes: Arc<Mutex<VecDeque<u8>>>,
    limit: usize,
}

impl std::fmt::Debug for ConsoleBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleBuffer")
            .field("len", &self.bytes.lock().map_or(0, |bytes| bytes.len()))
            .field("limit", &self.limit)
            .finish()
    }
}

impl Default for ConsoleBuffer {
    fn default() -> Self {
        Self::with_limit(DEFAULT_CONSOLE_BUFFER_LIMIT)
    }
}

impl ConsoleBuffer {
    /// A buffer keeping the last [`DEFAULT_CONSOLE_BUFFER_LIMIT`] bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer keeping the last `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            bytes: Arc::default(),
            limit,
        }
    }

    /// A copy of what the buffer holds.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().iter().copied().collect()
    }

    /// What the buffer holds, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }

    /// Empties the buffer and returns what it held.
    pub fn take(&self) -> Vec<u8> {
        self.lock().drain(..).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        forkvm_devices::sync::lock(&self.bytes)
    }
}

impl Write for ConsoleBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut bytes = self.lock();
        bytes.extend(buf);
        let excess = bytes.len().saturating_sub(self.limit);
        bytes.drain(..excess);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_keeps_only_the_newest_bytes() {
        let mut buffer = ConsoleBuffer::with_limit(4);
        buffer.write_all(b"abc").unwrap();
        buffer.write_all(b"def").unwrap();
        assert_eq!(buffer.contents(), b"cdef");
        assert_eq!(buffer.take(), b"cdef");
        assert!(buffer.contents().is_empty());
    }

    #[test]
    fn callback_sees_every_chunk() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut w =
            ConsoleOutput::Callback(Box::new(move |b| sink.lock().unwrap().extend_from_slice(b)))
                .into_writer()
                .unwrap();
        w.write_all(b"hello").unwrap();
        for delivery in take_deliveries() {
            delivery.upgrade().unwrap().drain();
        }
        assert_eq!(&*seen.lock().unwrap(), b"hello");
    }
}
