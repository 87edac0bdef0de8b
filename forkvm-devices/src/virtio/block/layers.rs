//! Copy-on-write storage of forked block devices: the layers a frozen disk's children read
//! through ([`FrozenLayers`], [`PreserveLayer`], [`FrozenLayer`]), the parent's side of a fork
//! ([`ImageCow`], which preserves what it overwrites) and a child's ([`ChildCow`], which writes
//! its own overlay).
//!
//! The design — what [`Block::freeze`](super::Block::freeze) and
//! [`Block::from_state`](super::Block::from_state) do, how children and parent stay
//! consistent, and the costs and limits — is described in `docs/design/block-cow.md` at the
//! root of the repository.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use super::SECTOR_SIZE;
use super::io::{AlignedBuffer, Dir, fallocate, read_bounced, transfer};
use super::request::{RequestError, Segment};
use super::ring::GuestView;

/// One bit per sector: set when the layer holds the sector.
pub(super) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    /// An empty bitmap for `sectors` sectors (zeroed memory, which the allocator gets from the
    /// kernel without writing it for large disks).
    fn new(sectors: u64) -> Self {
        let words = usize::try_from(sectors.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            words: vec![0; words],
        }
    }

    /// Whether `sector` is present (sectors outside the bitmap are not).
    fn get(&self, sector: u64) -> bool {
        usize::try_from(sector / 64)
            .ok()
            .and_then(|word| self.words.get(word))
            .is_some_and(|word| word & (1 << (sector % 64)) != 0)
    }

    /// Whether all of the `count` sectors from `start` are present.
    fn all_set(&self, start: u64, count: u64) -> bool {
        (start..start.saturating_add(count)).all(|sector| self.get(sector))
    }

    /// Marks the `count` sectors from `start` present (those outside the bitmap are ignored).
    fn set_range(&mut self, start: u64, count: u64) {
        let end = start.saturating_add(count);
        let mut sector = start;
        while sector < end {
            let Some(word) = usize::try_from(sector / 64)
                .ok()
                .and_then(|word| self.words.get_mut(word))
            else {
                return;
            };
            let bit = sector % 64;
            let bits = (end - sector).min(64 - bit);
            let mask = if bits == 64 {
                u64::MAX
            } else {
                ((1 << bits) - 1) << bit
            };
            *word |= mask;
            sector += bits;
        }
    }
}

/// A layer file of `len` bytes (see `temp_file`), made ahead of a fork for a child's overlay
/// ([`super::Block::from_state_over`]): creating and sizing one takes the file system tens of
/// microseconds.
pub fn layer_file(len: u64) -> io::Result<File> {
    temp_file(len)
}

/// Makes an unnamed sparse temporary file of `len` bytes in `std::env::temp_dir()`.
fn temp_file(len: u64) -> io::Result<File> {
    let dir = std::env::temp_dir();
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(&dir)
    {
        Ok(file) => file,
        // A file system without O_TMPFILE: a named file, removed at once.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = dir.join(format!(
                "forkvm-blk-layer-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            file
        }
        Err(e) => return Err(e),
    };
    file.set_len(len)?;
    Ok(file)
}

/// A child's overlay after the freeze that made it shared: its content no longer changes.
pub(super) struct FrozenLayer {
    file: File,
    present: Bitmap,
}

impl fmt::Debug for FrozenLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrozenLayer")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// What the image held at a freeze, for the sectors the parent overwrote since: written by the
/// parent, read by the freeze's children and their descendants. Its file is made when the parent
/// first overwrites a sector, not at the freeze (which the paused parent waits for).
pub(super) struct PreserveLayer {
    file: OnceLock<File>,
    sectors: u64,
    present: RwLock<Bitmap>,
}

impl fmt::Debug for PreserveLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreserveLayer")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// The bitmap for reading, also after a panic elsewhere (bits are only ever set, after the data
/// they stand for is written, so a poisoned lock holds nothing half-done).
fn read_bits(lock: &RwLock<Bitmap>) -> RwLockReadGuard<'_, Bitmap> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The bitmap for writing (see [`read_bits`]).
fn write_bits(lock: &RwLock<Bitmap>) -> RwLockWriteGuard<'_, Bitmap> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PreserveLayer {
    fn new(sectors: u64) -> Self {
        Self {
            file: OnceLock::new(),
            sectors,
            present: RwLock::new(Bitmap::new(sectors)),
        }
    }

    /// The layer's file, for reading sectors its bitmap says it holds (it has a file since the
    /// first sector was preserved).
    fn file(&self) -> io::Result<&File> {
        self.file
            .get()
            .ok_or_else(|| io::Error::other("a preserve layer without a file holds no sector"))
    }

    /// Copies the `count` sectors from `start` of `image` that the layer lacks into it, a
    /// bounce buffer's worth at a time, each under the write lock.
    fn preserve(
        &self,
        image: &File,
        start: u64,
        count: u64,
        bounce: &mut AlignedBuffer,
    ) -> Result<(), RequestError> {
        let chunk = bounce.len() as u64 / SECTOR_SIZE;
        let end = start + count;
        let mut at = start;
        while at < end {
            let n = chunk.min(end - at);
            if read_bits(&self.present).all_set(at, n) {
                at += n;
                continue;
            }
            let mut present = write_bits(&self.present);
            // Made under the write lock, so only once.
            let file = match self.file.get() {
                Some(file) => file,
                None => {
                    let file = temp_file(self.sectors * SECTOR_SIZE).map_err(RequestError::Io)?;
                    self.file.get_or_init(|| file)
                }
            };
            let mut sector = at;
            while sector < at + n {
                if present.get(sector) {
                    sector += 1;
                    continue;
                }
                let mut run_end = sector + 1;
                while run_end < at + n && !present.get(run_end) {
                    run_end += 1;
                }
                // At most a bounce buffer's worth.
                let bytes = ((run_end - sector) * SECTOR_SIZE) as usize;
                let data = &mut bounce.as_mut()[..bytes];
                let offset = sector * SECTOR_SIZE;
                image
                    .read_exact_at(data, offset)
                    .map_err(RequestError::Io)?;
                // Zeroes (a sparse image's holes, say) take no space: punched (in case a failed
                // copy left something there), the range reads as zeroes.
                let punched = data.iter().all(|b| *b == 0)
                    && fallocate(file, libc::FALLOC_FL_PUNCH_HOLE, offset, bytes as u64).is_ok();
                if !punched {
                    file.write_all_at(data, offset).map_err(RequestError::Io)?;
                }
                present.set_range(sector, run_end - sector);
                sector = run_end;
            }
            at += n;
        }
        Ok(())
    }
}

/// The layers a freeze of a writable disk leaves its children.
#[derive(Clone, Debug)]
pub(super) struct FrozenLayers {
    preserve: Arc<PreserveLayer>,
    /// Newest first.
    frozen: Vec<Arc<FrozenLayer>>,
}

impl FrozenLayers {
    /// Layers with nothing in them yet, over an image nobody else writes (a restored snapshot's
    /// disk).
    pub(super) fn empty(sectors: u64) -> Self {
        Self {
            preserve: Arc::new(PreserveLayer::new(sectors)),
            frozen: Vec::new(),
        }
    }

    /// Where a child with nothing of its own reads `sector` (`preserved`: the preserve layer's
    /// bitmap, locked).
    fn source(&self, preserved: &Bitmap, sector: u64) -> Source {
        if let Some(i) = self.frozen.iter().position(|l| l.present.get(sector)) {
            Source::Frozen(i)
        } else if preserved.get(sector) {
            Source::Preserved
        } else {
            Source::Image
        }
    }

    /// Writes the content of the disk these layers froze (`sectors` sectors over `image`, a
    /// buffered handle) into `to` at the same offsets, a MiB at a time; runs of zeroes stay
    /// holes. The parent may write the image meanwhile: each MiB is read under the preserve
    /// layer's read lock, as a child's reads are.
    pub(super) fn save(&self, image: &File, sectors: u64, to: &File) -> io::Result<()> {
        const CHUNK: u64 = 2048;
        to.set_len(sectors * SECTOR_SIZE)?;
        let mut buffer = vec![0u8; (CHUNK * SECTOR_SIZE) as usize];
        for first in (0..sectors).step_by(CHUNK as usize) {
            let count = CHUNK.min(sectors - first);
            let data = &mut buffer[..(count * SECTOR_SIZE) as usize];
            {
                let preserved = read_bits(&self.preserve.present);
                let mut done = 0;
                while done < count {
                    let source = self.source(&preserved, first + done);
                    let mut end = done + 1;
                    while end < count && self.source(&preserved, first + end) == source {
                        end += 1;
                    }
                    let file = match source {
                        Source::Frozen(i) => &self.frozen[i].file,
                        Source::Preserved => self.preserve.file()?,
                        Source::Image | Source::Own => image,
                    };
                    let range = (done * SECTOR_SIZE) as usize..(end * SECTOR_SIZE) as usize;
                    file.read_exact_at(&mut data[range], (first + done) * SECTOR_SIZE)?;
                    done = end;
                }
            }
            write_sparse(to, data, first * SECTOR_SIZE)?;
        }
        Ok(())
    }
}

/// Writes `data` at `offset` of `to`, leaving each all-zero 4 KiB block a hole.
pub(super) fn write_sparse(to: &File, data: &[u8], offset: u64) -> io::Result<()> {
    const BLOCK: usize = 4096;
    let mut at = 0;
    while at < data.len() {
        let zero = |i: usize| data[i..(i + BLOCK).min(data.len())].iter().all(|b| *b == 0);
        let is_zero = zero(at);
        let mut end = at;
        while end < data.len() && zero(end) == is_zero {
            end += BLOCK;
        }
        let end = end.min(data.len());
        if !is_zero {
            to.write_all_at(&data[at..end], offset + at as u64)?;
        }
        at = end;
    }
    Ok(())
}

/// The copy-on-write state of a writable device that was frozen or forked.
pub(super) enum Cow {
    /// The device over the user's image, frozen at least once.
    Image(ImageCow),
    /// A child: its device file is its own overlay.
    Child(ChildCow),
}

/// A frozen parent's side: the preserve layers of its freezes.
pub(super) struct ImageCow {
    /// A handle on the image for the children.
    base: Arc<File>,
    /// One per freeze whose children may still read the image, oldest first.
    layers: Vec<Weak<PreserveLayer>>,
    /// The image changed since the last freeze (else the next freeze reuses its layer).
    written: bool,
}

impl ImageCow {
    /// The state of `image` before its first freeze.
    pub(super) fn new(image: &File) -> io::Result<Self> {
        Ok(Self {
            base: Arc::new(image.try_clone()?),
            layers: Vec::new(),
            written: true,
        })
    }

    /// Freezes the image (`sectors` long): the children's handle on it and their layers.
    pub(super) fn freeze(&mut self, sectors: u64) -> io::Result<(Arc<File>, FrozenLayers)> {
        // Only the latest freeze's layer holds what the image holds now, if it is still alive.
        let reusable = (!self.written)
            .then(|| self.layers.last().and_then(Weak::upgrade))
            .flatten();
        self.layers.retain(|layer| layer.strong_count() > 0);
        let preserve = match reusable {
            Some(layer) => layer,
            None => {
                let layer = Arc::new(PreserveLayer::new(sectors));
                self.layers.push(Arc::downgrade(&layer));
                self.written = false;
                layer
            }
        };
        let layers = FrozenLayers {
            preserve,
            frozen: Vec::new(),
        };
        Ok((self.base.clone(), layers))
    }

    /// Before the image's `count` sectors from `start` change: copies what they hold into every
    /// live preserve layer lacking them. Returns whether any layer is still live (when none
    /// is, the device can drop its copy-on-write state).
    pub(super) fn preserve(
        &mut self,
        image: &File,
        start: u64,
        count: u64,
        bounce: &mut AlignedBuffer,
    ) -> Result<bool, RequestError> {
        self.written = true;
        self.layers.retain(|layer| layer.strong_count() > 0);
        for layer in &self.layers {
            if let Some(layer) = layer.upgrade() {
                layer.preserve(image, start, count, bounce)?;
            }
        }
        Ok(!self.layers.is_empty())
    }

    /// How many freezes' layers the image still preserves its content for.
    #[cfg(test)]
    pub(super) fn live_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.strong_count() > 0).count()
    }
}

/// A child's side: where its reads find each sector.
pub(super) struct ChildCow {
    base: Arc<File>,
    /// The image was opened with `O_DIRECT`: reads of it go through the bounce buffer.
    base_direct: bool,
    layers: FrozenLayers,
    /// The sectors of the child's own overlay (the device's file).
    present: Bitmap,
    /// The overlay holds something (else a freeze has nothing to turn into a frozen layer).
    written: bool,
}

/// A test's hook into a child's reads (see [`BEFORE_IMAGE_READ`]).
#[cfg(test)]
pub(super) type ImageReadHook = Option<Box<dyn FnMut(u64)>>;

#[cfg(test)]
thread_local! {
    /// Called by a child's read on this thread just before it reads the image at the offset
    /// given, with what it looked up still locked (lets a test interleave a parent's write).
    pub(super) static BEFORE_IMAGE_READ: std::cell::RefCell<ImageReadHook> =
        const { std::cell::RefCell::new(None) };
}

/// The layer a sector is read from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    Own,
    /// Index in [`FrozenLayers::frozen`].
    Frozen(usize),
    Preserved,
    Image,
}

impl ChildCow {
    /// A child of a freeze of a disk of `sectors` sectors, and its (empty) overlay.
    pub(super) fn new(
        base: Arc<File>,
        base_direct: bool,
        layers: FrozenLayers,
        sectors: u64,
        overlay: Option<File>,
    ) -> io::Result<(Self, File)> {
        let len = sectors * SECTOR_SIZE;
        let overlay = match overlay {
            Some(file) => {
                if file.metadata()?.len() != len {
                    file.set_len(len)?;
                }
                file
            }
            None => temp_file(len)?,
        };
        let child = Self {
            base,
            base_direct,
            layers,
            present: Bitmap::new(sectors),
            written: false,
        };
        Ok((child, overlay))
    }

    /// Freezes the child whose overlay is `overlay` (`sectors` long): unless it is empty, the
    /// overlay becomes a frozen layer and is replaced by a fresh one. Returns the children's
    /// handle on the image, whether it uses `O_DIRECT`, and their layers.
    pub(super) fn freeze(
        &mut self,
        overlay: &mut File,
        sectors: u64,
    ) -> io::Result<(Arc<File>, bool, FrozenLayers)> {
        if self.written {
            let fresh = temp_file(sectors * SECTOR_SIZE)?;
            let layer = FrozenLayer {
                file: std::mem::replace(overlay, fresh),
                present: std::mem::replace(&mut self.present, Bitmap::new(sectors)),
            };
            self.layers.frozen.insert(0, Arc::new(layer));
            self.written = false;
        }
        Ok((self.base.clone(), self.base_direct, self.layers.clone()))
    }

    /// The child wrote (or zeroed) the `count` sectors from `start` in its overlay.
    pub(super) fn mark_written(&mut self, start: u64, count: u64) {
        self.present.set_range(start, count);
        self.written = true;
    }

    fn source(&self, preserved: &Bitmap, sector: u64) -> Source {
        if self.present.get(sector) {
            Source::Own
        } else {
            self.layers.source(preserved, sector)
        }
    }

    /// Reads the `count` sectors from `start` into `segments` (from their first byte), each run
    /// of sectors that one layer holds with one transfer.
    pub(super) fn read(
        &self,
        overlay: &File,
        memory: &GuestView<'_>,
        segments: &[Segment],
        start: u64,
        count: u64,
        bounce: &mut AlignedBuffer,
    ) -> Result<(), RequestError> {
        // Held until the image has been read: the parent cannot overwrite a sector this read
        // found unpreserved before then.
        let preserved = read_bits(&self.layers.preserve.present);
        let mut done = 0;
        while done < count {
            let source = self.source(&preserved, start + done);
            let mut end = done + 1;
            while end < count && self.source(&preserved, start + end) == source {
                end += 1;
            }
            let skip = done * SECTOR_SIZE;
            let len = (end - done) * SECTOR_SIZE;
            let offset = (start + done) * SECTOR_SIZE;
            #[cfg(test)]
            if source == Source::Image {
                BEFORE_IMAGE_READ.with_borrow_mut(|hook| hook.as_mut().map(|hook| hook(offset)));
            }
            let file = match source {
                Source::Own => overlay,
                Source::Frozen(i) => &self.layers.frozen[i].file,
                Source::Preserved => self.layers.preserve.file().map_err(RequestError::Io)?,
                Source::Image if self.base_direct => {
                    read_bounced(&self.base, memory, segments, skip, len, offset, bounce)?;
                    done = end;
                    continue;
                }
                Source::Image => &*self.base,
            };
            transfer(file, memory, segments, skip, len, offset, Dir::Read)?;
            done = end;
        }
        Ok(())
    }
}
