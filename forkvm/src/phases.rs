//! Per-phase timing of captures and forks, for measurement only (`benches/fork_running.rs`).
//!
//! Off unless the process runs with `FORKVM_PHASES=1` (read once). Off, a probe is one relaxed
//! atomic load and a branch: no clock is read and nothing is recorded. On, each probe appends
//! `(name, value)` to one process-wide list — a duration in nanoseconds for [`span`]s, a count for
//! [`count`] — which [`take_phase_timings`] drains. Phases of several threads interleave there;
//! measure one fork at a time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

/// 0: not read yet, 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static RECORDED: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// Whether probes record (`FORKVM_PHASES=1`).
#[inline]
pub(crate) fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var_os("FORKVM_PHASES").is_some_and(|v| v == "1");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// Entries kept until [`take_phase_timings`] drains them; later ones are dropped (a process that
/// turned the probes on and never drains them stays bounded).
const MAX_RECORDED: usize = 1 << 20;

fn record(name: &'static str, value: u64) {
    if let Ok(mut recorded) = RECORDED.lock()
        && recorded.len() < MAX_RECORDED
    {
        recorded.push((name, value));
    }
}

/// A phase being timed: records its duration under its name when dropped (if probes are on).
pub(crate) struct Span {
    name: &'static str,
    start: Option<Instant>,
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            record(self.name, start.elapsed().as_nanos() as u64);
        }
    }
}

/// Times the phase `name` until the returned span is dropped.
#[inline]
pub(crate) fn span(name: &'static str) -> Span {
    Span {
        name,
        start: enabled().then(Instant::now),
    }
}

/// Records a quantity of the current phase (pages, bytes).
#[inline]
pub(crate) fn count(name: &'static str, value: u64) {
    if enabled() {
        record(name, value);
    }
}

/// Drains what the probes recorded since the last call, in order: `(phase, nanoseconds)` for
/// timed phases, `(name, count)` for quantities (their names say what they count). Empty unless
/// the process runs with `FORKVM_PHASES=1`. For measurement; not a stable interface.
#[doc(hidden)]
pub fn take_phase_timings() -> Vec<(&'static str, u64)> {
    RECORDED
        .lock()
        .map(|mut recorded| std::mem::take(&mut *recorded))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_record_only_when_on() {
        // (Other tests of this process may record meanwhile: only this test's names are checked.)
        STATE.store(1, Ordering::Relaxed);
        drop(span("test.off"));
        count("test.off_pages", 1);
        assert!(
            !take_phase_timings()
                .iter()
                .any(|(n, _)| n.starts_with("test.off"))
        );
        STATE.store(2, Ordering::Relaxed);
        drop(span("test.on"));
        count("test.on_pages", 7);
        STATE.store(1, Ordering::Relaxed);
        let recorded = take_phase_timings();
        assert!(recorded.iter().any(|&(n, _)| n == "test.on"));
        assert!(recorded.contains(&("test.on_pages", 7)));
    }
}
