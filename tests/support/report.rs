//! Benchmark figures as a report: sample counts from the environment, percentiles printed and
//! also appended as JSON lines (one file per benchmark binary) that `scripts/bench-report.sh`
//! turns into the README's table and the plots in `docs/plots/`.
//!
//! Where: `$FORKVM_BENCH_OUT`, else `target/bench-report/` under the repository root; each line
//! is one figure: `bench`, `name`, `unit` (`ns`), `n`, `p50`, `p90`, `p99`, `max`, `samples` (all
//! of them, in the order taken), `at` (Unix seconds) and `load` (the 1-minute load average then:
//! how busy the machine was), or a series ([`record_series`]).
//! Lines are appended: the report reads the newest line of each name.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Samples per case for the fork, restore and pause benchmarks: `var` if set, else
/// `FORKVM_BENCH_SAMPLES`, else 1,000.
pub fn sample_count(var: &str) -> usize {
    [var, "FORKVM_BENCH_SAMPLES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1000)
}

/// The `p`-th percentile (0–100, nearest rank) of `sorted`; zero if empty.
pub fn percentile_ns(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints `name`'s sample count, p50, p90, p99 and maximum (in ms; `samples` in nanoseconds,
/// in the order taken) and appends them with the samples to this benchmark's report file.
pub fn print_percentiles_ns(name: &str, samples: &[u64]) {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let [p50, p90, p99] = [50.0, 90.0, 99.0].map(|p| percentile_ns(&sorted, p));
    let max = sorted.last().copied().unwrap_or(0);
    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "{name}: n={} p50={:.3} ms p90={:.3} ms p99={:.3} ms max={:.3} ms",
        sorted.len(),
        ms(p50),
        ms(p90),
        ms(p99),
        ms(max),
    );
    if sorted.is_empty() {
        return;
    }
    write_line(serde_json::json!({
        "name": name,
        "unit": "ns",
        "n": sorted.len(),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": max,
        "samples": samples,
    }));
}

/// [`print_percentiles_ns`] of durations (`samples` stays as it is: `&mut` is the signature the
/// benchmarks call).
pub fn print_percentiles(name: &str, samples: &mut [Duration]) {
    let ns: Vec<u64> = samples.iter().map(|d| d.as_nanos() as u64).collect();
    print_percentiles_ns(name, &ns);
}

/// Appends a series (e.g. the time each of fork(1000)'s children was running) under `name` to
/// this benchmark's report file: `fields` plus `name`, `kind: "series"`, `bench` and `at`.
pub fn record_series(name: &str, mut fields: serde_json::Value) {
    if let Some(map) = fields.as_object_mut() {
        map.insert("name".into(), name.into());
        map.insert("kind".into(), "series".into());
    }
    write_line(fields);
}

/// The report directory.
pub fn report_dir() -> PathBuf {
    std::env::var_os("FORKVM_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target/bench-report"))
}

/// This benchmark binary's name: cargo names it `<bench>-<hash>`.
fn bench_name() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe.file_stem().unwrap_or_default().to_string_lossy();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => stem.into_owned(),
    }
}

/// The 1-minute load average (`/proc/loadavg`), if readable.
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Appends `line` (with `bench`, `at` and `load` added) to `<report dir>/<bench>.jsonl`; a failure is
/// printed, not fatal (the printed figures stand).
fn write_line(mut line: serde_json::Value) {
    let bench = bench_name();
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if let Some(map) = line.as_object_mut() {
        map.insert("bench".into(), bench.clone().into());
        map.insert("at".into(), at.into());
        map.insert("load".into(), load_average().into());
    }
    let dir = report_dir();
    let path = dir.join(format!("{bench}.jsonl"));
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        writeln!(file, "{line}")
    });
    if let Err(e) = written {
        println!("(cannot append to {}: {e})", path.display());
    }
}
