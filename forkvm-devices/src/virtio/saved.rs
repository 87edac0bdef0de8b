//! How device states go into a snapshot directory and come back. Most states are plain data in
//! the snapshot's state file; a device with data of its own (a disk) writes it to files of the
//! snapshot through [`SnapshotFiles`], and its saved state names those files. The VMM's side is a
//! loop: [`DeviceState::to_saved`] for each device when saving, [`DeviceState::from_saved`] when
//! loading.

use std::fs::File;
use std::io;

use super::DeviceState;
use super::block::BlockState;

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

impl DeviceState {
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
