//! Placeholder RAM for a VM created ahead of need (a prepared fork child): RAM that maps no image
//! yet, over what the image it will adopt most likely maps (a file, or a base and its overlays),
//! and adopting that image in place (which makes it guest RAM).

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::image::FrozenRam;
use super::overlay::Overlay;
use super::runs::{merged, subtract};
use super::{GuestRam, MemoryError, RamSlot, RamSlots};

/// What a placeholder maps ahead: the file the next image will most likely be, or the image the
/// next one will most likely stack an overlay on (its base and overlays).
#[derive(Clone)]
pub(crate) enum Expected {
    /// A file (a RAM's own before its first freeze, a snapshot's memory).
    File(Arc<File>),
    /// An image: the next is most likely this one or one more overlay on it.
    Image(Arc<FrozenRam>),
}

/// Guest RAM that maps no image yet, for a VM created ahead of need: a KVM VM can have its
/// memory slots over it ([`RamSlots`]), and nothing can read or write it until
/// [`PlaceholderRam::adopt`] turns it into the [`GuestRam`] of an image, at the same addresses.
pub(crate) struct PlaceholderRam {
    ram: GuestRam,
    /// The overlays it maps over its file (those of an expected image), oldest first.
    applied: Vec<Arc<Overlay>>,
}

impl PlaceholderRam {
    /// Placeholder RAM of `size` bytes. It maps `expected` privately — what the image it will
    /// most likely adopt maps ([`GuestRam::next_image`] of the VM it is prepared for; a file may
    /// still be written until then) — or else a new, empty file. (Called before a VM's memory
    /// slots are made over it, so mapping an image's overlays costs KVM nothing.)
    pub(crate) fn new(size: u64, expected: Option<Expected>) -> Result<Self, MemoryError> {
        let ranges = super::ram_ranges(size);
        match expected {
            Some(Expected::File(file)) => Ok(Self {
                ram: GuestRam::map(file, ranges, libc::MAP_PRIVATE, None)?,
                applied: Vec::new(),
            }),
            Some(Expected::Image(image)) if image.ranges == ranges => {
                let mut ram = GuestRam::map(image.file.clone(), ranges, libc::MAP_PRIVATE, None)?;
                ram.apply_overlays(&image.overlays)?;
                Ok(Self {
                    ram,
                    applied: image.overlays.clone(),
                })
            }
            _ => Ok(Self {
                ram: GuestRam::with_new_file(size, libc::MAP_PRIVATE)?,
                applied: Vec::new(),
            }),
        }
    }

    /// Maps `image` privately into this placeholder RAM in place, giving the RAM of the image:
    /// the same addresses, so the memory slots of a VM created over this RAM stay valid. The image
    /// must have this RAM's layout, and no vCPU may run meanwhile. A placeholder that already maps
    /// the image's file is not re-mapped: it was never touched, so it holds no page of its own and
    /// reads the file, which is sealed now, through its mapping (and KVM, whose vCPUs never ran,
    /// holds no stale mapping of it). That spares a re-map, which makes KVM drop its mappings of
    /// the whole RAM (with shadow paging, time in proportion to the RAM's size). Of the image's
    /// overlays, only those the placeholder does not map yet are mapped, where what it maps is
    /// what the image shows below them (see `maps_below`).
    ///
    /// On an error the placeholder is gone (unmapped), and so must be the VM created over it,
    /// whose vCPUs never ran.
    pub(crate) fn adopt(self, image: &Arc<FrozenRam>) -> Result<GuestRam, MemoryError> {
        let Self { mut ram, applied } = self;
        if image.ranges != ram.ranges {
            return Err(MemoryError::Freeze {
                what: "adopting an image",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("image of {} bytes, RAM of {}", image.size(), ram.size()),
                ),
            });
        }
        let same_file = Arc::ptr_eq(&ram.file, &image.file);
        let below = same_file.then(|| maps_below(&applied, image)).flatten();
        crate::phases::count("spawn.adopt_remapped", u64::from(below.is_none()));
        let below = match below {
            Some(below) => below,
            None => {
                ram.file = image.file.clone();
                ram.remap_private()?;
                0
            }
        };
        if below < image.overlays.len() {
            let _span = crate::phases::span("spawn.adopt_overlay");
            ram.apply_overlays(&image.overlays[below..])?;
        }
        ram.mapped = Some(image.clone());
        // Overlays the image dropped may have been held here last: their memory is freed off
        // the fork's path.
        crate::reaper::drop_later(applied);
        Ok(ram)
    }
}

/// How many of `image`'s overlays (the first ones) a placeholder that maps `applied` over the
/// image's base already shows as the image does, so that mapping the rest on top gives the
/// image: `applied` must hold those first overlays in order, and every other overlay of
/// `applied` must be hidden in the image by newer ones (the image dropped it: see `layers.rs`).
/// `None` where the rest on top would not give the image.
fn maps_below(applied: &[Arc<Overlay>], image: &FrozenRam) -> Option<usize> {
    let position = |o: &Arc<Overlay>| applied.iter().position(|a| Arc::ptr_eq(a, o));
    let below = image
        .overlays
        .iter()
        .take_while(|o| position(o).is_some())
        .count();
    let kept: Vec<usize> = image.overlays[..below]
        .iter()
        .filter_map(position)
        .collect();
    if image.overlays[below..]
        .iter()
        .any(|o| position(o).is_some())
        || !kept.windows(2).all(|w| w[0] < w[1])
    {
        return None;
    }
    // Each overlay of `applied` the image dropped: covered by what lies above it here.
    for (i, dropped) in applied.iter().enumerate() {
        if kept.contains(&i) {
            continue;
        }
        let above = applied[i + 1..].iter().chain(&image.overlays[below..]);
        let hidden = dropped.runs.iter().enumerate().all(|(range, runs)| {
            let cover = merged(
                above
                    .clone()
                    .filter_map(|o| o.runs.get(range))
                    .flatten()
                    .copied()
                    .collect(),
            );
            subtract(runs, cover).is_empty()
        });
        if !hidden {
            return None;
        }
    }
    Some(below)
}

#[cfg(test)]
impl PlaceholderRam {
    /// The RAM it is.
    pub(super) fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

impl RamSlots for PlaceholderRam {
    fn slots(&self) -> io::Result<Vec<RamSlot>> {
        self.ram.slots()
    }
}

impl GuestRam {
    /// What the next image frozen from this RAM will most likely be or stack on: its own file
    /// while it maps it shared (the first freeze seals it), else the image of its last freeze
    /// (reused while the VM stays paused, stacked on when it ran), else the image it maps.
    pub(crate) fn next_image(&self) -> Option<Expected> {
        match (&self.latest, &self.mapped) {
            (Some(latest), _) => Some(Expected::Image(latest.clone())),
            (None, None) => Some(Expected::File(self.file.clone())),
            (None, Some(mapped)) => Some(Expected::Image(mapped.clone())),
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
        assert_eq!(read(&shell.ram, 0x1000), 0);
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
        let shell = PlaceholderRam::new(4 * MIB, parent.next_image()).unwrap();
        write(&parent, 0x1000, 5);
        let first = parent.freeze().unwrap();
        write(&parent, 0x1000, 6);
        let epoch = shell.ram.epoch;
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
        let stale = PlaceholderRam::new(4 * MIB, parent.next_image()).unwrap();
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
        let shared = PlaceholderRam::new(size, parent.next_image()).unwrap();
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
