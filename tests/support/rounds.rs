//! Alternating rounds of two set-ups, each on a thread of its own, for the benches' overhead
//! figures (a device with a feature on against the same device without it): short rounds taken
//! in turn see the same load from the rest of the machine, so their ratio means something even
//! where absolute times drift.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use forkvm::{Bucket, RateLimit};

use crate::report::{percentile_ns, print_percentiles_ns};

/// A rate limit that never binds a bench's device (1 TiB/s and 2^30 requests/s), so that only
/// its bookkeeping is measured.
pub fn unbinding_limit() -> RateLimit {
    RateLimit {
        bytes: Some(Bucket::new(1 << 40, Duration::from_secs(1))),
        ops: Some(Bucket::new(1 << 30, Duration::from_secs(1))),
    }
}

/// How many rounds [`compare`] takes: `FORKVM_BENCH_ROUNDS`, 201 by default, at least 21.
pub fn round_count() -> usize {
    usize::try_from(crate::env_u64("FORKVM_BENCH_ROUNDS", 201).max(21)).unwrap_or(usize::MAX)
}

/// A thread that runs `batch` a number of times per round, on request.
pub struct Worker {
    requests: Option<SyncSender<u32>>,
    results: Receiver<Duration>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread: it runs `enter` once (e.g. to put itself under a filter), then waits
    /// for rounds.
    pub fn spawn(
        enter: impl FnOnce() + Send + 'static,
        mut batch: impl FnMut() + Send + 'static,
    ) -> Self {
        let (requests, jobs) = sync_channel::<u32>(1);
        let (done, results) = sync_channel(1);
        let thread = std::thread::spawn(move || {
            enter();
            while let Ok(batches) = jobs.recv() {
                let start = Instant::now();
                for _ in 0..batches {
                    batch();
                }
                if done.send(start.elapsed() / batches.max(1)).is_err() {
                    return;
                }
            }
        });
        Self {
            requests: Some(requests),
            results,
            thread: Some(thread),
        }
    }

    /// Runs one round of `batches` batches; returns the time per batch.
    pub fn round(&self, batches: u32) -> Duration {
        let requests = self.requests.as_ref().expect("the worker runs");
        requests.send(batches).expect("the worker runs");
        self.results.recv().expect("the worker answers")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `rounds` rounds of `batches` batches on `a` and on `b`, in turn (A B, then B A, so that
/// neither always goes first); prints each one's time per batch (p50, p90, p99, in µs) and the
/// ratio of their medians, and records both in the bench's report. Returns that ratio (b / a).
pub fn compare(
    name: &str,
    a: (&str, &Worker),
    b: (&str, &Worker),
    rounds: usize,
    batches: u32,
) -> f64 {
    let (mut times_a, mut times_b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            times_a.push(a.1.round(batches));
            times_b.push(b.1.round(batches));
        } else {
            times_b.push(b.1.round(batches));
            times_a.push(a.1.round(batches));
        }
    }
    let ns =
        |times: &[Duration]| -> Vec<u64> { times.iter().map(|t| t.as_nanos() as u64).collect() };
    let (ns_a, ns_b) = (ns(&times_a), ns(&times_b));
    let summary = |samples: &[u64]| {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        [50.0, 90.0, 99.0].map(|p| percentile_ns(&sorted, p) as f64 / 1e3)
    };
    let (sa, sb) = (summary(&ns_a), summary(&ns_b));
    let ratio = sb[0] / sa[0];
    println!(
        "{name}: {} p50 {:.2} µs p90 {:.2} p99 {:.2} | {} p50 {:.2} µs p90 {:.2} p99 {:.2} | \
         {}/{} = {ratio:.3} ({rounds} alternating rounds of {batches} batches)",
        a.0, sa[0], sa[1], sa[2], b.0, sb[0], sb[1], sb[2], b.0, a.0
    );
    print_percentiles_ns(&format!("{name}/{}", a.0), &ns_a);
    print_percentiles_ns(&format!("{name}/{}", b.0), &ns_b);
    ratio
}
