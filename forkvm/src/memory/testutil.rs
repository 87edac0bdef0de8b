//! Helpers of the memory tests: guest RAM read and written a word at a time, and what its
//! mappings hold.

use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use std::sync::Arc;

use super::GuestRam;
use super::freeze::Tracking;
use super::image::FrozenRam;

pub(super) const MIB: u64 = 1 << 20;

pub(super) fn read(ram: &GuestRam, addr: u64) -> u64 {
    ram.memory.read_obj(GuestAddress(addr)).unwrap()
}

pub(super) fn write(ram: &GuestRam, addr: u64, value: u64) {
    ram.memory.write_obj(value, GuestAddress(addr)).unwrap();
}

/// Resident and anonymous (copied-on-write) kB of the mapping at guest address `addr`, from
/// /proc/self/smaps.
pub(super) fn mapping_kb(ram: &GuestRam, addr: u64) -> (u64, u64) {
    let host = ram.memory.get_host_address(GuestAddress(addr)).unwrap() as u64;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut lines = smaps.lines();
    while let Some(line) = lines.next() {
        let Some((range, _)) = line.split_once(' ') else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        if !(start..end).contains(&host) {
            continue;
        }
        let mut rss = 0;
        let mut anon = 0;
        for field in lines.by_ref() {
            let value = || {
                field
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            };
            if field.starts_with("Rss:") {
                rss = value();
            } else if field.starts_with("Anonymous:") {
                anon = value();
            } else if field.starts_with("VmFlags:") {
                return (rss, anon);
            }
        }
    }
    panic!("no mapping holds {host:#x}");
}

/// The whole contents of an image.
pub(super) fn contents(image: &FrozenRam) -> Vec<u8> {
    let flat = super::create_memfd().unwrap();
    image.copy_data_to(&flat).unwrap();
    let mut bytes = vec![0u8; image.size() as usize];
    flat.read_exact_at(&mut bytes, 0).unwrap();
    bytes
}

/// Whether `ram` tracks its writes (said on stderr when not: then only images are checked).
pub(super) fn tracked(ram: &GuestRam) -> bool {
    let on = matches!(ram.tracking, Tracking::On(_));
    if !on {
        eprintln!("writes are not tracked on this host: only images are checked");
    }
    on
}

/// Freezes `ram` with a draft made first, `between` run between the draft and the pause.
pub(super) fn drafted_freeze(
    ram: &mut GuestRam,
    between: impl FnOnce(&GuestRam),
) -> Arc<FrozenRam> {
    let draft = ram.draft_freeze().unwrap();
    between(ram);
    ram.freeze_from(Some(draft)).unwrap()
}
