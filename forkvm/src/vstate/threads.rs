//! VMM threads started ahead of need. A child prepared for a fork ([`crate::snapshot::pool`])
//! comes with its event-loop and vCPU threads already started, each waiting for the one job it
//! will run, because starting a thread in a process that holds many VMs costs more than the rest
//! of a fork: a new thread's stack changes the process's mappings, and every such change goes
//! past the MMU notifier of every VM in the process (about 0.6 ms per thread with 1,000 VMs on
//! this host).
//!
//! Each thread puts itself under the seccomp filter of its kind ([`crate::seccomp`]) before it
//! runs anything else: a spare thread as it starts (so a fork does not wait for it), a new one
//! at the start of its job.

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::{self, SyncSender};
use std::thread::{self, JoinHandle};

use crate::seccomp::{self, SeccompPolicy, ThreadKind};

/// Work for a VMM thread.
type Job = Box<dyn FnOnce() + Send>;

/// A thread waiting for the one job it will run; dropped unused, it ends and is joined.
pub(crate) struct SpareThread {
    job: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl SpareThread {
    /// Starts a thread named `name` that waits for its job, under the filter of `kind`.
    fn spawn(name: String, kind: ThreadKind, policy: SeccompPolicy) -> io::Result<Self> {
        let (job, waiting) = mpsc::sync_channel::<Job>(1);
        let parent = seccomp::current();
        let handle = thread::Builder::new().name(name).spawn(move || {
            seccomp::enter_or_log(kind, policy, parent);
            // Woken for its job, a thread of the batch class does not take the CPU from the
            // thread that woke it (the fork, which returns next); it runs at the scheduler's
            // next decision, and as an ordinary thread from then on.
            let batch = set_policy(libc::SCHED_BATCH);
            // No job: the spare was dropped unused.
            if let Ok(job) = waiting.recv() {
                if batch {
                    set_policy(libc::SCHED_OTHER);
                }
                job();
            }
        })?;
        Ok(Self {
            job: Some(job),
            handle: Some(handle),
        })
    }

    /// Hands `job` to the thread and returns the thread's handle, or gives `job` back if the
    /// thread cannot take it (it is gone).
    fn take_job(mut self, job: Job) -> Result<JoinHandle<()>, Job> {
        let (Some(sender), Some(handle)) = (self.job.take(), self.handle.take()) else {
            return Err(job);
        };
        match sender.send(job) {
            Ok(()) => Ok(handle),
            Err(mpsc::SendError(job)) => {
                // The thread only ends once it has no sender or has run its job.
                let _ = handle.join();
                Err(job)
            }
        }
    }
}

impl Drop for SpareThread {
    fn drop(&mut self) {
        // Without a sender the thread's wait ends, and so does the thread.
        self.job = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Puts the calling thread in scheduling class `policy` (`SCHED_OTHER` or `SCHED_BATCH`, which
/// any thread may switch between); says whether it did. `FORKVM_NO_BATCH=1` leaves the class
/// alone, for measuring what the batch class saves (`benches/fork_tails.rs`).
pub(crate) fn set_policy(policy: libc::c_int) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var_os("FORKVM_NO_BATCH").is_some_and(|v| v == "1")) {
        return false;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

/// Runs `job` on a thread named `name` under the filter of `kind`: on `spare` if one is given
/// and can take it (a spare thread of that kind, filtered already), else on a new thread.
pub(crate) fn run_on_thread(
    spare: Option<SpareThread>,
    name: String,
    kind: ThreadKind,
    policy: SeccompPolicy,
    job: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let mut job: Job = Box::new(job);
    if let Some(spare) = spare {
        match spare.take_job(job) {
            Ok(handle) => return Ok(handle),
            Err(returned) => job = returned,
        }
    }
    let parent = seccomp::current();
    thread::Builder::new().name(name).spawn(move || {
        seccomp::enter_or_log(kind, policy, parent);
        job();
    })
}

/// The threads of one VM started ahead of need: its event loop's and one per vCPU.
#[derive(Default)]
pub(crate) struct SpareThreads {
    /// For the event loop.
    pub events: Option<SpareThread>,
    /// For the vCPUs, in order.
    pub vcpus: VecDeque<SpareThread>,
}

impl SpareThreads {
    /// Whether there is a thread for the event loop and for each of `vcpus` vCPUs.
    pub(crate) fn ready_for(&self, vcpus: usize) -> bool {
        self.events.is_some() && self.vcpus.len() >= vcpus
    }

    /// Starts the threads of a VM with `vcpus` vCPUs, named as [`crate::Vm::start`] names them,
    /// under the filters of `policy`.
    pub(crate) fn spawn(vcpus: u8, policy: SeccompPolicy) -> io::Result<Self> {
        Ok(Self {
            events: Some(SpareThread::spawn(
                EVENTS_THREAD.into(),
                ThreadKind::EventLoop,
                policy,
            )?),
            vcpus: (0..vcpus)
                .map(|id| SpareThread::spawn(vcpu_thread(u32::from(id)), ThreadKind::Vcpu, policy))
                .collect::<io::Result<_>>()?,
        })
    }
}

/// The name of a VM's event-loop thread.
pub(crate) const EVENTS_THREAD: &str = "forkvm-events";

/// The name of the thread of vCPU `id`.
pub(crate) fn vcpu_thread(id: u32) -> String {
    format!("forkvm-vcpu{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_spare_thread_runs_its_job_under_its_name() {
        let spare =
            SpareThread::spawn("spare-test".into(), ThreadKind::Vcpu, SeccompPolicy::Off).unwrap();
        let handle = run_on_thread(
            Some(spare),
            "other".into(),
            ThreadKind::Vcpu,
            SeccompPolicy::Off,
            || {
                assert_eq!(thread::current().name(), Some("spare-test"));
            },
        )
        .unwrap();
        handle.join().expect("the job ran on the spare thread");
    }

    #[test]
    fn without_a_spare_a_new_thread_runs_the_job() {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        run_on_thread(
            None,
            "new-test".into(),
            ThreadKind::Vcpu,
            SeccompPolicy::Off,
            move || {
                assert_eq!(thread::current().name(), Some("new-test"));
                flag.store(true, Ordering::SeqCst);
            },
        )
        .unwrap()
        .join()
        .unwrap();
        assert!(ran.load(Ordering::SeqCst));
    }

    #[test]
    fn an_unused_spare_ends_when_dropped() {
        let spare =
            SpareThread::spawn("unused-test".into(), ThreadKind::Vcpu, SeccompPolicy::Off).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(
            !spare.handle.as_ref().unwrap().is_finished(),
            "a spare waits for its job"
        );
        // Drop joins the thread, so it returns only once the thread has ended.
        drop(spare);
    }
}
