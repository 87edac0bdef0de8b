//! Dropping what takes time to free — a dropped VM (its KVM VM, memory, threads), a replaced
//! image's memory file, pages moved out of guest RAM — on threads of their own, off the path of
//! the call that let go of it (a drop, a fork). A process-wide pool of up to 4 threads (KVM tears
//! VMs down in parallel), started on first use; each value is dropped whole by one of them.
//! Where no thread can start, things are dropped where they are let go, as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Something to drop later.
type Job = Box<dyn Send>;

/// Threads in the pool at most.
const MAX_THREADS: usize = 4;

/// The reaper's queue (`None` where none of its threads could start).
fn queue() -> &'static Option<Mutex<Sender<Job>>> {
    static QUEUE: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (sender, receiver) = channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_THREADS);
        let started = (0..threads)
            .filter(|i| {
                let receiver = receiver.clone();
                std::thread::Builder::new()
                    .name(format!("forkvm-reaper-{i}"))
                    .spawn(move || reap(&receiver))
                    .is_ok()
            })
            .count();
        (started > 0).then(|| Mutex::new(sender))
    })
}

/// One reaper thread: drops what it receives until the queue is gone.
fn reap(receiver: &Mutex<Receiver<Job>>) {
    loop {
        let job = match receiver.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return;
        };
        // A panic in a destructor must not end the reaper.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(job)));
        PENDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Jobs given to the reaper and not yet dropped.
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Drops `value` on a reaper thread (or here, if there is none).
pub(crate) fn drop_later<T: Send + 'static>(value: T) {
    let Some(queue) = queue() else {
        drop(value);
        return;
    };
    PENDING.fetch_add(1, Ordering::SeqCst);
    let sent = queue
        .lock()
        .map_err(|_| ())
        .and_then(|sender| sender.send(Box::new(value)).map_err(|e| drop(e.0)));
    if sent.is_err() {
        PENDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many things let go of (dropped VMs included) are still to be freed in the background.
pub fn pending_releases() -> usize {
    PENDING.load(Ordering::SeqCst)
}

/// Waits until everything let go of so far is freed, or `timeout` passes; says whether it was.
pub fn wait_for_releases(timeout: Duration) -> bool {
    let t0 = Instant::now();
    while pending_releases() > 0 {
        if t0.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
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
        assert!(wait_for_releases(Duration::from_secs(10)));
        assert!(dropped.load(Ordering::SeqCst));
    }
}
