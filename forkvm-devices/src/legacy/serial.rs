//! The 8250 UART on COM1 (port 0x3f8, IRQ 4), built on `vm-superio`, and its receive FIFO as a
//! sink for host input.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::Serial;
use vm_superio::serial::SerialEvents;
pub use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::input::InputSink;
use crate::sync::lock;
use crate::trigger::IrqTrigger;

/// COM1's first I/O port.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Number of UART registers.
pub const SERIAL_PORT_LEN: u16 = 8;
/// COM1's legacy interrupt line.
pub const SERIAL_IRQ: u32 = 4;

/// Wakes the input subscriber once the guest has drained the receive FIFO.
struct FifoDrained(EventFd);

impl SerialEvents for FifoDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed wake-up only delays input until the next one; nothing to recover here.
        let _ = self.0.write(1);
    }
}

/// An 8250 UART whose output goes to `W` and whose interrupt is an irqfd.
pub struct SerialPort {
    uart: Serial<IrqTrigger, FifoDrained, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// Creates the UART writing guest output to `out`, raising `irq` for the guest.
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> io::Result<Self> {
        Self::from_state(&SerialState::default(), irq, out)
    }

    /// A UART that continues from `state` (another UART's registers and pending input).
    pub fn from_state(
        state: &SerialState,
        irq: IrqTrigger,
        out: Box<dyn Write + Send>,
    ) -> io::Result<Self> {
        let drained = FifoDrained(EventFd::new(libc::EFD_NONBLOCK)?);
        let uart = Serial::from_state(state, irq, drained, out)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Self { uart })
    }

    /// The registers and pending input, for a copy of this UART.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// The interrupt line to register with KVM.
    pub fn irq(&self) -> &IrqTrigger {
        self.uart.interrupt_evt()
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                crate::ratelimit::guest_warn!("serial: raising the receive interrupt failed: {e}");
                bytes.len().min(self.uart.fifo_capacity())
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    fn drained_event(&self) -> io::Result<EventFd> {
        self.uart.events().0.try_clone()
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] if offset < u64::from(SERIAL_PORT_LEN) => *byte = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data
            && offset < u64::from(SERIAL_PORT_LEN)
            && let Err(e) = self.uart.write(offset as u8, *value)
        {
            crate::ratelimit::guest_warn!("serial: guest write dropped: {e}");
        }
    }
}

/// The UART's receive FIFO as an [`InputSink`] for an [`crate::input::InputFeeder`].
pub struct SerialSink {
    port: Arc<Mutex<SerialPort>>,
    drained: EventFd,
}

impl SerialSink {
    /// Delivers host input into `port`'s receive FIFO.
    pub fn new(port: Arc<Mutex<SerialPort>>) -> io::Result<Self> {
        let drained = lock(&port).drained_event()?;
        Ok(Self { port, drained })
    }
}

impl InputSink for SerialSink {
    fn room(&self) -> usize {
        lock(&self.port).input_capacity()
    }

    fn deliver(&mut self, bytes: &[u8]) {
        // `bytes` never exceeds the room checked by the single feeder.
        lock(&self.port).enqueue_input(bytes);
    }

    fn room_made(&self) -> &EventFd {
        &self.drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::SharedWriter;

    fn port(out: SharedWriter) -> SerialPort {
        SerialPort::new(IrqTrigger::new().unwrap(), Box::new(out)).unwrap()
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let out = SharedWriter::default();
        let mut port = port(out.clone());
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*out.contents(), b"hi\n");
    }

    #[test]
    fn host_input_is_readable_by_the_guest_and_raises_the_irq() {
        let mut port = port(SharedWriter::default());
        port.write(1, &[0x01]); // IER: receive-data-available interrupt
        assert_eq!(port.enqueue_input(b"ab"), 2);
        assert_eq!(port.irq().eventfd().read().unwrap(), 1);
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0u8];
        port.read(0, &mut byte);
        assert_eq!(byte, [b'a']);
    }

    #[test]
    fn a_full_fifo_accepts_nothing_more() {
        let mut port = port(SharedWriter::default());
        let cap = port.input_capacity();
        assert_eq!(port.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(port.enqueue_input(b"y"), 0);
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_harmless() {
        let out = SharedWriter::default();
        let mut port = port(out.clone());
        let mut word = [0u8; 2];
        port.read(0, &mut word);
        assert_eq!(word, [0xff, 0xff]);
        port.write(0, b"ab");
        port.write(9, b"c");
        assert!(out.contents().is_empty());
    }
}
