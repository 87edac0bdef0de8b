//! The SIGSYS handler behind [`super::SeccompPolicy::Deny`]: a filtered thread's denied call
//! traps (`SECCOMP_RET_TRAP`, data = [`TAG`] | thread kind); the handler makes the call return
//! `-EPERM` and counts it per thread kind. It touches only atomics and the signal context (it
//! runs on filtered threads, inside any code); with `FORKVM_SECCOMP_TRACE=1` in the environment
//! at the first VM build it also writes one line per denial to standard error (`write(2)`, which
//! every filter allows), to learn what a list lacks.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

use seccompiler::BpfProgram;

use super::{SeccompError, ThreadKind};

/// The upper 12 bits of forkvm's trap data; the low 4 bits hold the thread kind.
const TAG: u32 = 0xf0c0;
/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: i32 = 1;
/// `BPF_RET | BPF_K`: return the constant `k`.
const BPF_RET_K: u16 = 0x06;

/// Denials per thread kind (see [`ThreadKind::index`]).
static DENIED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// The last denied call's number, -1 before any.
static LAST_SYSCALL: AtomicI64 = AtomicI64::new(-1);
/// Threads that run unfiltered because their filter could not be installed.
static INSTALL_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Whether denials are written to standard error.
static TRACE: AtomicBool = AtomicBool::new(false);
/// The SIGSYS handler before forkvm's (`sa_sigaction` and `sa_flags`), which a SIGSYS
/// without forkvm's tag goes to.
static PREVIOUS: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicUsize = AtomicUsize::new(0);

/// The seccomp denials counted so far in this process (under [`super::SeccompPolicy::Deny`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SeccompDenials {
    /// All denied calls.
    pub total: u64,
    /// Denied on vCPU threads.
    pub vcpu: u64,
    /// Denied on event-loop threads (and the DNS threads they start).
    pub event_loop: u64,
    /// Denied on the thread preparing children.
    pub prepare: u64,
    /// Denied on the reaper's threads.
    pub reaper: u64,
    /// The number of the last denied system call (x86-64 numbering), if any.
    pub last_syscall: Option<i64>,
    /// Threads that run unfiltered because the kernel refused their filter.
    pub install_failures: u64,
}

/// The seccomp denials counted so far in this process: calls outside a forkvm thread's
/// allowlist, each of which failed with `EPERM`. Non-zero means a guest or a bug drove forkvm
/// outside what it should do (or a list lacks a call: `docs/seccomp.md`).
pub fn seccomp_denials() -> SeccompDenials {
    let of = |kind: ThreadKind| DENIED[kind.index()].load(Ordering::SeqCst);
    let (vcpu, event_loop, prepare, reaper) = (
        of(ThreadKind::Vcpu),
        of(ThreadKind::EventLoop),
        of(ThreadKind::Prepare),
        of(ThreadKind::Reaper),
    );
    let last = LAST_SYSCALL.load(Ordering::SeqCst);
    SeccompDenials {
        total: vcpu + event_loop + prepare + reaper,
        vcpu,
        event_loop,
        prepare,
        reaper,
        last_syscall: (last >= 0).then_some(last),
        install_failures: INSTALL_FAILURES.load(Ordering::SeqCst),
    }
}

pub(super) fn count_install_failure() {
    INSTALL_FAILURES.fetch_add(1, Ordering::SeqCst);
}

/// Makes every return of `program` other than "allow" a trap tagged with `kind` (seccompiler's
/// trap carries no data, and its architecture check kills the process, which a library must
/// not do), or leaves it alone when it does not trap (a kill policy).
pub(super) fn tag(program: &mut BpfProgram, kind: ThreadKind) {
    let traps = program
        .iter()
        .any(|i| i.code == BPF_RET_K && i.k == libc::SECCOMP_RET_TRAP);
    if !traps {
        return;
    }
    let tagged = libc::SECCOMP_RET_TRAP | TAG | kind.index() as u32;
    for instruction in program.iter_mut() {
        if instruction.code == BPF_RET_K && instruction.k != libc::SECCOMP_RET_ALLOW {
            instruction.k = tagged;
        }
    }
}

/// The part of a SIGSYS `siginfo_t` the handler reads (`<asm-generic/siginfo.h>`, x86-64).
#[repr(C)]
struct SigsysInfo {
    _signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    _call_addr: *mut libc::c_void,
    syscall: i32,
    _arch: u32,
}

extern "C" fn on_sigsys(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid siginfo_t (128 bytes, larger
    // than `SigsysInfo`), laid out as `SigsysInfo` for SIGSYS.
    let sigsys = unsafe { &*info.cast::<SigsysInfo>() };
    let data = sigsys.errno as u32;
    let index = (data & 0xf) as usize;
    if sigsys.code != SYS_SECCOMP
        || data & !0xf != TAG
        || index >= DENIED.len()
        || context.is_null()
    {
        chain(signal, info, context);
        return;
    }
    DENIED[index].fetch_add(1, Ordering::SeqCst);
    LAST_SYSCALL.store(i64::from(sigsys.syscall), Ordering::SeqCst);
    let context = context.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes the interrupted thread's saved context, which it restores on
    // return from the handler; writing its RAX sets the trapped call's result.
    let args = unsafe {
        let gregs = &mut (*context).uc_mcontext.gregs;
        gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
        [gregs[libc::REG_RDI as usize], gregs[libc::REG_RSI as usize]]
    };
    if TRACE.load(Ordering::Relaxed) {
        trace(index, sigsys.syscall, args);
    }
}

/// Hands a SIGSYS that is not forkvm's to the handler before forkvm's, or does what the
/// kernel would have done without a handler (the default action: the process ends).
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS.load(Ordering::SeqCst);
    let flags = PREVIOUS_FLAGS.load(Ordering::SeqCst) as libc::c_int;
    if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
        // SAFETY: restoring the default action and raising the signal again are
        // async-signal-safe; the signal is blocked until this handler returns, then ends the
        // process as it would have without forkvm's handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &action, std::ptr::null_mut());
            libc::raise(signal);
        }
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so its handler has this
        // signature.
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(previous) };
        handler(signal, info, context);
    } else {
        // SAFETY: without SA_SIGINFO, the previous handler takes the signal number only.
        let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
        handler(signal);
    }
}

/// Writes "forkvm seccomp: denied syscall N on a KIND thread (rdi, rsi)" (and the path, for
/// `openat`) to standard error without allocating.
fn trace(kind: usize, syscall: i32, args: [i64; 2]) {
    let mut line = [0u8; 240];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    let kinds: [&[u8]; 4] = [b"vcpu", b"event-loop", b"prepare", b"reaper"];
    put(b"forkvm seccomp: denied syscall ");
    put(&decimal(i64::from(syscall)));
    put(b" on a ");
    put(kinds.get(kind).copied().unwrap_or(b"?"));
    put(b" thread (args ");
    put(&decimal(args[0]));
    put(b", ");
    put(&decimal(args[1]));
    put(b")");
    if i64::from(syscall) == libc::SYS_openat && args[1] != 0 {
        // The path the thread passed to the call it just made (so readable), up to 64 bytes.
        put(b" path ");
        let path = args[1] as *const u8;
        for i in 0..64 {
            // SAFETY: `path` is the NUL-terminated string this thread passed to `openat`;
            // reading stops at its NUL (or after 64 bytes).
            let byte = unsafe { path.add(i).read() };
            if byte == 0 {
                break;
            }
            put(&[byte]);
        }
    }
    put(b"\n");
    // SAFETY: writes `len` initialized bytes of `line` to fd 2; a failure is ignored.
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
}

/// `n` in decimal, without allocating.
fn decimal(n: i64) -> Vec20 {
    let mut digits = [0u8; 20];
    let mut value = n.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 || i == 1 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        digits[i] = b'-';
    }
    Vec20 { digits, start: i }
}

/// Digits in a fixed buffer, from `start`.
struct Vec20 {
    digits: [u8; 20],
    start: usize,
}

impl std::ops::Deref for Vec20 {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

/// Installs the SIGSYS handler unless it is there, keeping the one it replaces to chain to.
/// Called on an unfiltered thread first (a VM build); later calls find it and make no call.
pub(super) fn install_handler() -> Result<(), SeccompError> {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    static LOCK: Mutex<()> = Mutex::new(());
    if INSTALLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    let _held = forkvm_devices::sync::lock(&LOCK);
    if INSTALLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    TRACE.store(
        std::env::var_os("FORKVM_SECCOMP_TRACE").is_some_and(|v| v == "1"),
        Ordering::SeqCst,
    );
    // SAFETY: an all-zero sigaction is valid (no handler, empty mask, no flags); the calls
    // only read and write these two structures.
    let previous = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let mut previous: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, &mut previous) != 0 {
            return Err(SeccompError::Handler(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        previous
    };
    PREVIOUS_FLAGS.store(previous.sa_flags as usize, Ordering::SeqCst);
    PREVIOUS.store(previous.sa_sigaction, Ordering::SeqCst);
    INSTALLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Unblocks SIGSYS on the calling thread: a trap while it is blocked would end the process.
pub(super) fn unblock_sigsys() {
    // SAFETY: an empty set gets SIGSYS added; pthread_sigmask changes this thread's mask only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}
