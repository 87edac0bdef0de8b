//! Where the network runs code that is not its own, and calls that may block: every
//! [`Resolver`](crate::Resolver), a [`Connector`](crate::Connector) other than forkvm's own, and
//! the `on_denied` callbacks run on this process-wide pool of worker threads, never on a VM's
//! event loop.
//!
//! Why: forkvm puts its event loops under a seccomp filter (`docs/seccomp.md`) that allows
//! neither reading files nor starting threads; embedder code must not run under it, and a
//! resolver (the C library's reads `/etc/resolv.conf`) could not. The pool's threads are
//! started by a spawner thread that the process's first network starts; forkvm makes a VM's
//! first network on the thread building the VM (its embedder's, never filtered), and a fork
//! child's only after its parent's, so the spawner, and every worker it starts, is unfiltered.
//!
//! Workers wait for jobs and end after [`IDLE_LIMIT`] without one; at most [`MAX_WORKERS`] run
//! at once (more jobs wait their turn). A job that never returns keeps its worker.

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

/// Workers at most, in the whole process.
pub const MAX_WORKERS: usize = 256;
/// A worker with no job for this long ends.
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// The pool.
struct Pool {
    state: Mutex<State>,
    /// Jobs for idle workers.
    work: Condvar,
    /// Workers for the spawner to start.
    spawn: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers alive (and being started).
    workers: usize,
    /// Workers the spawner should start.
    wanted: usize,
}

static POOL: OnceLock<Option<Arc<Pool>>> = OnceLock::new();

/// The pool, started by the first call (see the module docs for which thread that must be);
/// `None` if its spawner thread could not start.
fn pool() -> Option<&'static Arc<Pool>> {
    POOL.get_or_init(|| {
        let pool = Arc::new(Pool {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            spawn: Condvar::new(),
        });
        let spawner = pool.clone();
        match thread::Builder::new()
            .name("forkvm-net-spawn".into())
            .spawn(move || spawner.spawn_loop())
        {
            Ok(_) => Some(pool),
            Err(e) => {
                log::error!("forkvm-net: cannot start the seams' thread: {e}");
                None
            }
        }
    })
    .as_ref()
}

/// Starts the pool now, from this thread (a network's constructor calls it; see the module
/// docs). Says whether it runs.
pub(crate) fn start() -> bool {
    pool().is_some()
}

/// Runs `job` on a worker.
pub(crate) fn submit(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let pool = pool().ok_or_else(|| io::Error::other("the network's worker threads are down"))?;
    let mut state = pool.lock();
    state.jobs.push_back(Box::new(job));
    if state.idle > state.jobs.len() - 1 {
        pool.work.notify_one();
    } else if state.workers < MAX_WORKERS {
        state.workers += 1;
        state.wanted += 1;
        pool.spawn.notify_one();
    }
    Ok(())
}

/// Runs `call` on a worker and waits for its result for at most `limit` (the caller, a VM's
/// event loop, must not wait longer; a late result is dropped).
pub(crate) fn call<T: Send + 'static>(
    limit: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (sender, receiver) = sync_channel(1);
    submit(move || {
        let _ = sender.send(call());
    })?;
    match receiver.recv_timeout(limit) {
        Ok(result) => Ok(result),
        Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the call did not return within {limit:?}"),
        )),
        Err(RecvTimeoutError::Disconnected) => Err(io::Error::other("the call panicked")),
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The spawner: starts the workers [`submit`] asks for.
    fn spawn_loop(self: Arc<Self>) {
        let mut state = self.lock();
        loop {
            while state.wanted == 0 {
                state = self
                    .spawn
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.wanted -= 1;
            drop(state);
            let worker = self.clone();
            let started = thread::Builder::new()
                .name("forkvm-net-seam".into())
                .spawn(move || worker.work_loop());
            state = self.lock();
            if let Err(e) = started {
                log::warn!("forkvm-net: cannot start a worker thread: {e}");
                state.workers -= 1;
                // The jobs wait for the next worker; try again shortly if no worker is left.
                if state.workers == 0 && !state.jobs.is_empty() {
                    drop(state);
                    thread::sleep(Duration::from_millis(100));
                    state = self.lock();
                    state.workers += 1;
                    state.wanted += 1;
                }
            }
        }
    }

    /// A worker: runs jobs until none comes for [`IDLE_LIMIT`].
    fn work_loop(self: Arc<Self>) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                drop(state);
                let run = std::panic::AssertUnwindSafe(job);
                if std::panic::catch_unwind(run).is_err() {
                    log::error!("forkvm-net: a seam or callback panicked");
                }
                state = self.lock();
                continue;
            }
            state.idle += 1;
            let (next, timeout) = self
                .work
                .wait_timeout(state, IDLE_LIMIT)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state = next;
            state.idle -= 1;
            if timeout.timed_out() && state.jobs.is_empty() {
                state.workers -= 1;
                return;
            }
        }
    }
}

/// The workers alive now (for tests).
#[cfg(test)]
pub(crate) fn workers() -> usize {
    pool().map_or(0, |pool| pool.lock().workers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn jobs_run_on_other_threads_and_many_at_once() {
        let caller = thread::current().id();
        let ran = call(Duration::from_secs(10), move || thread::current().id()).unwrap();
        assert_ne!(ran, caller);

        // 32 jobs that each wait for all of them to have started: they run at once.
        let started = Arc::new(AtomicUsize::new(0));
        let (sender, receiver) = std::sync::mpsc::channel();
        for _ in 0..32 {
            let (started, sender) = (started.clone(), sender.clone());
            submit(move || {
                started.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(10);
                while started.load(Ordering::SeqCst) < 32 && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                sender.send(started.load(Ordering::SeqCst)).unwrap();
            })
            .unwrap();
        }
        for _ in 0..32 {
            let seen = receiver.recv_timeout(Duration::from_secs(20)).unwrap();
            assert_eq!(seen, 32);
        }
        assert!(workers() >= 32);
    }

    #[test]
    fn a_call_past_its_limit_times_out_and_a_panic_is_contained() {
        let slow = call(Duration::from_millis(10), || {
            thread::sleep(Duration::from_millis(200))
        });
        assert_eq!(slow.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let panicked = call(Duration::from_secs(10), || -> u32 { panic!("seam") });
        assert!(panicked.is_err());
        // The pool still serves.
        assert_eq!(call(Duration::from_secs(10), || 7).unwrap(), 7);
    }
}
