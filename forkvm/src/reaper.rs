//! Dropping what takes time to free — a dropped VM (its KVM VM, memory, threads), a replaced
//! image's memory file, pages moved out of guest RAM — on threads of their own, off the path of
//! the call that let go of it (a drop, a fork). A process-wide pool of up to 16 threads, started
//! when there is work and ended when idle; each value is dropped whole by one of them. Where no
//! thread can start, things are dropped where they are let go.
//!
//! Why 16 on any number of CPUs: most of a KVM VM's teardown is waiting, not computing (measured
//! here: 1,000 VMs released in 3.3 s by 16 threads on 2 CPUs, 7–11 s by 2 threads;
//! `docs/measurements.md`), so it runs in parallel beyond the CPUs. The caller starts the first
//! thread only; each thread starts the next while work waits, so a mass drop does not pay for
//! starting threads (~0.6 ms each with 1,000 VMs in the process: `vstate/threads.rs`).
//! Each thread runs under the reaper's seccomp filter, with the process-wide policy
//! ([`crate::set_seccomp_policy`]).

use std::collections::VecDeque;
use std::sync::Condvar;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::seccomp::{self, ThreadKind};

/// Something to drop later.
type Job = Box<dyn Send>;

/// What a reaper thread receives.
enum Work {
    /// A job to drop.
    Drop(Job),
    /// End, unless there is work pending ([`wait_for_reaper`]).
    Exit,
}

/// Threads in the pool at most.
const MAX_THREADS: usize = 16;
/// A thread with nothing to drop for this long ends (a new one starts when there is work), so
/// that an idle process holds no reaper thread. Long enough that a VM forked or dropped now and
/// then does not start a thread each time (with many VMs in the process that costs ~0.6 ms:
/// `vstate/threads.rs`); [`wait_for_reaper`] ends idle threads at once.
const IDLE: Duration = Duration::from_secs(5);

/// Queue slots reserved up front: queuing a dropped VM allocates nothing until this many wait.
/// (A mass drop runs while thousands of exiting threads and unmapped RAM regions hold the
/// process's mappings lock in turn; growing the heap then waits behind them. In the first drop
/// of 1,000 VMs in a process, `Vm::drop` took 88–118 µs each while queuing allocated — the
/// channel's blocks and the teardown's box — and 22–34 µs without.)
const RESERVED: usize = 4096;

/// The pool's queue.
struct Queue {
    work: Mutex<VecDeque<Work>>,
    added: Condvar,
}

impl Queue {
    fn push(&self, work: Work) -> Result<(), Work> {
        match self.work.lock() {
            Ok(mut queue) => queue.push_back(work),
            Err(_) => return Err(work),
        }
        self.added.notify_one();
        Ok(())
    }

    fn try_pop(&self) -> Option<Work> {
        self.work.lock().ok()?.pop_front()
    }

    /// The next work, waiting up to `timeout` for some; `None` on a timeout.
    fn pop(&self, timeout: Duration) -> Option<Work> {
        let deadline = Instant::now() + timeout;
        let mut queue = self.work.lock().ok()?;
        loop {
            if let Some(work) = queue.pop_front() {
                return Some(work);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            queue = self.added.wait_timeout(queue, left).ok()?.0;
        }
    }
}

fn reaper() -> &'static Queue {
    static REAPER: OnceLock<Queue> = OnceLock::new();
    REAPER.get_or_init(|| Queue {
        work: Mutex::new(VecDeque::with_capacity(RESERVED)),
        added: Condvar::new(),
    })
}

/// Jobs given to the reaper and not yet dropped.
static PENDING: AtomicUsize = AtomicUsize::new(0);
/// Reaper threads alive.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The reaper threads started, to be joined by [`wait_for_reaper`] once they have ended.
static THREADS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Drops `value` on a reaper thread (or here, if none can start).
pub(crate) fn drop_later<T: Send + 'static>(value: T) {
    drop_boxed_later(Box::new(value));
}

/// [`drop_later`] of a value already boxed: allocates nothing more than the queue's own slots.
pub(crate) fn drop_boxed_later<T: Send + 'static>(value: Box<T>) {
    let reaper = reaper();
    PENDING.fetch_add(1, Ordering::SeqCst);
    let work = Work::Drop(value);
    let unsent = reaper.push(work).err();
    if let Some(job) = unsent {
        PENDING.fetch_sub(1, Ordering::SeqCst);
        drop(job);
        return;
    }
    if LIVE.load(Ordering::SeqCst) == 0 && !grow() {
        // No thread could start: drop what waits here.
        reap_now();
    }
}

/// Starts one more reaper thread, unless the pool is full; says whether one was started.
fn grow() -> bool {
    let live = LIVE.fetch_add(1, Ordering::SeqCst);
    if live >= MAX_THREADS {
        LIVE.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    let parent = seccomp::current();
    let spawned = std::thread::Builder::new()
        .name("forkvm-reaper".into())
        .spawn(move || {
            seccomp::enter_or_log(ThreadKind::Reaper, seccomp::seccomp_policy(), parent);
            reap();
        });
    match spawned {
        Ok(thread) => {
            if let Ok(mut threads) = THREADS.lock() {
                threads.retain(|t| !t.is_finished());
                threads.push(thread);
            }
            true
        }
        Err(_) => {
            LIVE.fetch_sub(1, Ordering::SeqCst);
            false
        }
    }
}

/// Drops one job.
fn run(job: Job) {
    // A panic in a destructor must not end the reaper.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(job)));
    PENDING.fetch_sub(1, Ordering::SeqCst);
}

/// Drops, on this thread, whatever is queued now.
fn reap_now() {
    while let Some(work) = reaper().try_pop() {
        if let Work::Drop(job) = work {
            run(job);
        }
    }
}

/// One reaper thread: drops what it receives, and ends once idle for [`IDLE`] or told to, with
/// nothing pending. While more is pending than threads run, it starts another first.
fn reap() {
    loop {
        match reaper().pop(IDLE) {
            Some(Work::Drop(job)) => {
                if PENDING.load(Ordering::SeqCst) > LIVE.load(Ordering::SeqCst) {
                    grow();
                }
                run(job);
            }
            Some(Work::Exit) | None => {
                LIVE.fetch_sub(1, Ordering::SeqCst);
                // Work counted before this thread left: stay for it (a sender that counts its
                // job after this starts a thread itself).
                if PENDING.load(Ordering::SeqCst) == 0 {
                    return;
                }
                LIVE.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// How many things let go of (dropped VMs included) are still to be freed in the background.
pub fn pending_releases() -> usize {
    PENDING.load(Ordering::SeqCst)
}

/// Waits until everything let go of so far is freed and the reaper's threads have ended (told
/// to, once idle), or until `timeout` passes; says whether that was reached
/// ([`crate::wait_for_releases`] then ends forkvm's other idle threads).
pub(crate) fn wait_for_reaper(timeout: Duration) -> bool {
    let t0 = Instant::now();
    let waited = |done: &dyn Fn() -> bool| {
        while !done() {
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        true
    };
    if !waited(&|| PENDING.load(Ordering::SeqCst) == 0) {
        return false;
    }
    // Idle threads are told to end; a thread that got the word while work came in meanwhile
    // stays for it, so the word is sent again while threads remain.
    let tell = || {
        for _ in 0..LIVE.load(Ordering::SeqCst) {
            let _ = reaper().push(Work::Exit);
        }
    };
    tell();
    let told = std::cell::Cell::new(Instant::now());
    let ended = || {
        let done = PENDING.load(Ordering::SeqCst) == 0 && LIVE.load(Ordering::SeqCst) == 0;
        if !done && told.get().elapsed() > Duration::from_millis(20) {
            tell();
            told.set(Instant::now());
        }
        done
    };
    if !waited(&ended) {
        return false;
    }
    // Each has left its loop: joined, it is gone from the process, not only on its way out.
    let ended = THREADS
        .lock()
        .map(|mut threads| std::mem::take(&mut *threads))
        .unwrap_or_default();
    for thread in ended {
        let _ = thread.join();
    }
    true
}

/// Occupies every reaper thread until dropped, so that what is let go of meanwhile waits (tests
/// of what a drop does before it returns).
#[cfg(test)]
pub(crate) struct Hold(std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>);

#[cfg(test)]
impl Hold {
    pub(crate) fn all_threads() -> Self {
        let gate = std::sync::Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let entered = std::sync::Arc::new(AtomicUsize::new(0));
        struct Blocker(
            std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>,
            std::sync::Arc<AtomicUsize>,
        );
        impl Drop for Blocker {
            fn drop(&mut self) {
                self.1.fetch_add(1, Ordering::SeqCst);
                let (open, changed) = &*self.0;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = changed.wait(open).unwrap();
                }
            }
        }
        // One at a time: a thread grows the pool only when it takes work while more waits, so
        // blockers queued while every live thread is taken (by other tests' work too) could
        // wait for a thread that never comes. One not taken soon gets a thread started for it.
        let t0 = Instant::now();
        for held in 0..MAX_THREADS {
            drop_later(Blocker(gate.clone(), entered.clone()));
            let mut asked = Instant::now();
            while entered.load(Ordering::SeqCst) <= held {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{held} of {MAX_THREADS} reaper threads held after 30 s ({} live, {} pending)",
                    LIVE.load(Ordering::SeqCst),
                    PENDING.load(Ordering::SeqCst),
                );
                if asked.elapsed() > Duration::from_millis(20) {
                    grow();
                    asked = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Self(gate)
    }
}

#[cfg(test)]
impl Drop for Hold {
    fn drop(&mut self) {
        let (open, changed) = &*self.0;
        *open.lock().unwrap() = true;
        changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    struct Slow(Arc<AtomicBool>);

    impl Drop for Slow {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(50));
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_value_let_go_of_is_dropped_later_on_another_thread_and_can_be_waited_for() {
        let dropped = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        drop_later(Slow(dropped.clone()));
        assert!(
            t0.elapsed() < Duration::from_millis(40),
            "did not wait for the drop"
        );
        assert!(wait_for_reaper(Duration::from_secs(10)));
        assert!(dropped.load(Ordering::SeqCst));
    }

    struct Nap;

    impl Drop for Nap {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Work let go of while a wait tells the idle threads to end keeps a thread that got the
    /// word: the wait tells it again rather than waiting for the thread's own idle timeout.
    #[test]
    fn a_wait_ends_the_threads_when_work_keeps_coming_during_it() {
        let feeder = std::thread::spawn(|| {
            for _ in 0..300 {
                drop_later(Nap);
                std::thread::sleep(Duration::from_micros(300));
            }
        });
        let mut waits = Vec::new();
        while !feeder.is_finished() {
            waits.push(wait_for_reaper(Duration::from_secs(3)));
        }
        feeder.join().unwrap();
        assert!(wait_for_reaper(Duration::from_secs(3)));
        assert!(waits.iter().all(|&w| w), "{waits:?}");
    }
}
