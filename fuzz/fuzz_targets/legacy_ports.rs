//! A guest hammering the legacy ports (8250 UART, i8042, debug exit) with arbitrary accesses.

#![no_main]

use std::io::sink;
use std::sync::{Arc, Mutex};

use forkvm_devices::bus::Bus;
use forkvm_devices::legacy::{
    DEBUG_EXIT_PORT, DebugExit, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_PORT_BASE,
    SERIAL_PORT_LEN, SerialPort,
};
use forkvm_devices::trigger::{ExitTrigger, IrqTrigger};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bus = Bus::new();
    let Ok(irq) = IrqTrigger::new() else { return };
    let serial = SerialPort::new(irq, Box::new(sink())).unwrap();
    bus.insert(
        Arc::new(Mutex::new(serial)),
        u64::from(SERIAL_PORT_BASE),
        u64::from(SERIAL_PORT_LEN),
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(I8042::new(ExitTrigger::new(|| {})))),
        u64::from(I8042_PORT_BASE),
        u64::from(I8042_PORT_LEN),
    )
    .unwrap();
    bus.insert(
        Arc::new(Mutex::new(DebugExit::new(|_| {}))),
        u64::from(DEBUG_EXIT_PORT),
        4,
    )
    .unwrap();
    // Each access: port low byte (within 0x000-0x3ff via the high bits), width, value.
    for op in data.chunks_exact(4) {
        let port = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x3ff);
        let width = [1usize, 2, 4][usize::from(op[2] % 3)];
        let value = [op[3]; 4];
        if op[2] & 0x80 == 0 {
            bus.write(port, &value[..width]);
        } else {
            let mut out = [0u8; 4];
            bus.read(port, &mut out[..width]);
        }
    }
});
