//! Legacy PC devices on port I/O: the 8250 UART, the i8042 controller (for guest-initiated
//! reset) and the test-only debug-exit port.

mod debug_exit;
mod i8042;
mod serial;

pub use debug_exit::{DEBUG_EXIT_PORT, DebugExit};
pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{
    SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN, SerialPort, SerialSink, SerialState,
};

#[cfg(test)]
mod tests {
    use std::io::sink;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::bus::Bus;
    use crate::trigger::{ExitTrigger, IrqTrigger};

    /// xorshift64: deterministic pseudo-random accesses without a dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// A guest hammering every legacy port with random widths and values gets answers, never a
    /// host panic, and its exits reach the VMM through the callbacks only.
    #[test]
    fn random_port_accesses_are_harmless() {
        let exits = Arc::new(AtomicUsize::new(0));
        let mut bus = Bus::new();
        let serial = SerialPort::new(IrqTrigger::new().unwrap(), Box::new(sink())).unwrap();
        bus.insert(
            Arc::new(Mutex::new(serial)),
            u64::from(SERIAL_PORT_BASE),
            u64::from(SERIAL_PORT_LEN),
        )
        .unwrap();
        let counter = exits.clone();
        let reset = ExitTrigger::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        bus.insert(
            Arc::new(Mutex::new(I8042::new(reset))),
            u64::from(I8042_PORT_BASE),
            u64::from(I8042_PORT_LEN),
        )
        .unwrap();
        let counter = exits.clone();
        let debug_exit = DebugExit::new(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        bus.insert(
            Arc::new(Mutex::new(debug_exit)),
            u64::from(DEBUG_EXIT_PORT),
            4,
        )
        .unwrap();

        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut expected_exits = 0;
        for _ in 0..200_000 {
            let r = next(&mut rng);
            let port = match r % 4 {
                0 => u64::from(SERIAL_PORT_BASE) + (r >> 8) % 10,
                1 => u64::from(I8042_PORT_BASE) + (r >> 8) % 6,
                2 => u64::from(DEBUG_EXIT_PORT) + (r >> 8) % 6,
                _ => (r >> 8) % 0x10000,
            };
            let width = [1usize, 2, 4][((r >> 24) % 3) as usize];
            let data = (r >> 32).to_le_bytes();
            if (r >> 30) & 1 == 0 {
                let mut buf = [0u8; 4];
                bus.read(port, &mut buf[..width]);
            } else {
                let is_reset = port == 0x64 && width == 1 && data[0] == 0xfe;
                let is_debug_exit = port == u64::from(DEBUG_EXIT_PORT);
                expected_exits += usize::from(is_reset || is_debug_exit);
                bus.write(port, &data[..width]);
            }
        }
        assert_eq!(exits.load(Ordering::SeqCst), expected_exits);
    }
}
