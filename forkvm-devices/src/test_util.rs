//! Helpers shared by this crate's unit tests.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// A `Write` whose bytes the test can read back.
#[derive(Clone, Default)]
pub struct SharedWriter(pub Arc<Mutex<Vec<u8>>>);

impl SharedWriter {
    /// What was written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
