//! Placeholder RAM for a VM created ahead of need (a prepared fork child): RAM that maps no image
//! yet, over the file the image it will adopt most likely is, and adopting that image in place.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::image::FrozenRam;
use super::{GuestRam, MemoryError};

impl GuestRam {
    /// Guest RAM of `size` bytes that maps no image yet, for a VM created ahead of need;
    /// [`GuestRam::adopt`] maps an image into it later. It maps `expected` privately — the file
    /// of the image it will most likely adopt ([`GuestRam::next_image_file`] of the VM it is
    /// prepared for), which may still be written until then — or else a new, empty file.
    /// Nothing may read or write it before it adopts an image.
    pub fn placeholder(size: u64, expected: Option<Arc<File>>) -> Result<Self, MemoryError> {
        match expected {
            Some(file) => Self::map(file, super::ram_ranges(size), libc::MAP_PRIVATE, None),
            None => Self::with_new_file(size, libc::MAP_PRIVATE),
        }
    }

    /// The file that the next image frozen from this RAM will most likely be: its own file
    /// while it maps it shared (the first freeze seals it), else the image of its last freeze
    /// (reused while the VM stays paused). `None` where the next freeze makes a new file.
    pub fn next_image_file(&self) -> Option<Arc<File>> {
        match (&self.latest, &self.mapped) {
            (Some(latest), _) => Some(latest.file.clone()),
            (None, None) => Some(self.file.clone()),
            (None, Some(_)) => None,
        }
    }

    /// Maps `image` privately into this placeholder RAM in place: the same addresses, so the
    /// memory slots of a VM created over this RAM stay valid. The image must have this RAM's
    /// layout, and no vCPU may run meanwhile. A placeholder that already maps the image's file
    /// is left as it is: it was never touched, so it holds no page of its own and reads the file,
    /// which is sealed now, through its mapping (and KVM, whose vCPUs never ran, holds no stale
    /// mapping of it). That spares a re-map, which makes KVM drop its mappings of the whole RAM
    /// (with shadow paging, time in proportion to the RAM's size).
    pub fn adopt(&mut self, image: &Arc<FrozenRam>) -> Result<(), MemoryError> {
        if image.ranges != self.ranges {
            return Err(MemoryError::Freeze {
                what: "adopting an image",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("image of {} bytes, RAM of {}", image.size(), self.size()),
                ),
            });
        }
        if !Arc::ptr_eq(&self.file, &image.file) {
            self.file = image.file.clone();
            self.remap_private()?;
        }
        self.mapped = Some(image.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::memory::testutil::{MIB, read, write};

    #[test]
    fn placeholder_ram_adopts_an_image_in_place() {
        let mut parent = GuestRam::new(4 * MIB).unwrap();
        write(&parent, 0x1000, 5);
        let image = parent.freeze().unwrap();
        let mut shell = GuestRam::placeholder(4 * MIB, None).unwrap();
        let before = shell.memory.get_host_address(GuestAddress(0)).unwrap();
        assert_eq!(read(&shell, 0x1000), 0);
        shell.adopt(&image).unwrap();
        assert_eq!(
            shell.memory.get_host_address(GuestAddress(0)).unwrap(),
            before
        );
        assert_eq!(read(&shell, 0x1000), 5);
        write(&shell, 0x1000, 6);
        assert_eq!(
            read(&image.map().unwrap(), 0x1000),
            5,
            "adopting RAM writes privately"
        );
        let mut small = GuestRam::placeholder(2 * MIB, None).unwrap();
        assert!(small.adopt(&image).is_err(), "layouts must match");
    }

    #[test]
    fn a_placeholder_over_the_next_image_s_file_adopts_it_without_a_re_map() {
        let mut parent = GuestRam::new(4 * MIB).unwrap();
        // Prepared while the parent still writes its file.
        let mut shell = GuestRam::placeholder(4 * MIB, parent.next_image_file()).unwrap();
        write(&parent, 0x1000, 5);
        let first = parent.freeze().unwrap();
        write(&parent, 0x1000, 6);
        let epoch = shell.epoch;
        shell.adopt(&first).unwrap();
        assert_eq!(shell.epoch, epoch, "not re-mapped");
        assert_eq!(
            read(&shell, 0x1000),
            5,
            "the image, not the parent's later write"
        );
        write(&shell, 0x1000, 7);
        assert_eq!(
            [read(&parent, 0x1000), read(&first.map().unwrap(), 0x1000)],
            [6, 5]
        );

        // Prepared for the image of a paused parent, which a re-freeze replaces.
        let mut stale = GuestRam::placeholder(4 * MIB, parent.next_image_file()).unwrap();
        let second = parent.freeze().unwrap();
        stale.adopt(&second).unwrap();
        assert_eq!(read(&stale, 0x1000), 6, "re-mapped over the new image");
    }
}
