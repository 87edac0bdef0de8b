//! A frozen image of guest RAM ([`FrozenRam`]): a sealed memory file that VMs map privately, and
//! copying such a file's data (holes stay holes) into another.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::overlay::Overlay;
use super::{GuestRam, MemoryError, RamRange, create_memfd};

/// Guest RAM frozen at one instant: a sealed memfd that nobody writes any more (the base), and,
/// for a re-freeze of RAM that maps an image, overlays of the pages written since (oldest first;
/// a page is the last overlay's that holds it, else the base's: [`Overlay`]).
pub struct FrozenRam {
    pub(super) file: Arc<File>,
    pub(super) ranges: Vec<RamRange>,
    pub(super) overlays: Vec<Arc<Overlay>>,
}

/// Bytes copied per step into a memory file (from another file or from RAM).
pub(super) const COPY_CHUNK: usize = 1 << 20;

impl FrozenRam {
    /// New guest RAM that starts as this image: private copy-on-write mappings of it.
    pub fn map(self: &Arc<Self>) -> Result<GuestRam, MemoryError> {
        let mut ram = GuestRam::map(
            self.file.clone(),
            self.ranges.clone(),
            libc::MAP_PRIVATE,
            Some(self.clone()),
        )?;
        ram.apply_overlays(&self.overlays)?;
        Ok(ram)
    }

    /// The overlays' runs, all together, if the image has overlays.
    #[cfg(test)]
    pub(crate) fn overlay_runs(&self) -> Option<usize> {
        (!self.overlays.is_empty()).then(|| self.overlays.iter().map(|o| o.run_count()).sum())
    }

    /// How many overlays the image has over its base.
    pub(crate) fn depth(&self) -> usize {
        self.overlays.len()
    }

    /// The sealed file holding the image's base (all of it, for an image without overlay).
    #[cfg(test)]
    pub(crate) fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// An image read from `file`, which holds `size` bytes of RAM laid out as forkvm lays out
    /// its memory file (a snapshot's memory). Nothing writes it: VMs map it privately.
    pub fn from_file(file: File, size: u64) -> Arc<Self> {
        Arc::new(Self {
            file: Arc::new(file),
            ranges: super::ram_ranges(size),
            overlays: Vec::new(),
        })
    }

    /// An image holding a copy of `file`'s `size` bytes of RAM (laid out as [`Self::from_file`]
    /// says), in a new memory file sealed against any change: whatever happens to `file`
    /// afterwards (truncated, rewritten) does not reach the VMs mapping the copy. Holes stay
    /// holes; a file that shrinks during the copy is an error, never a `SIGBUS` (it is read,
    /// not mapped).
    pub fn copied_from(file: &File, size: u64) -> io::Result<Arc<Self>> {
        let copy = create_memfd().map_err(io::Error::other)?;
        copy.set_len(size)?;
        for (start, end) in data_extents(file)? {
            copy_range(file, &copy, start.min(size), end.min(size))?;
        }
        super::seal::seal(&copy).map_err(io::Error::other)?;
        Ok(Arc::new(Self {
            file: Arc::new(copy),
            ranges: super::ram_ranges(size),
            overlays: Vec::new(),
        }))
    }

    /// A new memory file holding the image's data.
    pub(super) fn copy_into_new_file(&self) -> Result<File, MemoryError> {
        let file = create_memfd()?;
        self.copy_data_to(&file)
            .map_err(|source| MemoryError::Freeze {
                what: "copying the image",
                source,
            })?;
        Ok(file)
    }

    /// Writes the image's data into `to` at the same offsets (holes stay holes), each overlay's
    /// pages over what is below.
    pub fn copy_data_to(&self, to: &File) -> io::Result<()> {
        to.set_len(self.size())?;
        let extents = data_extents(&self.file)?;
        crate::phases::count(
            "image.data_bytes",
            extents.iter().map(|&(start, end)| end - start).sum(),
        );
        for (start, end) in extents {
            copy_range(&self.file, to, start, end)?;
        }
        self.overlays
            .iter()
            .try_for_each(|overlay| overlay.copy_to(&self.ranges, to))
    }
}

/// The `[start, end)` byte ranges of `file` that hold data (holes skipped).
fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let size = file.metadata()?.len();
    let seek = |offset: u64, whence| -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: lseek on an open fd has no memory effects.
        let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        match at {
            // ENXIO: no data (or hole) at or after `offset`.
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Ok(None),
            -1 => Err(io::Error::last_os_error()),
            at => Ok(Some(at as u64)),
        }
    };
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        extents.push((start, end));
        at = end;
    }
    Ok(extents)
}

/// Copies bytes `start..end` of `from` to the same offsets of `to`.
fn copy_range(from: &File, to: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buffer = vec![0u8; COPY_CHUNK];
    let mut at = start;
    while at < end {
        let len = (end - at).min(COPY_CHUNK as u64) as usize;
        from.read_exact_at(&mut buffer[..len], at)?;
        to.write_all_at(&buffer[..len], at)?;
        at += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::memory::testutil::{MIB, contents, mapping_kb, read, write};

    #[test]
    fn the_image_is_sealed_against_writes() {
        let mut ram = GuestRam::new(2 * MIB).unwrap();
        ram.freeze().unwrap();
        let err = ram.file.write_all_at(&[1], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert!(ram.file.set_len(4 * MIB).is_err(), "the image cannot grow");
    }

    #[test]
    fn a_new_vm_from_an_image_holds_no_memory_until_it_writes() {
        let mut parent = GuestRam::new(8 * MIB).unwrap();
        for page in 0..256 {
            write(&parent, page * 4096, page + 1);
        }
        let image = parent.freeze().unwrap();
        let child = image.map().unwrap();
        assert_eq!(
            mapping_kb(&child, 0),
            (0, 0),
            "nothing resident before it runs"
        );
        assert_eq!(child.allocated_bytes().unwrap(), 0);
        for page in 0..256 {
            assert_eq!(read(&child, page * 4096), page + 1);
        }
        let (_, anon) = mapping_kb(&child, 0);
        assert_eq!(anon, 0, "reads share the image's pages");
        for page in 0..3 {
            write(&child, page * 4096, 0);
        }
        assert_eq!(
            mapping_kb(&child, 0).1,
            12,
            "each first write copies one page"
        );
        assert_eq!(child.allocated_bytes().unwrap(), 12 * 1024, "its own pages");
        assert_eq!(
            mapping_kb(&parent, 0).1,
            0,
            "the frozen parent copied nothing"
        );
    }

    #[test]
    fn a_copy_of_an_image_s_data_has_its_contents_and_its_holes() {
        let mut ram = GuestRam::new(8 * MIB).unwrap();
        write(&ram, 0x1000, 1);
        write(&ram, 5 * MIB, 2);
        let image = ram.freeze().unwrap();
        let extents = data_extents(image.file()).unwrap();
        let holds = |at: u64| {
            extents
                .iter()
                .any(|&(start, end)| start <= at && at + 8 <= end)
        };
        assert!(holds(0x1000) && holds(5 * MIB), "{extents:x?}");
        let data: u64 = extents.iter().map(|(start, end)| end - start).sum();
        assert!(data < 8 * MIB, "holes are not data: {extents:x?}");

        let copy = create_memfd().unwrap();
        image.copy_data_to(&copy).unwrap();
        assert_eq!(copy.metadata().unwrap().len(), 8 * MIB);
        assert!(
            copy.metadata().unwrap().blocks() * 512 <= data,
            "holes stay holes"
        );
        let copy = FrozenRam::from_file(copy, 8 * MIB);
        assert!(contents(&copy) == contents(&image));
        assert_eq!(read(&copy.map().unwrap(), 5 * MIB), 2);
    }

    /// A copy of a memory file is sealed and its own: truncating the file afterwards changes
    /// nothing the image's VMs read (a mapping of the file itself would raise SIGBUS).
    #[test]
    fn a_copied_image_outlives_its_file() {
        let path = std::env::temp_dir().join(format!("forkvm-image-copy-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(4 * MIB).unwrap();
        file.write_all_at(&5u64.to_le_bytes(), 3 * MIB).unwrap();
        let image = FrozenRam::copied_from(&file, 4 * MIB).unwrap();
        file.set_len(0).unwrap();
        std::fs::remove_file(&path).unwrap();
        let ram = image.map().unwrap();
        assert_eq!(read(&ram, 3 * MIB), 5);
        assert_eq!(read(&ram, MIB), 0);
        assert!(image.file.set_len(0).is_err(), "sealed");
    }
}
