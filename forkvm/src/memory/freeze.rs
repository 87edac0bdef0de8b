//! Freezing guest RAM at an instant, so that several VMs can continue from it (fork, restore).
//!
//! A first freeze replaces, in place, RAM's shared mappings of its memfd by private ones and
//! seals the file: the file is the image ([`FrozenRam`]), which VMs started from it map
//! privately. RAM that already maps an image is frozen into an overlay of the pages written since
//! (stacked on the image: `layers.rs`) or, where that cannot be, into a new file holding the
//! mapped image's data and the RAM's own pages — either nearly all copied while the VM still
//! runs ([`GuestRam::draft_freeze`], with its writes tracked by `memory::dirty`), so that with the
//! VM paused [`GuestRam::freeze_from`] copies only the pages written since the draft's last scan.
//! The RAM goes on mapping the image it mapped unless it holds many pages of its own
//! (`REMAP_RATIO`).
//!
//! The design, what each step costs and why: `docs/design/memory-freeze.md` in the repository.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Once};

use vm_memory::{Bytes, GuestAddress};

use super::PAGE;
use super::dirty::WriteTracker;
use super::image::COPY_CHUNK;
use super::layers::without_hidden;
use super::overlay::Overlay;
use super::pagemap::{scan_not_held, written_runs};
use super::runs::{merged, subtract};
use super::seal::seal;
use super::{GuestRam, MemoryError, RamRange};
use crate::phases;

pub use super::image::FrozenRam;

/// Rounds of copying the pages written during the previous round that a draft makes at most
/// after its first copy of written pages...
const PRECOPY_ROUNDS: usize = 2;
/// ...as long as the previous round copied more pages than this.
const PRECOPY_ENOUGH: usize = 64;
/// A re-freeze re-maps RAM that holds more than one page in this many as its own over the new
/// image (why: `docs/design/memory-freeze.md`).
const REMAP_RATIO: usize = 8;

/// The part of freezing private RAM that does not need the VM paused: a new file holding the
/// data of the image the RAM maps privately (which nobody writes) and, where the RAM's writes are
/// tracked, the pages it wrote. [`GuestRam::freeze_from`] then adds only the pages written since.
pub struct FreezeDraft {
    /// The file the draft copies into: a new one over `base`'s data (or a stack's), a new
    /// overlay, or the RAM's own file.
    pub(super) file: Arc<File>,
    /// The image the RAM maps, or `None` for the RAM's own file (see [`GuestRam::draft_freeze`]).
    pub(super) base: Option<Arc<FrozenRam>>,
    pub(super) precopy: Option<Precopy>,
    /// For an overlay (`file` holds only pages, not data below them): the image it goes on.
    pub(super) on: Option<Arc<FrozenRam>>,
    /// The balloon drops the draft relies on not changing by the pause (`Stack::since` in
    /// `layers.rs`).
    pub(super) since: Option<u64>,
}

/// Runs of pages (first page, count): sorted, disjoint.
type PageRuns = Vec<(usize, usize)>;

/// A draft finished with the VM paused: the file, about how many pages of its own the RAM holds,
/// and, for an overlay, what it goes on and the runs of its pages.
struct Finished {
    file: Arc<File>,
    own: usize,
    overlay: Option<(Arc<FrozenRam>, Vec<PageRuns>)>,
    /// Copied with write tracking unbroken: the next re-freeze may stack on this one.
    tracked: bool,
}

/// The pages a draft copied from RAM whose writes are tracked.
pub(super) struct Precopy {
    /// The RAM's epoch when the draft (re)started its write tracking.
    epoch: u64,
    /// The RAM's [`GuestRam::private_discards`] before the draft copied anything.
    discards: u64,
    /// For each range of the RAM, the pages copied: sorted, disjoint runs (first page, count).
    pub(super) copied: Vec<Vec<(usize, usize)>>,
}

#[cfg(test)]
impl FreezeDraft {
    /// The 8 bytes at guest address `addr` (below the MMIO hole) as the draft copied them from
    /// RAM, if it did.
    pub(crate) fn copied_u64(&self, addr: u64) -> Option<u64> {
        let page = (addr / PAGE as u64) as usize;
        let copied = self.precopy.as_ref()?.copied.first()?;
        copied.iter().find(|&&(f, c)| (f..f + c).contains(&page))?;
        let mut bytes = [0u8; 8];
        self.file.read_exact_at(&mut bytes, addr).ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// Whether guest RAM tracks which pages it writes (see [`super::dirty`]), so that a freeze
/// copies them before the pause.
pub(super) enum Tracking {
    /// Not tried yet: the first draft of a freeze tries.
    Untried,
    /// Unavailable or switched off: a freeze copies every page written since the RAM began to
    /// map its image with the VM paused.
    Off,
    /// Available.
    On(WriteTracker),
}

/// Logs once per process that writes cannot be tracked.
fn log_untracked(why: &io::Error) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::warn!(
            "guest memory writes cannot be tracked ({why}): a fork of a VM forked before copies \
             the pages it wrote since with the VM paused"
        );
    });
}

impl GuestRam {
    /// Freezes the RAM's current contents into an image and keeps this RAM running over it
    /// privately (what it costs: `docs/design/memory-freeze.md`). Every vCPU and device of the VM must be
    /// stopped (`Vm::pause`) while this runs. (Captures draft first: [`GuestRam::freeze_from`].)
    #[cfg(test)]
    pub fn freeze(&mut self) -> Result<Arc<FrozenRam>, MemoryError> {
        self.freeze_from(None)
    }

    /// Starts a freeze while the VM still runs: for RAM that maps an image privately, copies
    /// into a new overlay the pages written since the last re-freeze or since it began to map
    /// the image (`layers.rs`), or, where that cannot be, the image's data into a new file and,
    /// where writes are tracked, the pages written since the RAM began to map it; for RAM that
    /// maps its own file, re-maps it privately (see `docs/design/memory-freeze.md`). Pass it to [`GuestRam::freeze_from`] with the VM paused.
    pub fn draft_freeze(&mut self) -> Result<FreezeDraft, MemoryError> {
        let Some(base) = self.mapped.clone() else {
            return self.draft_own_file();
        };
        if let Some(stack) = self.stack_for(&base)
            && let Some(draft) = self.draft_layered(&base, stack)?
        {
            return Ok(draft);
        }
        self.break_chain();
        let span = phases::span("draft.copy_image");
        let file = Arc::new(base.copy_into_new_file()?);
        drop(span);
        let _span = phases::span("draft.precopy");
        let precopy = match self.precopy(&file, false) {
            Ok(precopy) => precopy,
            Err(e) => {
                // What was copied may be stale by now: start again from the image alone.
                self.stop_tracking(&e);
                return Ok(FreezeDraft {
                    file: Arc::new(base.copy_into_new_file()?),
                    base: Some(base),
                    precopy: None,
                    on: None,
                    since: None,
                });
            }
        };
        Ok(FreezeDraft {
            file,
            base: Some(base),
            precopy,
            on: None,
            since: None,
        })
    }

    /// The draft of a first freeze: re-maps the RAM privately over its own file now, while the VM
    /// runs (so that KVM drops its mappings of the whole RAM outside the pause), unless it is
    /// already; from then on the file changes only where this RAM writes it: the pages the RAM
    /// writes are its own, and the draft copies them into the file, which their owner alone maps
    /// and shadows. The pause copies those written since and seals the file: it is the image.
    fn draft_own_file(&mut self) -> Result<FreezeDraft, MemoryError> {
        if !self.privatized {
            self.remap_private()?;
            self.privatized = true;
        }
        let file = self.file.clone();
        let precopy = self.precopy(&file, false).unwrap_or_else(|e| {
            // Nothing is lost: the pause copies every page of the RAM's own.
            self.stop_tracking(&e);
            None
        });
        Ok(FreezeDraft {
            file,
            base: None,
            precopy,
            on: None,
            since: None,
        })
    }

    /// Write-protects the whole RAM, copying into `file` the pages it wrote since it began to map
    /// its image (with `since_last`: since the last freeze's scans, which tracking unbroken
    /// since requires), then, in rounds, those written since the previous round's scan (the VM runs).
    /// `None` where writes are not tracked.
    pub(super) fn precopy(&mut self, file: &File, since_last: bool) -> io::Result<Option<Precopy>> {
        if let Tracking::Untried = self.tracking {
            self.tracking = match WriteTracker::new() {
                Ok(tracker) => Tracking::On(tracker),
                Err(e) => {
                    log_untracked(&e);
                    Tracking::Off
                }
            };
        }
        self.epoch += 1;
        let Tracking::On(tracker) = &self.tracking else {
            return Ok(None);
        };
        let discards = self.private_discards();
        // The pages the RAM holds as its own (written since it began to map its image), each
        // reported as it is protected: a write after that is reported by the next scan.
        let hosts = self.hosts()?;
        let mut copied = Vec::with_capacity(self.ranges.len());
        let mut pages = 0;
        for (range, &host) in self.ranges.iter().zip(&hosts) {
            let span = phases::span("draft.precopy_scan_protect");
            let runs = if since_last {
                tracker.written(host, range.size)?
            } else {
                tracker.start(host, range.size)?
            };
            drop(span);
            let _span = phases::span("draft.precopy_copy_own");
            pages += self.copy_runs(range, &runs, file)?;
            copied.push(runs);
        }
        phases::count("draft.own_pages", pages as u64);
        for _ in 0..PRECOPY_ROUNDS {
            if pages <= PRECOPY_ENOUGH {
                break;
            }
            pages = 0;
            for ((range, &host), copied) in self.ranges.iter().zip(&hosts).zip(&mut copied) {
                let _span = phases::span("draft.precopy_round");
                let runs = tracker.written(host, range.size)?;
                pages += self.copy_runs(range, &runs, file)?;
                copied.extend(runs);
            }
            phases::count("draft.round_pages", pages as u64);
        }
        Ok(Some(Precopy {
            epoch: self.epoch,
            discards,
            copied: copied.into_iter().map(merged).collect(),
        }))
    }

    /// Stops tracking writes after `why` (a draft's copies are then no longer finished).
    pub(super) fn stop_tracking(&mut self, why: &io::Error) {
        log_untracked(why);
        self.tracking = Tracking::Off;
        self.epoch += 1;
    }

    /// [`GuestRam::freeze`], finishing `draft` if it was made from the image this RAM maps now.
    ///
    /// RAM that maps its file shared is re-mapped privately over it, in place, and the file is
    /// sealed: it is the image. RAM that already maps an image privately is frozen into a new
    /// file holding the mapped image's data and the RAM's own pages; the RAM goes on mapping the
    /// image it mapped, unless it holds more than one page in `REMAP_RATIO` as its own: then
    /// it is re-mapped over the new image too, its own pages moved out of the way.
    pub fn freeze_from(
        &mut self,
        draft: Option<FreezeDraft>,
    ) -> Result<Arc<FrozenRam>, MemoryError> {
        let frozen = match self.mapped.clone() {
            None if !self.privatized => {
                self.remap_private()?;
                seal(&self.file)?;
                let frozen = self.frozen_over(self.file.clone());
                self.mapped = Some(frozen.clone());
                frozen
            }
            None => {
                let file = self.finish_draft(None, draft)?.file;
                seal(&file)?;
                let frozen = self.frozen_over(file);
                self.mapped = Some(frozen.clone());
                self.privatized = false;
                frozen
            }
            Some(mapped) => {
                let span = phases::span("freeze.finish_draft");
                let finished = self.finish_draft(Some(&mapped), draft)?;
                drop(span);
                let (file, own) = (finished.file, finished.own);
                phases::count("freeze.own_pages", own as u64);
                let span = phases::span("freeze.seal");
                seal(&file)?;
                drop(span);
                if let Some((on, runs)) = finished.overlay {
                    // One more overlay on the stack; the RAM goes on mapping what it maps.
                    phases::count(
                        "freeze.overlay_runs",
                        runs.iter().map(Vec::len).sum::<usize>() as u64,
                    );
                    let mut overlays = on.overlays.clone();
                    overlays.push(Arc::new(Overlay { file, runs }));
                    let (overlays, shown_runs) = without_hidden(overlays);
                    let frozen = Arc::new(FrozenRam {
                        file: on.file.clone(),
                        ranges: self.ranges.clone(),
                        overlays,
                    });
                    phases::count("freeze.depth", frozen.depth() as u64);
                    self.chain_to(&frozen, shown_runs);
                    frozen
                } else {
                    let frozen = self.frozen_over(file);
                    if finished.tracked {
                        self.chain_to(&frozen, 0);
                    } else {
                        self.break_chain();
                    }
                    let remap = own > (self.size() as usize / PAGE) / REMAP_RATIO;
                    phases::count("freeze.remapped", u64::from(remap));
                    if remap {
                        let _span = phases::span("freeze.remap");
                        self.move_own_pages_out();
                        self.file = frozen.file.clone();
                        self.remap_private()?;
                        self.replaced.extend(self.mapped.replace(frozen.clone()));
                    }
                    frozen
                }
            }
        };
        // Freeing the previous image (its file's memory, unless other VMs map it) can wait for
        // the VM to run again.
        self.replaced.extend(self.latest.replace(frozen.clone()));
        Ok(frozen)
    }

    /// An image of this RAM's layout in `file`.
    fn frozen_over(&self, file: Arc<File>) -> Arc<FrozenRam> {
        Arc::new(FrozenRam {
            file,
            ranges: self.ranges.clone(),
            overlays: Vec::new(),
        })
    }

    /// A file holding this RAM's contents, which are what it maps (the image `base`, or its own
    /// file for `None`) and the pages the RAM wrote since it began to map it, and about how many
    /// pages of its own the RAM holds: `draft`'s copies, finished, where the draft was made from
    /// the same and its writes were tracked to the end; otherwise copied now (into a new file
    /// over `base`'s data, or into the RAM's own file).
    fn finish_draft(
        &mut self,
        base: Option<&Arc<FrozenRam>>,
        draft: Option<FreezeDraft>,
    ) -> Result<Finished, MemoryError> {
        let draft = draft.filter(|draft| match (&draft.base, base) {
            (Some(drafted), Some(base)) => Arc::ptr_eq(drafted, base),
            (None, None) => Arc::ptr_eq(&draft.file, &self.file),
            _ => false,
        });
        let finished = match (&self.tracking, draft) {
            (
                Tracking::On(tracker),
                Some(FreezeDraft {
                    file,
                    precopy: Some(precopy),
                    on,
                    since,
                    ..
                }),
            ) if precopy.epoch == self.epoch
                && since.is_none_or(|drops| drops == self.private_discards()) =>
            {
                match self.finish_precopy(tracker, &file, &precopy) {
                    Ok((own, paused)) => Some(Finished {
                        file,
                        own,
                        overlay: on.map(|on| {
                            let runs = precopy
                                .copied
                                .iter()
                                .zip(paused)
                                .map(|(copied, paused)| {
                                    merged([copied.as_slice(), &paused].concat())
                                })
                                .collect();
                            (on, runs)
                        }),
                        tracked: true,
                    }),
                    Err(e) => {
                        self.stop_tracking(&e);
                        None
                    }
                }
            }
            // Not tracked: the draft holds what the RAM maps alone.
            (
                _,
                Some(FreezeDraft {
                    file,
                    precopy: None,
                    ..
                }),
            ) => {
                let own = self.copy_written_pages(&file)?;
                Some(Finished {
                    file,
                    own,
                    overlay: None,
                    tracked: false,
                })
            }
            // No draft, or one whose copies were not tracked to the end.
            _ => None,
        };
        let (file, own) = match (finished, base) {
            (Some(finished), _) => return Ok(finished),
            (None, Some(base)) => {
                let file = base.copy_into_new_file()?;
                let own = self.copy_written_pages(&file)?;
                (Arc::new(file), own)
            }
            (None, None) => {
                let file = self.file.clone();
                let own = self.copy_written_pages(&file)?;
                (file, own)
            }
        };
        Ok(Finished {
            file,
            own,
            overlay: None,
            tracked: false,
        })
    }

    /// Does what the last freeze leaves for after the pause: frees what it replaced (see
    /// [`GuestRam::freeze_from`]: the images it froze or mapped before, unless other VMs map
    /// them, and the pages it moved out) on the reaper's threads ([`crate::reaper`]), freeing
    /// taking time in proportion to the pages; and starts flattening its stack if it grew deep
    /// (a new thread: not something for the pause). Call it once the VM runs again.
    pub fn release_replaced(&mut self) {
        let replaced = (
            std::mem::take(&mut self.replaced),
            std::mem::take(&mut self.moved),
        );
        if !replaced.0.is_empty() || !replaced.1.is_empty() {
            crate::reaper::drop_later(replaced);
        }
        self.start_flattening();
    }

    /// Finishes a draft whose copies `precopy` were made from this RAM into `file`, with the VM
    /// paused: copies the pages written since the draft's last scan, and, if the VM's balloon
    /// dropped pages of this RAM since the draft began, again the pages the draft copied that
    /// the RAM no longer holds as its own present pages (dropped with `MADV_DONTNEED` after the
    /// draft protected them, so no scan reports them, and the RAM reads the image there again).
    /// Returns about how many pages of its own the RAM holds, and, for each range, the runs of
    /// pages it copied now (besides the draft's).
    fn finish_precopy(
        &self,
        tracker: &WriteTracker,
        file: &File,
        precopy: &Precopy,
    ) -> io::Result<(usize, Vec<PageRuns>)> {
        let hosts = self.hosts()?;
        let mut own = 0;
        let mut paused_runs = Vec::with_capacity(self.ranges.len());
        for (range, &host) in self.ranges.iter().zip(&hosts) {
            // Paused: nothing to protect against; the next draft protects every page again.
            let span = phases::span("freeze.paused_scan");
            let runs = tracker.written_since_scan(host, range.size)?;
            drop(span);
            let paused = self.copy_runs(range, &runs, file)?;
            phases::count("freeze.paused_pages", paused as u64);
            own += paused;
            paused_runs.push(runs);
        }
        own += precopy
            .copied
            .iter()
            .flatten()
            .map(|&(_, count)| count)
            .sum::<usize>();
        if self.private_discards() == precopy.discards {
            return Ok((own, paused_runs));
        }
        let pagemap = File::open("/proc/self/pagemap")?;
        for ((range, &host), copied) in self.ranges.iter().zip(&hosts).zip(&precopy.copied) {
            let (Some(&(lo, _)), Some(&(last, count))) = (copied.first(), copied.last()) else {
                continue;
            };
            let hull = (lo * PAGE) as u64;
            let not_held =
                scan_not_held(&pagemap, host + hull, ((last + count - lo) * PAGE) as u64)?
                    .into_iter()
                    .map(|(first, count)| (first + lo, count));
            let stale = subtract(copied, subtract(copied, not_held));
            self.copy_runs(range, &stale, file)?;
        }
        Ok((own, paused_runs))
    }

    /// The image of this RAM's last freeze, if it was frozen.
    #[cfg(test)]
    pub fn frozen(&self) -> Option<&Arc<FrozenRam>> {
        self.latest.as_ref()
    }

    /// Writes into `file`, at their offsets, the pages this VM has written since it began to map
    /// its image privately (its anonymous copy-on-write pages, found through `/proc/self/pagemap`);
    /// returns how many for each range.
    fn copy_written_pages(&self, file: &File) -> Result<usize, MemoryError> {
        let copy = || -> io::Result<usize> {
            let pagemap = File::open("/proc/self/pagemap")?;
            let mut own = 0;
            for (range, host) in self.ranges.iter().zip(self.hosts()?) {
                let written = written_runs(&pagemap, host, range.size)?;
                own += self.copy_runs(range, &written, file)?;
            }
            Ok(own)
        };
        copy().map_err(|source| MemoryError::Freeze {
            what: "copying written pages",
            source,
        })
    }

    /// Copies the `runs` of pages (first page, count) of `range` from the RAM into `file`, at
    /// their offsets; returns how many pages it copied.
    fn copy_runs(
        &self,
        range: &RamRange,
        runs: &[(usize, usize)],
        file: &File,
    ) -> io::Result<usize> {
        let mut chunk =
            vec![0u8; COPY_CHUNK.min(runs.iter().map(|r| r.1 * PAGE).max().unwrap_or(0))];
        let mut pages = 0;
        for &(first, count) in runs {
            for part in (first..first + count).step_by(COPY_CHUNK / PAGE) {
                let n = (first + count - part).min(COPY_CHUNK / PAGE);
                let offset = (part * PAGE) as u64;
                let bytes = &mut chunk[..n * PAGE];
                self.memory
                    .read_slice(bytes, GuestAddress(range.guest_addr + offset))
                    .map_err(|e| io::Error::other(e.to_string()))?;
                file.write_all_at(bytes, range.file_offset + offset)?;
            }
            pages += count;
        }
        Ok(pages)
    }
}

#[cfg(test)]
#[path = "freeze_tests.rs"]
mod tests;
