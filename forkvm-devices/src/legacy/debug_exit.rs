//! A port through which a test guest ends the VM with a status, like QEMU's `isa-debug-exit`.
//! Off by default: only test guests get it.

use crate::bus::BusDevice;

/// The I/O port the debug-exit device listens on.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Ends the VM with the value a guest writes (1, 2 or 4 bytes, little-endian).
pub struct DebugExit {
    on_exit: Box<dyn Fn(u32) + Send>,
}

impl DebugExit {
    /// Creates the device; `on_exit` receives the status the guest wrote.
    pub fn new(on_exit: impl Fn(u32) + Send + 'static) -> Self {
        Self {
            on_exit: Box::new(on_exit),
        }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || !matches!(data.len(), 1 | 2 | 4) {
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        (self.on_exit)(u32::from_le_bytes(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn passes_the_written_status_and_ignores_odd_accesses() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut dev = DebugExit::new(move |v| sink.lock().unwrap().push(v));
        dev.write(0, &0x1234_5678u32.to_le_bytes());
        dev.write(0, &[3]);
        dev.write(1, &[9]);
        dev.write(0, &[1, 2, 3]);
        assert_eq!(*seen.lock().unwrap(), vec![0x1234_5678, 3]);
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
