//! Why a directory holds no snapshot that may be loaded ([`SnapshotError`], the reason of
//! [`super::Error::SnapshotInvalid`]): each reason names the file or the state field that is
//! wrong. (Here rather than in `snapshot/`, so that the crate's error does not depend on the
//! snapshot module.)

use std::io;

use forkvm_devices::virtio::saved::SavedStateError;

/// Why a snapshot directory cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The directory has no state file: not a snapshot, or one whose save did not finish.
    #[error("no {file} ({error}): not a snapshot, or one that did not finish")]
    Missing {
        /// The missing file.
        file: &'static str,
        /// Why it could not be opened.
        error: io::Error,
    },
    /// A file of the snapshot cannot be used as one.
    #[error("{file}: {problem}")]
    File {
        /// The file's name in the snapshot.
        file: String,
        /// What is wrong with it.
        problem: FileProblem,
    },
    /// The state file is not the JSON of a snapshot.
    #[error("{file}: {error}")]
    Parse {
        /// The file.
        file: &'static str,
        /// What the parser says.
        error: serde_json::Error,
    },
    /// A value of the state file is out of range.
    #[error("state field {field} = {value}: {reason}")]
    Field {
        /// The field, as a path in the state (`devices[0].transport.queues[1].size`).
        field: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file's length or contents differ from what its checksum recorded: it is damaged.
    #[error(
        "{file}: {len} bytes with CRC-32 {crc:#010x}, the snapshot recorded {expected_len} bytes with {expected_crc:#010x}: damaged"
    )]
    Checksum {
        /// The file.
        file: String,
        /// Its length.
        len: u64,
        /// Its checksum.
        crc: u32,
        /// The length recorded at the save.
        expected_len: u64,
        /// The checksum recorded at the save.
        expected_crc: u32,
    },
    /// The snapshot's format records checksums, and its checksum file lacks one.
    #[error("no checksum of {file}, which a snapshot of format {format} records")]
    NoChecksum {
        /// The file without a checksum.
        file: String,
        /// The snapshot's format.
        format: u32,
    },
    /// A device's saved state does not fit its files.
    #[error("device {index}: {error}")]
    Device {
        /// The device's index.
        index: usize,
        /// What its state says.
        error: io::Error,
    },
    /// The snapshot's memory could not be copied into a sealed memory file.
    #[error("copying {file} into a sealed memory file: {error}")]
    Copy {
        /// The memory file.
        file: &'static str,
        /// Why.
        error: io::Error,
    },
    /// The directory itself cannot be opened or resolved.
    #[error("the directory: {0}")]
    Directory(io::Error),
    /// The files of a directory kept ready were replaced while it was loaded.
    #[error("its files were replaced while it was loaded")]
    Replaced,
}

/// What is wrong with one file of a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileProblem {
    /// It cannot be opened (a symbolic link is refused here: `O_NOFOLLOW`).
    #[error("cannot be opened: {0}")]
    Open(io::Error),
    /// It is a symbolic link, which a snapshot never holds.
    #[error("is a symbolic link, which a snapshot never holds")]
    Symlink,
    /// It is not a regular file (a FIFO, a device, a directory).
    #[error("is a {0}, not a regular file")]
    NotRegular(&'static str),
    /// It belongs to another user than this process's (or root).
    #[error("belongs to user {owner}, not to this process's user ({uid}) or root")]
    Owner {
        /// The file's owner.
        owner: u32,
        /// This process's effective user.
        uid: u32,
    },
    /// It is longer than such a file may be.
    #[error("holds {len} bytes, more than {max}")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The most it may hold.
        max: u64,
    },
    /// Its length is not what the state says.
    #[error("holds {len} bytes, the state says {expected}")]
    Length {
        /// Its length.
        len: u64,
        /// What the state says.
        expected: u64,
    },
    /// It could not be read.
    #[error("cannot be read: {0}")]
    Read(io::Error),
}

impl SnapshotError {
    /// A problem with `file`.
    pub(crate) fn file(file: impl Into<String>, problem: FileProblem) -> Self {
        Self::File {
            file: file.into(),
            problem,
        }
    }

    /// A device state field out of range, under `parent` in the state.
    pub(crate) fn saved_field(parent: &str, e: SavedStateError) -> Self {
        Self::Field {
            field: format!("{parent}.{}", e.field),
            value: e.value,
            reason: e.reason,
        }
    }

    /// Field `field`, holding `value`, is out of range for `reason`.
    pub(crate) fn field(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        reason: &'static str,
    ) -> Self {
        Self::Field {
            field: field.into(),
            value: value.to_string(),
            reason,
        }
    }
}
