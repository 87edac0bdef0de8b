//! Snapshot directories kept ready for [`crate::Vm::restore`]: loaded once, with children
//! prepared for them and refilled in the background ([`Snapshot::keep_ready`]), so that a
//! restore of such a directory only maps nothing, loads state and starts (a prepared spawn)
//! instead of reading the state, mapping the memory file and creating a KVM VM whose cost grows
//! with memory size.
//!
//! A kept entry is used only while the directory still holds the files it was loaded from:
//! `state.json` and `memory` with the same device, inode, size and modification time (saving a
//! snapshot again renames new files in, so a re-saved directory is loaded again).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use forkvm_devices::sync::lock;

use super::{MEMORY_FILE, STATE_FILE, Snapshot, SnapshotError};
use crate::error::Error;

/// Which files a kept snapshot was loaded from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    files: [(u64, u64, u64, i64, i64); 2],
}

impl Stamp {
    fn of(dir: &Path) -> Option<Self> {
        let file = |name: &str| {
            let meta = std::fs::symlink_metadata(dir.join(name)).ok()?;
            Some((
                meta.dev(),
                meta.ino(),
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
            ))
        };
        Some(Self {
            files: [file(STATE_FILE)?, file(MEMORY_FILE)?],
        })
    }
}

struct Entry {
    dir: PathBuf,
    stamp: Stamp,
    snapshot: Arc<Snapshot>,
}

/// The directories kept ready, few: a list.
static KEPT: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Keeps `n` children prepared for restores of the snapshot in `dir` (0: no longer).
pub(crate) fn keep(dir: &Path, n: usize) -> Result<(), Error> {
    let dir = canonical(dir)?;
    let stale = {
        let mut kept = lock(&KEPT);
        let at = kept.iter().position(|entry| entry.dir == dir);
        at.map(|at| kept.swap_remove(at))
    };
    // Dropped here, outside the lock: a kept snapshot's children go with it.
    drop(stale);
    if n == 0 {
        return Ok(());
    }
    let stamp = Stamp::of(&dir).ok_or_else(|| Error::SnapshotInvalid {
        path: dir.clone(),
        reason: SnapshotError::Missing {
            file: STATE_FILE,
            error: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {STATE_FILE} or {MEMORY_FILE}"),
            ),
        },
    })?;
    let snapshot = Snapshot::load(&dir)?;
    // Loaded from other files than stamped (replaced meanwhile): not kept.
    if Stamp::of(&dir) != Some(stamp) {
        return Err(Error::SnapshotInvalid {
            path: dir,
            reason: SnapshotError::Replaced,
        });
    }
    snapshot.keep_ready(n)?;
    lock(&KEPT).push(Entry {
        dir,
        stamp,
        snapshot,
    });
    Ok(())
}

/// The kept snapshot of `dir`, if there is one and `dir` still holds its files. An entry whose
/// files were replaced is forgotten. When no directory is kept (the usual case: every
/// [`crate::Vm::restore`] asks) it touches no file.
pub(crate) fn get(dir: &Path) -> Option<Arc<Snapshot>> {
    if lock(&KEPT).is_empty() {
        return None;
    }
    let dir = canonical(dir).ok()?;
    let stamp = Stamp::of(&dir);
    let mut kept = lock(&KEPT);
    let at = kept.iter().position(|entry| entry.dir == dir)?;
    if Some(kept[at].stamp) == stamp {
        return Some(kept[at].snapshot.clone());
    }
    let stale = kept.swap_remove(at);
    drop(kept);
    drop(stale);
    None
}

fn canonical(dir: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(dir).map_err(|e| Error::SnapshotInvalid {
        path: dir.to_owned(),
        reason: SnapshotError::Directory(e),
    })
}
