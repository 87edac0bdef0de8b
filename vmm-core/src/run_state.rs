//! What a running VM's threads share: how it ended, the exiting flag every loop checks, the
//! pause request every loop honours, and the handles needed to kick and join the threads.
//!
//! Pausing: the requester raises the pause flag and kicks every vCPU out of `KVM_RUN` (a vCPU
//! that was about to enter it finds `immediate_exit` set and returns at once), so each vCPU stops
//! at an instruction boundary with any pending port or MMIO access completed; the event loop is
//! woken through its wake-up eventfd. Each thread parks in [`RunState::park_while_paused`]; the
//! requester waits until all of them have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::exit::GuestExit;
use crate::vcpu::kick_signal;
use forkvm_devices::sync::lock;

/// Shared between the VM handle, its vCPU threads, its event loop and the devices that end it.
pub struct RunState {
    exiting: AtomicBool,
    exit: Mutex<Option<GuestExit>>,
    ended: Condvar,
    vcpu_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes the event loop so it notices the exiting flag or a pause request.
    pub loop_wakeup: EventFd,
    /// Fast-path copy of `pause.requested`, read by every loop iteration.
    pause_requested: AtomicBool,
    pause: Mutex<Pause>,
    pause_changed: Condvar,
}

/// A pause request and the threads that have parked for it.
#[derive(Default)]
struct Pause {
    requested: bool,
    parked: usize,
}

/// How long [`RunState::pause`] waits for the threads to park before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl RunState {
    /// State of a VM that has not ended.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            exiting: AtomicBool::new(false),
            exit: Mutex::new(None),
            ended: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            loop_wakeup: EventFd::new(libc::EFD_NONBLOCK)?,
            pause_requested: AtomicBool::new(false),
            pause: Mutex::default(),
            pause_changed: Condvar::new(),
        })
    }

    /// Whether the VM is ending; every loop checks this before blocking again.
    pub fn is_exiting(&self) -> bool {
        self.exiting.load(Ordering::SeqCst)
    }

    /// Ends the VM with `exit` unless it already ended: raises the exiting flag, kicks every vCPU
    /// and the event loop, then publishes the exit. The first caller wins.
    pub fn finish(&self, exit: GuestExit) {
        if self.exiting.swap(true, Ordering::SeqCst) {
            return;
        }
        self.kick_all();
        // Parked threads wake up and see the exiting flag (taking the lock orders this after
        // any thread's check of the flag).
        drop(lock(&self.pause));
        self.pause_changed.notify_all();
        *lock(&self.exit) = Some(exit);
        self.ended.notify_all();
    }

    /// Kicks every vCPU out of `KVM_RUN` and wakes the event loop.
    fn kick_all(&self) {
        {
            // Holding the list while kicking keeps `join_all` from joining (and invalidating
            // the pthread handle of) a thread being kicked.
            let threads = lock(&self.vcpu_threads);
            for thread in threads.iter() {
                // A thread that already returned cannot be kicked and needs no kick.
                let _ = thread.kill(kick_signal());
            }
        }
        let _ = self.loop_wakeup.write(1);
    }

    /// Stops the VM's `threads` threads (its vCPUs and event loop) and waits until every one has
    /// parked. Returns `false` if the VM ended first, or if its threads did not all park within
    /// [`PAUSE_TIMEOUT`] (the request is then withdrawn).
    pub fn pause(&self, threads: usize) -> bool {
        let mut pause = lock(&self.pause);
        pause.requested = true;
        self.pause_requested.store(true, Ordering::SeqCst);
        self.kick_all();
        let deadline = std::time::Instant::now() + PAUSE_TIMEOUT;
        while pause.parked < threads && !self.is_exiting() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                drop(pause);
                self.resume();
                return false;
            }
            pause = self
                .pause_changed
                .wait_timeout(pause, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        !self.is_exiting()
    }

    /// Requests a pause before the VM's threads start, so that each parks as soon as it starts
    /// (there is nothing to kick or wait for yet); [`RunState::resume`] lets them all run.
    pub fn hold_at_start(&self) {
        lock(&self.pause).requested = true;
        self.pause_requested.store(true, Ordering::SeqCst);
    }

    /// Lets parked threads run again.
    pub fn resume(&self) {
        let mut pause = lock(&self.pause);
        pause.requested = false;
        self.pause_requested.store(false, Ordering::SeqCst);
        drop(pause);
        self.pause_changed.notify_all();
    }

    /// Whether a pause is requested or in force.
    pub fn is_paused(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// Called by each VMM thread between units of work: parks it while a pause is in force
    /// (returns at once otherwise, or when the VM is exiting).
    pub fn park_while_paused(&self) {
        if !self.pause_requested.load(Ordering::SeqCst) {
            return;
        }
        let mut pause = lock(&self.pause);
        if !pause.requested || self.is_exiting() {
            return;
        }
        pause.parked += 1;
        self.pause_changed.notify_all();
        while pause.requested && !self.is_exiting() {
            pause = self
                .pause_changed
                .wait(pause)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        pause.parked -= 1;
    }

    /// Records a started vCPU thread. Call with the guard from [`Self::threads`] held across all
    /// spawns so `finish` kicks either none or all of them.
    pub fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        lock(&self.vcpu_threads)
    }

    /// Blocks until the VM has ended, then joins the vCPU threads.
    pub fn wait(&self) -> GuestExit {
        let exit = {
            let mut exit = lock(&self.exit);
            while exit.is_none() {
                exit = self
                    .ended
                    .wait(exit)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            exit.clone()
        };
        let threads = std::mem::take(&mut *lock(&self.vcpu_threads));
        for thread in threads {
            // A vCPU thread that panicked has nothing more to report than the exit above.
            let _ = thread.join();
        }
        exit.unwrap_or(GuestExit::Stopped)
    }

    /// The exit, if the VM has ended.
    pub fn exit(&self) -> Option<GuestExit> {
        lock(&self.exit).clone()
    }
}
