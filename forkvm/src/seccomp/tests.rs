use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::*;
use crate::{ConsoleBuffer, ConsoleOutput, VmBuilder};

/// Whether threads entering a filter run [`probe`] (the test-only hook).
static PROBING: AtomicBool = AtomicBool::new(false);
/// What each probe saw: the thread's kind and policy, and the errno of `execve` and of an
/// `openat` creating a file.
static PROBES: Mutex<Vec<(ThreadKind, SeccompPolicy, i32, i32)>> = Mutex::new(Vec::new());
/// Serializes the tests that turn probing on.
static PROBE_TESTS: Mutex<()> = Mutex::new(());

/// A path whose parent does not exist: an allowed `execve` or `openat` of it fails with
/// `ENOENT` (and changes nothing), a denied one with `EPERM`.
const MISSING: &std::ffi::CStr = c"/nonexistent-forkvm-seccomp-probe/x";

/// Tries calls no forkvm thread may make; returns the errno of `execve` and of `openat`
/// creating a file.
fn forbidden_calls() -> (i32, i32) {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let argv = [MISSING.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: NUL-terminated path and null-terminated argv/envp; the path does not exist, so
    // the call returns.
    let exec = unsafe { libc::execve(MISSING.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    assert_eq!(exec, -1);
    let exec = errno();
    // SAFETY: NUL-terminated path; a returned fd is closed at once.
    let fd = unsafe { libc::open(MISSING.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600) };
    let open = if fd >= 0 {
        // SAFETY: `fd` was just opened here.
        unsafe { libc::close(fd) };
        0
    } else {
        errno()
    };
    (exec, open)
}

/// The test-only hook run by [`enter_or_log`] once a thread is filtered.
pub(super) fn probe(kind: ThreadKind, policy: SeccompPolicy) {
    if PROBING.load(Ordering::SeqCst) {
        let (exec, open) = forbidden_calls();
        forkvm_devices::sync::lock(&PROBES).push((kind, policy, exec, open));
    }
}

fn probing() -> MutexGuard<'static, ()> {
    let guard = PROBE_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    forkvm_devices::sync::lock(&PROBES).clear();
    PROBING.store(true, Ordering::SeqCst);
    guard
}

fn denied(kind: ThreadKind) -> u64 {
    let d = seccomp_denials();
    match kind {
        ThreadKind::Vcpu => d.vcpu,
        ThreadKind::EventLoop => d.event_loop,
        ThreadKind::Prepare => d.prepare,
        ThreadKind::Reaper => d.reaper,
    }
}

/// Every kind's filter fails `execve` and file creation with EPERM and counts both, and leaves
/// the calls a thread lives on working.
#[test]
fn each_kind_denies_exec_and_new_files_with_eperm_and_counts_them() {
    for kind in ThreadKind::ALL {
        let before = denied(kind);
        let (exec, open, allowed) = std::thread::spawn(move || {
            use std::io::{Read, Write};
            // A pipe made before: fds a thread holds stay usable.
            let (mut reader, mut writer) = std::io::pipe().unwrap();
            enter(kind, SeccompPolicy::Deny, None).unwrap();
            let (exec, open) = forbidden_calls();
            // Allocation, locks, fds it holds: what every thread lives on.
            let data = vec![7u8; 1 << 20];
            let lock = Mutex::new(data.len());
            writer.write_all(b"ok").unwrap();
            let mut got = [0; 2];
            reader.read_exact(&mut got).unwrap();
            let allowed = *lock.lock().unwrap() == 1 << 20 && &got == b"ok";
            (exec, open, allowed)
        })
        .join()
        .unwrap();
        assert_eq!((exec, open), (libc::EPERM, libc::EPERM), "{kind:?}");
        assert!(allowed, "{kind:?}");
        assert!(denied(kind) >= before + 2, "{kind:?}: denials counted");
        assert!(seccomp_denials().last_syscall.is_some());
    }
}

/// The threads that face the guest (vCPU, event loop) neither read files nor start threads:
/// what the user-mode network needs for those (name resolution, embedder code) runs on its own
/// unfiltered workers. The thread preparing children and the reaper still start threads; no
/// kind starts a process. A refused thread start fails (glibc blocks signals around it, so a
/// trap there would kill the process).
#[test]
fn vcpu_and_event_loop_threads_read_no_files_and_start_no_threads() {
    for kind in ThreadKind::ALL {
        let (read, spawned, forked) = std::thread::spawn(move || {
            enter(kind, SeccompPolicy::Deny, None).unwrap();
            // SAFETY: NUL-terminated path; a returned fd is closed at once.
            let fd = unsafe { libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) };
            let read = if fd >= 0 {
                // SAFETY: just opened here.
                unsafe { libc::close(fd) };
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            };
            let spawned = std::thread::Builder::new()
                .spawn(|| ())
                .map(|thread| thread.join().is_ok())
                .unwrap_or(false);
            // SAFETY: a child, if one is made, ends at once without running anything.
            let forked = match unsafe { libc::fork() } {
                // SAFETY: the child (if the filter let it be made) ends here.
                0 => unsafe { libc::_exit(0) },
                -1 => std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                child => {
                    // SAFETY: waits for the child just made.
                    unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
                    0
                }
            };
            (read, spawned, forked)
        })
        .join()
        .unwrap();
        assert_eq!(read, libc::EPERM, "{kind:?} opened a file to read");
        assert_eq!(forked, libc::EPERM, "{kind:?} made a process");
        let may_spawn = matches!(kind, ThreadKind::Prepare | ThreadKind::Reaper);
        assert_eq!(spawned, may_spawn, "{kind:?} starting a thread");
    }
}

/// A thread a guest drives may not shape VMs (here: map memory into one, make a vCPU), while
/// its own KVM calls pass; the thread preparing children may do both. On fd -1, an allowed call
/// fails with EBADF, a denied one with EPERM.
#[test]
fn guest_facing_threads_may_not_map_memory_into_a_vm() {
    let shaping = rules::VM_SHAPING;
    // Checked against <linux/kvm.h>: KVM_SET_USER_MEMORY_REGION, KVM_CREATE_VCPU.
    assert_eq!(shaping[3], 0x4020_ae46);
    assert_eq!(shaping[1], 0xae41);
    const KVM_RUN: u64 = 0xae80;
    for kind in ThreadKind::ALL {
        let errnos = std::thread::spawn(move || {
            enter(kind, SeccompPolicy::Deny, None).unwrap();
            [u64::from(shaping[3]), u64::from(shaping[1]), KVM_RUN].map(|request| {
                // SAFETY: an ioctl on fd -1 does nothing but fail.
                let r = unsafe { libc::ioctl(-1, request as libc::c_ulong, 0) };
                assert_eq!(r, -1);
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            })
        })
        .join()
        .unwrap();
        let expected = match kind {
            ThreadKind::Vcpu | ThreadKind::EventLoop => [libc::EPERM, libc::EPERM, libc::EBADF],
            ThreadKind::Prepare | ThreadKind::Reaper => [libc::EBADF; 3],
        };
        assert_eq!(errnos, expected, "{kind:?}");
    }
}

/// Without a filter (and on the embedder's threads) the same calls reach the kernel.
#[test]
fn without_a_filter_the_calls_reach_the_kernel() {
    let (exec, open) = std::thread::spawn(|| {
        enter(ThreadKind::Vcpu, SeccompPolicy::Off, None).unwrap();
        forbidden_calls()
    })
    .join()
    .unwrap();
    assert_eq!((exec, open), (libc::ENOENT, libc::ENOENT));
    assert_eq!(forbidden_calls(), (libc::ENOENT, libc::ENOENT));
}

/// The fail-stop policies compile to kills, never to forkvm's trap; `Off` to no filter.
#[test]
fn kill_policies_kill_and_off_installs_nothing() {
    let returns = |policy| {
        program(ThreadKind::Vcpu, policy)
            .unwrap()
            .unwrap()
            .iter()
            .filter(|i| i.code == 0x06)
            .map(|i| i.k)
            .collect::<Vec<_>>()
    };
    let deny = returns(SeccompPolicy::Deny);
    // Allow, forkvm's tagged trap, or the spawn guard's errno (`rules::spawn_guard`).
    assert!(deny.iter().all(|&k| k == libc::SECCOMP_RET_ALLOW
        || k & 0xffff_0000 == libc::SECCOMP_RET_TRAP && k & 0xfff0 == 0xf0c0
        || k == libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
        || k == libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32));
    let kill = returns(SeccompPolicy::KillProcess);
    assert!(kill.contains(&libc::SECCOMP_RET_KILL_PROCESS));
    assert!(
        !kill
            .iter()
            .any(|&k| k & 0xffff_0000 == libc::SECCOMP_RET_TRAP)
    );
    let kill_thread = returns(SeccompPolicy::KillThread);
    assert!(kill_thread.contains(&libc::SECCOMP_RET_KILL_THREAD));
    assert!(
        program(ThreadKind::Vcpu, SeccompPolicy::Off)
            .unwrap()
            .is_none()
    );
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every thread a VM runs on — vCPU, event loop, the thread preparing children, the spare
/// threads a fork child runs on, the reaper's — is filtered: the probe each runs as it starts
/// sees EPERM, and the denials are counted per kind. The guest still runs, forks and ends.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn every_thread_of_a_vm_and_of_its_children_is_filtered() {
    // No idle reaper thread left from other tests: the drops below start one.
    assert!(crate::wait_for_releases(Duration::from_secs(60)));
    let _probing = probing();
    let before: Vec<u64> = ThreadKind::ALL.iter().map(|&k| denied(k)).collect();
    let console = ConsoleBuffer::new();
    let vm = VmBuilder::new()
        .kernel(crate::test_guest::path())
        .memory_mib(32)
        .cmdline("mode=halt")
        .console(ConsoleOutput::Buffer(console.clone()))
        .seccomp(SeccompPolicy::Deny)
        .build()
        .unwrap();
    vm.start().unwrap();
    wait_until("the guest halts", || console.text().contains("halting"));
    vm.keep_forks_ready(1);
    wait_until("a child is prepared", || vm.prepared_forks() >= 1);
    let child_console = ConsoleBuffer::new();
    let children = vm
        .fork([ConsoleOutput::Buffer(child_console.clone())])
        .unwrap();
    vm.keep_forks_ready(0);
    assert!(children[0].exit().is_none(), "the child runs");
    drop(children);
    drop(vm);
    assert!(crate::wait_for_releases(Duration::from_secs(60)));
    PROBING.store(false, Ordering::SeqCst);

    let probes = forkvm_devices::sync::lock(&PROBES).clone();
    for (i, kind) in ThreadKind::ALL.into_iter().enumerate() {
        let seen: Vec<_> = probes
            .iter()
            .filter(|p| p.0 == kind && p.1 == SeccompPolicy::Deny)
            .collect();
        assert!(
            !seen.is_empty(),
            "no {kind:?} thread was filtered: {probes:?}"
        );
        assert!(
            seen.iter()
                .all(|p| (p.2, p.3) == (libc::EPERM, libc::EPERM)),
            "{kind:?}: {seen:?}"
        );
        assert!(denied(kind) >= before[i] + 2, "{kind:?}: denials counted");
    }
    // vCPU and event-loop threads: the parent's own, and the child's spare ones.
    let count = |kind| probes.iter().filter(|p| p.0 == kind).count();
    assert!(count(ThreadKind::Vcpu) >= 2 && count(ThreadKind::EventLoop) >= 2);
}

/// Embedder code never runs on a filtered thread: a console callback may make calls no forkvm
/// thread may (here an `openat` creating a file, which reaches the kernel: `ENOENT`), runs on
/// a thread of its own, and has received all of the output when `wait` returns.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_console_callback_runs_unfiltered_and_has_everything_when_wait_returns() {
    let seen = std::sync::Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let sink = seen.clone();
    let vm = VmBuilder::new()
        .kernel(crate::test_guest::path())
        .memory_mib(32)
        .cmdline("mode=exit")
        .debug_exit(true)
        .seccomp(SeccompPolicy::Deny)
        .console(ConsoleOutput::Callback(Box::new(move |bytes: &[u8]| {
            let (_, open) = {
                // SAFETY: NUL-terminated path; a returned fd is closed at once.
                let fd =
                    unsafe { libc::open(MISSING.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                if fd >= 0 {
                    // SAFETY: just opened here.
                    unsafe { libc::close(fd) };
                }
                ((), errno)
            };
            let mut seen = sink.lock().unwrap();
            seen.0.extend_from_slice(bytes);
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            seen.1.push((thread, open, current()));
        })))
        .build()
        .unwrap();
    vm.start().unwrap();
    vm.wait().unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        String::from_utf8_lossy(&seen.0).contains("test guest: done"),
        "{}",
        String::from_utf8_lossy(&seen.0)
    );
    for (thread, open, filter) in &seen.1 {
        assert_eq!(*open, Some(libc::ENOENT), "on {thread}");
        assert_eq!(*filter, None, "on {thread}");
        assert!(!thread.starts_with("forkvm-vcpu"), "on {thread}");
    }
}
