//! Overlays: a frozen image can be a **base** (a sealed image) plus a stack of **overlays**, each
//! holding only pages written between two re-freezes (`layers.rs`, `docs/design/fork-layers.md`),
//! so that a re-freeze of a running parent copies those pages, not the base's data again. An
//! overlay is a sealed, sparse memory file of the image's size with its pages at their own
//! offsets, so a VM maps each run of it that no newer overlay covers privately over the base
//! with one `mmap` (or, past [`MAX_MAPPED_RUNS`] runs or past the process's
//! [`MAPPING_BUDGET`], copies the pages into its own memory: each mapping is one of the 65,530
//! that Linux allows a process by default, `vm.max_map_count`, and every VM of forkvm lives in
//! its user's process).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::{Bytes, GuestAddress};

#[cfg(test)]
use super::create_memfd;
use super::runs::{merged, subtract};
use super::{GuestRam, MemoryError, PAGE};

/// Runs an overlay may have to be mapped (one `mmap` and one mapping each); a VM copies the
/// pages of an overlay with more.
pub(super) const MAX_MAPPED_RUNS: usize = 256;

/// Mappings that overlays may add to this process, all VMs together; past it a VM copies an
/// overlay's pages in (a quarter of Linux's default `vm.max_map_count`).
pub(super) const MAPPING_BUDGET: usize = 16_384;

/// Mappings overlays add to this process now.
static OVERLAY_MAPPINGS: AtomicUsize = AtomicUsize::new(0);

/// The mappings one VM's RAM added for an overlay: given back to the budget when dropped.
pub(super) struct OverlayMappings(usize);

impl OverlayMappings {
    /// Takes `n` mappings from `budget` (of at most `limit`), if they are left.
    fn reserve(budget: &'static AtomicUsize, n: usize, limit: usize) -> Option<Self> {
        budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                held.checked_add(n).filter(|&total| total <= limit)
            })
            .ok()
            .map(|_| Self(n))
    }
}

impl OverlayMappings {
    /// One reservation holding both (a placeholder's mappings and those its adoption adds).
    fn join(mut self, mut other: Self) -> Self {
        self.0 += std::mem::take(&mut other.0);
        self
    }
}

impl Drop for OverlayMappings {
    fn drop(&mut self) {
        OVERLAY_MAPPINGS.fetch_sub(self.0, Ordering::SeqCst);
    }
}

/// The pages of an image that are not its base's.
pub struct Overlay {
    /// The sealed, sparse file holding them, at the image's offsets.
    pub(super) file: Arc<File>,
    /// For each range of the image, the runs of pages (first page, count) the overlay holds:
    /// sorted, disjoint.
    pub(super) runs: Vec<Vec<(usize, usize)>>,
}

impl Overlay {
    /// How many runs it holds.
    #[cfg(test)]
    pub(super) fn run_count(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }

    /// Copies its pages into `to` at their offsets (`ranges` give each range's file offset).
    pub(super) fn copy_to(&self, ranges: &[super::RamRange], to: &File) -> io::Result<()> {
        let mut buffer = Vec::new();
        for (range, runs) in ranges.iter().zip(&self.runs) {
            for &(first, count) in runs {
                let offset = range.file_offset + (first * PAGE) as u64;
                buffer.resize(count * PAGE, 0);
                self.file.read_exact_at(&mut buffer, offset)?;
                to.write_all_at(&buffer, offset)?;
            }
        }
        Ok(())
    }
}

/// What each overlay of a stack (oldest first) still shows: for each overlay and range, its runs
/// less those of every overlay above it. A VM maps only these, so that a page written at every
/// re-freeze costs one mapping, not one per overlay.
pub(super) fn visible(overlays: &[Arc<Overlay>]) -> Vec<Vec<Vec<(usize, usize)>>> {
    let ranges = overlays.iter().map(|o| o.runs.len()).max().unwrap_or(0);
    let mut covered: Vec<Vec<(usize, usize)>> = vec![Vec::new(); ranges];
    let mut shown = vec![Vec::new(); overlays.len()];
    for (i, overlay) in overlays.iter().enumerate().rev() {
        shown[i] = overlay
            .runs
            .iter()
            .zip(&covered)
            .map(|(runs, covered)| subtract(runs, covered.iter().copied()))
            .collect();
        for (covered, runs) in covered.iter_mut().zip(&overlay.runs) {
            *covered = merged([covered.as_slice(), runs].concat());
        }
    }
    shown
}

impl GuestRam {
    /// Puts `overlays`' pages over what this RAM maps (their base, just mapped), oldest first:
    /// each run mapped privately from its overlay's file in place, or, past [`MAX_MAPPED_RUNS`]
    /// runs or the process's [`MAPPING_BUDGET`], copied in. No vCPU may run meanwhile.
    pub(super) fn apply_overlays(&mut self, overlays: &[Arc<Overlay>]) -> Result<(), MemoryError> {
        if overlays.is_empty() {
            return Ok(());
        }
        let shown = visible(overlays);
        let runs: usize = shown.iter().flatten().map(Vec::len).sum();
        crate::phases::count("spawn.overlay_mapped_runs", runs as u64);
        // Each run splits one mapping in up to three.
        let mappings = (runs <= MAX_MAPPED_RUNS)
            .then(|| OverlayMappings::reserve(&OVERLAY_MAPPINGS, 2 * runs, MAPPING_BUDGET))
            .flatten();
        let copy = mappings.is_none();
        crate::phases::count("spawn.overlay_copied", u64::from(copy));
        for (overlay, runs) in overlays.iter().zip(&shown) {
            self.apply_overlay(&overlay.file, runs, copy)?;
        }
        if let Some(added) = mappings {
            // Mappings made before (a placeholder's) stay counted.
            self.overlay_mappings = Some(match self.overlay_mappings.take() {
                Some(held) => held.join(added),
                None => added,
            });
        }
        Ok(())
    }

    /// Puts the `runs` (for each range) of an overlay's `file` over what this RAM maps: mapped,
    /// or with `copy` copied in.
    fn apply_overlay(
        &self,
        file: &File,
        runs: &[Vec<(usize, usize)>],
        copy: bool,
    ) -> Result<(), MemoryError> {
        let fail = |what, source| MemoryError::Freeze { what, source };
        if runs.len() != self.ranges.len() {
            return Err(fail(
                "applying an overlay",
                io::Error::from(io::ErrorKind::InvalidInput),
            ));
        }
        let hosts = self.hosts().map_err(|e| fail("finding a region", e))?;
        let mut buffer = Vec::new();
        for ((range, host), runs) in self.ranges.iter().zip(hosts).zip(runs) {
            for &(first, count) in runs {
                let (start, len) = (first * PAGE, count * PAGE);
                let in_range = start
                    .checked_add(len)
                    .is_some_and(|end| end as u64 <= range.size);
                if !in_range {
                    return Err(fail(
                        "applying an overlay",
                        io::Error::from(io::ErrorKind::InvalidInput),
                    ));
                }
                let offset = range.file_offset + start as u64;
                if copy {
                    buffer.resize(len, 0);
                    file.read_exact_at(&mut buffer, offset)
                        .map_err(|e| fail("reading an overlay", e))?;
                    self.memory
                        .write_slice(&buffer, GuestAddress(range.guest_addr + start as u64))
                        .map_err(|e| fail("copying an overlay", io::Error::other(e.to_string())))?;
                    continue;
                }
                let file_offset = libc::off_t::try_from(offset)
                    .map_err(|_| fail("overlay offset", io::ErrorKind::InvalidInput.into()))?;
                let at = host + start as u64;
                // SAFETY: `at..at + len` lies inside one mapping that `self.memory` made for
                // this range and owns (checked above: the run is inside the range). MAP_FIXED
                // swaps what backs those pages in one step, at the same addresses, so every
                // pointer into the mapping stays valid; guest memory is only accessed through
                // volatile copies, and the caller runs no vCPU. KVM re-faults through its MMU
                // notifier.
                let mapped = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        file.as_raw_fd(),
                        file_offset,
                    )
                };
                if mapped != at as *mut libc::c_void {
                    return Err(fail("mapping an overlay", io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;
