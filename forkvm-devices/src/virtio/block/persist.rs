//! A frozen disk as children continue from it ([`BlockState`]) and as a snapshot records it
//! ([`SavedBlock`]): its content at the freeze, written sparsely to a file of the snapshot,
//! and read back as the base of a restored VM's private overlay.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::layers::FrozenLayers;
use super::{ID_LEN, SECTOR_SIZE};
use crate::virtio::saved::{DISK_FILE_PREFIX, SavedStateError};

/// The largest disk a snapshot may record: 16 TiB, the largest file ext4 holds. A restored disk
/// keeps a bitmap of one bit per sector (4 GiB at this size, zeroed memory the kernel gives
/// lazily); a state file naming more is refused before anything is allocated.
pub const MAX_SAVED_DISK_BYTES: u64 = 16 << 40;

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

impl SavedBlock {
    /// Checks a record read back from a snapshot, as device `index`: its file is the snapshot's
    /// file for that device, and its capacity at most [`MAX_SAVED_DISK_BYTES`].
    pub fn check(&self, index: usize) -> Result<(), SavedStateError> {
        if self.file != format!("{DISK_FILE_PREFIX}{index}") {
            return Err(SavedStateError::new(
                "file",
                format_args!("{:?}", self.file),
                "not this device's disk file of the snapshot",
            ));
        }
        self.capacity_bytes().map(|_| ()).map_err(|e| {
            SavedStateError::new("capacity_sectors", self.capacity_sectors, e.reason())
        })
    }

    /// The recorded capacity in bytes, if it is one a snapshot may hold.
    fn capacity_bytes(&self) -> Result<u64, SavedDiskError> {
        match self.capacity_sectors.checked_mul(SECTOR_SIZE) {
            None => Err(SavedDiskError::CapacityOverflow {
                capacity_sectors: self.capacity_sectors,
            }),
            Some(bytes) if bytes > MAX_SAVED_DISK_BYTES => Err(SavedDiskError::TooLarge {
                capacity_sectors: self.capacity_sectors,
            }),
            Some(bytes) => Ok(bytes),
        }
    }
}

impl BlockState {
    /// The disk's size in bytes: what a child's overlay file ([`super::layer_file`]) is made for.
    pub fn disk_bytes(&self) -> u64 {
        self.capacity_sectors.saturating_mul(SECTOR_SIZE)
    }

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
    /// writable disk's VM gets a private overlay over it, so the snapshot never changes. A
    /// record that does not fit its file fails with an error of kind `InvalidData` that wraps
    /// a [`SavedDiskError`].
    pub fn open_saved(saved: &SavedBlock, file: File) -> io::Result<Self> {
        // The capacity comes from the snapshot's state file, which is not trusted: checked before
        // the file's length is compared and anything is allocated for it.
        let expected = saved.capacity_bytes()?;
        let len = file.metadata()?.len();
        if len != expected {
            return Err(SavedDiskError::SizeMismatch {
                len,
                capacity_sectors: saved.capacity_sectors,
            }
            .into());
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

/// Why a snapshot's record of a disk does not fit the disk file it names.
#[derive(Debug, thiserror::Error)]
pub enum SavedDiskError {
    /// The recorded capacity is more bytes than a `u64` counts.
    #[error("a capacity of {capacity_sectors} sectors overflows a byte count")]
    CapacityOverflow {
        /// The recorded capacity, in sectors.
        capacity_sectors: u64,
    },
    /// The recorded capacity is more than a snapshot may hold ([`MAX_SAVED_DISK_BYTES`]).
    #[error("a capacity of {capacity_sectors} sectors is more than a snapshot's disk may hold")]
    TooLarge {
        /// The recorded capacity, in sectors.
        capacity_sectors: u64,
    },
    /// The file's length is not the recorded capacity.
    #[error("disk file of {len} bytes for {capacity_sectors} sectors")]
    SizeMismatch {
        /// The file's length in bytes.
        len: u64,
        /// The recorded capacity, in sectors.
        capacity_sectors: u64,
    },
}

impl SavedDiskError {
    /// Why a capacity is refused, in a few words.
    fn reason(&self) -> &'static str {
        match self {
            Self::CapacityOverflow { .. } => "overflows a byte count",
            Self::TooLarge { .. } => "more than a snapshot's disk may hold (16 TiB)",
            Self::SizeMismatch { .. } => "not the disk file's length",
        }
    }
}

impl From<SavedDiskError> for io::Error {
    fn from(e: SavedDiskError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A record from an untrusted snapshot whose capacity in bytes wraps a `u64` to the length
    /// of the file it names (512 bytes) must be refused, not multiplied blindly.
    #[test]
    fn a_saved_capacity_that_overflows_is_refused() {
        let path = std::env::temp_dir().join(format!("forkvm-blk-saved-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        file.write_all(&[0u8; 512]).unwrap();
        drop(file);
        for read_only in [true, false] {
            // (2^55 + 1) * 512 = 2^64 + 512, which wraps to the file's length.
            let saved = SavedBlock {
                file: "disk-0".into(),
                read_only,
                capacity_sectors: (1 << 55) + 1,
                id: [0; ID_LEN],
            };
            let err = BlockState::open_saved(&saved, File::open(&path).unwrap()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let inner = err
                .get_ref()
                .and_then(|e| e.downcast_ref::<SavedDiskError>());
            assert!(
                matches!(
                    inner,
                    Some(SavedDiskError::CapacityOverflow {
                        capacity_sectors: 0x80_0000_0000_0001
                    })
                ),
                "{err}"
            );
        }
        // A record that fits its file still opens; one that does not is a size mismatch.
        let fits = SavedBlock {
            file: "disk-0".into(),
            read_only: false,
            capacity_sectors: 1,
            id: [0; ID_LEN],
        };
        let state = BlockState::open_saved(&fits, File::open(&path).unwrap()).unwrap();
        assert_eq!(state.capacity_sectors, 1);
        let short = SavedBlock {
            capacity_sectors: 2,
            ..fits
        };
        let err = BlockState::open_saved(&short, File::open(&path).unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "disk file of 512 bytes for 2 sectors");
        std::fs::remove_file(&path).unwrap();
    }

    /// A record whose capacity fits its file, but where the file is a huge sparse one (tmpfs
    /// holds files of any length without storing them), must be refused before the restored
    /// disk's bitmap is allocated: 2^45 sectors asked for a 4 TiB bitmap, and the allocator
    /// aborted the process.
    #[test]
    fn a_saved_capacity_beyond_the_limit_is_refused_before_allocating() {
        let dir = std::path::Path::new("/dev/shm");
        let base = if dir.is_dir() {
            dir.to_owned()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!("forkvm-blk-huge-{}", std::process::id()));
        let capacity_sectors = 1u64 << 45;
        let file = File::create(&path).unwrap();
        file.set_len(capacity_sectors * SECTOR_SIZE).unwrap();
        drop(file);
        let saved = SavedBlock {
            file: "disk-3".into(),
            read_only: false,
            capacity_sectors,
            id: [0; ID_LEN],
        };
        let err = BlockState::open_saved(&saved, File::open(&path).unwrap()).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<SavedDiskError>());
        assert!(
            matches!(inner, Some(SavedDiskError::TooLarge { .. })),
            "{err}"
        );
        let check = saved.check(3).unwrap_err();
        assert_eq!(check.field, "capacity_sectors");
        // The record names its own device's file, and no other.
        let fits = SavedBlock {
            capacity_sectors: 8,
            ..saved
        };
        assert_eq!(fits.check(3), Ok(()));
        assert_eq!(fits.check(4).unwrap_err().field, "file");
    }
}
