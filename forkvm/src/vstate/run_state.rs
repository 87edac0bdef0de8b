//! What a running VM's threads share: how it ended, the exiting flag every loop checks, the
//! pause request every loop honours, and the handles needed to kick and join the threads.
//!
//! Pausing: the requester raises the pause flag and kicks every vCPU out of `KVM_RUN` (a vCPU
//! that was about to enter it finds `immediate_exit` set and returns at once), so each vCPU stops
//! at an instruction boundary with any pending port or MMIO access completed; the event loop is
//! woken through its wake-up eventfd. Each thread parks in [`RunState::park_while_paused`]; the
//! requester waits until all of them have.
//!
//! Pauses are counted: each [`RunState::pause`] (and the hold taken before the threads start)
//! is one hold, and the threads run again only when the last hold is released
//! ([`RunState::release`]). A fork's capture, a user's pause and a snapshot therefore compose:
//! none of them can let the VM run while another still needs it still. Each time the VM runs
//! again its run epoch advances, so a capture can tell that the VM has not run since an earlier
//! one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use super::ThreadSetup;
use super::threads::set_policy;
use crate::exit::GuestExit;
use forkvm_devices::sync::lock;

/// Called once with the VM's exit ([`RunState::on_exit`]).
pub type ExitHook = Box<dyn FnOnce(&GuestExit) + Send>;

type HookJob = Box<dyn FnOnce() + Send>;

/// The thread that runs the exit hooks of VMs ending on a filtered thread of forkvm's, and who
/// needs it: it runs while any VM (or pool making VMs) holds a [`HookUser`], and
/// [`end_hook_runner_if_unused`] ends it once none does.
static HOOKS: Mutex<HookService> = Mutex::new(HookService {
    runner: None,
    users: 0,
});

struct HookService {
    runner: Option<(Sender<HookJob>, JoinHandle<()>)>,
    users: usize,
}

/// A claim on the exit hooks' thread, held by each [`RunState`] and by a pool making VMs.
pub(crate) struct HookUser(());

/// Claims the exit hooks' thread, starting it if this thread is not filtered (a VM build, a
/// restore or a pool's start, on the embedder's thread; a fork child's or a pool's VM is made
/// while a claim on it is held already).
pub(crate) fn hook_user() -> HookUser {
    let mut service = lock(&HOOKS);
    service.users += 1;
    if service.runner.is_none() && crate::seccomp::current().is_none() {
        let (sender, jobs) = channel::<HookJob>();
        let started = std::thread::Builder::new()
            .name("forkvm-exit-hooks".into())
            .spawn(move || {
                while let Ok(job) = jobs.recv() {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        log::error!("a VM's exit hook panicked");
                    }
                }
            });
        match started {
            Ok(thread) => service.runner = Some((sender, thread)),
            Err(e) => log::warn!("cannot start the exit hooks' thread: {e}"),
        }
    }
    HookUser(())
}

impl Drop for HookUser {
    fn drop(&mut self) {
        let mut service = lock(&HOOKS);
        service.users = service.users.saturating_sub(1);
    }
}

/// Ends the exit hooks' thread, once the hooks it was given ran, if no VM needs it
/// ([`crate::wait_for_releases`] calls this, so that a process without VMs keeps no thread of
/// forkvm's). Returns false only if it could not be joined.
pub(crate) fn end_hook_runner_if_unused() -> bool {
    let runner = {
        let mut service = lock(&HOOKS);
        if service.users > 0 {
            return true;
        }
        service.runner.take()
    };
    if let Some((sender, thread)) = runner {
        drop(sender);
        return thread.join().is_ok();
    }
    true
}

/// Runs `hooks` with `exit`: here, unless this is a filtered thread of forkvm's (a vCPU or the
/// event loop), whose filter the embedder's code must never run under; then on the hooks'
/// thread ([`hook_user`]), or here if it could not start.
fn run_hooks(hooks: Vec<ExitHook>, exit: GuestExit) {
    if hooks.is_empty() {
        return;
    }
    let job: HookJob = Box::new(move || {
        for hook in hooks {
            hook(&exit);
        }
    });
    if crate::seccomp::current().is_none() {
        return job();
    }
    let unsent = match &lock(&HOOKS).runner {
        Some((runner, _)) => runner.send(job).err().map(|unsent| unsent.0),
        None => Some(job),
    };
    if let Some(job) = unsent {
        job();
    }
}

/// Shared between the VM handle, its vCPU threads, its event loop and the devices that end it.
pub struct RunState {
    /// Its claim on the thread that runs exit hooks off filtered threads.
    _hooks: HookUser,
    exiting: AtomicBool,
    /// Run once when the VM ends; `None` once they ran.
    exit_hooks: Mutex<Option<Vec<ExitHook>>>,
    /// The signal that kicks this VM's vCPU threads out of `KVM_RUN`, and their seccomp policy.
    setup: ThreadSetup,
    exit: Mutex<Option<GuestExit>>,
    ended: Condvar,
    vcpu_threads: Mutex<Vec<JoinHandle<()>>>,
    /// How many vCPU threads have left their run loop ([`Self::vcpu_left`]).
    vcpus_left: Mutex<usize>,
    vcpu_left_changed: Condvar,
    /// Wakes the event loop so it notices the exiting flag or a pause request.
    pub loop_wakeup: EventFd,
    /// Fast-path copy of `pause.requested`, read by every loop iteration.
    pause_requested: AtomicBool,
    pause: Mutex<Pause>,
    pause_changed: Condvar,
}

/// The pause holds, the threads that have parked for them, and how many times the VM ran again.
#[derive(Default)]
struct Pause {
    /// How many holders want the VM paused; it runs when none do.
    holds: usize,
    parked: usize,
    /// Advances each time the last hold is released.
    epoch: u64,
}

/// How long [`RunState::pause`] waits for the threads to park before giving up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a pause or an end waits for the VM's threads before kicking them again.
const RE_KICK_INTERVAL: Duration = Duration::from_millis(50);

impl RunState {
    /// State of a VM that has not ended, whose threads are set up as `setup` says.
    pub fn new(setup: ThreadSetup) -> std::io::Result<Self> {
        Ok(Self {
            _hooks: hook_user(),
            exiting: AtomicBool::new(false),
            exit_hooks: Mutex::new(Some(Vec::new())),
            setup,
            exit: Mutex::new(None),
            ended: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            vcpus_left: Mutex::new(0),
            vcpu_left_changed: Condvar::new(),
            loop_wakeup: EventFd::new(libc::EFD_NONBLOCK)?,
            pause_requested: AtomicBool::new(false),
            pause: Mutex::default(),
            pause_changed: Condvar::new(),
        })
    }

    /// How this VM's threads are set up.
    pub(crate) fn setup(&self) -> ThreadSetup {
        self.setup
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
        *lock(&self.exit) = Some(exit.clone());
        self.ended.notify_all();
        let hooks = lock(&self.exit_hooks).take().unwrap_or_default();
        run_hooks(hooks, exit);
    }

    /// Runs `hook` with the exit once the VM ends (at once, on this thread, if it has ended).
    pub fn on_exit(&self, hook: ExitHook) {
        let mut hooks = lock(&self.exit_hooks);
        if let Some(hooks) = hooks.as_mut() {
            hooks.push(hook);
            return;
        }
        drop(hooks);
        hook(&self.exit().unwrap_or(GuestExit::Stopped));
    }

    /// Kicks every vCPU out of `KVM_RUN` and wakes the event loop.
    fn kick_all(&self) {
        {
            // Holding the list while kicking keeps `join_all` from joining (and invalidating
            // the pthread handle of) a thread being kicked.
            let threads = lock(&self.vcpu_threads);
            for thread in threads.iter() {
                // A thread that already returned cannot be kicked and needs no kick.
                let _ = thread.kill(self.setup.kick_signal);
            }
        }
        let _ = self.loop_wakeup.write(1);
    }

    /// Takes one pause hold: stops the VM's `threads` threads (its vCPUs and event loop) and
    /// waits until every one has parked. Returns `false`, holding nothing, if the VM ended first
    /// or if its threads did not all park within [`PAUSE_TIMEOUT`]; otherwise the caller holds
    /// one hold and must [`RunState::release`] it.
    pub fn pause(&self, threads: usize) -> bool {
        let mut pause = lock(&self.pause);
        pause.holds += 1;
        self.pause_requested.store(true, Ordering::SeqCst);
        self.kick_all();
        let deadline = std::time::Instant::now() + PAUSE_TIMEOUT;
        while pause.parked < threads && !self.is_exiting() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let (guard, waited) = self
                .pause_changed
                .wait_timeout(pause, left.min(RE_KICK_INTERVAL))
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            pause = guard;
            if waited.timed_out() && pause.parked < threads {
                // A kick may be lost (see `wait`): kick again.
                self.kick_all();
            }
        }
        if pause.parked < threads || self.is_exiting() {
            drop(pause);
            self.release();
            return false;
        }
        true
    }

    /// Takes the hold the VM's threads start under, so that each parks as soon as it starts
    /// (there is nothing to kick or wait for yet); [`RunState::release`] lets them run.
    pub fn hold_at_start(&self) {
        lock(&self.pause).holds += 1;
        self.pause_requested.store(true, Ordering::SeqCst);
    }

    /// Releases one hold; when it was the last, the parked threads run again and the run epoch
    /// advances.
    pub fn release(&self) {
        let mut pause = lock(&self.pause);
        // A release without a hold is a bug in the caller; it must not wrap the count.
        pause.holds = pause.holds.saturating_sub(1);
        if pause.holds > 0 {
            return;
        }
        pause.epoch = pause.epoch.wrapping_add(1);
        self.pause_requested.store(false, Ordering::SeqCst);
        drop(pause);
        self.pause_changed.notify_all();
    }

    /// Whether a pause is requested or in force.
    pub fn is_paused(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// How many times the VM ran again after a pause: unchanged between two readings taken
    /// while holding a pause means the VM did not run in between.
    pub fn run_epoch(&self) -> u64 {
        lock(&self.pause).epoch
    }

    /// Called by each VMM thread between units of work: parks it while a pause is in force
    /// (returns at once otherwise, or when the VM is exiting). A parked thread waits in the batch
    /// scheduling class, so that the resume that wakes it (a fork, which goes on to spawn its
    /// children) keeps its CPU; it is an ordinary thread again once it runs.
    pub fn park_while_paused(&self) {
        if !self.pause_requested.load(Ordering::SeqCst) {
            return;
        }
        let mut pause = lock(&self.pause);
        if pause.holds == 0 || self.is_exiting() {
            return;
        }
        pause.parked += 1;
        self.pause_changed.notify_all();
        let batch = set_policy(libc::SCHED_BATCH);
        while pause.holds > 0 && !self.is_exiting() {
            pause = self
                .pause_changed
                .wait(pause)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        pause.parked -= 1;
        drop(pause);
        if batch {
            set_policy(libc::SCHED_OTHER);
        }
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
        // Woken as each thread leaves its loop. A kick has been seen lost once, on a loaded host
        // whose KVM emulates guest ring 0: both vCPUs of a VM stayed in `KVM_RUN` with the VM
        // ending. Threads not out soon are kicked again, at growing intervals.
        let mut delay = Duration::from_micros(500);
        let mut left = lock(&self.vcpus_left);
        while *left < threads.len() && !threads.iter().all(JoinHandle::is_finished) {
            let (guard, waited) = self
                .vcpu_left_changed
                .wait_timeout(left, delay)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            left = guard;
            if waited.timed_out() {
                for thread in threads.iter().filter(|t| !t.is_finished()) {
                    let _ = thread.kill(self.setup.kick_signal);
                }
                delay = (delay * 2).min(RE_KICK_INTERVAL);
            }
        }
        drop(left);
        for thread in threads {
            // A vCPU thread that panicked has nothing more to report than the exit above.
            let _ = thread.join();
        }
        exit.unwrap_or(GuestExit::Stopped)
    }

    /// Says that a vCPU thread has left its run loop for good, the last thing it does.
    pub fn vcpu_left(&self) {
        *lock(&self.vcpus_left) += 1;
        self.vcpu_left_changed.notify_all();
    }

    /// The exit, if the VM has ended.
    pub fn exit(&self) -> Option<GuestExit> {
        lock(&self.exit).clone()
    }
}

/// One pause hold on a VM, from [`crate::Vm::pause_guard`]: the VM stays paused at least until
/// this is dropped, whatever other threads pause and resume meanwhile. Each hold is counted; the
/// VM runs again when the last is released ([`crate::Vm::resume`] releases only the hold
/// [`crate::Vm::pause`] parked in the VM).
#[must_use = "the VM runs again as soon as the guard is dropped"]
pub struct PauseGuard {
    state: Arc<RunState>,
}

impl PauseGuard {
    /// Takes one hold on the VM whose threads share `state` (`threads` of them).
    pub(crate) fn take(state: &Arc<RunState>, threads: usize) -> Option<Self> {
        state.pause(threads).then(|| Self {
            state: state.clone(),
        })
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.state.release();
    }
}

impl std::fmt::Debug for PauseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseGuard").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::RunState;
    use crate::exit::GuestExit;

    /// A VM that ends on a filtered thread of forkvm's (a vCPU, the event loop) runs its exit
    /// hooks (the embedder's code) on the hooks' own thread, which is not filtered.
    #[test]
    fn exit_hooks_never_run_on_a_filtered_thread() {
        let state = Arc::new(
            RunState::new(crate::vstate::ThreadSetup {
                kick_signal: libc::SIGRTMIN(),
                seccomp: crate::SeccompPolicy::Off,
            })
            .unwrap(),
        );
        let (sender, seen) = std::sync::mpsc::channel();
        state.on_exit(Box::new(move |exit| {
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            sender
                .send((exit.clone(), thread, crate::seccomp::current()))
                .unwrap();
        }));
        let ending = state.clone();
        std::thread::spawn(move || {
            crate::seccomp::enter(crate::ThreadKind::Vcpu, crate::SeccompPolicy::Deny, None)
                .unwrap();
            ending.finish(GuestExit::Reset);
        })
        .join()
        .unwrap();
        let (exit, thread, filter) = seen
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        assert_eq!(exit, GuestExit::Reset);
        assert_eq!(thread, "forkvm-exit-hooks");
        assert_eq!(filter, None);
    }

    #[test]
    fn exit_hooks_run_once_with_the_exit_and_late_ones_at_once() {
        let state = RunState::new(crate::vstate::ThreadSetup {
            kick_signal: libc::SIGRTMIN(),
            seccomp: crate::SeccompPolicy::Off,
        })
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for name in ["first", "second"] {
            let seen = seen.clone();
            state.on_exit(Box::new(move |exit| {
                seen.lock().unwrap().push((name, exit.clone()));
            }));
        }
        assert!(seen.lock().unwrap().is_empty());
        state.finish(GuestExit::Reset);
        // A second end changes nothing and runs nothing again.
        state.finish(GuestExit::Stopped);
        let late = seen.clone();
        state.on_exit(Box::new(move |exit| {
            late.lock().unwrap().push(("late", exit.clone()));
        }));
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("first", GuestExit::Reset),
                ("second", GuestExit::Reset),
                ("late", GuestExit::Reset)
            ]
        );
    }
}
