//! Forks at scale, without criterion (a round of 1,000 children takes seconds to tear down, so
//! each case runs a fixed number of rounds and prints its figures):
//!
//! - `fork(n)` for n = 10, 100, 1,000 children of a paused, halted 256 MiB, 2-vCPU test guest
//!   (`mode=halt`: the children do not compete for the CPUs), one call each: total time and per
//!   child, with and without the children prepared ahead ([`Vm::prepare_forks`], untimed);
//! - density: host memory per child while 1,000 halted children run, before they write: this
//!   process's `RssAnon`/`RssFile`/`RssShmem` and PSS, and kernel memory from `/proc/meminfo`
//!   (KVM allocates per-VM metadata, e.g. memory slot rmaps, that no process's RSS shows). Other
//!   processes on the machine move `/proc/meminfo` too;
//! - lazy-fault tail: after `fork(1)` of a paused `mode=touch` parent, the time from the host
//!   setting the child's flag until the child reports it wrote one byte per page over 64 MiB
//!   (each first write a KVM page fault and a copy-on-write copy), against the same in a VM that
//!   was never forked, and the host-side equivalent (`Vm::write_memory` of one byte per page).
//!
//! Each `fork(n)` call is also a timeline: the time from the call until each child was started
//! (its threads running), from forkvm's phase probes (`FORKVM_PHASES=1`, which this benchmark turns
//! on: a clock read per phase, ~µs per child), `capture` plus the `fork.spawn` of each child so
//! far. The children are returned together at the end of the call; the timeline and the per-child
//! spawn percentiles go to the report (`forkvm_tests::report`) for `docs/plots/fork1000.svg`.
//!
//! `FORK_SCALE_MAX=N` caps n (default 1,000).

use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, ConsoleOutput, Vm, VmBuilder};
use forkvm_tests::{
    MEMINFO, cpu_time, meminfo, open_fds, print_percentiles, print_percentiles_ns, proc_status,
    raise_fd_limit, record_series, test_guest, wait_for_output,
};

const VCPUS: u32 = 2;
const MIB: u64 = 1 << 20;

fn quiet(n: usize) -> Vec<ConsoleOutput> {
    (0..n).map(|_| ConsoleOutput::Discard).collect()
}

/// A started test guest in `cmdline`'s mode, once its console shows `ready`.
fn guest(cmdline: &str, memory_mib: u64, ready: &str) -> (Vm, ConsoleBuffer) {
    let console = ConsoleBuffer::new();
    let vm = VmBuilder::new()
        .kernel(test_guest())
        .vcpus(VCPUS)
        .memory_mib(memory_mib)
        .cmdline(cmdline)
        .console(ConsoleOutput::Buffer(console.clone()))
        .build()
        .unwrap();
    vm.start().unwrap();
    wait_for_output(&console, ready);
    (vm, console)
}

/// This process's `Pss` from `/proc/self/smaps_rollup`, in kB.
fn pss() -> i64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// How many mappings this process has (`/proc/sys/vm/max_map_count` bounds them).
fn maps() -> i64 {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    text.lines().count() as i64
}

/// Memory figures of this process and the kernel, in kB.
struct Memory {
    process: [i64; 6],
    kernel: Vec<i64>,
}

impl Memory {
    fn now() -> Self {
        let status = |f| proc_status(f) as i64;
        Self {
            process: [
                status("RssAnon"),
                status("RssFile"),
                status("RssShmem"),
                pss(),
                status("Threads"),
                maps(),
            ],
            kernel: meminfo(),
        }
    }

    /// Prints what grew from `before` to now, per VM of `vms`.
    fn print_growth(before: &Self, vms: usize, what: &str) {
        let now = Self::now();
        let per = |a: i64, b: i64| (a - b) as f64 / vms as f64;
        let names = ["RssAnon", "RssFile", "RssShmem", "Pss"];
        let mut line = format!("density/{what}: per VM ({vms}):");
        for (i, name) in names.iter().enumerate() {
            line += &format!(" {name} {:.1} KiB,", per(now.process[i], before.process[i]));
        }
        line += &format!(
            " threads {:.1}, mappings {:.1};",
            per(now.process[4], before.process[4]),
            per(now.process[5], before.process[5])
        );
        for (i, name) in MEMINFO.iter().enumerate() {
            line += &format!(" {name} {:+.1} KiB", per(now.kernel[i], before.kernel[i]));
        }
        println!("{line}");
    }
}

fn fork_n(max: usize) {
    let (parent, _) = guest("mode=halt", 256, "halting");
    parent.pause().unwrap();
    // The first fork freezes the parent's RAM; later ones reuse the image.
    drop(parent.fork(quiet(1)).unwrap());
    for n in [10, 100, 1000] {
        if n > max {
            continue;
        }
        let rounds = match n {
            10 => 10,
            100 => 3,
            _ => 1,
        };
        for prepared in [false, true] {
            let name = format!("fork_n/{n}{}", if prepared { "_prepared" } else { "" });
            let mut totals = Vec::new();
            for _ in 0..rounds {
                let fds = open_fds();
                let before = Memory::now();
                if prepared {
                    let t0 = Instant::now();
                    parent.prepare_forks(n).unwrap();
                    println!(
                        "{name}: prepare_forks({n}) {:.1} ms (untimed in the fork)",
                        t0.elapsed().as_secs_f64() * 1e3
                    );
                }
                forkvm::take_phase_timings();
                let t0 = Instant::now();
                let children = match parent.fork(quiet(n)) {
                    Ok(children) => children,
                    Err(e) => {
                        println!("{name}: fork failed after {:?}: {e}", t0.elapsed());
                        return;
                    }
                };
                let took = t0.elapsed();
                totals.push(took);
                timeline(&name, n, took);
                println!(
                    "{name}: {:.1} ms, {:.1} µs per child; fds +{}",
                    took.as_secs_f64() * 1e3,
                    took.as_secs_f64() * 1e6 / n as f64,
                    open_fds() - fds,
                );
                // Halted children use no CPU: check over half a second.
                let (cpu, t0) = (cpu_time(), Instant::now());
                std::thread::sleep(Duration::from_millis(500));
                println!(
                    "{name}: the process used {:.1}% of a CPU while the children idled",
                    (cpu_time() - cpu).as_secs_f64() * 100.0 / t0.elapsed().as_secs_f64()
                );
                if n == 1000 {
                    let what = if prepared { "prepared" } else { "not_prepared" };
                    Memory::print_growth(&before, n, &format!("{n}_children_{what}"));
                }
                forkvm::take_phase_timings();
                let t0 = Instant::now();
                let mut children = children;
                children.drain(..).for_each(drop);
                let vms_dropped = t0.elapsed();
                drop(children);
                let dropped = t0.elapsed();
                // Where the VMs' drops went (the phases of `Vm::drop`, summed).
                let mut drop_phases = std::collections::BTreeMap::<&str, u64>::new();
                for (phase, ns) in forkvm::take_phase_timings() {
                    if phase.starts_with("vm.drop") {
                        *drop_phases.entry(phase).or_default() += ns;
                    }
                }
                for (phase, ns) in drop_phases {
                    println!("{name}:   {phase} {:.1} ms in all", ns as f64 / 1e6);
                }
                // The KVM VMs, vCPUs and RAM go on the reaper's threads (`forkvm::pending_releases`).
                let released = forkvm::wait_for_releases(Duration::from_secs(120));
                println!(
                    "{name}: dropping {n} children returned after {:.1} ms ({:.1} ms the VMs, the rest their `Vec`'s buffer); all released after {:.2} s{}",
                    dropped.as_secs_f64() * 1e3,
                    vms_dropped.as_secs_f64() * 1e3,
                    t0.elapsed().as_secs_f64(),
                    if released {
                        ""
                    } else {
                        " (not all within 120 s)"
                    }
                );
            }
            print_percentiles(&format!("{name}: total"), &mut totals);
        }
    }
}

/// Reports when each child of the `fork(n)` call that took `took` was started, from the phase
/// probes: `capture`, then each child's `fork.spawn`, in order.
fn timeline(name: &str, n: usize, took: Duration) {
    let phases = forkvm::take_phase_timings();
    let capture: u64 = phases
        .iter()
        .filter(|(phase, _)| *phase == "capture")
        .map(|(_, ns)| ns)
        .sum();
    let spawns: Vec<u64> = phases
        .iter()
        .filter(|(phase, _)| *phase == "fork.spawn")
        .map(|(_, ns)| *ns)
        .collect();
    if spawns.len() != n {
        println!(
            "{name}: no timeline ({} spawns timed; FORKVM_PHASES=1?)",
            spawns.len()
        );
        return;
    }
    let started: Vec<u64> = spawns
        .iter()
        .scan(capture, |t, spawn| {
            *t += spawn;
            Some(*t)
        })
        .collect();
    let total = took.as_nanos() as u64;
    let last = started.last().copied().unwrap_or(capture);
    println!(
        "{name}: timeline: capture {:.2} ms, last child started at {:.1} ms, call returned at {:.1} ms",
        capture as f64 / 1e6,
        last as f64 / 1e6,
        total as f64 / 1e6,
    );
    print_percentiles_ns(&format!("{name}: spawn per child"), &spawns);
    record_series(
        &format!("{name}: timeline"),
        serde_json::json!({ "n": n, "unit": "ns", "capture": capture, "total": total, "started": started }),
    );
}

/// A console whose text a thread can wait for: each write appends and wakes the waiter.
struct Watched {
    text: Arc<Mutex<Vec<u8>>>,
    wake: mpsc::Receiver<()>,
}

fn watched() -> (ConsoleOutput, Watched) {
    let text = Arc::new(Mutex::new(Vec::new()));
    let (tx, wake) = mpsc::channel();
    let sink = text.clone();
    let console = ConsoleOutput::Callback(Box::new(move |bytes| {
        sink.lock().unwrap().extend_from_slice(bytes);
        let _ = tx.send(());
    }));
    (console, Watched { text, wake })
}

impl Watched {
    /// Waits (at most 30 s) until the text holds `needle` followed by a newline; returns what
    /// follows `needle` on that line.
    fn wait_for(&self, needle: &str) -> String {
        loop {
            let text = String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned();
            if let Some((line, _)) = text.split(needle).nth(1).and_then(|r| r.split_once('\n')) {
                return line.to_owned();
            }
            self.wake
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no {needle:?} on the console: {text}"));
        }
    }
}

/// The guest address of `mode=touch`'s flag, from its console.
fn flag_address(console: &Watched) -> u64 {
    let hex = console.wait_for("flag at ");
    u64::from_str_radix(hex.trim().trim_start_matches("0x"), 16).unwrap()
}

/// Sets `mode=touch`'s flag and times until the guest reports that it touched its pages.
fn time_touch(vm: &Vm, console: &Watched, flag: u64) -> Duration {
    let t0 = Instant::now();
    vm.write_memory(flag, &1u64.to_le_bytes()).unwrap();
    console.wait_for("touched ");
    t0.elapsed()
}

fn lazy_faults() {
    const ROUNDS: usize = 10;
    const TOUCH_MIB: u64 = 64;
    let cmdline = format!("mode=touch touch_mib={TOUCH_MIB}");
    for mib in [256, 4096] {
        // Never forked: the guest's writes fill fresh memfd pages.
        let mut fresh = Vec::new();
        for _ in 0..ROUNDS {
            let (output, console) = watched();
            let vm = VmBuilder::new()
                .kernel(test_guest())
                .vcpus(VCPUS)
                .memory_mib(mib)
                .cmdline(&cmdline)
                .console(output)
                .build()
                .unwrap();
            vm.start().unwrap();
            let flag = flag_address(&console);
            fresh.push(time_touch(&vm, &console, flag));
        }
        print_percentiles(
            &format!("lazy_fault/never_forked/{mib}: guest touches 64 MiB"),
            &mut fresh,
        );

        for populated in [false, true] {
            forked_touches(mib, &cmdline, populated);
        }
    }
}

/// Lazy faults of children of a paused `mode=touch` parent of `mib` MiB; with `populated`, the
/// host wrote every page of the range into the parent before the fork (the children copy data
/// pages), otherwise the range is a hole in the image.
fn forked_touches(mib: u64, cmdline: &str, populated: bool) {
    const ROUNDS: usize = 10;
    const TOUCH_MIB: u64 = 64;
    let (output, console) = watched();
    let parent = VmBuilder::new()
        .kernel(test_guest())
        .vcpus(VCPUS)
        .memory_mib(mib)
        .cmdline(cmdline)
        .console(output)
        .build()
        .unwrap();
    parent.start().unwrap();
    let flag = flag_address(&console);
    parent.pause().unwrap();
    if populated {
        for page in 0..TOUCH_MIB * MIB / 4096 {
            parent.write_memory(4 * MIB + page * 4096, &[7]).unwrap();
        }
    }
    let name = if populated {
        "child_of_data"
    } else {
        "child_of_holes"
    };
    let (mut guest_side, mut host_side, mut forks) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (output, console) = watched();
        let t0 = Instant::now();
        let child = parent.fork(vec![output]).unwrap().remove(0);
        forks.push(t0.elapsed());
        guest_side.push(time_touch(&child, &console, flag));
        drop(child);

        let child = parent.fork(quiet(1)).unwrap().remove(0);
        child.pause().unwrap();
        let t0 = Instant::now();
        for page in 0..TOUCH_MIB * MIB / 4096 {
            child.write_memory(4 * MIB + page * 4096, &[1]).unwrap();
        }
        host_side.push(t0.elapsed());
    }
    print_percentiles(
        &format!("lazy_fault/{name}/{mib}: the fork itself"),
        &mut forks,
    );
    print_percentiles(
        &format!("lazy_fault/{name}/{mib}: guest touches 64 MiB"),
        &mut guest_side,
    );
    print_percentiles(
        &format!("lazy_fault/{name}/{mib}: host writes a byte per page of 64 MiB"),
        &mut host_side,
    );
}

fn main() {
    if std::env::var_os("FORKVM_PHASES").is_none() {
        // SAFETY: no other thread runs yet, so none reads the environment meanwhile.
        unsafe { std::env::set_var("FORKVM_PHASES", "1") };
    }
    // Criterion-style arguments (`--bench`) are accepted and ignored.
    let max = std::env::var("FORK_SCALE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let limit = raise_fd_limit();
    println!("fork_scale: open-file limit {limit}");
    let only = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let run = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    if run("lazy_fault") {
        lazy_faults();
    }
    if run("fork_n") {
        fork_n(max);
    }
}
