//! Repeated `fork(1)` of a *running* parent that ran (and wrote memory) since its previous fork
//! (issue 14), without criterion: each case prints p50/p90/p99/max of the fork call and of the
//! parent's pause ([`Vm::last_pause`]) over `FORK_RUNNING_N` forks (else `FORKVM_BENCH_SAMPLES`,
//! else 1,000; also written to the report, `forkvm_tests::report`), the host's
//! `Shmem` (memfds: images) before and after, and, with `FORKVM_PHASES=1`, the new image's size
//! per fork and the p50/p90 of every
//! phase the library times (`forkvm::take_phase_timings`; what each is: `docs/measurements.md`).
//!
//! Every fork uses a prepared child (`Vm::keep_forks_ready(1)`, refilled in the background; the
//! loop waits untimed until it is ready), and the child is dropped untimed after it. Cases:
//!
//! - **Linux** (`guest/kernel/build.sh`, `guest/rootfs/build.sh`, 256 MiB, 1 vCPU, agent
//!   answering): the guest runs `python3` writing one byte into each page of a W MiB bytearray in
//!   a loop (W = 0: no workload, only the idle guest), the parent runs ~`T` ms
//!   (`FORK_RUNNING_T_MS`, default 50) between forks, so each fork follows W MiB written (a Python
//!   loop over 4,096 pages takes well under 50 ms natively);
//! - **test guest** (`mode=spin`, 256 MiB, 1 vCPU): the guest only spins; the *host* writes the
//!   pages (`Vm::write_memory`), so nothing in the guest adds noise: first `touched` MiB once
//!   (what the guest "ever touched"), then W MiB before each fork;
//! - the same VMs' **paused** parent forks, for comparison (the capture is reused).
//!
//! `FORK_RUNNING_LINUX=0` skips the Linux cases; `FORK_RUNNING_MIB` sets the RAM (default 256);
//! `FORK_RUNNING_FAULTS=1` also times, untimed in the fork, the host reading all of each child's
//! RAM below 1 GiB (the first touches of its mappings: lazy faults), the parent held paused.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, ConsoleOutput, Vm};
use forkvm_agent_client::{Command, ProcessEvent};
use forkvm_tests::{
    env_u64, linux_image_vm, print_percentiles_ns, proc_status, sample_count, spinning_guest_sized,
    start_linux_image,
};

const MIB: u64 = 1 << 20;
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i]
}

/// Figures of one case.
#[derive(Default)]
struct Record {
    fork: Vec<u64>,
    pause: Vec<u64>,
    /// With `FORK_RUNNING_FAULTS=1`: how long the host took to read all of each child's RAM
    /// below 1 GiB (first touches: the lazy faults of its mappings), untimed in `fork`.
    child_read: Vec<u64>,
    /// Every phase's values (ns, or counts), over the forks.
    phases: BTreeMap<&'static str, Vec<u64>>,
    rss_kb: (u64, u64),
    shmem_kb: (u64, u64),
    failed: usize,
}

impl Record {
    fn print(mut self, name: &str) {
        let ms = |v: u64| v as f64 / 1e6;
        if self.failed > 0 {
            println!("{name}: {} forks failed (not counted below)", self.failed);
        }
        for (what, samples) in [
            ("fork", &self.fork),
            ("pause", &self.pause),
            ("child_reads_its_ram", &self.child_read),
        ] {
            if !samples.is_empty() {
                print_percentiles_ns(&format!("{name}: {what}"), samples);
            }
        }
        let forks = self.fork.len().max(1) as i64;
        println!(
            "{name}: host Shmem (all memfds, whole machine) {} -> {} MiB ({:+.2} MiB per fork); \
             this process's RssAnon {} -> {} MiB",
            self.shmem_kb.0 / 1024,
            self.shmem_kb.1 / 1024,
            (self.shmem_kb.1 as i64 - self.shmem_kb.0 as i64) as f64 / 1024.0 / forks as f64,
            self.rss_kb.0 / 1024,
            self.rss_kb.1 / 1024,
        );
        // A new image: the data of the one the parent maps plus the parent's own pages.
        let median = |phase: &str| {
            let mut v = self.phases.get(phase).cloned().unwrap_or_default();
            v.sort_unstable();
            pct(&v, 50.0)
        };
        if self.phases.contains_key("image.data_bytes") {
            println!(
                "{name}: new image per fork (p50): {:.1} MiB copied from the mapped image + {:.1} MiB of the parent's own pages",
                median("image.data_bytes") as f64 / MIB as f64,
                (median("freeze.own_pages") * 4096) as f64 / MIB as f64,
            );
        }
        for (phase, values) in &mut self.phases {
            values.sort_unstable();
            let per_fork = values.len() as f64 / forks as f64;
            let (p50, p90) = (pct(values, 50.0), pct(values, 90.0));
            if is_count(phase) {
                println!("{name}:   {phase:<32} p50={p50} p90={p90} ({per_fork:.1}/fork)");
            } else {
                println!(
                    "{name}:   {phase:<32} p50={:.3} ms p90={:.3} ms ({per_fork:.1}/fork)",
                    ms(p50),
                    ms(p90)
                );
            }
        }
    }
}

/// Whether a phase name is a count (pages, bytes, flags) rather than a time.
fn is_count(phase: &str) -> bool {
    [
        "_pages", "_runs", "_bytes", "remapped", "prepared", "depth", "rebased", "copied",
    ]
    .iter()
    .any(|s| phase.ends_with(s))
}

fn rss_kb() -> u64 {
    proc_status("RssAnon")
}

/// `Shmem` of `/proc/meminfo` in kB: memfds (images) included, whoever maps them.
fn shmem_kb() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Shmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Forks `parent` `n` times (one prepared child each), calling `between` before each fork.
fn fork_repeatedly(parent: &Vm, n: usize, mut between: impl FnMut()) -> Record {
    let mut record = Record::default();
    parent.keep_forks_ready(1);
    // Warm-up: the first re-freeze of a freshly started case is not the steady state.
    for _ in 0..3 {
        between();
        drop(parent.fork([ConsoleOutput::Discard]).unwrap());
    }
    record.rss_kb.0 = rss_kb();
    record.shmem_kb.0 = shmem_kb();
    for _ in 0..n {
        let ready = Instant::now();
        while parent.prepared_forks() == 0 && ready.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        between();
        forkvm::take_phase_timings();
        let t0 = Instant::now();
        let children = match parent.fork([ConsoleOutput::Discard]) {
            Ok(children) => children,
            Err(e) => {
                // Reported, not fatal: one failure must not lose the run's other figures.
                println!("fork failed: {}", forkvm::error_chain(&e));
                record.failed += 1;
                forkvm::take_phase_timings();
                continue;
            }
        };
        record.fork.push(t0.elapsed().as_nanos() as u64);
        for (phase, value) in forkvm::take_phase_timings() {
            record.phases.entry(phase).or_default().push(value);
        }
        record
            .pause
            .extend(parent.last_pause().map(|d| d.as_nanos() as u64));
        if std::env::var("FORK_RUNNING_FAULTS").as_deref() == Ok("1") {
            // The parent held paused meanwhile, so that its vCPU does not compete for the CPUs.
            let _hold = parent.pause_guard().unwrap();
            let size = parent.memory_size().min(1 << 30);
            let mut buf = vec![0u8; MIB as usize];
            let t0 = Instant::now();
            for at in (0..size).step_by(MIB as usize) {
                children[0].read_memory(at, &mut buf).unwrap();
            }
            record.child_read.push(t0.elapsed().as_nanos() as u64);
        }
        drop(children);
    }
    record.rss_kb.1 = rss_kb();
    record.shmem_kb.1 = shmem_kb();
    parent.keep_forks_ready(0);
    record
}

fn paused_forks(parent: &Vm, n: usize, name: &str) {
    parent.pause().unwrap();
    let record = fork_repeatedly(parent, n, || {});
    parent.resume().unwrap();
    record.print(name);
}

fn test_guest_cases(mib: u64, n: usize) {
    for touched in [0u64, 128.min(mib / 2)] {
        for written in [0u64, 1, 16] {
            let (parent, _, _) = spinning_guest_sized(1, mib);
            let chunk = vec![0x5au8; MIB as usize];
            // Above the guest's own pages: from 32 MiB up.
            for m in 0..touched {
                parent.write_memory((32 + m) * MIB, &chunk).unwrap();
            }
            let mut round = 0u8;
            let record = fork_repeatedly(&parent, n, || {
                round = round.wrapping_add(1);
                let chunk = vec![round; MIB as usize];
                for m in 0..written {
                    parent.write_memory((32 + m) * MIB, &chunk).unwrap();
                }
                std::thread::sleep(Duration::from_millis(5));
            });
            record.print(&format!(
                "test_guest/{mib}MiB/touched_{touched}MiB/written_{written}MiB/running"
            ));
            if touched == 128.min(mib / 2) && written == 16 {
                paused_forks(
                    &parent,
                    n,
                    &format!("test_guest/{mib}MiB/touched_{touched}MiB/paused"),
                );
            }
        }
    }
}

/// The Python workload: writes one byte into each page of a `mib` MiB bytearray, forever.
fn workload(mib: u64) -> Command {
    let code = format!(
        "import sys\nn={mib}<<20\nb=bytearray(n)\nsys.stdout.write('ready\\n')\nsys.stdout.flush()\n\
         v=0\nwhile True:\n    v=(v+1)&255\n    for i in range(0,n,4096):\n        b[i]=v\n"
    );
    Command::new(["python3", "-c", code.as_str()])
}

fn linux_cases(mib: u64, n: usize, t: Duration) {
    let console = ConsoleBuffer::new();
    let t0 = Instant::now();
    let (vm, agent) = start_linux_image(linux_image_vm(mib, &console), &console, BOOT_TIMEOUT);
    println!(
        "linux/{mib}MiB: agent up after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // `FORK_RUNNING_W_MIB=0` (one value): only that case.
    let only: Option<u64> = std::env::var("FORK_RUNNING_W_MIB")
        .ok()
        .and_then(|w| w.parse().ok());
    for written in [0u64, 1, 16]
        .into_iter()
        .filter(|w| only.is_none_or(|o| o == *w))
    {
        let process = (written > 0).then(|| {
            let process = agent.spawn(&workload(written)).unwrap();
            let mut out = Vec::new();
            while !String::from_utf8_lossy(&out).contains("ready") {
                match process.next(Some(BOOT_TIMEOUT)).unwrap() {
                    Some(ProcessEvent::Output(_, bytes)) => out.extend(bytes),
                    other => panic!(
                        "workload ended: {other:?} {}",
                        String::from_utf8_lossy(&out)
                    ),
                }
            }
            process
        });
        let record = fork_repeatedly(&vm, n, || std::thread::sleep(t));
        record.print(&format!("linux/{mib}MiB/written_{written}MiB/running"));
        if written == 16 {
            paused_forks(
                &vm,
                n,
                &format!("linux/{mib}MiB/written_{written}MiB/paused"),
            );
        }
        if let Some(process) = process {
            process.kill().unwrap();
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let n = sample_count("FORK_RUNNING_N");
    let mib = env_u64("FORK_RUNNING_MIB", 256);
    let t = Duration::from_millis(env_u64("FORK_RUNNING_T_MS", 50));
    println!(
        "fork_running: n={n} T={} ms, phases {}",
        t.as_millis(),
        if std::env::var_os("FORKVM_PHASES").is_some() {
            "on"
        } else {
            "off"
        }
    );
    if env_u64("FORK_RUNNING_TEST_GUEST", 1) == 1 {
        test_guest_cases(mib, n);
    }
    if env_u64("FORK_RUNNING_LINUX", 1) == 1 {
        linux_cases(mib, n, t);
    }
}
