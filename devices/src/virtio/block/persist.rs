//! A frozen disk as children continue from it ([`BlockState`]) and as a snapshot records it
//! ([`SavedBlock`]): its content at the freeze, written sparsely to a file of the snapshot,
//! and read back as the base of a restored VM's private overlay.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::layers::FrozenLayers;
use super::{ID_LEN, SECTOR_SIZE};

/// What a block device's children continue from (cheap to clone; `Send + Sync`): the disk's
/// content at [`Block::freeze`](super::Block::freeze), and its configuration.
#[derive(Clone, Debug)]
pub struct BlockState {
    /// A handle on the user's image.
    pub(super) base: Arc<File>,
    /// `base` was opened with `O_DIRECT`.
    pub(super) direct_io: bool,
    pub(super) capacity_sectors: u64,
    pub(super) id: [u8; ID_LEN],
    /// The layers over `base`; `None` for a read-only disk.
    pub(super) layers: Option<FrozenLayers>,
}

/// A block device as a snapshot records it: its disk's content goes to a file of the snapshot,
/// named here, which a restored VM reads (and, if the disk is writable, overlays privately).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SavedBlock {
    /// The disk's file, relative to the snapshot.
    pub file: String,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
}

impl BlockState {
    /// Writes the disk's content at the freeze into `to` (sparse: zeroes stay holes; the parent
    /// may go on writing its image meanwhile) and returns how a snapshot records the device,
    /// with `file` the name of `to` in the snapshot.
    pub fn save(&self, to: &File, file: String) -> io::Result<SavedBlock> {
        // A buffered handle on the image: the copy reads it at any offset and length.
        let image = if self.direct_io {
            File::open(format!("/proc/self/fd/{}", self.base.as_raw_fd()))?
        } else {
            self.base.try_clone()?
        };
        match &self.layers {
            Some(layers) => layers.save(&image, self.capacity_sectors, to)?,
            None => FrozenLayers::empty(0).save(&image, self.capacity_sectors, to)?,
        }
        Ok(SavedBlock {
            file,
            read_only: self.layers.is_none(),
            capacity_sectors: self.capacity_sectors,
            id: self.id,
        })
    }

    /// The state a snapshot recorded as `saved`, over `file`, the disk content it saved: a
    /// writable disk's VM gets a private overlay over it, so the snapshot never changes.
    pub fn open_saved(saved: &SavedBlock, file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if len != saved.capacity_sectors * SECTOR_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "disk file of {len} bytes for {} sectors",
                    saved.capacity_sectors
                ),
            ));
        }
        Ok(Self {
            base: Arc::new(file),
            direct_io: false,
            capacity_sectors: saved.capacity_sectors,
            id: saved.id,
            layers: if saved.read_only {
                None
            } else {
                Some(FrozenLayers::empty(saved.capacity_sectors))
            },
        })
    }
}
