//! How device states go into a snapshot directory and come back. Most states are plain data in
//! the snapshot's state file; a device with data of its own (a disk) writes it to files of the
//! snapshot through [`SnapshotFiles`], and its saved state names those files. The VMM's side is a
//! loop: [`DeviceState::to_saved`] for each device when saving, [`DeviceState::from_saved`] when
//! loading. A state read back from a snapshot is not trusted: [`VirtioStateCheck`] checks every
//! value a device or its transport would use as a size, an index or an address before anything
//! is made from it ([`SavedStateError`] names the field).

use std::fmt::Display;
use std::fs::File;
use std::io;

use super::DeviceState;
use super::block::BlockState;
use super::mmio::VirtioState;

/// Start of the name of each disk's file in a snapshot (then the device's index).
pub const DISK_FILE_PREFIX: &str = "disk-";

/// The files of one snapshot directory, as devices see them.
pub trait SnapshotFiles {
    /// Writes the snapshot's file `name` (a plain file name) through `write`, completely or not
    /// at all.
    fn write(
        &mut self,
        name: &str,
        write: &mut dyn FnMut(&File) -> io::Result<()>,
    ) -> io::Result<()>;
    /// Opens the snapshot's file `name` for reading. Names come from a state file that is not
    /// trusted: the implementation refuses any that is not a device file of the snapshot.
    fn open(&self, name: &str) -> io::Result<File>;
}

/// A value of a device state read back from a snapshot that no device could have had (the
/// snapshot is damaged or crafted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value}: {reason}")]
pub struct SavedStateError {
    /// The field, as a path from the device's state (`transport.queues[1].size`).
    pub field: String,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl SavedStateError {
    /// `field` holding `value` is wrong for `reason`.
    pub fn new(field: impl Into<String>, value: impl Display, reason: &'static str) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            reason,
        }
    }

    /// The same error for a field one level down, under `parent`.
    pub fn under(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// What a saved virtio device is checked against.
pub struct VirtioStateCheck<'a> {
    /// The device's index in the snapshot (its files are named after it).
    pub index: usize,
    /// The VM's RAM in bytes.
    pub ram_bytes: u64,
    /// Whether `len` bytes from guest-physical `addr` are all RAM.
    pub in_ram: &'a dyn Fn(u64, u64) -> bool,
}

impl VirtioState {
    /// Checks a state read back from a snapshot: its transport's registers, queues and rate
    /// limits (a receive limit only on a device with a receive direction), and the device's own
    /// state (`check`).
    pub fn check_saved(&self, check: &VirtioStateCheck<'_>) -> Result<(), SavedStateError> {
        self.transport
            .check_saved(check.in_ram)
            .map_err(|e| e.under("transport"))?;
        let receives = matches!(self.device, DeviceState::Net(_) | DeviceState::Vsock(_));
        if !receives && !self.transport.rx_rate_limit().is_unlimited() {
            return Err(SavedStateError::new(
                "transport.rx_rate_limit",
                format_args!("{:?}", self.transport.rx_rate_limit()),
                "a receive limit on a device without a receive direction",
            ));
        }
        self.device
            .check_saved(check)
            .map_err(|e| e.under("device"))
    }
}

impl DeviceState {
    /// Checks a device state read back from a snapshot (see [`VirtioState::check_saved`]).
    pub fn check_saved(&self, check: &VirtioStateCheck<'_>) -> Result<(), SavedStateError> {
        match self {
            Self::Rng | Self::Net(_) => Ok(()),
            Self::Block(_) => Err(SavedStateError::new(
                "Block",
                "a live disk",
                "a snapshot records disks as saved files",
            )),
            Self::SavedBlock(saved) => saved.check(check.index).map_err(|e| e.under("SavedBlock")),
            Self::Console(console) => console.check().map_err(|e| e.under("Console")),
            Self::Vsock(vsock) => vsock.check().map_err(|e| e.under("Vsock")),
            Self::Balloon(balloon) => balloon
                .check(check.ram_bytes)
                .map_err(|e| e.under("Balloon")),
        }
    }

    /// This state as a snapshot records it, with the data of device `index` that does not fit a
    /// state file (a disk's content) written through `files`.
    pub fn to_saved(&self, index: usize, files: &mut dyn SnapshotFiles) -> io::Result<Self> {
        match self {
            Self::Block(disk) => {
                let name = format!("{DISK_FILE_PREFIX}{index}");
                let mut saved = None;
                files.write(&name, &mut |file| {
                    saved = Some(disk.save(file, name.clone())?);
                    Ok(())
                })?;
                saved
                    .map(Self::SavedBlock)
                    .ok_or_else(|| io::Error::other("the disk was not written"))
            }
            other => Ok(other.clone()),
        }
    }

    /// The state a snapshot recorded, with its files opened through `files` (a disk reads its
    /// saved file and will write a private overlay).
    pub fn from_saved(self, files: &dyn SnapshotFiles) -> io::Result<Self> {
        match self {
            Self::SavedBlock(saved) => {
                let file = files.open(&saved.file)?;
                let disk = BlockState::open_saved(&saved, file)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", saved.file)))?;
                Ok(Self::Block(disk))
            }
            other => Ok(other),
        }
    }
}
