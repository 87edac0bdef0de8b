//! Latency of the guest's serial output to the host: a byte written to the echo guest's serial
//! input comes back on its console, and the time from the write to its arrival is taken per byte
//! (p50/p90/p99), for output to a `ConsoleOutput::Callback` (delivered on a thread of its own,
//! off the seccomp-filtered vCPU thread) and to a pipe written by the vCPU thread itself (a
//! `ConsoleOutput::File` over the pipe), which has no extra thread. Both include the input path
//! (event loop → UART → the guest's polling loop). `FORKVM_BENCH_SAMPLES` sets the count
//! (default 1000). Results: `docs/seccomp.md`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forkvm::{ConsoleInput, ConsoleOutput, VmBuilder};
use forkvm_tests::test_guest;

fn samples() -> usize {
    std::env::var("FORKVM_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Round trips of one byte through the echo guest whose console is `output`; `arrived` yields
/// the instant each echoed `x` reached the host.
fn round_trips(output: ConsoleOutput, arrived: &mpsc::Receiver<Instant>) -> Vec<Duration> {
    let (reader, mut writer) = std::io::pipe().unwrap();
    let vm = VmBuilder::new()
        .kernel(test_guest())
        .memory_mib(32)
        .cmdline("mode=echo")
        .debug_exit(true)
        .console(output)
        .console_input(ConsoleInput::Fd(reader.into()))
        .build()
        .unwrap();
    vm.start().unwrap();
    // Warm-up, which also lets the banner through.
    for _ in 0..20 {
        writer.write_all(b"x").unwrap();
        arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    let times = (0..samples())
        .map(|_| {
            while arrived.try_recv().is_ok() {}
            let t0 = Instant::now();
            writer.write_all(b"x").unwrap();
            let t1 = arrived.recv_timeout(Duration::from_secs(10)).unwrap();
            t1.duration_since(t0)
        })
        .collect();
    writer.write_all(b"q").unwrap();
    vm.wait().unwrap();
    times
}

fn report(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let at = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    println!(
        "console_callback/{name}: n={} p50={:?} p90={:?} p99={:?}",
        times.len(),
        at(50),
        at(90),
        at(99)
    );
}

fn main() {
    let (sender, arrived) = mpsc::channel();
    let callback = ConsoleOutput::Callback(Box::new(move |bytes: &[u8]| {
        let now = Instant::now();
        for _ in bytes.iter().filter(|&&b| b == b'x') {
            let _ = sender.send(now);
        }
    }));
    report("callback", round_trips(callback, &arrived));

    let (mut pipe_reader, pipe_writer) = std::io::pipe().unwrap();
    let (sender, arrived) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe_reader.read(&mut buf) {
            let now = Instant::now();
            for _ in buf[..n].iter().filter(|&&b| b == b'x') {
                let _ = sender.send(now);
            }
        }
    });
    let path = format!("/proc/self/fd/{}", pipe_writer.as_raw_fd());
    let times = round_trips(ConsoleOutput::File(path.into()), &arrived);
    drop(pipe_writer);
    report("pipe written by the vCPU thread", times);
    drop(arrived);
    assert!(forkvm::wait_for_releases(Duration::from_secs(30)));
    let _ = reader.join();
}
