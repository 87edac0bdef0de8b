//! Sealing a frozen image's memory file so that nothing changes its contents or size again.
//!
//! `F_SEAL_WRITE` makes the kernel first check that no page of the file is pinned by anyone:
//! it walks every page of the file (0.3–1.8 ms for a 256 MiB image here, inside the parent's
//! pause) and, if some page keeps an extra reference (a page still in another CPU's LRU batch, a
//! pipe or an I/O that holds it), waits up to ~150 ms and fails with `EBUSY` — which made
//! 2 in ~1,900 forks of a running parent fail under load. `F_SEAL_FUTURE_WRITE` (Linux 5.1)
//! forbids the same future changes (`write`, `fallocate`, new shared writable mappings) without
//! that walk; it leaves writable shared mappings that already exist alone, and forkvm keeps none
//! when it seals (the image is written with `pwrite`, or the RAM that mapped it shared is
//! re-mapped privately first; debug builds check `/proc/self/maps`). Before Linux 6.7 it also
//! made private mappings of the file impossible to `mprotect` writable, which forkvm's dirty
//! tracking does: so it is used only where a one-time probe shows private mappings unaffected,
//! and `F_SEAL_WRITE` elsewhere.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use super::{MemoryError, create_memfd};

/// The seals every image gets besides the write seal.
const SIZE_SEALS: i32 = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// Seals `file` against any further change of contents or size.
pub(super) fn seal(file: &File) -> Result<(), MemoryError> {
    #[cfg(debug_assertions)]
    assert_not_writably_shared(file);
    add_seals(file, write_seal() | SIZE_SEALS).map_err(|source| MemoryError::Freeze {
        what: "sealing the frozen memory file",
        source,
    })
}

/// The write seal this kernel can take without harm: `F_SEAL_FUTURE_WRITE` or `F_SEAL_WRITE`.
pub(super) fn write_seal() -> i32 {
    static SEAL: OnceLock<i32> = OnceLock::new();
    *SEAL.get_or_init(|| {
        if future_write_keeps_private_mappings_writable().unwrap_or(false) {
            libc::F_SEAL_FUTURE_WRITE
        } else {
            libc::F_SEAL_WRITE
        }
    })
}

fn add_seals(file: &File, seals: i32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on an open fd; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a file sealed with `F_SEAL_FUTURE_WRITE` can still be mapped privately read-only and
/// then made writable (`mprotect`), as forkvm's dirty tracking does (Linux 6.7 and later).
fn future_write_keeps_private_mappings_writable() -> io::Result<bool> {
    let file = create_memfd().map_err(|_| io::Error::other("memfd"))?;
    file.set_len(PAGE_LEN as u64)?;
    if add_seals(&file, libc::F_SEAL_FUTURE_WRITE).is_err() {
        return Ok(false);
    }
    Ok(OnePage::map(&file, libc::MAP_PRIVATE)?.make_writable())
}

/// The bytes [`OnePage`] maps.
const PAGE_LEN: usize = 4096;

/// A read-only mapping of a file's first page, unmapped when dropped.
struct OnePage(*mut libc::c_void);

impl OnePage {
    /// Maps the first page of `file` read-only, with `flags` (`MAP_PRIVATE` or `MAP_SHARED`).
    fn map(file: &File, flags: i32) -> io::Result<Self> {
        // SAFETY: a new mapping of an open file at an address the kernel picks; `Self` owns it.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_LEN,
                libc::PROT_READ,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(at))
    }

    /// Makes the mapping writable; says whether the kernel allowed it.
    fn make_writable(&self) -> bool {
        // SAFETY: `self.0` is the mapping `map` made, `PAGE_LEN` long, owned by `self`.
        unsafe { libc::mprotect(self.0, PAGE_LEN, libc::PROT_READ | libc::PROT_WRITE) == 0 }
    }
}

impl Drop for OnePage {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made; nothing refers to it after `self` goes.
        unsafe { libc::munmap(self.0, PAGE_LEN) };
    }
}

/// Debug builds: no mapping of this process writes `file` shared (the future-write seal would
/// not stop one). Skipped on a thread whose seccomp filter denies the read of `/proc/self/maps`
/// (the thread preparing children: one denial counted).
#[cfg(debug_assertions)]
fn assert_not_writably_shared(file: &File) {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(maps)) = (file.metadata(), std::fs::read_to_string("/proc/self/maps")) else {
        return;
    };
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(perms), Some(inode)) = (fields.get(1), fields.get(4)) else {
            continue;
        };
        let shared_writable = perms.as_bytes().get(1) == Some(&b'w') && perms.ends_with('s');
        let memfd = fields
            .get(5)
            .is_some_and(|path| path.starts_with("/memfd:"));
        assert!(
            !(shared_writable && memfd && *inode == meta.ino().to_string()),
            "an image about to be sealed is still mapped shared and writable: {line}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    use super::*;

    /// A pipe holding a reference to page 0 of `file` (`vmsplice` of a shared read-only mapping
    /// that is gone again), the way a transient kernel reference would.
    fn pin_first_page(file: &File) -> [std::os::fd::OwnedFd; 2] {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the descriptors were just made and are owned by nobody else.
        let pipe = fds.map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let page = OnePage::map(file, libc::MAP_SHARED).unwrap();
        let iov = libc::iovec {
            iov_base: page.0,
            iov_len: PAGE_LEN,
        };
        // SAFETY: `iov` describes the mapping above; the pipe's write end is open.
        let spliced = unsafe { libc::vmsplice(pipe[1].as_raw_fd(), &iov, 1, 0) };
        assert_eq!(spliced, PAGE_LEN as isize, "{}", io::Error::last_os_error());
        pipe
    }

    #[test]
    fn a_page_someone_else_holds_does_not_stop_or_delay_the_seal() {
        let file = create_memfd().unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[7; 4096], 0).unwrap();
        let _pipe = pin_first_page(&file);
        let t0 = Instant::now();
        let sealed = seal(&file);
        let took = t0.elapsed();
        if write_seal() == libc::F_SEAL_WRITE {
            eprintln!(
                "this kernel takes F_SEAL_WRITE only: a held page delays the seal ({took:?}: {sealed:?})"
            );
            return;
        }
        sealed.unwrap();
        assert!(
            took < Duration::from_millis(100),
            "the seal waited {took:?}"
        );
        assert_eq!(
            file.write_all_at(&[1], 0).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(file.set_len(2 << 20).is_err(), "the image cannot grow");
    }

    #[test]
    fn the_write_seal_alone_fails_on_a_held_page() {
        // What `seal` avoids: the page held above makes F_SEAL_WRITE wait and fail.
        let file = create_memfd().unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[7; 4096], 0).unwrap();
        let _pipe = pin_first_page(&file);
        let err = add_seals(&file, libc::F_SEAL_WRITE).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    }

    #[test]
    fn private_mappings_of_a_sealed_image_stay_writable() {
        let file = create_memfd().unwrap();
        file.set_len(PAGE_LEN as u64).unwrap();
        seal(&file).unwrap();
        let page = OnePage::map(&file, libc::MAP_PRIVATE).unwrap();
        assert!(page.make_writable());
        // SAFETY: the page is mapped and now writable; nothing else uses it.
        unsafe { *(page.0 as *mut u8) = 1 };
    }
}
