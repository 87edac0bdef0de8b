//! Checksums of a snapshot's files (`checksums.json`): the length and CRC-32 of `state.json`,
//! `memory` and each disk file, written at the save (after each file is complete and synced)
//! and checked at the load: always for `state.json`, for the large files when the load asks
//! ([`super::LoadOptions::verify_data`]; the cost is in `docs/design/snapshot-files.md`).
//!
//! A checksum finds a file damaged by the disk, a copy or a truncation, not one changed on
//! purpose (anyone who can write the directory can write new checksums too): the directory's
//! ownership checks and the state's range checks are what guard against that.
//!
//! CRC-32 (IEEE) from `crc32fast`: the most used CRC crate (flate2, zip and png use it),
//! maintained, with one small dependency (`cfg-if`), computed with the CPU's carry-less
//! multiply (PCLMULQDQ) where there is one. Firecracker puts a CRC-64 on its snapshots; the
//! CRC-64 crates looked at were not fit: `crc64fast-nvme` is archived (deprecated by its
//! authors), and its successor `crc-fast` builds a C library and a panic handler by default.
//! A 32-bit CRC finds every burst of up to 32 bits and misses other damage with a probability
//! of 2^-32 per file, and the length is compared too.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::error::{FileProblem, SnapshotError};

/// The checksum file of a snapshot directory.
pub const CHECKSUM_FILE: &str = "checksums.json";
/// The algorithm named in the file.
const ALGORITHM: &str = "crc32";
/// The largest checksum file read (a snapshot has at most a few dozen files).
pub(super) const MAX_CHECKSUM_BYTES: u64 = 64 << 10;
/// Bytes read per step when a file is summed.
const CHUNK: usize = 1 << 20;

/// One file's length and checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FileSum {
    len: u64,
    crc32: u32,
}

/// The checksums of a snapshot's files, by name.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Checksums {
    algorithm: String,
    files: BTreeMap<String, FileSum>,
}

impl FileSum {
    /// The checksum of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self {
            len: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            crc32: crc32fast::hash(bytes),
        }
    }

    /// The checksum of all of `file` (its holes read as zeroes), read a MiB at a time.
    pub fn of_file(file: &File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let mut digest = crc32fast::Hasher::new();
        let mut buffer = vec![0u8; CHUNK];
        let mut at = 0;
        while at < len {
            let step = usize::try_from((len - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buffer[..step];
            file.read_exact_at(chunk, at)?;
            digest.update(chunk);
            at += step as u64;
        }
        Ok(Self {
            len,
            crc32: digest.finalize(),
        })
    }
}

impl Checksums {
    /// No checksum yet.
    pub fn new() -> Self {
        Self {
            algorithm: ALGORITHM.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Records `sum` for `file`.
    pub fn insert(&mut self, file: &str, sum: FileSum) {
        self.files.insert(file.to_owned(), sum);
    }

    /// The file's contents.
    pub fn to_json(&self) -> Vec<u8> {
        // A map of strings to two numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a checksum file (at most [`MAX_CHECKSUM_BYTES`], read by the caller).
    pub fn parse(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let sums: Self = serde_json::from_slice(bytes).map_err(|error| SnapshotError::Parse {
            file: CHECKSUM_FILE,
            error,
        })?;
        if sums.algorithm != ALGORITHM {
            return Err(SnapshotError::field(
                format!("{CHECKSUM_FILE}: algorithm"),
                format_args!("{:?}", sums.algorithm),
                "not the checksum this forkvm computes (crc32)",
            ));
        }
        Ok(sums)
    }

    /// Checks `bytes`, the contents of `file`, against its recorded checksum (of a snapshot of
    /// `format`).
    pub fn verify_bytes(&self, file: &str, format: u32, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.compare(file, format, FileSum::of_bytes(bytes))
    }

    /// Reads all of `file` (named `name`) and checks it against its recorded checksum.
    pub fn verify_file(&self, name: &str, format: u32, file: &File) -> Result<(), SnapshotError> {
        let sum =
            FileSum::of_file(file).map_err(|e| SnapshotError::file(name, FileProblem::Read(e)))?;
        self.compare(name, format, sum)
    }

    fn compare(&self, file: &str, format: u32, found: FileSum) -> Result<(), SnapshotError> {
        let Some(&expected) = self.files.get(file) else {
            return Err(SnapshotError::NoChecksum {
                file: file.to_owned(),
                format,
            });
        };
        if found != expected {
            return Err(SnapshotError::Checksum {
                file: file.to_owned(),
                len: found.len,
                crc: found.crc32,
                expected_len: expected.len,
                expected_crc: expected.crc32,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC is CRC-32/IEEE (its check value, over "123456789"), a file's is that of its
    /// bytes, and a damaged copy, or one of another length, is refused by name.
    #[test]
    fn checksums_find_damaged_files() {
        assert_eq!(FileSum::of_bytes(b"123456789").crc32, 0xcbf4_3926);
        let path = std::env::temp_dir().join(format!("forkvm-crc-{}", std::process::id()));
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let sum = FileSum::of_file(&file).unwrap();
        assert_eq!(sum, FileSum::of_bytes(&data));
        let mut sums = Checksums::new();
        sums.insert("memory", sum);
        let sums = Checksums::parse(&sums.to_json()).unwrap();
        sums.verify_file("memory", 3, &file).unwrap();

        let mut damaged = data.clone();
        damaged[CHUNK + 5] ^= 1;
        let err = sums.verify_bytes("memory", 3, &damaged).unwrap_err();
        assert!(matches!(err, SnapshotError::Checksum { .. }), "{err}");
        assert!(err.to_string().starts_with("memory: "), "{err}");
        let err = sums.verify_bytes("memory", 3, &data[1..]).unwrap_err();
        assert!(matches!(err, SnapshotError::Checksum { len, .. } if len == sum.len - 1));
        let err = sums.verify_bytes("disk-0", 3, &data).unwrap_err();
        assert!(matches!(err, SnapshotError::NoChecksum { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
