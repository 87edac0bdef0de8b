//! Legacy PC devices on port I/O: the 8250 UART, the i8042 controller (for guest-initiated
//! reset) and the test-only debug-exit port.

mod debug_exit;
mod i8042;
mod serial;

pub use debug_exit::{DEBUG_EXIT_PORT, DebugExit};
pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN, SerialInput, SerialPort};
