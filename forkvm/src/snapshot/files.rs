//! The files of a snapshot directory, which someone else may have written: read without
//! following links or blocking ([`SnapshotDir`]), and written so that the snapshot already
//! there stays whole until the new one is ([`NewSnapshot`]).
//!
//! Reading: the directory is opened once, and each file relative to it with `O_NOFOLLOW |
//! O_NONBLOCK | O_CLOEXEC` (a link is refused, a FIFO does not block the open); `fstat` on the
//! opened file must show a regular file owned by this process's user or root. A save that
//! replaces the directory meanwhile cannot mix two snapshots' files: the open directory is the
//! old one.
//!
//! Writing: the new snapshot goes into a fresh directory beside the target, named uniquely
//! (`.<name>.new-<pid>-<n>-<ns>`, made with `mkdir`, which never follows a link), its files
//! created with `O_CREAT | O_EXCL | O_NOFOLLOW` and synced, then the directory synced; then
//! `renameat2(RENAME_EXCHANGE)` swaps it with the old directory in one step, the parent is
//! synced, and the old snapshot (now under the temporary name) is removed. A failure before the
//! swap removes the new directory and leaves the old snapshot as it was. A process killed midway
//! leaves its new directory behind; the next save beside it removes such a leftover once its
//! process is gone from this host and it has not changed for [`LEFTOVER_AGE`] (a save from
//! another machine sharing the directory keeps changing its own). Where the filesystem
//! cannot exchange (`EINVAL`: some network and FUSE filesystems), the old directory is renamed
//! aside and the new one renamed in: a crash between the two leaves the old snapshot under its
//! temporary name and none under the target's. An existing target that holds other files than a
//! snapshot's is refused, never replaced. Uses `rustix` (already in the build, through
//! `tempfile`) for the `*at` calls std lacks, without `unsafe`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::error::{FileProblem, SnapshotError};

/// A snapshot directory opened for reading.
pub(super) struct SnapshotDir {
    dir: OwnedFd,
}

impl SnapshotDir {
    /// Opens the directory at `path` (the caller's path: a link to a directory is followed).
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SnapshotError::Directory(e.into()))?;
        Ok(Self { dir })
    }

    /// Opens the file `name` of the snapshot for reading: not a link, a regular file, owned by
    /// this process's user or root. A missing file is [`FileProblem::Open`] of kind `NotFound`.
    pub fn open_file(&self, name: &str) -> Result<File, SnapshotError> {
        let bad = |problem| SnapshotError::file(name, problem);
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP => bad(FileProblem::Symlink),
            e => bad(FileProblem::Open(e.into())),
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| bad(FileProblem::Open(e.into())))?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => {}
            other => return Err(bad(FileProblem::NotRegular(type_name(other)))),
        }
        let uid = rustix::process::geteuid().as_raw();
        if stat.st_uid != uid && stat.st_uid != 0 {
            return Err(bad(FileProblem::Owner {
                owner: stat.st_uid,
                uid,
            }));
        }
        // O_NONBLOCK changes nothing for a regular file's reads and maps.
        Ok(File::from(fd))
    }

    /// Reads all of the file `name`, which may hold at most `max` bytes.
    pub fn read(&self, name: &str, max: u64) -> Result<Vec<u8>, SnapshotError> {
        let file = self.open_file(name)?;
        let bad = |problem| SnapshotError::file(name, problem);
        let len = file
            .metadata()
            .map_err(|e| bad(FileProblem::Read(e)))?
            .len();
        if len > max {
            return Err(bad(FileProblem::TooLarge { len, max }));
        }
        let mut bytes = Vec::new();
        // Bounded again, should the file grow meanwhile.
        file.take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| bad(FileProblem::Read(e)))?;
        let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if read > max {
            return Err(bad(FileProblem::TooLarge { len: read, max }));
        }
        Ok(bytes)
    }
}

/// Whether an error is a missing file's.
pub(super) fn is_missing(e: &SnapshotError) -> bool {
    matches!(
        e,
        SnapshotError::File {
            problem: FileProblem::Open(e),
            ..
        } if e.kind() == io::ErrorKind::NotFound
    )
}

fn type_name(kind: FileType) -> &'static str {
    match kind {
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        _ => "special file",
    }
}

/// Whether `name` is one a snapshot directory holds: its files, and the temporary names of
/// format 2, which wrote its files beside the old ones.
pub(super) fn is_snapshot_file(name: &OsStr) -> bool {
    let name = name.as_bytes();
    let known = [
        super::STATE_FILE,
        super::MEMORY_FILE,
        super::checksum::CHECKSUM_FILE,
    ];
    known.iter().any(|k| name == k.as_bytes())
        || name.starts_with(super::DISK_FILE_PREFIX.as_bytes())
        || (name.starts_with(b".") && name.ends_with(b".tmp"))
}

/// A snapshot being written: a fresh directory beside the one it replaces, removed again if it
/// is dropped before [`NewSnapshot::commit`].
pub(super) struct NewSnapshot {
    parent: OwnedFd,
    /// The target's name in `parent`.
    name: OsString,
    /// The new directory's name in `parent`.
    temporary: OsString,
    dir: OwnedFd,
    committed: bool,
}

/// How long a new directory left by a save whose process is gone stays untouched before the
/// next save beside it removes it.
pub(super) const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Tells apart the temporary directories of one process.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A name for a temporary directory beside `name`, unique to this process and this instant.
fn temporary_name(name: &OsStr, what: &str) -> OsString {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut temporary = OsString::from(".");
    temporary.push(name);
    temporary.push(format!(
        ".{what}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    temporary
}

impl NewSnapshot {
    /// Makes the fresh directory for a snapshot that will replace `target` (whose parent is
    /// created if missing).
    pub fn create(target: &Path) -> io::Result<Self> {
        let target = resolve(target)?;
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a snapshot directory needs a name in a parent directory",
            ));
        };
        let parent = rustix::fs::open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        remove_leftovers(&parent, name);
        let mut tries = 0;
        let temporary = loop {
            let temporary = temporary_name(name, "new");
            match rustix::fs::mkdirat(&parent, temporary.as_os_str(), Mode::RWXU) {
                Ok(()) => break temporary,
                Err(Errno::EXIST) if tries < 16 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        };
        let dir = match open_dir_at(&parent, &temporary) {
            Ok(dir) => dir,
            Err(e) => {
                let _ = rustix::fs::unlinkat(&parent, temporary.as_os_str(), AtFlags::REMOVEDIR);
                return Err(e);
            }
        };
        Ok(Self {
            parent,
            name: name.to_owned(),
            temporary,
            dir,
            committed: false,
        })
    }

    /// Writes the new file `name` through `write`, and syncs it; returns it open for reading.
    pub fn write(
        &self,
        name: &str,
        write: &mut dyn FnMut(&File) -> io::Result<()>,
    ) -> io::Result<File> {
        let plain = Path::new(name).file_name() == Some(OsStr::new(name));
        if !plain {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a plain file name"),
            ));
        }
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR,
        )?;
        let file = File::from(fd);
        write(&file)?;
        file.sync_all()?;
        Ok(file)
    }

    /// Puts the new snapshot in the target's place (see the module docs): the old one, if
    /// any, is removed only once the new one is complete and in place.
    pub fn commit(mut self) -> io::Result<()> {
        rustix::fs::fsync(&self.dir)?;
        let old = self.swap()?;
        self.committed = true;
        let synced = rustix::fs::fsync(&self.parent);
        if let Some(old) = old {
            remove_snapshot_dir(&self.parent, &old);
        }
        synced.map_err(Into::into)
    }

    /// Renames the new directory to the target's name; returns the name the old snapshot now
    /// has, if there was one.
    fn swap(&self) -> io::Result<Option<OsString>> {
        let (parent, temporary, name) = (
            &self.parent,
            self.temporary.as_os_str(),
            self.name.as_os_str(),
        );
        match rustix::fs::renameat_with(parent, temporary, parent, name, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(None),
            Err(Errno::EXIST | Errno::NOTEMPTY) => {}
            // A filesystem without the flag: look first (nothing else writes the target).
            Err(Errno::INVAL | Errno::NOSYS) => {
                match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => {}
                    Err(Errno::NOENT) => {
                        rustix::fs::renameat(parent, temporary, parent, name)?;
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
        check_replaceable(parent, name)?;
        match rustix::fs::renameat_with(parent, temporary, parent, name, RenameFlags::EXCHANGE) {
            // The old snapshot is under the temporary name now.
            Ok(()) => Ok(Some(self.temporary.clone())),
            Err(Errno::INVAL | Errno::NOSYS) => {
                let aside = temporary_name(name, "old");
                rustix::fs::renameat(parent, name, parent, aside.as_os_str())?;
                if let Err(e) = rustix::fs::renameat(parent, temporary, parent, name) {
                    // Put the old one back rather than leave none.
                    let _ = rustix::fs::renameat(parent, aside.as_os_str(), parent, name);
                    return Err(e.into());
                }
                Ok(Some(aside))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for NewSnapshot {
    fn drop(&mut self) {
        if !self.committed {
            remove_snapshot_dir(&self.parent, &self.temporary);
        }
    }
}

/// Removes the new directories of saves to `name` that a killed process left in `parent`: named
/// `.<name>.new-<pid>-…` with no process `pid` on this host, and unchanged for [`LEFTOVER_AGE`].
/// Only snapshot files are removed (a directory holding anything else stays). The `.old-`
/// directory of an interrupted fallback swap may be the only copy left, and is kept.
fn remove_leftovers(parent: &OwnedFd, name: &OsStr) {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".new-");
    let prefix = prefix.as_bytes();
    let Ok(entries) = rustix::fs::Dir::read_from(parent) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for entry in entries.filter_map(Result::ok) {
        let file = OsStr::from_bytes(entry.file_name().to_bytes());
        let Some(rest) = file.as_bytes().strip_prefix(prefix) else {
            continue;
        };
        let pid = std::str::from_utf8(rest)
            .ok()
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        let Some(pid) = pid else { continue };
        let gone = pid.as_raw_nonzero().get() != std::process::id() as i32
            && rustix::process::test_kill_process(pid) == Err(Errno::SRCH);
        let Ok(stat) = rustix::fs::statat(parent, file, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let changed = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                u64::try_from(stat.st_mtime).unwrap_or(0),
                u32::try_from(stat.st_mtime_nsec).unwrap_or(0),
            );
        let old = now
            .duration_since(changed)
            .is_ok_and(|age| age >= LEFTOVER_AGE);
        if gone && old && FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            remove_snapshot_dir(parent, file);
        }
    }
}

/// `target` with its parent created and its links resolved (the caller's own path: a link to
/// the snapshot directory, or in its path, is the caller's choice).
fn resolve(target: &Path) -> io::Result<PathBuf> {
    if let Ok(resolved) = std::fs::canonicalize(target) {
        return Ok(resolved);
    }
    let name = target.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a snapshot directory needs a name",
        )
    })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    Ok(std::fs::canonicalize(parent)?.join(name))
}

fn open_dir_at(parent: &OwnedFd, name: &OsStr) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Into::into)
}

/// Refuses to replace `name` in `parent` unless it is a directory (not a link) holding only a
/// snapshot's files.
fn check_replaceable(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let dir = open_dir_at(parent, name).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{} exists and is not a directory ({e})",
                name.to_string_lossy()
            ),
        )
    })?;
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let file = OsStr::from_bytes(entry.file_name().to_bytes());
        if file == "." || file == ".." || is_snapshot_file(file) {
            continue;
        }
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} holds {}, which is not a snapshot's file: not replaced",
                name.to_string_lossy(),
                file.to_string_lossy()
            ),
        ));
    }
    Ok(())
}

/// Removes the directory `name` of `parent` and the snapshot's files in it (best effort: what
/// is left is only disk space). Nothing is followed: a link in it is removed, not its target.
fn remove_snapshot_dir(parent: &impl AsFd, name: &OsStr) {
    let Ok(dir) = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    if let Ok(entries) = rustix::fs::Dir::read_from(&dir) {
        let names: Vec<OsString> = entries
            .filter_map(Result::ok)
            .map(|entry| OsStr::from_bytes(entry.file_name().to_bytes()).to_owned())
            .filter(|file| is_snapshot_file(file))
            .collect();
        for file in names {
            let _ = rustix::fs::unlinkat(&dir, file.as_os_str(), AtFlags::empty());
        }
    }
    let _ = rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("forkvm-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn write(new: &NewSnapshot, name: &str, bytes: &'static [u8]) {
        new.write(name, &mut |mut file| {
            use std::io::Write;
            file.write_all(bytes)
        })
        .unwrap();
    }

    /// A save removes what an earlier save killed midway left beside it (its process gone,
    /// unchanged for [`LEFTOVER_AGE`]), and nothing else: not a live process's, not a recent
    /// one, not the `.old-` copy of an interrupted fallback swap, not another snapshot's.
    #[test]
    fn a_save_removes_the_leftovers_of_a_killed_save_only() {
        let parent = scratch("leftovers");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        let dead = child.id();
        let alive = std::process::id();
        let stale = std::time::SystemTime::now() - LEFTOVER_AGE * 2;
        let make = |name: String, age: std::time::SystemTime| {
            let dir = parent.join(&name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(super::super::STATE_FILE), b"{}").unwrap();
            let file = std::fs::File::open(&dir).unwrap();
            file.set_modified(age).unwrap();
            name
        };
        let now = std::time::SystemTime::now();
        let killed = make(format!(".snap.new-{dead}-0-1"), stale);
        let kept = [
            make(format!(".snap.new-{dead}-0-2"), now),
            make(format!(".snap.new-{alive}-0-3"), stale),
            make(format!(".snap.old-{dead}-0-4"), stale),
            make(format!(".other.new-{dead}-0-5"), stale),
        ];
        let new = NewSnapshot::create(&parent.join("snap")).unwrap();
        let names = entries(&parent);
        assert!(!names.contains(&killed), "{names:?}");
        for name in &kept {
            assert!(names.contains(name), "{name} went: {names:?}");
        }
        drop(new);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// The old snapshot stays whole until the new one is committed: a new one dropped midway
    /// leaves nothing behind, a committed one takes the old one's place and the old one goes.
    #[test]
    fn a_snapshot_is_replaced_only_by_a_complete_one() {
        let parent = scratch("replace");
        let target = parent.join("snap");
        let new = NewSnapshot::create(&target).unwrap();
        write(&new, super::super::STATE_FILE, b"old");
        new.commit().unwrap();
        assert_eq!(entries(&parent), ["snap"]);

        let failed = NewSnapshot::create(&target).unwrap();
        write(&failed, super::super::MEMORY_FILE, b"half");
        assert_eq!(entries(&parent).len(), 2, "the new directory beside it");
        drop(failed);
        assert_eq!(entries(&parent), ["snap"]);
        assert_eq!(std::fs::read(target.join("state.json")).unwrap(), b"old");

        let new = NewSnapshot::create(&target).unwrap();
        write(&new, super::super::STATE_FILE, b"new");
        assert!(new.write("../escape", &mut |_| Ok(())).is_err());
        new.commit().unwrap();
        assert_eq!(entries(&parent), ["snap"]);
        assert_eq!(std::fs::read(target.join("state.json")).unwrap(), b"new");

        // A directory holding other files is refused and left alone.
        std::fs::write(target.join("notes.txt"), b"mine").unwrap();
        let new = NewSnapshot::create(&target).unwrap();
        write(&new, super::super::STATE_FILE, b"newer");
        let err = new.commit().unwrap_err();
        assert!(err.to_string().contains("notes.txt"), "{err}");
        assert_eq!(entries(&parent), ["snap"]);
        assert_eq!(entries(&target), ["notes.txt", "state.json"]);
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// Only regular files of this user (or root) open; links, FIFOs and directories are
    /// refused by name, without blocking.
    #[test]
    fn only_regular_files_of_this_user_open() {
        let path = scratch("open");
        std::fs::write(path.join("plain"), b"x").unwrap();
        symlink_or_panic(&path.join("plain"), &path.join("link"));
        std::fs::create_dir(path.join("dir")).unwrap();
        let fifo = std::ffi::CString::new(path.join("fifo").into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let dir = SnapshotDir::open(&path).unwrap();
        assert_eq!(dir.read("plain", 1).unwrap(), b"x");
        let problem = |name: &str| match dir.open_file(name) {
            Err(SnapshotError::File { file, problem }) if file == name => problem,
            other => panic!("{name}: {:?}", other.map(|_| ())),
        };
        assert!(matches!(problem("link"), FileProblem::Symlink));
        assert!(matches!(problem("fifo"), FileProblem::NotRegular("FIFO")));
        assert!(matches!(
            problem("dir"),
            FileProblem::NotRegular("directory")
        ));
        assert!(matches!(problem("missing"), FileProblem::Open(_)));
        assert!(matches!(
            dir.read("plain", 0),
            Err(SnapshotError::File {
                problem: FileProblem::TooLarge { len: 1, max: 0 },
                ..
            })
        ));
        if std::os::unix::fs::chown(path.join("plain"), Some(54_321), None).is_ok() {
            assert!(matches!(
                problem("plain"),
                FileProblem::Owner { owner: 54_321, .. }
            ));
        }
        std::fs::remove_dir_all(&path).unwrap();
    }

    fn symlink_or_panic(target: &Path, link: &Path) {
        std::os::unix::fs::symlink(target, link).unwrap();
    }
}
