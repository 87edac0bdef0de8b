//! Where the tail of a fork goes (issue 14, item 3), without criterion: `FORK_TAILS_N` forks
//! (else `FORKVM_BENCH_SAMPLES`, else 10,000) per case of a 256 MiB, 2-vCPU test guest with four
//! devices (virtio-blk, -rng, -console, -vsock), each fork's latency and its phases
//! (`forkvm::take_phase_timings`; `FORKVM_PHASES=1` is set here) kept. Cases:
//!
//! - `prepared`: a paused parent, the child prepared (`Vm::prepare_forks(1)`) untimed before
//!   each fork;
//! - `kept_ready`: the same with `Vm::keep_forks_ready(2)`: the refill thread runs meanwhile;
//! - `unprepared`: a paused parent, no child prepared;
//! - `running`: a running parent (the guest spins and writes) forked with a prepared child; the
//!   parent's pause ([`Vm::last_pause`]) is the figure there.
//!
//! - `unprepared_1vcpu`: the same as `unprepared` for a 128 MiB parent with one vCPU and no
//!   devices (the shape zeroboot forks, for comparison);
//! - `kvm_floor`: what this host's KVM alone takes to make a VM of the same shape, timed from
//!   plain `kvm-ioctls` calls (`KVM_CREATE_VM`, the 256 MiB and identity-page memory slots,
//!   `KVM_SET_TSS_ADDR`, `KVM_CREATE_IRQCHIP`, a `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` per vCPU), for
//!   both shapes above: the
//!   floor under an unprepared fork, which makes all of that in its path.
//!
//! `FORK_TAILS_SECCOMP=off` turns forkvm's seccomp filters off for the run (they are on by
//! default), to measure what they cost.
//!
//! Each case prints p50/p90/p99/max, then the mean of each phase over the forks at or above the
//! 99th percentile against the mean over the forks around the median, and what no phase covers
//! ("other"): where the slow forks spent their extra time. Each child is dropped and its release
//! waited for (untimed) before the next fork, so teardown does not overlap the forks. The load
//! average before and after each case is printed: the figures mean something only on an
//! otherwise idle machine.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use forkvm::{ConsoleOutput, Vm, VsockConfig};
use forkvm_tests::{TempFile, load_average, mappings, print_percentiles, spinning_guest_with};

/// One fork: its latency, the parent's pause (running parent), and its phases.
struct Sample {
    took: Duration,
    pause: Option<Duration>,
    phases: Vec<(&'static str, u64)>,
}

/// `FORK_TAILS_N`, else `FORKVM_BENCH_SAMPLES` (a quick report run), else 10,000.
fn n() -> usize {
    ["FORK_TAILS_N", "FORKVM_BENCH_SAMPLES"]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.parse().ok())
        .unwrap_or(10_000)
}

/// Waits (untimed) until every child dropped so far is released.
fn settle() {
    let t0 = Instant::now();
    while forkvm::pending_releases() > 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn run_case(name: &str, parent: &Vm, prepare: bool) -> Vec<Sample> {
    let load = load_average();
    let mut samples = Vec::with_capacity(n());
    for _ in 0..n() {
        if prepare {
            parent.prepare_forks(1).unwrap();
        }
        forkvm::take_phase_timings();
        let t0 = Instant::now();
        let children = parent.fork(vec![ConsoleOutput::Discard]).unwrap();
        let took = t0.elapsed();
        samples.push(Sample {
            took,
            pause: parent.last_pause(),
            phases: forkvm::take_phase_timings(),
        });
        drop(children);
        settle();
    }
    println!(
        "{name}: n={} load average before {load}, after {}; {} mappings in the process",
        samples.len(),
        load_average(),
        mappings()
    );
    samples
}

/// Prints the percentiles of `what` over `samples`, then where the slowest 1 % went.
fn report(name: &str, samples: &[Sample], what: impl Fn(&Sample) -> Option<Duration>) {
    let mut values: Vec<(Duration, usize)> = samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| what(s).map(|v| (v, i)))
        .collect();
    if values.is_empty() {
        return;
    }
    let mut durations: Vec<Duration> = values.iter().map(|v| v.0).collect();
    print_percentiles(name, &mut durations);
    values.sort();
    let len = values.len();
    let tail = &values[(len * 99 / 100).min(len - 1)..];
    let middle = &values[len * 45 / 100..(len * 55 / 100).max(len * 45 / 100 + 1)];
    let means = |set: &[(Duration, usize)]| {
        let mut sums: BTreeMap<&'static str, f64> = BTreeMap::new();
        let mut total = 0.0;
        for &(v, i) in set {
            total += v.as_secs_f64() * 1e6;
            for &(phase, ns) in &samples[i].phases {
                // Counts (names ending in their unit) are not times.
                if phase.ends_with("_pages")
                    || phase.ends_with("_runs")
                    || phase.ends_with("prepared")
                    || phase.ends_with("_copied")
                    || phase.ends_with("remapped")
                    || phase.ends_with("depth")
                    || phase.ends_with("rebased")
                {
                    continue;
                }
                *sums.entry(phase).or_default() += ns as f64 / 1e3;
            }
        }
        let count = set.len() as f64;
        (
            total / count,
            sums.into_iter()
                .map(|(k, v)| (k, v / count))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    let (tail_total, tail_phases) = means(tail);
    let (mid_total, mid_phases) = means(middle);
    println!(
        "{name}: mean µs of the {} forks ≥ p99 ({tail_total:.0} µs) against the {} around the median ({mid_total:.0} µs), by phase (nested phases count inside their parent):",
        tail.len(),
        middle.len()
    );
    let mut rows: Vec<(&str, f64, f64)> = tail_phases
        .iter()
        .map(|(k, &t)| (*k, t, mid_phases.get(k).copied().unwrap_or(0.0)))
        .collect();
    rows.sort_by(|a, b| (b.1 - b.2).total_cmp(&(a.1 - a.2)));
    // Every phase that took a microsecond, in either set.
    for (phase, t, m) in rows.iter().filter(|r| r.1 >= 1.0 || r.2 >= 1.0).take(40) {
        println!(
            "  {phase:28} tail {t:9.1}  median {m:9.1}  extra {:9.1}",
            t - m
        );
    }
    let top = |phases: &BTreeMap<&str, f64>| phases.get("fork").copied().unwrap_or(0.0);
    println!(
        "  {:28} tail {:9.1}  median {:9.1}",
        "other (outside `fork`)",
        tail_total - top(&tail_phases),
        mid_total - top(&mid_phases)
    );
}

fn main() {
    // SAFETY: set before any other thread of this process reads the environment.
    unsafe { std::env::set_var("FORKVM_PHASES", "1") };
    forkvm_tests::raise_fd_limit();
    // `FORK_TAILS_SECCOMP=off`: no filters on forkvm's threads, for measuring what they cost.
    if std::env::var("FORK_TAILS_SECCOMP").as_deref() == Ok("off") {
        forkvm::set_seccomp_policy(forkvm::SeccompPolicy::Off);
    }
    println!("fork_tails: seccomp {:?}", forkvm::seccomp_policy());
    let disk = TempFile::with_contents("fork-tails.img", &vec![0u8; 64 << 20]);
    let (parent, _, _) = spinning_guest_with(2, 256, |builder| {
        builder
            .block(disk.path(), false)
            .rng()
            .virtio_console(ConsoleOutput::Discard, None)
            .vsock(VsockConfig::new(3))
    });
    let only = std::env::var("FORK_TAILS_ONLY").unwrap_or_default();
    let wanted = |case: &str| only.is_empty() || only.split(',').any(|c| c == case);

    if wanted("running") {
        // Warm-up: the first forks of a fresh parent differ (the image is made).
        for _ in 0..20 {
            parent.prepare_forks(1).unwrap();
            drop(parent.fork(vec![ConsoleOutput::Discard]).unwrap());
        }
        settle();
        let samples = run_case("running", &parent, true);
        report("fork_tails/running: fork latency", &samples, |s| {
            Some(s.took)
        });
        report("fork_tails/running: parent paused", &samples, |s| s.pause);
    }
    parent.pause().unwrap();
    for (case, prepare, keep) in [
        ("prepared", true, 0),
        ("kept_ready", false, 2),
        ("unprepared", false, 0),
    ] {
        if !wanted(case) {
            continue;
        }
        parent.keep_forks_ready(keep);
        let samples = run_case(case, &parent, prepare);
        parent.keep_forks_ready(0);
        report(&format!("fork_tails/{case}: fork latency"), &samples, |s| {
            Some(s.took)
        });
    }
    drop(parent);
    forkvm::wait_for_releases(Duration::from_secs(60));
    if wanted("unprepared_1vcpu") {
        let (parent, _, _) = spinning_guest_with(1, 128, |builder| builder);
        parent.pause().unwrap();
        let samples = run_case("unprepared_1vcpu", &parent, false);
        report("fork_tails/unprepared_1vcpu: fork latency", &samples, |s| {
            Some(s.took)
        });
        drop(parent);
        forkvm::wait_for_releases(Duration::from_secs(60));
    }
    if wanted("kvm_floor") {
        kvm_floor(2, 256);
        kvm_floor(1, 128);
    }
}

/// The `kvm_floor` case: KVM's own calls for a VM of `vcpus` vCPUs and `mib` MiB, `n()` times.
fn kvm_floor(vcpus: u64, mib: u64) {
    use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, kvm_userspace_memory_region};
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let map = |size: usize| {
        // SAFETY: a new private anonymous mapping, unmapped by nothing while the process runs
        // (the benchmark's end).
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        at as u64
    };
    let (ram, identity) = (map((mib << 20) as usize), map(4096));
    let steps = ["create_vm", "memory_slots", "tss_irqchip", "vcpus"];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); steps.len() + 1];
    let load = load_average();
    for _ in 0..n() {
        let t0 = Instant::now();
        let vm = kvm.create_vm().unwrap();
        let t1 = Instant::now();
        for (slot, flags, guest_phys_addr, memory_size, userspace_addr) in [
            (0, 0, 0, mib << 20, ram),
            (1, KVM_MEM_READONLY, 0xfeff_c000, 4096, identity),
        ] {
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr,
                memory_size,
                userspace_addr,
            };
            // SAFETY: both mappings stay for the life of the process, longer than the VM.
            unsafe { vm.set_user_memory_region(region) }.unwrap();
        }
        let t2 = Instant::now();
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        let t3 = Instant::now();
        let fds: Vec<_> = (0..vcpus)
            .map(|id| {
                let fd = vm.create_vcpu(id).unwrap();
                fd.set_cpuid2(&cpuid).unwrap();
                fd
            })
            .collect();
        let t4 = Instant::now();
        for (i, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4)]
            .iter()
            .enumerate()
        {
            times[i].push(*b - *a);
        }
        drop(fds);
        drop(vm);
    }
    let name = format!("kvm_floor/{vcpus}vcpu_{mib}MiB");
    println!(
        "{name}: n={} load average before {load}, after {}",
        n(),
        load_average()
    );
    for (step, values) in steps.iter().chain(["all"].iter()).zip(&mut times) {
        print_percentiles(&format!("fork_tails/{name}: {step}"), values);
    }
}
