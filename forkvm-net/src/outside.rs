//! Where the network runs code that is not its own, and calls that may block: every
//! [`Resolver`](crate::Resolver), a [`Connector`](crate::Connector) other than forkvm's own, and
//! the `on_denied` callbacks run on this process-wide pool of worker threads, never on a VM's
//! event loop.
//!
//! Why: forkvm puts its event loops under a seccomp filter (`docs/seccomp.md`) that allows
//! neither reading files nor starting threads; embedder code must not run under it, and a
//! resolver (the C library's reads `/etc/resolv.conf`) could not. The pool's threads are
//! started by a spawner thread that a network starts when no other network holds the pool
//! ([`PoolUser`]); forkvm makes such a network on the thread building the VM (its embedder's,
//! never filtered), and a fork child's only while its parent's holds the pool, so the spawner,
//! and every worker it starts, is unfiltered. [`end_threads_if_unused`] ends them all once no
//! network holds the pool.
//!
//! Workers wait for jobs and end after [`IDLE_LIMIT`] without one; at most [`MAX_WORKERS`] run
//! at once (more jobs wait their turn). A job that never returns keeps its worker.

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

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
    /// Set by [`end_threads_if_unused`]: the spawner and idle workers end.
    closing: bool,
}

/// The pool while it runs, and how many networks need it.
struct Service {
    pool: Option<(Arc<Pool>, JoinHandle<()>)>,
    users: usize,
}

static SERVICE: Mutex<Service> = Mutex::new(Service {
    pool: None,
    users: 0,
});

fn service() -> MutexGuard<'static, Service> {
    SERVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A network's claim on the pool: while one is held, the pool runs.
pub(crate) struct PoolUser(());

impl Drop for PoolUser {
    fn drop(&mut self) {
        let mut service = service();
        service.users = service.users.saturating_sub(1);
    }
}

/// Claims the pool, starting it from this thread if it does not run (see the module docs for
/// which thread that must be).
pub(crate) fn user() -> io::Result<PoolUser> {
    let mut service = service();
    if service.pool.is_none() {
        let pool = Arc::new(Pool {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            spawn: Condvar::new(),
        });
        let spawner = pool.clone();
        let thread = thread::Builder::new()
            .name("forkvm-net-spawn".into())
            .spawn(move || spawner.spawn_loop())?;
        service.pool = Some((pool, thread));
    }
    service.users += 1;
    Ok(PoolUser(()))
}

/// Ends the pool's threads if no network needs them (forkvm's `wait_for_releases` calls this,
/// so that a process without VMs keeps no thread of forkvm's): the spawner and the idle workers
/// end at once, busy workers when their job returns. Waits for them up to `timeout`; false if
/// some did not end in time (a resolver that never returns keeps its worker). While a network
/// needs them, they stay, and this is true.
pub fn end_threads_if_unused(timeout: Duration) -> bool {
    let taken = {
        let mut service = service();
        if service.users > 0 {
            return true;
        }
        service.pool.take()
    };
    let Some((pool, spawner)) = taken else {
        return true;
    };
    pool.lock().closing = true;
    pool.work.notify_all();
    pool.spawn.notify_all();
    let _ = spawner.join();
    let deadline = Instant::now() + timeout;
    while pool.lock().workers > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_micros(500));
    }
    true
}

/// Runs `job` on a worker.
pub(crate) fn submit(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let pool = service()
        .pool
        .as_ref()
        .map(|(pool, _)| pool.clone())
        .ok_or_else(|| io::Error::other("the network's worker threads are down"))?;
    let mut state = pool.lock();
    state.jobs.push_back(Box::new(job));
    if state.idle >= state.jobs.len() {
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
            while state.wanted == 0 && !state.closing {
                state = self
                    .spawn
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if state.closing {
                // Workers asked for and never started are not alive.
                state.workers -= state.wanted;
                state.wanted = 0;
                return;
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
            if state.closing && state.jobs.is_empty() {
                state.workers -= 1;
                return;
            }
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
            if (timeout.timed_out() || state.closing) && state.jobs.is_empty() {
                state.workers -= 1;
                return;
            }
        }
    }
}

/// The workers alive now (for tests).
#[cfg(test)]
pub(crate) fn workers() -> usize {
    service()
        .pool
        .as_ref()
        .map_or(0, |(pool, _)| pool.lock().workers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn jobs_run_on_other_threads_and_many_at_once() {
        let _user = user().unwrap();
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
        let _user = user().unwrap();
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
