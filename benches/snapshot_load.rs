//! What the load options of a snapshot cost (`forkvm::LoadOptions`), without criterion:
//! `Snapshot::load` of a snapshot whose 256 MiB guest memory holds 128 MiB of data (filled by
//! the host) and a 64 MiB disk holding 32 MiB of data, as is (the memory file mapped), with
//! `verify_data` (the memory and disk files read whole and checked against their CRC-32s) and
//! with `copy_memory` (the memory's data copied into a sealed memfd); then the CRC-32 alone over
//! a 64 MiB buffer in memory. Prints p50/p90/p99/max of `SNAPSHOT_LOAD_N` rounds each (else
//! `FORKVM_BENCH_SAMPLES`, else 1,000; the files stay in the page cache) and the MiB/s of the
//! medians: what an option adds, divided into the bytes it reads.

use std::time::Instant;

use forkvm::{LoadOptions, Snapshot};
use forkvm_tests::{TempFile, print_percentiles, sample_count, spinning_guest_with};

const MEMORY_MIB: u64 = 256;
const DATA_MIB: u64 = 128;
const DISK_MIB: u64 = 64;

fn main() {
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let mut disk = vec![0u8; (DISK_MIB << 20) as usize];
    for half in disk.chunks_mut(2 << 20).map(|two| &mut two[..1 << 20]) {
        half.copy_from_slice(&data);
    }
    let image = TempFile::with_contents("load-bench.img", &disk);
    let (vm, _, _console) = spinning_guest_with(1, MEMORY_MIB, |b| b.block(image.path(), true));
    for mib in 0..DATA_MIB {
        vm.write_memory((16 + mib) << 20, &data).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("forkvm-bench-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    vm.snapshot(&dir).unwrap();
    drop(vm);

    let rounds = sample_count("SNAPSHOT_LOAD_N");
    let options = [
        ("default", LoadOptions::new()),
        ("verify_data", LoadOptions::new().verify_data(true)),
        ("copy_memory", LoadOptions::new().copy_memory(true)),
    ];
    let mut samples = vec![Vec::new(); options.len()];
    for _ in 0..rounds {
        for (i, (_, options)) in options.iter().enumerate() {
            let t0 = Instant::now();
            let snapshot = Snapshot::load_with(&dir, *options).unwrap();
            samples[i].push(t0.elapsed());
            drop(snapshot);
        }
    }
    let mut medians = Vec::new();
    for ((name, _), samples) in options.iter().zip(&mut samples) {
        print_percentiles(&format!("snapshot_load/{name}/{MEMORY_MIB}MiB"), samples);
        samples.sort_unstable();
        medians.push(samples[samples.len() / 2].as_secs_f64());
    }
    let mib_per_s = |bytes_mib: u64, extra: f64| bytes_mib as f64 / extra.max(1e-9);
    println!(
        "snapshot_load/verify_data: {:.0} MiB/s over {} MiB read ({MEMORY_MIB} MiB memory, {DISK_MIB} MiB disk)",
        mib_per_s(MEMORY_MIB + DISK_MIB, medians[1] - medians[0]),
        MEMORY_MIB + DISK_MIB
    );
    println!(
        "snapshot_load/copy_memory: {:.0} MiB/s over {DATA_MIB} MiB of data",
        mib_per_s(DATA_MIB, medians[2] - medians[0])
    );

    // The CRC alone, in memory (what verify_data costs beyond reading).
    let buffer = disk;
    let mut crc = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        std::hint::black_box(crc32fast::hash(&buffer));
        crc.push(t0.elapsed());
    }
    print_percentiles(&format!("snapshot_load/crc32_only/{DISK_MIB}MiB"), &mut crc);
    crc.sort_unstable();
    println!(
        "snapshot_load/crc32_only: {:.0} MiB/s",
        mib_per_s(DISK_MIB, crc[crc.len() / 2].as_secs_f64())
    );
    let _ = std::fs::remove_dir_all(&dir);
}
