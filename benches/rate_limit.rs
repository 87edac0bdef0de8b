//! Rate limits between VMs of one process (issue 15): two test guests (`mode=blk-loop
//! blk_kib=16`), each with its own disk, read 16 KiB from it again and again, one request at a
//! time, and count the reads in their memory; the host samples the counts. First both
//! unlimited; then VM A's disk limited to `LIMIT_KIB` KiB/s through `Vm::set_rate_limit` while
//! B stays unlimited; then both unlimited again. Each phase counts for `RATE_LIMIT_SECONDS`
//! (default 3) after a 1 s warm-up that empties A's full bucket, and prints reads/s and MiB/s
//! of each VM, and p50/p90/p99 of the reads/s of each 100 ms slice.
//!
//! Then the receive direction: two test guests echo on a vsock port (`mode=vsock-listen`), a
//! host thread each writes to it as fast as it can and another reads the echo; the same three
//! phases with VM A's vsock receive direction limited to `RX_LIMIT_KIB` KiB/s through
//! `Vm::set_rx_rate_limit` (what the host pushes: data and packet headers), in echoed MiB/s.
//! `RATE_LIMIT_CASE=disk` or `=vsock-rx` runs one of the two.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forkvm::{Bucket, ConsoleBuffer, DeviceKind, RateLimit, Vm, VsockConfig};
use forkvm_tests::report::percentile_ns;
use forkvm_tests::{TempFile, hex_after, read_u64, test_guest_vm, wait_for_output};

/// VM A's limit, in KiB per second (a bucket of one second's worth).
const LIMIT_KIB: u64 = 1024;
const READ_KIB: u64 = 16;
const WARM_UP: Duration = Duration::from_secs(1);
const SLICE: Duration = Duration::from_millis(100);
/// VM A's receive limit in the vsock case, in KiB per second (a bucket of one second's worth).
const RX_LIMIT_KIB: u64 = 4096;
const VSOCK_PORT: u32 = 77;

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

/// How a phase reports a VM's count per second (reads, or KiB echoed).
struct Unit {
    name: &'static str,
    kib: f64,
}

fn phase(name: &str, counts: [&dyn Fn() -> u64; 2], unit: &Unit, seconds: u64) {
    std::thread::sleep(WARM_UP);
    let count = |f: &&dyn Fn() -> u64| f();
    let guests = counts;
    let first = guests.each_ref().map(count);
    let mut last = first;
    let mut slices: [Vec<u64>; 2] = Default::default();
    let start = Instant::now();
    let mut slice_start = start;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(SLICE);
        let now = guests.each_ref().map(count);
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
        let rate = (last[i] - first[i]) as f64 / elapsed;
        let mut s = slices[i].clone();
        s.sort_unstable();
        let [p50, p90, p99] = [50.0, 90.0, 99.0].map(|p| percentile_ns(&s, p));
        let unit_name = unit.name;
        println!(
            "  VM {vm}: {rate:.0} {unit_name}/s = {:.2} MiB/s; per {} ms slice: p50 {p50} \
             p90 {p90} p99 {p99} {unit_name}/s",
            rate * unit.kib / 1024.0,
            SLICE.as_millis()
        );
    }
}

fn disk(seconds: u64) {
    let a = guest("rate-limit-a.img");
    let b = guest("rate-limit-b.img");
    let reads = Unit {
        name: "reads",
        kib: READ_KIB as f64,
    };
    let count_a = || read_u64(&a.vm, a.counter);
    let count_b = || read_u64(&b.vm, b.counter);
    let counts: [&dyn Fn() -> u64; 2] = [&count_a, &count_b];
    phase("both unlimited", counts, &reads, seconds);
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
        counts,
        &reads,
        seconds,
    );
    a.vm.set_rate_limit(a.disk, RateLimit::unlimited())
        .expect("lift A's limit");
    phase("both unlimited again", counts, &reads, seconds);
    a.vm.stop();
    b.vm.stop();
}

/// A test guest echoing on its vsock port, a host thread writing to it without pause and
/// another counting the bytes that come back.
struct Echo {
    vm: Vm,
    vsock: usize,
    echoed: Arc<AtomicU64>,
    stream: UnixStream,
    _console: ConsoleBuffer,
}

fn echo_guest() -> Echo {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm(
        &format!("mode=vsock-listen vsock_port={VSOCK_PORT}"),
        &console,
    )
    .vsock(VsockConfig::new(3))
    .build()
    .expect("build the test guest");
    vm.start().expect("start");
    wait_for_output(
        &console,
        &format!("vsock-listen: listening on port {VSOCK_PORT}"),
    );
    let vsock = vm
        .devices()
        .iter()
        .position(|d| d.kind == DeviceKind::Vsock)
        .expect("a vsock device");
    let stream = vm
        .vsock_connect(VSOCK_PORT, Duration::from_secs(10))
        .expect("connect to the guest");
    let mut writer = stream.try_clone().expect("clone the stream");
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 << 10];
        while writer.write_all(&chunk).is_ok() {}
    });
    let echoed = Arc::new(AtomicU64::new(0));
    let mut reader = stream.try_clone().expect("clone the stream");
    let counter = echoed.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    Echo {
        vm,
        vsock,
        echoed,
        stream,
        _console: console,
    }
}

fn vsock_rx(seconds: u64) {
    let a = echo_guest();
    let b = echo_guest();
    let kib = Unit {
        name: "KiB",
        kib: 1.0,
    };
    let count_a = || a.echoed.load(Ordering::Relaxed) >> 10;
    let count_b = || b.echoed.load(Ordering::Relaxed) >> 10;
    let counts: [&dyn Fn() -> u64; 2] = [&count_a, &count_b];
    phase("vsock echo, both unlimited", counts, &kib, seconds);
    let limit = RateLimit {
        bytes: Some(Bucket::new(RX_LIMIT_KIB << 10, Duration::from_secs(1))),
        ops: None,
    };
    a.vm.set_rx_rate_limit(a.vsock, limit).expect("limit A");
    phase(
        &format!("vsock echo, A's receive direction limited to {RX_LIMIT_KIB} KiB/s, B unlimited"),
        counts,
        &kib,
        seconds,
    );
    a.vm.set_rx_rate_limit(a.vsock, RateLimit::unlimited())
        .expect("lift A's limit");
    phase("vsock echo, both unlimited again", counts, &kib, seconds);
    for echo in [a, b] {
        let _ = echo.stream.shutdown(Shutdown::Both);
        echo.vm.stop();
    }
}

fn main() {
    let seconds = std::env::var("RATE_LIMIT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let case = std::env::var("RATE_LIMIT_CASE").unwrap_or_default();
    if case.is_empty() || case == "disk" {
        disk(seconds);
    }
    if case.is_empty() || case == "vsock-rx" {
        vsock_rx(seconds);
    }
}
