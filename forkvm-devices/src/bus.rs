//! Routing of guest port I/O (and, later, MMIO) accesses to devices by address range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use thiserror::Error;

/// A device reachable through a range of guest addresses.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors while building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// Address ranges mapped to devices. Accesses that hit no device read as all-ones and are dropped
/// on write, as on real hardware with nothing decoding the address.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` on `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(start, (l, _))| start + l > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// Finds the device covering the whole access `[addr, addr + size)` and the offset into it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (base, (len, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((device, offset))
    }

    /// Dispatches a guest read; returns whether a device handled it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest write; returns whether a device handled it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last_write: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_by_range_and_offset() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::new();
        bus.insert(probe.clone(), 0x3f8, 8).unwrap();
        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fa, &mut byte));
        assert_eq!(byte, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(probe.lock().unwrap().last_write, vec![(7, vec![7])]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_read_all_ones() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Probe::default())), 0x60, 1)
            .unwrap();
        let mut word = [0u8; 2];
        assert!(
            !bus.read(0x60, &mut word),
            "a 2-byte access past a 1-byte device"
        );
        assert_eq!(word, [0xff, 0xff]);
        assert!(!bus.read(0x1000, &mut word));
        assert!(!bus.write(0x5f, &[1, 2]));
    }

    #[test]
    fn rejects_overlapping_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Probe::default())), 0x10, 0x10)
            .unwrap();
        for (base, len) in [(0x18, 4), (0x8, 0x10), (0x10, 1)] {
            assert_eq!(
                bus.insert(Arc::new(Mutex::new(Probe::default())), base, len),
                Err(BusError::Overlap { base, len })
            );
        }
        assert!(
            bus.insert(Arc::new(Mutex::new(Probe::default())), 0x20, 0x10)
                .is_ok()
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Probe::default())), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
    }
}
