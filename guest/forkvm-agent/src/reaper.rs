//! Waiting for children.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them all, so one thread
//! waits for any child (`waitpid(-1)`) and hands the statuses of the agent's own children to
//! whoever spawned them. Anywhere else (tests) a thread waits for each spawned child by pid, so
//! that other children of the process are left alone.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;

use forkvm_agent_protocol::ExitStatus;

/// Spawns children and reports how they end.
pub struct Reaper {
    reap_all: bool,
    state: Mutex<State>,
    spawned: Condvar,
}

#[derive(Default)]
struct State {
    waiters: HashMap<libc::pid_t, SyncSender<ExitStatus>>,
    /// Children spawned so far, so that the reaping thread notices a spawn it raced with.
    spawns: u64,
}

impl Reaper {
    /// A reaper; with `reap_all` (PID 1) a thread reaps every child of the process. There is
    /// only one such reaper per process, shared by every caller that asks for it.
    pub fn new(reap_all: bool) -> Arc<Reaper> {
        static REAP_ALL: OnceLock<Arc<Reaper>> = OnceLock::new();
        let new = || {
            Arc::new(Reaper {
                reap_all,
                state: Mutex::new(State::default()),
                spawned: Condvar::new(),
            })
        };
        if !reap_all {
            return new();
        }
        Arc::clone(REAP_ALL.get_or_init(|| {
            let reaper = new();
            let r = Arc::clone(&reaper);
            // Named, so that a test can find it.
            if let Err(e) = thread::Builder::new()
                .name("agent-reaper".into())
                .spawn(move || r.reap_all_loop())
            {
                eprintln!("forkvm-agent: cannot start the reaping thread: {e}");
            }
            reaper
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns `command`; the receiver gets its exit status once it has been reaped. Nothing else
    /// may wait for the child.
    pub fn spawn(&self, command: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
        let (tx, rx) = sync_channel(1);
        // The lock is held across the spawn so that the reaping thread cannot see the child's exit
        // before its waiter is registered.
        let mut state = self.lock();
        let child = command.spawn()?;
        // Pids are positive and below 2^22.
        let pid = child.id() as libc::pid_t;
        if self.reap_all {
            state.waiters.insert(pid, tx);
            state.spawns += 1;
            self.spawned.notify_all();
        } else {
            drop(state);
            thread::spawn(move || {
                let status = wait_for(pid);
                // The spawner may have stopped listening; nothing to do then.
                let _ = tx.send(status);
            });
        }
        Ok((child, rx))
    }

    fn reap_all_loop(&self) {
        loop {
            let spawns = self.lock().spawns;
            // SAFETY: siginfo_t is plain data; all zeroes is valid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // Only look (WNOWAIT): a child whose exec failed is reaped by std's spawn itself,
            // which must not find it gone, so the zombie is only taken under the lock that
            // spawn holds.
            // SAFETY: waitid writes only to `info`.
            let rc =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc == 0 {
                // SAFETY: waitid filled `info` for a child that exited (WEXITED).
                let pid = unsafe { info.si_pid() };
                let mut state = self.lock();
                let mut status = 0;
                // SAFETY: waitpid writes only to `status`.
                let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if reaped == pid
                    && let Some(tx) = state.waiters.remove(&pid)
                {
                    let _ = tx.send(decode(status));
                }
                continue;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: no children. Sleep until one is spawned, without a timeout: an idle guest
            // must not wake up (each wake-up is emulated kernel code on some hosts). No orphan
            // can come meanwhile: a process is reparented to us only when its parent, one of
            // our descendants, exits, and with no children we have no descendants either (an
            // orphan is ours before the parent that left it can be reaped).
            let state = self.lock();
            if state.spawns == spawns {
                drop(
                    self.spawned
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner),
                );
            }
        }
    }
}

/// Waits for (and reaps) child `pid`.
fn wait_for(pid: libc::pid_t) -> ExitStatus {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            return decode(status);
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // Someone else reaped it; its status is lost.
            return ExitStatus::default();
        }
    }
}

/// Decodes a `waitpid` status.
fn decode(status: libc::c_int) -> ExitStatus {
    if libc::WIFEXITED(status) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            ..ExitStatus::default()
        }
    } else if libc::WIFSIGNALED(status) {
        ExitStatus {
            signal: Some(libc::WTERMSIG(status)),
            ..ExitStatus::default()
        }
    } else {
        ExitStatus::default()
    }
}

/// Sends `signal` to the process group `pgid`; a group already gone is not an error.
pub fn kill_group(pgid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err);
        }
    }
    Ok(())
}
