//! What idle children cost (issue 14, items 5 and 6), without criterion: boots forkvm's Linux
//! image once (agent answering, then left idle), forks N children of it in one call for each N of
//! `IDLE_CHILDREN` (default `100`; e.g. `100,1000`), lets them sit, and prints:
//!
//! - CPU: this process's share of one core over `IDLE_WINDOW_S` seconds (default 10) with only
//!   the parent, then with the children alive; which threads burned it (grouped by name, from
//!   `/proc/self/task/*/schedstat`); the whole machine's busy share (other work moves it too);
//! - the guest side: KVM's own counters of every vCPU of the process over the window (exits,
//!   halts, halt polling, ..., from each vCPU's binary statistics fd), per child and second;
//!   inside the parent guest, the interrupts (`/proc/interrupts`) and the agent's context
//!   switches over a window;
//! - `fork(1)` latency p50/p90/p99 of the parent (`IDLE_FORKS` forks, default 30, each child
//!   dropped untimed) without children and while the N live;
//! - kernel memory per child: `/proc/meminfo` deltas across the fork of N (MemAvailable, Slab,
//!   ..., SecPageTables), with this process's RSS and threads;
//! - with `IDLE_VCPUS=2`, the same for a 2-vCPU parent (its kernel has no SMP: the second vCPU
//!   never starts; it only shows what a vCPU costs the host).
//!
//! First, what an in-kernel PIT costs: `IDLE_PIT_VMS` (default 200; 0 skips it) bare KVM VMs
//! without, then with a PIT each. `IDLE_MIB` sets the guest RAM (default 256). The window and the memory figures include what
//! other processes on the machine do.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, ConsoleOutput, Vm};
use forkvm_agent_client::Agent;
use forkvm_tests::{
    MEMINFO, cpu_time, env_u64, linux_image_vm, load_average, meminfo, open_fds, proc_status,
    raise_fd_limit, start_linux_image,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Busy and total jiffies of the whole machine (`/proc/stat`).
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// On-CPU nanoseconds of every thread of this process, summed per thread name with its digits
/// removed (`forkvm-vcpu0` and `forkvm-vcpu1` are one group), and how many threads each has.
fn thread_cpu() -> BTreeMap<String, (u64, usize)> {
    let mut groups = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return groups;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let name: String = name
            .trim()
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0u64);
        let entry = groups.entry(name).or_insert((0, 0));
        entry.0 += ns;
        entry.1 += 1;
    }
    groups
}

/// `KVM_GET_STATS_FD` (`_IO(KVMIO, 0xce)`).
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
/// `KVM_STATS_TYPE_MASK` and `KVM_STATS_TYPE_CUMULATIVE` of a statistics descriptor's flags.
const STATS_TYPE_MASK: u32 = 0xf;
const STATS_CUMULATIVE: u32 = 0;

/// Binary statistics fds (KVM's `Documentation/virt/kvm/api.rst`, `KVM_GET_STATS_FD`) of every
/// vCPU of this process (`anon_inode:kvm-vcpu:N` in `/proc/self/fd`), opened while `vms` (all the
/// process's VMs) are paused: the ioctl takes the vCPU's mutex, which `KVM_RUN` holds, so on a
/// running vCPU it would wait for the guest's next exit to user space. Reading the fds later
/// takes no lock.
fn vcpu_stats_fds(vms: &[&Vm]) -> Vec<OwnedFd> {
    forkvm::wait_for_releases(Duration::from_secs(60));
    let paused: Vec<bool> = vms.iter().map(|vm| vm.pause().is_ok()).collect();
    let mut stats = Vec::new();
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        for fd in fds.flatten() {
            let is_vcpu = std::fs::read_link(fd.path())
                .map(|l| l.to_string_lossy().starts_with("anon_inode:kvm-vcpu"))
                .unwrap_or(false);
            let fd = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
            if let (true, Some(fd)) = (is_vcpu, fd) {
                // SAFETY: the ioctl takes no argument and returns a new fd or -1.
                let new = unsafe { libc::ioctl(fd, KVM_GET_STATS_FD, 0) };
                if new >= 0 {
                    // SAFETY: `new` is a new fd that nothing else owns.
                    stats.push(unsafe { OwnedFd::from_raw_fd(new) });
                }
            }
        }
    }
    for (vm, paused) in vms.iter().zip(paused) {
        if paused {
            let _ = vm.resume();
        }
    }
    stats
}

/// The cumulative counters of the vCPUs of `fds`, summed per name.
fn vcpu_stats(fds: &[OwnedFd]) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for fd in fds {
        read_stats(fd, &mut sums);
    }
    sums
}

fn pread(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> bool {
    // SAFETY: pread writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    n == buf.len() as isize
}

/// Adds the cumulative counters of the statistics fd `fd` to `sums`; false if it is unreadable.
fn read_stats(fd: &OwnedFd, sums: &mut BTreeMap<String, u64>) -> bool {
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
    let mut header = [0u8; 24];
    if !pread(fd, &mut header, 0) {
        return false;
    }
    let (name_size, num_desc) = (u32_at(&header, 4) as usize, u32_at(&header, 8) as usize);
    let (desc_offset, data_offset) = (u32_at(&header, 16), u32_at(&header, 20));
    let desc_size = 16 + name_size;
    let mut descs = vec![0u8; desc_size * num_desc];
    if !pread(fd, &mut descs, u64::from(desc_offset)) {
        return false;
    }
    for desc in descs.chunks_exact(desc_size) {
        let flags = u32_at(desc, 0);
        let size = u16::from_le_bytes([desc[6], desc[7]]);
        let offset = u32_at(desc, 8);
        if flags & STATS_TYPE_MASK != STATS_CUMULATIVE || size != 1 {
            continue;
        }
        let name = &desc[16..];
        let name = String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(0)])
            .into_owned();
        let mut value = [0u8; 8];
        if pread(fd, &mut value, u64::from(data_offset) + u64::from(offset)) {
            *sums.entry(name).or_insert(0) += u64::from_le_bytes(value);
        }
    }
    true
}

/// A window's figures.
struct Window {
    cpu: Duration,
    wall: Duration,
    machine: (u64, u64),
    threads: BTreeMap<String, (u64, usize)>,
    stats: BTreeMap<String, u64>,
    vcpus: usize,
}

/// Sits for `window` and measures what this process (and the machine) spent meanwhile.
fn measure(window: Duration, vms: &[&Vm]) -> Window {
    let fds = vcpu_stats_fds(vms);
    // The pause and resume above are not part of the window.
    std::thread::sleep(Duration::from_secs(1));
    let (threads0, stats0, machine0) = (thread_cpu(), vcpu_stats(&fds), machine_jiffies());
    let (cpu0, t0) = (cpu_time(), Instant::now());
    std::thread::sleep(window);
    let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
    let (threads1, stats1, machine1) = (thread_cpu(), vcpu_stats(&fds), machine_jiffies());
    let vcpus = fds.len();
    let threads = threads1
        .into_iter()
        .map(|(name, (ns, n))| {
            let before = threads0.get(&name).map_or(0, |t| t.0);
            (name, (ns.saturating_sub(before), n))
        })
        .collect();
    let stats = stats1
        .into_iter()
        .map(|(name, v)| {
            let before = stats0.get(&name).copied().unwrap_or(0);
            (name, v.saturating_sub(before))
        })
        .collect();
    Window {
        cpu,
        wall,
        machine: (machine1.0 - machine0.0, machine1.1 - machine0.1),
        threads,
        stats,
        vcpus,
    }
}

impl Window {
    fn print(&self, name: &str, vms: usize) {
        let wall = self.wall.as_secs_f64();
        println!(
            "{name}: process CPU {:.1}% of a core over {wall:.1} s ({:.3}% per VM of {vms}); \
             machine busy {:.1}% of its CPUs; load {}",
            self.cpu.as_secs_f64() * 100.0 / wall,
            self.cpu.as_secs_f64() * 100.0 / wall / vms as f64,
            self.machine.0 as f64 * 100.0 / self.machine.1.max(1) as f64,
            load_average(),
        );
        let mut threads: Vec<_> = self.threads.iter().collect();
        threads.sort_by_key(|(_, (ns, _))| std::cmp::Reverse(*ns));
        let line: Vec<String> = threads
            .iter()
            .take(6)
            .map(|(name, (ns, n))| format!("{name}×{n} {:.2}%", *ns as f64 / 1e7 / wall))
            .collect();
        println!("{name}: threads (share of a core): {}", line.join(", "));
        let per = |v: u64| v as f64 / vms as f64 / wall;
        let mut stats: Vec<_> = self.stats.iter().filter(|(_, v)| **v > 0).collect();
        stats.sort_by_key(|(_, v)| std::cmp::Reverse(**v));
        let line: Vec<String> = stats
            .iter()
            .filter(|(n, _)| !n.ends_with("_ns") && !n.ends_with("_hist"))
            .take(14)
            .map(|(n, v)| format!("{n} {:.1}", per(**v)))
            .collect();
        println!(
            "{name}: KVM counters of {} vCPUs, per VM and second: {}",
            self.vcpus,
            line.join(", ")
        );
        let line: Vec<String> = stats
            .iter()
            .filter(|(n, _)| n.ends_with("_ns"))
            .map(|(n, v)| format!("{n} {:.3} ms", per(**v) / 1e6))
            .collect();
        if !line.is_empty() {
            println!("{name}: KVM times per VM and second: {}", line.join(", "));
        }
    }
}

/// This process's memory figures (kB) and thread count, then the kernel's.
fn memory() -> (Vec<i64>, Vec<i64>) {
    let status = |f| proc_status(f) as i64;
    (
        vec![
            status("RssAnon"),
            status("RssFile"),
            status("RssShmem"),
            status("Threads"),
        ],
        meminfo(),
    )
}

fn print_memory(name: &str, before: &(Vec<i64>, Vec<i64>), vms: usize) {
    let now = memory();
    let per = |a: i64, b: i64| (a - b) as f64 / vms as f64;
    let mut line = format!("{name}: per child ({vms}):");
    for (i, field) in ["RssAnon", "RssFile", "RssShmem"].iter().enumerate() {
        line += &format!(" {field} {:+.1} KiB,", per(now.0[i], before.0[i]));
    }
    line += &format!(" threads {:+.1};", per(now.0[3], before.0[3]));
    for (i, field) in MEMINFO.iter().enumerate() {
        line += &format!(" {field} {:+.1} KiB", per(now.1[i], before.1[i]));
    }
    println!("{line}");
}

/// `IDLE_FORKS` forks of one child each, timed, each child dropped untimed.
fn fork_latency(name: &str, vm: &Vm, n: usize) {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let child = vm.fork([ConsoleOutput::Discard]);
        samples.push(t0.elapsed());
        drop(child.expect("fork"));
        forkvm::wait_for_releases(Duration::from_secs(30));
    }
    samples.sort_unstable();
    let p = |q: f64| {
        let i = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    println!(
        "{name}: fork(1) n={n} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms; load {}",
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0),
        load_average()
    );
}

/// What fires inside the guest of `agent` over `window`, read through the agent's file reads
/// (no process started): every interrupt line of `/proc/interrupts` that moved, the context
/// switches of the whole guest (`/proc/stat`) and of each thread of each process.
fn guest_side(name: &str, agent: &Agent, window: Duration) {
    let read = |path: &str| {
        agent
            .read_file(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    // Interrupts and the guest's context switches are read right at the window's edges, the
    // threads' switches (many reads) outside it: theirs include those reads.
    let interrupts = || {
        let mut counts = BTreeMap::new();
        for line in read("/proc/interrupts").lines().skip(1) {
            let mut words = line.split_whitespace();
            if let (Some(irq), Some(n)) = (words.next(), words.next().and_then(|n| n.parse().ok()))
            {
                let what: Vec<&str> = words.collect();
                counts.insert(format!("irq {irq} {}", what.join(" ")), n);
            }
        }
        for line in read("/proc/stat").lines() {
            if let Some(n) = line
                .strip_prefix("ctxt ")
                .and_then(|n| n.trim().parse().ok())
            {
                counts.insert("context switches".into(), n);
            }
        }
        counts
    };
    let threads = || {
        let mut counts = BTreeMap::new();
        let pids = agent.list("/proc").unwrap_or_default();
        for pid in pids
            .iter()
            .filter(|e| e.name.bytes().all(|b| b.is_ascii_digit()))
        {
            let tasks = agent
                .list(&format!("/proc/{}/task", pid.name))
                .unwrap_or_default();
            for task in tasks {
                let status = read(&format!("/proc/{}/task/{}/status", pid.name, task.name));
                let field = |f: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(f))
                        .map(|v| v.trim().to_owned())
                        .unwrap_or_default()
                };
                let switches: u64 = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
                    .iter()
                    .filter_map(|f| field(f).parse::<u64>().ok())
                    .sum();
                let key = format!("pid {} tid {} {}", pid.name, task.name, field("Name:"));
                counts.insert(key, switches);
            }
        }
        counts
    };
    // The guest's pending timers, if its kernel has /proc/timer_list.
    let timers = read("/proc/timer_list");
    for line in timers
        .lines()
        .filter(|l| l.contains(" #") || l.contains("expires at"))
    {
        println!("{name}: timer_list: {}", line.trim());
    }
    let mut before = threads();
    before.extend(interrupts());
    let t0 = Instant::now();
    std::thread::sleep(window);
    let mut after = interrupts();
    let wall = t0.elapsed().as_secs_f64();
    after.extend(threads());
    println!(
        "{name}: inside the guest, over {wall:.1} s (per second; the reads are agent requests):"
    );
    for (what, n) in &after {
        let delta = n - before.get(what).copied().unwrap_or(0);
        if delta > 0 {
            println!("{name}:   {what}: {:.2}/s ({delta})", delta as f64 / wall);
        }
    }
}

fn case(vcpus: u32, mib: u64, counts: &[usize], window: Duration, forks: usize) {
    let console = ConsoleBuffer::new();
    let t0 = Instant::now();
    let builder = linux_image_vm(mib, &console).vcpus(vcpus);
    let (vm, agent) = start_linux_image(builder, &console, BOOT_TIMEOUT);
    let name = format!("idle/{vcpus}vcpu/{mib}MiB");
    println!("{name}: agent up after {:.1} s", t0.elapsed().as_secs_f64());
    // Let the boot's after-effects settle (the agent's first requests, deferred work).
    std::thread::sleep(Duration::from_secs(3));
    if vcpus == 1 {
        guest_side(&name, &agent, window);
    }
    measure(window, &[&vm]).print(&format!("{name}/parent_only"), 1);
    fork_latency(&format!("{name}/parent_only"), &vm, forks);
    for &n in counts {
        let before = memory();
        let fds = open_fds();
        let t0 = Instant::now();
        let children = match vm.fork((0..n).map(|_| ConsoleOutput::Discard)) {
            Ok(children) => children,
            Err(e) => {
                println!(
                    "{name}/{n}_children: fork failed after {:.1} s: {e}",
                    t0.elapsed().as_secs_f64()
                );
                continue;
            }
        };
        println!(
            "{name}/{n}_children: fork({n}) took {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(2));
        print_memory(&format!("{name}/{n}_children"), &before, n);
        println!(
            "{name}/{n}_children: {:.1} fds per child",
            (open_fds() - fds) as f64 / n as f64
        );
        let vms: Vec<&Vm> = std::iter::once(&vm).chain(&children).collect();
        measure(window, &vms).print(&format!("{name}/{n}_children"), n + 1);
        fork_latency(&format!("{name}/{n}_children"), &vm, forks);
        let alive = children.iter().filter(|c| c.exit().is_none()).count();
        println!("{name}/{n}_children: {alive} of {n} children still running");
        drop(children);
        forkvm::wait_for_releases(Duration::from_secs(300));
    }
    drop(agent);
    vm.stop();
}

/// Raises the hard limit on open files to 100,000 where this process may (a Linux child has ~25
/// fds: 1,000 of them need more than this machine's default hard limit, 20,000), then the soft
/// limit to the hard one.
fn raise_fd_limits() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed, which outlives them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_max < 100_000 {
            limit.rlim_max = 100_000;
            limit.rlim_cur = 100_000;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    raise_fd_limit()
}

/// `KVM_CREATE_VM`, `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2` (`_IOW(KVMIO, 0x77, struct
/// kvm_pit_config)`, 64 bytes).
const KVM_CREATE_VM: libc::c_ulong = 0xae01;
const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xae60;
const KVM_CREATE_PIT2: libc::c_ulong = 0x4040_ae77;

/// What an in-kernel PIT costs the host kernel: `n` bare KVM VMs (irqchip, no memory, no vCPU)
/// without, then with a PIT each, and the `/proc/meminfo` growth and `kvm-pit` threads per VM.
fn pit_cost(n: usize) {
    let Ok(kvm) = std::fs::File::open("/dev/kvm") else {
        println!("pit: no /dev/kvm");
        return;
    };
    let pit_threads = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("kvm-pit"))
            })
            .count() as i64
    };
    for with_pit in [false, true] {
        let (before, threads) = (meminfo(), pit_threads());
        let mut vms = Vec::with_capacity(n);
        for _ in 0..n {
            // SAFETY: the ioctls take an integer or a pointer to a 64-byte config that outlives
            // them; each returns a new fd or -1.
            let fd = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
            if fd < 0 {
                break;
            }
            // SAFETY: `fd` is a new fd that nothing else owns.
            let vm = unsafe { OwnedFd::from_raw_fd(fd) };
            let config = [0u32; 16];
            // SAFETY: as above.
            unsafe {
                libc::ioctl(vm.as_raw_fd(), KVM_CREATE_IRQCHIP, 0);
                if with_pit {
                    libc::ioctl(vm.as_raw_fd(), KVM_CREATE_PIT2, config.as_ptr());
                }
            }
            vms.push(vm);
        }
        std::thread::sleep(Duration::from_millis(200));
        let now = meminfo();
        let per = |i: usize| (now[i] - before[i]) as f64 / vms.len().max(1) as f64;
        let line: Vec<String> = MEMINFO
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, f)| format!("{f} {:+.1} KiB", per(i)))
            .collect();
        println!(
            "pit: {} bare VMs (irqchip{}): per VM {}; kvm-pit threads {:+}",
            vms.len(),
            if with_pit { " + PIT" } else { "" },
            line.join(", "),
            pit_threads() - threads
        );
        drop(vms);
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let pit_vms = env_u64("IDLE_PIT_VMS", 200) as usize;
    if pit_vms > 0 {
        pit_cost(pit_vms);
    }
    println!("idle_children: fd limit {}", raise_fd_limits());
    let counts = env_list("IDLE_CHILDREN", "100");
    let vcpus = env_list("IDLE_VCPUS", "1");
    let window = Duration::from_secs(env_u64("IDLE_WINDOW_S", 10));
    let forks = env_u64("IDLE_FORKS", 30) as usize;
    let mib = env_u64("IDLE_MIB", 256);
    for v in vcpus {
        case(v as u32, mib, &counts, window, forks);
    }
}
