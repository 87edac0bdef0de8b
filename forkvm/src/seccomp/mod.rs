//! Per-thread seccomp filters on the threads forkvm owns: each kind of VMM thread ([`ThreadKind`])
//! installs an allowlist of the system calls it needs ([`rules`]) on itself, at the start of its
//! job, never with `TSYNC`: the embedder's threads are never filtered, and no embedder code runs
//! on a filtered thread (console callbacks are delivered from a thread of their own:
//! [`crate::console`]). A call outside the list fails with `EPERM` and is counted
//! ([`seccomp_denials`]); [`SeccompPolicy`] picks a fail-stop action instead, or no filter. Why
//! each call is allowed, and the threat model: `docs/seccomp.md`.
//!
//! Dependency: `seccompiler` 0.5 (rust-vmm's filter compiler, the one Firecracker uses) turns
//! the lists into BPF, which would otherwise be written and jump-counted by hand.
//!
//! Counting needs the kernel to tell forkvm of each denial, which `SECCOMP_RET_ERRNO` does not:
//! the filters return `SECCOMP_RET_TRAP` with forkvm's tag in the return data, the kernel raises
//! `SIGSYS` on the offending thread, and forkvm's handler ([`trap`]) sets the call's result to
//! `-EPERM` and counts it. A `SIGSYS` without the tag (another filter's, or none) goes to the
//! handler installed before forkvm's, so an embedder's own use of `SIGSYS` keeps working.

mod rules;
mod trap;

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

pub use trap::{SeccompDenials, seccomp_denials};

/// What a filtered thread's system call outside its allowlist does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SeccompPolicy {
    /// The call fails with `EPERM` and is counted ([`seccomp_denials`]); the thread goes on,
    /// and the VM with it (its device or vCPU sees the error). The default.
    #[default]
    Deny,
    /// The kernel ends the thread (`SECCOMP_RET_KILL_THREAD`). Fail-stop for the thread only:
    /// a VM whose thread is killed this way hangs (its `wait` never returns), so prefer
    /// [`SeccompPolicy::KillProcess`] for fail-stop.
    KillThread,
    /// The kernel ends the whole process (`SECCOMP_RET_KILL_PROCESS`): fail-stop for programs
    /// that prefer it to going on after a denial.
    KillProcess,
    /// No filter.
    Off,
}

impl SeccompPolicy {
    const ALL: [Self; 4] = [Self::Deny, Self::KillThread, Self::KillProcess, Self::Off];

    fn index(self) -> usize {
        match self {
            Self::Deny => 0,
            Self::KillThread => 1,
            Self::KillProcess => 2,
            Self::Off => 3,
        }
    }
}

/// The kinds of threads forkvm owns, each with its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ThreadKind {
    /// A vCPU thread (also a spare thread started ahead for a prepared child's vCPU).
    Vcpu,
    /// A VM's event loop serving its devices (also its spare thread), and the DNS resolver
    /// threads it starts, which inherit its filter.
    EventLoop,
    /// The thread preparing children ahead of forks (`Vm::keep_forks_ready`), and the one
    /// flattening a deep stack of memory layers.
    Prepare,
    /// The reaper's threads, which drop released VMs and memory.
    Reaper,
}

impl ThreadKind {
    /// Every kind, in the order of [`ThreadKind::index`].
    pub(crate) const ALL: [Self; 4] = [Self::Vcpu, Self::EventLoop, Self::Prepare, Self::Reaper];

    fn index(self) -> usize {
        match self {
            Self::Vcpu => 0,
            Self::EventLoop => 1,
            Self::Prepare => 2,
            Self::Reaper => 3,
        }
    }
}

/// Why a filter could not be made or installed.
#[derive(Clone, Debug, Error)]
pub enum SeccompError {
    /// seccompiler refused the allowlist (a bug in [`rules`]).
    #[error("cannot compile the seccomp filter of {kind:?} threads: {reason}")]
    Compile {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's message.
        reason: String,
    },
    /// The kernel refused the filter (no seccomp, or out of memory).
    #[error("cannot install the seccomp filter of {kind:?} threads: {reason}")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// The kernel's error.
        reason: String,
    },
    /// The SIGSYS handler that counts denials could not be installed.
    #[error("cannot install the SIGSYS handler counting seccomp denials: {0}")]
    Handler(String),
}

/// The policy of threads that serve every VM (the reaper's) and of VMs whose builder sets none.
static PROCESS_POLICY: AtomicU8 = AtomicU8::new(0);

/// Sets the [`SeccompPolicy`] of threads forkvm starts from now on for the whole process (the
/// reaper's threads, VMs loaded from a directory) and of VMs whose [`crate::VmBuilder`] sets none.
/// Threads already running keep their filter (a filter cannot be removed).
pub fn set_seccomp_policy(policy: SeccompPolicy) {
    PROCESS_POLICY.store(policy.index() as u8, Ordering::SeqCst);
}

/// The process-wide policy ([`set_seccomp_policy`]).
pub fn seccomp_policy() -> SeccompPolicy {
    let index = usize::from(PROCESS_POLICY.load(Ordering::SeqCst));
    SeccompPolicy::ALL
        .get(index)
        .copied()
        .unwrap_or(SeccompPolicy::Deny)
}

thread_local! {
    /// The filter this thread installed, if any.
    static CURRENT: Cell<Option<(ThreadKind, SeccompPolicy)>> = const { Cell::new(None) };
}

/// The filter the calling thread runs under, as far as forkvm installed it; a thread it starts
/// inherits it.
pub(crate) fn current() -> Option<(ThreadKind, SeccompPolicy)> {
    CURRENT.with(Cell::get)
}

/// The compiled filter of `kind` under `policy` (`None` for [`SeccompPolicy::Off`]), compiled
/// once per process.
fn program(
    kind: ThreadKind,
    policy: SeccompPolicy,
) -> Result<Option<&'static BpfProgram>, SeccompError> {
    type Slot = OnceLock<Result<BpfProgram, SeccompError>>;
    static PROGRAMS: [[Slot; 3]; 4] = [const { [const { OnceLock::new() }; 3] }; 4];
    let mismatch = match policy {
        SeccompPolicy::Off => return Ok(None),
        SeccompPolicy::Deny => SeccompAction::Trap,
        SeccompPolicy::KillThread => SeccompAction::KillThread,
        SeccompPolicy::KillProcess => SeccompAction::KillProcess,
    };
    let slot = &PROGRAMS[kind.index()][policy.index()];
    slot.get_or_init(|| compile(kind, mismatch))
        .as_ref()
        .map(Some)
        .map_err(Clone::clone)
}

fn compile(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let err = |e: &dyn std::fmt::Display| SeccompError::Compile {
        kind,
        reason: e.to_string(),
    };
    let rules = rules::allowlist(kind).map_err(|e| err(&e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| err(&e))?;
    let mut program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))?;
    trap::tag(&mut program, kind);
    program.splice(0..0, rules::spawn_guard(kind));
    Ok(program)
}

/// Puts the calling thread under the filter forkvm gives its threads of `kind` (policy
/// [`SeccompPolicy::Deny`]), for `benches/`: they drive device models on a thread of their own
/// and measure what the filter costs them. The thread stays filtered; not for embedders.
#[cfg(feature = "bench-utils")]
#[doc(hidden)]
pub fn filter_this_thread_for_bench(kind: ThreadKind) -> Result<(), SeccompError> {
    prepare(SeccompPolicy::Deny)?;
    enter(kind, SeccompPolicy::Deny, None)
}

/// Readies `policy` for threads about to start, on the calling (unfiltered) thread: compiles
/// every kind's filter and, for [`SeccompPolicy::Deny`], installs the SIGSYS handler. A VM
/// build calls this, so that its threads only install what is ready.
pub(crate) fn prepare(policy: SeccompPolicy) -> Result<(), SeccompError> {
    if policy == SeccompPolicy::Deny {
        trap::install_handler()?;
    }
    for kind in ThreadKind::ALL {
        program(kind, policy)?;
    }
    Ok(())
}

/// Puts the calling thread, a new thread of `kind`, under its filter for `policy`, unless it
/// inherited that very filter (`inherited`: [`current`] of the thread that started it).
pub(crate) fn enter(
    kind: ThreadKind,
    policy: SeccompPolicy,
    inherited: Option<(ThreadKind, SeccompPolicy)>,
) -> Result<(), SeccompError> {
    if inherited == Some((kind, policy)) {
        CURRENT.with(|c| c.set(inherited));
        return Ok(());
    }
    let Some(program) = program(kind, policy)? else {
        return Ok(());
    };
    if policy == SeccompPolicy::Deny {
        trap::install_handler()?;
        trap::unblock_sigsys();
    }
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
        kind,
        reason: e.to_string(),
    })?;
    CURRENT.with(|c| c.set(Some((kind, policy))));
    Ok(())
}

/// [`enter`], logging a failure: the thread then runs unfiltered (a kernel without seccomp),
/// which [`SeccompDenials::install_failures`] counts.
pub(crate) fn enter_or_log(
    kind: ThreadKind,
    policy: SeccompPolicy,
    inherited: Option<(ThreadKind, SeccompPolicy)>,
) {
    if let Err(e) = enter(kind, policy, inherited) {
        trap::count_install_failure();
        log::error!("{e}");
    }
    #[cfg(test)]
    tests::probe(kind, policy);
}

#[cfg(test)]
mod tests;
