//! The kick signal's handler belongs to the whole process, so these tests have a process of
//! their own: a handler the program installed for the kick signal fails the build with
//! `Error::SignalTaken` (before the first VM, and after forkvm installed its own), unless the
//! builder allows replacing it. One test, so the steps run in order.

use std::sync::atomic::{AtomicUsize, Ordering};

use forkvm::{ConsoleBuffer, Error, ErrorKind, GuestExit};
use forkvm_tests::test_guest_vm;

static PROGRAM_HANDLER_CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn program_handler(_: libc::c_int) {
    PROGRAM_HANDLER_CALLS.fetch_add(1, Ordering::SeqCst);
}

/// Installs the program's handler for `signal`.
fn install_program_handler(signal: i32) {
    // SAFETY: a zeroed sigaction with a plain handler; the handler only touches an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = program_handler as *const () as usize;
        assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
    }
}

fn current_handler(signal: i32) -> usize {
    // SAFETY: reads the current action only.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(signal, std::ptr::null(), &mut action), 0);
        action.sa_sigaction
    }
}

fn run_halting_guest(offset: i32, replace: bool) -> Result<GuestExit, Error> {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=exit", &console)
        .kick_signal_offset(offset)
        .replace_signal_handler(replace)
        .build()?;
    vm.start()?;
    vm.wait()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_handler_the_program_installed_is_not_replaced_unless_allowed() {
    let signal = forkvm::kick_signal();
    install_program_handler(signal);

    // Before the first VM: the build fails, and the program's handler stays.
    let err = run_halting_guest(forkvm::KICK_SIGNAL_OFFSET, false).unwrap_err();
    assert!(
        matches!(err, Error::SignalTaken { signal: s, .. } if s == signal),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("replace_signal_handler"), "{err}");
    assert_eq!(
        current_handler(signal),
        program_handler as *const () as usize
    );

    // Allowed: the build replaces it and the VM runs.
    let exit = run_halting_guest(forkvm::KICK_SIGNAL_OFFSET, true).unwrap();
    assert!(matches!(exit, GuestExit::PoweredOff { .. }), "{exit:?}");
    assert_ne!(
        current_handler(signal),
        program_handler as *const () as usize
    );
    // Once forkvm's handler is there, builds need no permission.
    run_halting_guest(forkvm::KICK_SIGNAL_OFFSET, false).unwrap();

    // Another signal: forkvm's handler first, then the program's over it; the next build
    // notices rather than kick vCPUs through the program's handler.
    let other = forkvm::KICK_SIGNAL_OFFSET + 1;
    run_halting_guest(other, false).unwrap();
    let other_signal = forkvm::kick_signal() + 1;
    install_program_handler(other_signal);
    let err = run_halting_guest(other, false).unwrap_err();
    assert!(matches!(err, Error::SignalTaken { signal: s, .. } if s == other_signal));

    // SIG_IGN is the program's choice too.
    let ignored = forkvm::KICK_SIGNAL_OFFSET + 2;
    // SAFETY: sets the disposition of a real-time signal nothing else uses here.
    unsafe { libc::signal(forkvm::kick_signal() + 2, libc::SIG_IGN) };
    assert!(matches!(
        run_halting_guest(ignored, false),
        Err(Error::SignalTaken { .. })
    ));
    assert_eq!(PROGRAM_HANDLER_CALLS.load(Ordering::SeqCst), 0);
}
