//! A snapshot's `state.json` as someone else may have written it: arbitrary bytes through the
//! parse-and-check path of `Snapshot::load` (`forkvm::Snapshot::check_state_file`: the JSON
//! parser, then every size, index and address range-checked), without KVM or other files. It
//! may refuse anything, and must never panic, abort, hang or allocate without bound.
//!
//! Seeds: `seeds/snapshot_state/`, state files of real snapshots (a spinning guest with two
//! vCPUs, a guest with virtio rng, console and vsock, a guest with a disk) taken by the
//! integration tests on this host.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = forkvm::Snapshot::check_state_file(data);
});
