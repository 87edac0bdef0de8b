//! The i8042 keyboard controller, present so a guest can reset the machine (Linux `reboot=k`).

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::trigger::ExitTrigger;

/// First port of the i8042 range (data port 0x60; command/status port 0x64).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Length of the i8042 range, 0x60..=0x64.
pub const I8042_PORT_LEN: u16 = 5;
/// Offset of the command/status port within the range.
const COMMAND_OFFSET: u64 = 4;

/// i8042 controller whose "pulse reset line" command ends the VM through an [`ExitTrigger`].
pub struct I8042(I8042Device<ExitTrigger>);

impl I8042 {
    /// Creates the controller; `reset` runs when the guest asks for a CPU reset.
    pub fn new(reset: ExitTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (0 | COMMAND_OFFSET, [byte]) => *byte = self.0.read(offset as u8),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0 | COMMAND_OFFSET, [value]) = (offset, data) {
            // Infallible: the reset trigger cannot fail.
            let _ = self.0.write(offset as u8, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn reset_command_on_the_command_port_triggers_exit() {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let mut dev = I8042::new(ExitTrigger::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(COMMAND_OFFSET, &[0xfe, 0]); // wrong width
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }
}
