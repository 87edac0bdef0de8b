//! Rate limits between VMs of one process (issue 15): two test guests (`mode=blk-loop
//! blk_kib=16`), each with its own disk, read 16 KiB from it again and again, one request at a
//! time, and count the reads in their memory; the host samples the counts. First both
//! unlimited; then VM A's disk limited to `LIMIT_KIB` KiB/s through `Vm::set_rate_limit` while
//! B stays unlimited; then both unlimited again. Each phase counts for `RATE_LIMIT_SECONDS`
//! (default 3) after a 1 s warm-up that empties A's full bucket, and prints reads/s and MiB/s
//! of each VM, and p50/p90/p99 of the reads/s of each 100 ms slice.

use std::time::{Duration, Instant};

use forkvm::{Bucket, ConsoleBuffer, DeviceKind, RateLimit, Vm};
use forkvm_tests::report::percentile_ns;
use forkvm_tests::{TempFile, hex_after, read_u64, test_guest_vm};

/// VM A's limit, in KiB per second (a bucket of one second's worth).
const LIMIT_KIB: u64 = 1024;
const READ_KIB: u64 = 16;
const WARM_UP: Duration = Duration::from_secs(1);
const SLICE: Duration = Duration::from_millis(100);

struct Guest {
    vm: Vm,
    counter: u64,
    disk: usize,
    _image: TempFile,
    _console: ConsoleBuffer,
}

fn guest(name: &str) -> Guest {
    let image = TempFile::with_contents(name, &vec![7u8; 1 << 20]);
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm(&format!("mode=blk-loop blk_kib={READ_KIB}"), &console)
        .block(image.path(), true)
        .build()
        .expect("build the test guest");
    vm.start().expect("start");
    let counter = hex_after(&console, "blk-loop counter at ");
    let disk = vm
        .devices()
        .iter()
        .position(|d| d.kind == DeviceKind::Block)
        .expect("a disk");
    Guest {
        vm,
        counter,
        disk,
        _image: image,
        _console: console,
    }
}

fn phase(name: &str, guests: [&Guest; 2], seconds: u64) {
    std::thread::sleep(WARM_UP);
    let count = |g: &Guest| read_u64(&g.vm, g.counter);
    let first = guests.map(count);
    let mut last = first;
    let mut slices: [Vec<u64>; 2] = Default::default();
    let start = Instant::now();
    let mut slice_start = start;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(SLICE);
        let now = guests.map(count);
        let took = slice_start.elapsed().as_secs_f64();
        slice_start = Instant::now();
        for i in 0..2 {
            slices[i].push(((now[i] - last[i]) as f64 / took) as u64);
        }
        last = now;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("{name}:");
    for (i, vm) in ["A", "B"].iter().enumerate() {
        let reads = (last[i] - first[i]) as f64 / elapsed;
        let mut s = slices[i].clone();
        s.sort_unstable();
        let [p50, p90, p99] = [50.0, 90.0, 99.0].map(|p| percentile_ns(&s, p));
        println!(
            "  VM {vm}: {reads:.0} reads/s = {:.2} MiB/s; per {} ms slice: p50 {p50} p90 {p90} \
             p99 {p99} reads/s",
            reads * READ_KIB as f64 / 1024.0,
            SLICE.as_millis()
        );
    }
}

fn main() {
    let seconds = std::env::var("RATE_LIMIT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let a = guest("rate-limit-a.img");
    let b = guest("rate-limit-b.img");
    phase("both unlimited", [&a, &b], seconds);
    let limit = RateLimit {
        bytes: Some(Bucket::new(LIMIT_KIB << 10, Duration::from_secs(1))),
        ops: None,
    };
    a.vm.set_rate_limit(a.disk, limit).expect("limit A");
    phase(
        &format!(
            "A limited to {LIMIT_KIB} KiB/s ({} reads/s), B unlimited",
            LIMIT_KIB / READ_KIB
        ),
        [&a, &b],
        seconds,
    );
    a.vm.set_rate_limit(a.disk, RateLimit::unlimited())
        .expect("lift A's limit");
    phase("both unlimited again", [&a, &b], seconds);
    a.vm.stop();
    b.vm.stop();
}
