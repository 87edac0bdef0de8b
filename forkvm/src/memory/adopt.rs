//! Placeholder RAM for a VM created ahead of need (a prepared fork child): RAM that maps no image
//! yet, over the file the image it will adopt most likely is, and adopting that image in place
//! (which makes it guest RAM).

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::image::FrozenRam;
use super::{GuestRam, MemoryError, RamSlot, RamSlots};

/// Guest RAM that maps no image yet, for a VM created ahead of need: a KVM VM can have its
/// memory slots over it ([`RamSlots`]), and nothing can read or write it until
/// [`PlaceholderRam::adopt`] turns it into the [`GuestRam`] of an image, at the same addresses.
pub(crate) struct PlaceholderRam(GuestRam);

impl PlaceholderRam {
    /// Placeholder RAM of `size` bytes. It maps `expected` privately — the file of the image it
    /// will most likely adopt ([`GuestRam::next_image_file`] of the VM it is prepared for), which
    /// may still be written until then — or else a new, empty file.
    pub(crate) fn new(size: u64, expected: Option<Arc<File>>) -> Result<Self, MemoryError> {
        let ram = match expected {
            Some(file) => GuestRam::map(file, super::ram_ranges(size), libc::MAP_PRIVATE, None),
            None => GuestRam::with_new_file(size, libc::MAP_PRIVATE),
        }?;
        Ok(Self(ram))
    }

    /// Maps `image` privately into this placeholder RAM in place, giving the RAM of the image:
    /// the same addresses, so the memory slots of a VM created over this RAM stay valid. The image
    /// must have this RAM's layout, and no vCPU may run meanwhile. A placeholder that already maps
    /// the image's file is left as it is: it was never touched, so it holds no page of its own and
    /// reads the file, which is sealed now, through its mapping (and KVM, whose vCPUs never ran,
    /// holds no stale mapping of it). That spares a re-map, which makes KVM drop its mappings of
    /// the whole RAM (with shadow paging, time in proportion to the RAM's size).
    ///
    /// On an error the placeholder is gone (unmapped), and so must be the VM created over it,
    /// whose vCPUs never ran.
    pub(crate) fn adopt(self, image: &Arc<FrozenRam>) -> Result<GuestRam, MemoryError> {
        let mut ram = self.0;
        if image.ranges != ram.ranges {
            return Err(MemoryError::Freeze {
                what: "adopting an image",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("image of {} bytes, RAM of {}", image.size(), ram.size()),
                ),
            });
        }
        let remap = !Arc::ptr_eq(&ram.file, &image.file);
        crate::phases::count("spawn.adopt_remapped", u64::from(remap));
        if remap {
            ram.file = image.file.clone();
            ram.remap_private()?;
        }
        if !image.overlays.is_empty() {
            let _span = crate::phases::span("spawn.adopt_overlay");
            ram.apply_overlays(&image.overlays)?;
        }
        ram.mapped = Some(image.clone());
        Ok(ram)
    }
}

impl RamSlots for PlaceholderRam {
    fn slots(&self) -> io::Result<Vec<RamSlot>> {
        self.0.slots()
    }
}

impl GuestRam {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::testutil::{MIB, read, write};

    #[test]
    fn placeholder_ram_adopts_an_image_in_place() {
        let mut parent = GuestRam::new(4 * MIB).unwrap();
        write(&parent, 0x1000, 5);
        let image = parent.freeze().unwrap();
        let shell = PlaceholderRam::new(4 * MIB, None).unwrap();
        let before = shell.slots().unwrap()[0].host_addr;
        assert_eq!(read(&shell.0, 0x1000), 0);
        let shell = shell.adopt(&image).unwrap();
        assert_eq!(shell.slots().unwrap()[0].host_addr, before);
        assert_eq!(read(&shell, 0x1000), 5);
        write(&shell, 0x1000, 6);
        assert_eq!(
            read(&image.map().unwrap(), 0x1000),
            5,
            "adopting RAM writes privately"
        );
        let small = PlaceholderRam::new(2 * MIB, None).unwrap();
        assert!(small.adopt(&image).is_err(), "layouts must match");
    }

    #[test]
    fn a_placeholder_over_the_next_image_s_file_adopts_it_without_a_re_map() {
        let mut parent = GuestRam::new(4 * MIB).unwrap();
        // Prepared while the parent still writes its file.
        let shell = PlaceholderRam::new(4 * MIB, parent.next_image_file()).unwrap();
        write(&parent, 0x1000, 5);
        let first = parent.freeze().unwrap();
        write(&parent, 0x1000, 6);
        let epoch = shell.0.epoch;
        let shell = shell.adopt(&first).unwrap();
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
        let stale = PlaceholderRam::new(4 * MIB, parent.next_image_file()).unwrap();
        let second = parent.freeze().unwrap();
        let stale = stale.adopt(&second).unwrap();
        assert_eq!(read(&stale, 0x1000), 6, "re-mapped over the new image");
    }

    /// The typestate: a VM's memory slots taken over placeholder RAM are the slots of the RAM it
    /// becomes (re-mapped or not, above and below the MMIO hole), and a placeholder that cannot
    /// adopt an image is consumed all the same (`adopt` takes it by value): there is no RAM left to
    /// run a vCPU over.
    #[test]
    fn adopting_keeps_the_memory_slots_and_consumes_the_placeholder() {
        let size = crate::layout::MMIO_HOLE_START + 2 * MIB;
        let mut parent = GuestRam::new(size).unwrap();
        write(&parent, crate::layout::MMIO_HOLE_END, 9);
        let shared = PlaceholderRam::new(size, parent.next_image_file()).unwrap();
        let fresh = PlaceholderRam::new(size, None).unwrap();
        let image = parent.freeze().unwrap();
        for placeholder in [shared, fresh] {
            let slots = placeholder.slots().unwrap();
            assert_eq!(
                slots
                    .iter()
                    .map(|s| (s.guest_addr, s.size))
                    .collect::<Vec<_>>(),
                [
                    (0, crate::layout::MMIO_HOLE_START),
                    (crate::layout::MMIO_HOLE_END, 2 * MIB)
                ]
            );
            let ram = placeholder.adopt(&image).unwrap();
            assert_eq!(ram.slots().unwrap(), slots);
            assert_eq!(read(&ram, crate::layout::MMIO_HOLE_END), 9);
        }

        let wrong = PlaceholderRam::new(4 * MIB, None).unwrap();
        let Err(MemoryError::Freeze { what, .. }) = wrong.adopt(&image) else {
            panic!("a 4 MiB placeholder adopted an image of {size} bytes");
        };
        assert_eq!(what, "adopting an image");
    }
}
