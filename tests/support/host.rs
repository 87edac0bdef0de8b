//! What benchmarks read from the host and their environment: the load average, the kernel's
//! memory counters, this process's CPU time, numeric settings.

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`), as the kernel prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The kB fields of `/proc/meminfo` that [`meminfo`] reads: what KVM allocates per VM shows in
/// them, not in any process's RSS.
pub const MEMINFO: [&str; 7] = [
    "MemAvailable",
    "Slab",
    "SUnreclaim",
    "VmallocUsed",
    "KernelStack",
    "PageTables",
    "SecPageTables",
];

/// The [`MEMINFO`] fields now, in kB (0 where unreadable).
pub fn meminfo() -> Vec<i64> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    MEMINFO
        .iter()
        .map(|field| {
            text.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// The number in environment variable `name`, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time this process used so far, all threads, user and system.
pub fn cpu_time() -> std::time::Duration {
    // SAFETY: getrusage writes only the struct passed, which outlives the call; all-zero bytes
    // are a valid `rusage`.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// How many mappings this process has (lines of `/proc/self/maps`): creating a KVM VM takes
/// every mapping's lock, so its cost grows with them.
pub fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |maps| maps.lines().count())
}
