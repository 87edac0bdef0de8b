//! What a running VM's threads share: how it ended, the exiting flag every loop checks, and the
//! handles needed to kick and join the threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::exit::GuestExit;
use crate::vcpu::kick_signal;

/// Shared between the VM handle, its vCPU threads, its event loop and the devices that end it.
pub struct RunState {
    exiting: AtomicBool,
    exit: Mutex<Option<GuestExit>>,
    ended: Condvar,
    vcpu_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes the event loop so it notices the exiting flag.
    pub loop_wakeup: EventFd,
}

impl RunState {
    /// State of a VM that has not ended.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            exiting: AtomicBool::new(false),
            exit: Mutex::new(None),
            ended: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            loop_wakeup: EventFd::new(libc::EFD_NONBLOCK)?,
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
        *lock(&self.exit) = Some(exit);
        self.ended.notify_all();
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
