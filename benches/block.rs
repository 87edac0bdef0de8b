//! Host-side virtio-blk request processing: 4 KiB random reads at queue depth 32, from requests
//! placed in guest memory, against `pread` of the same offsets from the same file in the same
//! run. The ratio of the two medians is the figure of merit (target: device ≥ 0.8 × pread).
//! After criterion's two measurements, alternating rounds of both give a ratio that load from
//! other processes skews less, printed with the time per request.
//!
//! `virtio_blk_forked_child` reads the same offsets from a child of a fork of the (writable)
//! image, through its copy-on-write layers: a quarter of the reads from its own overlay, a
//! quarter from what the parent preserved before overwriting it, half from the image.
//!
//! Then the hardening's costs (issue 15), each device on a thread of its own, in alternating
//! rounds: a rate limit that never binds (1 TiB/s, 2^30 requests/s) against none, and the
//! event loop's seccomp filter on the thread serving the device against none.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkvm::{RateLimit, ThreadKind};
use forkvm_devices::virtio::block::{Block, SECTOR_SIZE};
use forkvm_devices::virtio::test_driver::{BUF, Driver};
use forkvm_tests::TempFile;
use forkvm_tests::rounds::{Worker, compare, round_count, unbinding_limit};
use vm_memory::{Bytes, GuestAddress};

const IMAGE_SIZE: u64 = 64 << 20;
const QUEUE_DEPTH: u16 = 32;
const READ_SIZE: u32 = 4096;
const HEADERS: u64 = 0x4_0000;
const STATUSES: u64 = 0x5_0000;

/// Deterministic 4 KiB-aligned offsets spread over the image.
fn offsets() -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..QUEUE_DEPTH)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (IMAGE_SIZE / u64::from(READ_SIZE))) * u64::from(READ_SIZE)
        })
        .collect()
}

fn bench_block(c: &mut Criterion) {
    let contents: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i % 251) as u8).collect();
    let image = TempFile::with_contents("bench-blk.img", &contents);
    drop(contents);
    // Write the image back now rather than during the first measurement.
    File::open(image.path()).unwrap().sync_all().unwrap();
    let offsets = offsets();

    let mut driver = Driver::new(Box::new(
        Block::open(image.path(), true, false, "bench").unwrap(),
    ));
    driver.start_with(1 << 5); // VIRTIO_BLK_F_RO
    prepare_reads(&mut driver, &offsets);
    let mut group = c.benchmark_group("block_4k_random_read_qd32");
    group.throughput(Throughput::Elements(u64::from(QUEUE_DEPTH)));
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(5));

    group.bench_function("virtio_blk", |b| b.iter(|| read_batch(&mut driver)));

    let file = File::open(image.path()).unwrap();
    // Page-aligned like the guest's buffers. Measured here, the kernel's copy into buffers 528
    // bytes past a page boundary (where the heap put them before) made pread ~1.45x slower, and
    // 16 bytes past one ~3.4x (the copy's loads and stores alias at 4 KiB), flattering the
    // device's ratio.
    let len = QUEUE_DEPTH as usize * READ_SIZE as usize;
    let mut storage = vec![0u8; len + READ_SIZE as usize];
    let start = storage.as_ptr().align_offset(READ_SIZE as usize);
    let buffers = &mut storage[start..start + len];
    let mut pread_batch = || {
        for (buffer, offset) in buffers.chunks_mut(READ_SIZE as usize).zip(&offsets) {
            file.read_exact_at(buffer, *offset).unwrap();
        }
    };
    group.bench_function("pread", |b| b.iter(&mut pread_batch));

    let mut parent = Block::open(image.path(), false, false, "bench").unwrap();
    let state = parent.freeze().unwrap();
    let mut child = Driver::new(Box::new(Block::from_state(&state).unwrap()));
    drop(state);
    child.start();
    let mut parent = Driver::new(Box::new(parent));
    parent.start();
    for (i, offset) in offsets.iter().enumerate() {
        match i % 4 {
            0 => write_4k(&mut child, *offset),
            1 => write_4k(&mut parent, *offset),
            _ => {}
        }
    }
    prepare_reads(&mut child, &offsets);
    group.bench_function("virtio_blk_forked_child", |b| {
        b.iter(|| read_batch(&mut child))
    });
    group.finish();

    // The two medians above are taken seconds apart, so a compile on another core can skew
    // their ratio. Alternate short rounds of both instead, so that both see the same load.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--profile-time") {
        let (device, pread) = interleaved(&mut || read_batch(&mut driver), &mut pread_batch);
        let per_request = |batch: Duration| batch.as_nanos() as f64 / f64::from(QUEUE_DEPTH);
        println!(
            "interleaved medians per batch of {QUEUE_DEPTH}: virtio_blk {device:.2?} \
             ({:.0} ns/request), pread {pread:.2?} ({:.0} ns/request); \
             virtio_blk throughput / pread = {:.2}",
            per_request(device),
            per_request(pread),
            pread.as_secs_f64() / device.as_secs_f64()
        );
        let (forked, pread) = interleaved(&mut || read_batch(&mut child), &mut pread_batch);
        println!(
            "interleaved, forked child: virtio_blk {forked:.2?} ({:.0} ns/request), pread \
             {pread:.2?}; forked child throughput / pread = {:.2}",
            per_request(forked),
            pread.as_secs_f64() / forked.as_secs_f64()
        );
        overheads(image.path(), &offsets);
    }
}

/// The costs of a rate limit and of the seccomp filter on the read path (see the module docs).
fn overheads(image: &std::path::Path, offsets: &[u64]) {
    let reader = |limit: Option<RateLimit>| {
        let mut driver = Driver::new(Box::new(Block::open(image, true, false, "bench").unwrap()));
        driver.start_with(1 << 5); // VIRTIO_BLK_F_RO
        if let Some(limit) = limit {
            driver.transport.set_rate_limit(limit).unwrap();
        }
        prepare_reads(&mut driver, offsets);
        driver
    };
    let worker = |mut driver: Driver, filtered: bool| {
        let enter = move || {
            if filtered {
                forkvm::filter_this_thread_for_bench(ThreadKind::EventLoop).unwrap();
            }
        };
        Worker::spawn(enter, move || read_batch(&mut driver))
    };
    let rounds = round_count();
    let plain = worker(reader(None), false);
    let limited = worker(reader(Some(unbinding_limit())), false);
    compare(
        "block_4k_qd32_rate_limit",
        ("none", &plain),
        ("unbinding", &limited),
        rounds,
        200,
    );
    drop(limited);
    let filtered = worker(reader(None), true);
    compare(
        "block_4k_qd32_seccomp",
        ("off", &plain),
        ("event_loop_filter", &filtered),
        rounds,
        200,
    );
}

/// Writes each request's header (a read of 4 KiB at its offset) and chain once; each batch only
/// makes the chains available again and notifies, as a driver reusing its request slots would.
fn prepare_reads(driver: &mut Driver, offsets: &[u64]) {
    for (i, offset) in offsets.iter().enumerate() {
        let header = HEADERS + 16 * i as u64;
        driver.memory.write_obj(0u32, GuestAddress(header)).unwrap(); // VIRTIO_BLK_T_IN
        driver
            .memory
            .write_obj(offset / SECTOR_SIZE, GuestAddress(header + 8))
            .unwrap();
    }
    for i in 0..QUEUE_DEPTH {
        let n = u64::from(i);
        let data = BUF + n * u64::from(READ_SIZE);
        driver.chain(
            3 * i,
            &[
                (HEADERS + 16 * n, 16, false),
                (data, READ_SIZE, true),
                (STATUSES + n, 1, true),
            ],
        );
    }
    driver.notify();
}

/// Makes the prepared reads available again and serves them.
fn read_batch(driver: &mut Driver) {
    for i in 0..QUEUE_DEPTH {
        driver.make_available(3 * i);
    }
    driver.notify();
}

/// Writes 4 KiB of 0xa5 at `offset` through the driver's queue (descriptors past the reads').
fn write_4k(driver: &mut Driver, offset: u64) {
    let header = HEADERS + 0x1000;
    let data = BUF + u64::from(QUEUE_DEPTH) * u64::from(READ_SIZE);
    let status = STATUSES + 0x100;
    driver.memory.write_obj(1u32, GuestAddress(header)).unwrap(); // VIRTIO_BLK_T_OUT
    driver
        .memory
        .write_obj(0xffu8, GuestAddress(status))
        .unwrap();
    driver
        .memory
        .write_obj(offset / SECTOR_SIZE, GuestAddress(header + 8))
        .unwrap();
    driver
        .memory
        .write_slice(&[0xa5; READ_SIZE as usize], GuestAddress(data))
        .unwrap();
    driver.chain(
        3 * QUEUE_DEPTH,
        &[
            (header, 16, false),
            (data, READ_SIZE, false),
            (status, 1, true),
        ],
    );
    driver.notify();
    assert_eq!(
        driver.memory.read_obj::<u8>(GuestAddress(status)).unwrap(),
        0
    );
}

/// Median batch times of `a` and `b` over alternating rounds of 200 batches each.
fn interleaved(a: &mut dyn FnMut(), b: &mut dyn FnMut()) -> (Duration, Duration) {
    const ROUNDS: usize = 101;
    const BATCHES: u32 = 200;
    let round = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..BATCHES {
            f();
        }
        start.elapsed() / BATCHES
    };
    let (mut times_a, mut times_b): (Vec<Duration>, Vec<Duration>) = (0..ROUNDS)
        .map(|_| (round(&mut *a), round(&mut *b)))
        .unzip();
    times_a.sort();
    times_b.sort();
    (times_a[ROUNDS / 2], times_b[ROUNDS / 2])
}

criterion_group!(benches, bench_block);
criterion_main!(benches);
