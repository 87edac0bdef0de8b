//! The allowlist of each [`ThreadKind`] (x86-64 system calls), made of named groups; what each
//! group is for is written in `docs/seccomp.md`, which lists the same groups. A thread that
//! starts threads passes its filter on to them, so a spawner's list holds its children's: the
//! thread preparing children holds the vCPU's and event loop's lists (it starts their spare
//! threads), the event loop holds the DNS resolver threads' calls.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule, sock_filter,
};

use super::ThreadKind;

/// System call number → the rules of which one must match (none: always allowed).
pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// KVM's ioctl type (`KVMIO`), in bits 8..16 of every KVM request number.
const KVMIO: u64 = 0xae;

/// Every thread: memory, locks and sleeps, its own signals, reads and writes on fds it holds,
/// and ending itself (not the process: `exit_group` is not here).
const BASE: &[i64] = &[
    // The allocator and thread stacks.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Locks, condition variables, sleeps, clocks.
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // Fds the thread holds already: eventfds, the console, logs, closing.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    // Signal handlers (the kick, SIGSYS) return; masks; the thread's end.
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    // HashMap's random keys (std seeds them per thread).
    libc::SYS_getrandom,
];

/// Starting a thread (std and glibc), and the filter a new forkvm thread installs. `clone` only
/// for threads, and `clone3` never: [`spawn_guard`] decides those before the list.
const SPAWN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_seccomp,
];

/// A VM's event loop: epoll, device I/O on fds it holds (disk images, sockets), and the
/// user-mode network's host sockets.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // virtio-blk on its image (and overlay) files.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    // The user-mode network and vsock's host side.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
];

/// The thread preparing children: KVM VMs and vCPUs over memory files, overlay files.
const PREPARE: &[i64] = &[
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_dup,
];

/// The reaper: dropping VMs (fds, mappings, joining their threads) and memory.
const REAPER: &[i64] = &[libc::SYS_shutdown, libc::SYS_epoll_ctl, libc::SYS_fallocate];

/// The allowlist of `kind`.
pub(super) fn allowlist(kind: ThreadKind) -> Result<Rules, BackendError> {
    let mut rules = Rules::new();
    allow(&mut rules, BASE);
    allow_if(&mut rules, libc::SYS_tgkill, vec![arg_eq(0, pid())?])?;
    // std's check, as it drops an fd, that the fd is open.
    allow_if(
        &mut rules,
        libc::SYS_fcntl,
        vec![arg_eq(1, libc::F_GETFD as u64)?],
    )?;
    match kind {
        ThreadKind::Vcpu => vcpu(&mut rules)?,
        ThreadKind::EventLoop => event_loop(&mut rules)?,
        ThreadKind::Prepare => {
            vcpu(&mut rules)?;
            event_loop(&mut rules)?;
            allow(&mut rules, PREPARE);
            // It makes the children's VMs and vCPUs.
            kvm_ioctls(&mut rules)?;
            // It starts the spare threads of children, which install their own filters.
            allow(&mut rules, SPAWN);
            no_new_privs(&mut rules)?;
            set_name(&mut rules)?;
        }
        ThreadKind::Reaper => {
            allow(&mut rules, REAPER);
            allow(&mut rules, SPAWN);
            no_new_privs(&mut rules)?;
            set_name(&mut rules)?;
            kvm_ioctls(&mut rules)?;
        }
    }
    Ok(rules)
}

fn vcpu(rules: &mut Rules) -> Result<(), BackendError> {
    guest_facing_kvm_ioctls(rules)?;
    // A device reset by its driver (a status write, on this thread) drops its host connections,
    // which leave the device's epoll set (vsock).
    allow(rules, &[libc::SYS_epoll_ctl]);
    // A spare thread waits in the batch scheduling class and leaves it for the ordinary one
    // when it gets its job (`vstate::threads`); only for itself (pid 0).
    for class in [libc::SCHED_BATCH, libc::SCHED_OTHER] {
        allow_if(
            rules,
            libc::SYS_sched_setscheduler,
            vec![arg_eq(0, 0)?, arg_eq(1, class as u64)?],
        )?;
    }
    Ok(())
}

fn event_loop(rules: &mut Rules) -> Result<(), BackendError> {
    vcpu(rules)?;
    allow(rules, EVENT_LOOP);
    for request in [libc::FIONBIO, libc::FIONREAD, libc::FIOCLEX] {
        allow_if(rules, libc::SYS_ioctl, vec![arg_eq(1, request)?])?;
    }
    // A disk's overlay file, made at the guest's first write after a fork (or ahead of it, by
    // the thread preparing children): unnamed temporary files only (`O_TMPFILE`).
    let tmpfile = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::O_TMPFILE as u64),
        libc::O_TMPFILE as u64,
    )?;
    allow_if(rules, libc::SYS_openat, vec![tmpfile])
}

/// Instructions put before a filter's program: `clone3` fails with `ENOSYS` (glibc then uses
/// `clone`, whose flags a filter can see), and `fork`, `vfork` and a `clone` that makes a process
/// (not a thread, or on a thread that may not start threads) fail with `EPERM`.
///
/// Why not the trap: glibc blocks every signal around `clone` (`pthread_create`), and the
/// kernel kills the process on a trap while `SIGSYS` is blocked. So these are refused without
/// the trap, and not counted.
pub(super) fn spawn_guard(kind: ThreadKind) -> Vec<sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    // `struct seccomp_data`: the call's number, and the low half of its first argument.
    const NR: u32 = 0;
    const ARG0_LOW: u32 = 16;
    let op = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    let nr = |call: i64| call as u32;
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | e as u32;
    let may_spawn = matches!(kind, ThreadKind::Prepare | ThreadKind::Reaper);
    let mut guard = vec![
        op(LD_W_ABS, NR),
        jump(JEQ_K, nr(libc::SYS_clone3), 0, 1),
        op(RET_K, errno(libc::ENOSYS)),
    ];
    if may_spawn {
        // 3: fork and vfork to the EPERM at 8; clone to 6; anything else past the guard (9).
        guard.extend([
            jump(JEQ_K, nr(libc::SYS_fork), 4, 0),
            jump(JEQ_K, nr(libc::SYS_vfork), 3, 0),
            jump(JEQ_K, nr(libc::SYS_clone), 0, 3),
            op(LD_W_ABS, ARG0_LOW),
            jump(JSET_K, libc::CLONE_THREAD as u32, 1, 0),
            op(RET_K, errno(libc::EPERM)),
        ]);
    } else {
        // 3: fork, vfork and clone to the EPERM at 6; anything else past the guard (7).
        guard.extend([
            jump(JEQ_K, nr(libc::SYS_fork), 2, 0),
            jump(JEQ_K, nr(libc::SYS_vfork), 1, 0),
            jump(JEQ_K, nr(libc::SYS_clone), 0, 1),
            op(RET_K, errno(libc::EPERM)),
        ]);
    }
    guard
}

/// Every KVM ioctl (type `KVMIO`) on the KVM fds the thread holds.
fn kvm_ioctls(rules: &mut Rules) -> Result<(), BackendError> {
    allow_if(rules, libc::SYS_ioctl, vec![kvm_type()?])
}

/// The KVM ioctls of the threads a guest drives (vCPU, event loop): every one but those that
/// make VMs, vCPUs or devices, or change a VM's memory map ([`VM_SHAPING`]). A thread a guest
/// took over could otherwise map any of the process's memory into its guest.
fn guest_facing_kvm_ioctls(rules: &mut Rules) -> Result<(), BackendError> {
    let mut conditions = vec![kvm_type()?];
    for &request in VM_SHAPING {
        conditions.push(SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            u64::from(request),
        )?);
    }
    allow_if(rules, libc::SYS_ioctl, conditions)
}

fn kvm_type() -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )
}

/// A KVM ioctl request number (`_IO`, `_IOW`, `_IOWR` of `<linux/kvm.h>`).
const fn kvm_request(direction: u32, number: u32, size: usize) -> u32 {
    (direction << 30) | ((size as u32) << 16) | ((KVMIO as u32) << 8) | number
}

const IO: u32 = 0;
const IOW: u32 = 1;
const IOWR: u32 = 3;

/// What only the threads making VMs may ask of KVM (see [`guest_facing_kvm_ioctls`]).
pub(super) const VM_SHAPING: &[u32] = {
    use kvm_bindings::{
        kvm_create_device, kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region,
    };
    &[
        kvm_request(IO, 0x01, 0), // CREATE_VM
        kvm_request(IO, 0x41, 0), // CREATE_VCPU
        kvm_request(IO, 0x44, 0), // SET_NR_MMU_PAGES
        kvm_request(IOW, 0x46, size_of::<kvm_userspace_memory_region>()), // SET_USER_MEMORY_REGION
        kvm_request(IO, 0x47, 0), // SET_TSS_ADDR
        kvm_request(IOW, 0x48, size_of::<u64>()), // SET_IDENTITY_MAP_ADDR
        kvm_request(IOW, 0x49, 160), // SET_USER_MEMORY_REGION2
        kvm_request(IO, 0x60, 0), // CREATE_IRQCHIP
        kvm_request(IOW, 0x77, size_of::<kvm_pit_config>()), // CREATE_PIT2
        kvm_request(IOW, 0xa3, size_of::<kvm_enable_cap>()), // ENABLE_CAP
        kvm_request(IOWR, 0xe0, size_of::<kvm_create_device>()), // CREATE_DEVICE
    ]
};

/// `prctl(PR_SET_NO_NEW_PRIVS)`, which installing a filter does first.
fn no_new_privs(rules: &mut Rules) -> Result<(), BackendError> {
    allow_if(
        rules,
        libc::SYS_prctl,
        vec![arg_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)?],
    )
}

/// `prctl(PR_SET_NAME)`, with which std names a new thread.
fn set_name(rules: &mut Rules) -> Result<(), BackendError> {
    allow_if(
        rules,
        libc::SYS_prctl,
        vec![arg_eq(0, libc::PR_SET_NAME as u64)?],
    )
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for &call in calls {
        // An unconditional entry replaces any conditions.
        rules.insert(call, Vec::new());
    }
}

/// Allows `call` when all of `conditions` hold (or when another rule for it does).
fn allow_if(
    rules: &mut Rules,
    call: i64,
    conditions: Vec<SeccompCondition>,
) -> Result<(), BackendError> {
    let rule = SeccompRule::new(conditions)?;
    match rules.get_mut(&call) {
        // Already allowed unconditionally.
        Some(existing) if existing.is_empty() => {}
        Some(existing) => existing.push(rule),
        None => {
            rules.insert(call, vec![rule]);
        }
    }
    Ok(())
}

/// Argument `index`, an `int` (its low 32 bits: the ABI leaves the upper ones undefined), is
/// `value`.
fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

fn pid() -> u64 {
    u64::from(std::process::id())
}
