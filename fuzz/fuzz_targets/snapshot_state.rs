//! A snapshot's `state.json` as someone else may have written it, up to KVM: arbitrary bytes
//! through the parse-and-check path of `Snapshot::load` (`forkvm::Snapshot::check_state_file`:
//! the JSON parser, then every size, index and address range-checked), and, for a state that
//! passes, the whole `Snapshot::load` of a directory holding it: its checksum file, the memory
//! file and every disk file it names (made to the sizes it gives, sparse), so that each device
//! is opened from its saved state (`from_saved`: disk capacities, overlay bitmaps). Everything
//! short of making the KVM VM. It may refuse anything, and must never panic, abort, hang or
//! allocate without bound.
//!
//! Seeds: `seeds/snapshot_state/`, state files of real snapshots (a spinning guest with two
//! vCPUs, a guest with virtio rng, console and vsock, a guest with a disk) taken by the
//! integration tests on this host (a state from another host CPU or forkvm version stops at
//! that check).

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// Memory and disk files larger than this are not made (the load is skipped).
const MAX_FILE: u64 = 8 << 30;

/// This process's snapshot directory, reused by every input.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("forkvm-fuzz-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    })
}

/// The disk files `state` names, with their sizes in bytes.
fn disks(state: &serde_json::Value) -> Option<Vec<(String, u64)>> {
    let mut disks = Vec::new();
    for device in state.get("devices")?.as_array()? {
        let Some(block) = device.pointer("/state/device/SavedBlock") else {
            continue;
        };
        let name = block.get("file")?.as_str()?;
        let plain = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
        let bytes = block.get("capacity_sectors")?.as_u64()?.checked_mul(512)?;
        if !plain || bytes > MAX_FILE {
            return None;
        }
        disks.push((name.to_owned(), bytes));
    }
    Some(disks)
}

/// Writes a snapshot directory around `data` (the state) and loads it.
fn load(data: &[u8]) -> Option<()> {
    let state: serde_json::Value = serde_json::from_slice(data).ok()?;
    let memory = state.get("memory_size")?.as_u64()?;
    let disks = disks(&state)?;
    if memory > MAX_FILE {
        return None;
    }
    let dir = dir();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).ok()?;
    std::fs::write(dir.join("state.json"), data).ok()?;
    let sums = serde_json::json!({
        "algorithm": "crc32",
        "files": {"state.json": {"len": data.len(), "crc32": crc32fast::hash(data)}},
    });
    std::fs::write(dir.join("checksums.json"), sums.to_string()).ok()?;
    let sized = |name: &str, len: u64| {
        let file = std::fs::File::create(dir.join(name)).ok()?;
        file.set_len(len).ok()
    };
    sized("memory", memory)?;
    for (name, len) in &disks {
        sized(name, *len)?;
    }
    let _ = forkvm::Snapshot::load(dir);
    Some(())
}

fuzz_target!(|data: &[u8]| {
    if forkvm::Snapshot::check_state_file(data).is_ok() {
        let _ = load(data);
    }
});
