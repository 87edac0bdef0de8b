//! Re-freezing in proportion to what changed: images as a stack of overlays
//! (`docs/design/fork-layers.md`).
//!
//! A re-freeze of RAM that maps an image makes a new overlay instead of a new full image. The
//! first holds every page the RAM wrote since it began to map its image (over that image); each
//! later one only the pages written since the previous freeze, stacked on the previous image
//! (a [`Chain`]) — as long as the RAM's write tracking ran without a break in between and its
//! balloon dropped nothing (a dropped page reads the base again, which an older overlay would
//! hide). A stack at least [`COMPACT_DEPTH`] deep, or with [`COMPACT_RUNS`] runs, is flattened
//! into a new base on a thread of its own while the VM runs; the next re-freeze stacks on that
//! base the overlays made since. Past [`MAX_DEPTH`] (the flattening lags) or
//! [`MAX_LAYER_RUNS`] runs in one overlay, a re-freeze makes a full image, as before layers. An
//! overlay that newer ones hide entirely (a page written at every re-freeze) leaves the stack.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::freeze::{FreezeDraft, Tracking};
use super::image::FrozenRam;
use super::overlay::{MAX_MAPPED_RUNS, Overlay, visible};
use super::seal::seal;
use super::{GuestRam, MemoryError, create_memfd};
use crate::phases;
use crate::seccomp::{self, ThreadKind};
use forkvm_devices::sync::lock;

/// Most runs of pages one overlay holds; past it a re-freeze makes a full image. Each run costs
/// a VM that maps the image one `mmap` (6–14 µs here).
const MAX_LAYER_RUNS: usize = MAX_MAPPED_RUNS;
/// A stack this deep is flattened in the background...
const COMPACT_DEPTH: usize = 32;
/// ...and so is one whose overlays show this many runs together ([`visible`]: what a VM
/// maps for it). Flattening copies all the image's data (the base's too) on another thread.
const COMPACT_RUNS: usize = MAX_MAPPED_RUNS / 2;
/// No deeper stack is made: a re-freeze then starts over from the image the RAM maps.
const MAX_DEPTH: usize = 64;

/// The image of this RAM's last re-freeze, on which the next stacks an overlay of the pages
/// written since, while `epoch` (write tracking unbroken, the same mappings) and `discards` (no
/// page dropped by the balloon) still hold.
pub(super) struct Chain {
    image: Arc<FrozenRam>,
    epoch: u64,
    discards: u64,
}

/// What a layered draft stacks on.
pub(super) struct Stack {
    /// The image the new overlay goes on.
    pub(super) on: Arc<FrozenRam>,
    /// For an overlay of the pages written since `on` was frozen: the RAM's balloon drops then,
    /// which must not have changed by the pause. `None` for an overlay of all the RAM's own pages
    /// (`on` is the image it maps).
    pub(super) since: Option<u64>,
}

/// `overlays` (oldest first) without those every newer one hides entirely: they change nothing
/// the image shows, and would only hold memory. Also returns how many runs the rest show
/// ([`visible`]: what a VM maps for them).
pub(super) fn without_hidden(overlays: Vec<Arc<Overlay>>) -> (Vec<Arc<Overlay>>, usize) {
    let shown = visible(&overlays);
    let runs = shown.iter().flatten().map(Vec::len).sum();
    let kept = overlays
        .into_iter()
        .zip(shown)
        .filter(|(_, shown)| shown.iter().any(|runs| !runs.is_empty()))
        .map(|(overlay, _)| overlay)
        .collect();
    (kept, runs)
}

/// A stack flattened in the background: the image, and its flat copy (sealed).
struct Flattened {
    source: Arc<FrozenRam>,
    flat: Arc<File>,
}

/// The background flattening of one RAM's stacks.
#[derive(Default)]
pub(super) struct Compaction {
    running: AtomicBool,
    /// A deep stack the last freeze left to flatten once the VM runs again.
    wanted: Mutex<Option<Arc<FrozenRam>>>,
    done: Mutex<Option<Flattened>>,
}

impl GuestRam {
    /// What the next re-freeze stacks on: the last one's image (re-based onto its flattened copy
    /// if one is done) while its chain holds, or the image the RAM maps; `None` where the stack
    /// would be too deep (a full image then).
    pub(super) fn stack_for(&mut self, mapped: &Arc<FrozenRam>) -> Option<Stack> {
        if matches!(self.tracking, Tracking::Off) {
            return None;
        }
        let chained = self
            .chain
            .as_ref()
            .filter(|c| c.epoch == self.epoch && c.discards == self.private_discards())
            .map(|c| (self.rebased(&c.image), c.discards));
        let stack = match chained {
            Some((on, discards)) if on.depth() < MAX_DEPTH => Stack {
                on,
                since: Some(discards),
            },
            _ => Stack {
                on: mapped.clone(),
                since: None,
            },
        };
        phases::count("draft.stack_depth", stack.on.depth() as u64);
        (stack.on.depth() < MAX_DEPTH).then_some(stack)
    }

    /// `image` re-based onto a flattened copy of the stack it grew from, if one is done.
    /// The flattened copy is let go of either way: once used, the new image holds it, and one
    /// that does not fit any more never will.
    fn rebased(&self, image: &Arc<FrozenRam>) -> Arc<FrozenRam> {
        let done = lock(&self.compaction.done).take();
        let Some(Flattened { source, flat }) = done else {
            return image.clone();
        };
        // The image grew from the flattened one if it has its base and, of its overlays, some
        // first (those the image still shows, in order), then only newer ones.
        let in_source = |o: &Arc<Overlay>| source.overlays.iter().any(|s| Arc::ptr_eq(s, o));
        let below = image.overlays.iter().take_while(|o| in_source(o)).count();
        let grew_from = Arc::ptr_eq(&source.file, &image.file)
            && !image.overlays[below..].iter().any(in_source);
        if !grew_from {
            return image.clone();
        }
        phases::count("draft.rebased", 1);
        Arc::new(FrozenRam {
            file: flat,
            ranges: image.ranges.clone(),
            overlays: image.overlays[below..].to_vec(),
        })
    }

    /// The draft of a layered re-freeze of RAM that maps `mapped`: a new, empty file of the
    /// image's size that the pre-copy fills with the pages `stack` needs (see [`Stack`]). Where
    /// they form more than [`MAX_LAYER_RUNS`] runs, the draft becomes a full one (the stack's
    /// data copied, the pages put over it). `None` where writes are not tracked after all.
    pub(super) fn draft_layered(
        &mut self,
        mapped: &Arc<FrozenRam>,
        stack: Stack,
    ) -> Result<Option<FreezeDraft>, MemoryError> {
        let fail = |what, source| MemoryError::Freeze { what, source };
        let file = create_memfd()?;
        file.set_len(stack.on.size())
            .map_err(|e| fail("sizing an overlay", e))?;
        let file = Arc::new(file);
        let span = phases::span("draft.precopy");
        let precopy = match self.precopy(&file, stack.since.is_some()) {
            Ok(Some(precopy)) => precopy,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.stop_tracking(&e);
                return Ok(None);
            }
        };
        drop(span);
        let runs: usize = precopy.copied.iter().map(Vec::len).sum();
        phases::count("draft.own_runs", runs as u64);
        if runs <= MAX_LAYER_RUNS {
            return Ok(Some(FreezeDraft {
                file,
                base: Some(mapped.clone()),
                precopy: Some(precopy),
                on: Some(stack.on),
                since: stack.since,
            }));
        }
        let _span = phases::span("draft.copy_image");
        let full = stack.on.copy_into_new_file()?;
        let copied = Overlay {
            file,
            runs: precopy.copied.clone(),
        };
        copied
            .copy_to(&self.ranges, &full)
            .map_err(|e| fail("copying pages over an image", e))?;
        Ok(Some(FreezeDraft {
            file: Arc::new(full),
            base: Some(mapped.clone()),
            precopy: Some(precopy),
            on: None,
            since: stack.since,
        }))
    }

    /// Records `image`, just frozen from this RAM with its writes tracked to the pause, as what
    /// the next re-freeze stacks on; if its stack is deep (`shown_runs`: what its overlays
    /// show), it is to be flattened once the VM runs again ([`GuestRam::start_flattening`]).
    pub(super) fn chain_to(&mut self, image: &Arc<FrozenRam>, shown_runs: usize) {
        self.chain = Some(Chain {
            image: image.clone(),
            epoch: self.epoch,
            discards: self.private_discards(),
        });
        if image.depth() >= COMPACT_DEPTH || shown_runs >= COMPACT_RUNS {
            *lock(&self.compaction.wanted) = Some(image.clone());
        }
    }

    /// Flattens, on a thread of its own, the deep stack the last freeze left (if any, and if no
    /// flattening runs already).
    pub(super) fn start_flattening(&mut self) {
        let Some(image) = lock(&self.compaction.wanted).take() else {
            return;
        };
        if !self.compaction.running.swap(true, Ordering::SeqCst) {
            let compaction = self.compaction.clone();
            let parent = seccomp::current();
            let spawned = std::thread::Builder::new()
                .name("forkvm-compact".into())
                .spawn(move || {
                    // Memory files, sealed: what the thread preparing children may do.
                    seccomp::enter_or_log(ThreadKind::Prepare, seccomp::seccomp_policy(), parent);
                    match flatten(&image) {
                        Ok(flat) => {
                            *lock(&compaction.done) = Some(Flattened {
                                source: image,
                                flat: Arc::new(flat),
                            })
                        }
                        Err(e) => log::warn!(
                            "cannot flatten a layered image: {}",
                            forkvm_devices::chain::ErrorChain(&e)
                        ),
                    }
                    compaction.running.store(false, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.compaction.running.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Forgets the chain: the next re-freeze starts over from the image the RAM maps.
    pub(super) fn break_chain(&mut self) {
        self.chain = None;
    }
}

/// A sealed file holding `image`'s data, flat.
fn flatten(image: &FrozenRam) -> Result<File, MemoryError> {
    let file = image.copy_into_new_file()?;
    seal(&file)?;
    Ok(file)
}

#[cfg(test)]
#[path = "layers_tests.rs"]
mod tests;
