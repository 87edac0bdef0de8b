//! vCPU threads: each runs `KVM_RUN` in a loop, routes port and MMIO exits to the device buses and
//! turns terminal exits into a [`GuestExit`]. Another thread stops (or pauses) a vCPU by setting
//! the VM's exiting (or pause) flag and sending the kick signal, whose handler sets `immediate_exit` in that vCPU's
//! `kvm_run` so `KVM_RUN` returns `EINTR` whether the signal lands inside or just before it.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use forkvm_devices::bus::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::error::Error;
use crate::exit::{CpuRegisters, Crash, CrashReason, GuestExit};
use crate::vstate::run_state::RunState;
use forkvm_devices::sync::lock;

/// Default offset from `SIGRTMIN` of the signal that kicks vCPU threads out of `KVM_RUN`
/// ([`crate::VmBuilder::kick_signal_offset`] picks another). An embedding program must leave
/// this real-time signal to forkvm: forkvm installs its handler (once per process and signal,
/// at the first build of a VM using it), which only sets a flag of the vCPU running on the
/// signalled thread and does nothing on any other thread. A build finding another handler for
/// the signal fails with [`crate::Error::SignalTaken`] instead of replacing it (unless
/// [`crate::VmBuilder::replace_signal_handler`] allows it).
pub const KICK_SIGNAL_OFFSET: i32 = 2;

/// The signal number used to kick vCPU threads by default.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// The kick signal at `offset` from `SIGRTMIN`, if it is a real-time signal.
pub(crate) fn kick_signal_at(offset: i32) -> Result<i32, Error> {
    let signal = SIGRTMIN().checked_add(offset).filter(|_| offset >= 0);
    signal
        .filter(|&signal| signal <= libc::SIGRTMAX())
        .ok_or(Error::Setup {
            what: "vCPU kick signal",
            reason: format!(
                "SIGRTMIN+{offset} is not a real-time signal (SIGRTMIN+0..={})",
                libc::SIGRTMAX() - SIGRTMIN()
            ),
        })
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while it runs a vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: a non-null pointer is set only by this thread's `run` while it owns the vCPU,
        // whose `kvm_run` mapping stays valid until `run` clears the pointer again.
        unsafe { flag.write_volatile(1) };
    }
}

/// Makes forkvm's kick handler the handler of `signal`: finds it there, or installs it over the
/// default action, or (`replace`) over whatever the program installed; anything else (a handler,
/// or `SIG_IGN`) is the program's, and fails with [`Error::SignalTaken`]. Checked at every build
/// (one `sigaction` call), so a handler the program installed after forkvm's is noticed too.
pub(crate) fn install_kick_handler(signal: i32, replace: bool) -> Result<(), Error> {
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _held = lock(&INSTALLING);
    let setup_err = |e: &dyn std::fmt::Display| Error::Setup {
        what: "vCPU kick signal handler",
        reason: e.to_string(),
    };
    let current = current_handler(signal).map_err(|e| setup_err(&e))?;
    if current == on_kick as *const () as usize {
        return Ok(());
    }
    if current != libc::SIG_DFL && !replace {
        return Err(Error::SignalTaken {
            signal,
            what: "vCPU kick",
        });
    }
    register_signal_handler(signal, on_kick).map_err(|e| setup_err(&e))
}

/// The handler (or `SIG_DFL`, `SIG_IGN`) installed for `signal`.
fn current_handler(signal: i32) -> std::io::Result<usize> {
    // SAFETY: an all-zero sigaction is a valid out-parameter; a null new action only reads
    // the current one.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(current.sa_sigaction)
    }
}

/// The buses a vCPU routes its port and MMIO exits to.
pub struct IoBuses {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices (virtio windows).
    pub mmio: Bus,
}

/// A vCPU ready to run on its own thread.
pub struct Vcpu {
    /// KVM's handle.
    pub fd: VcpuFd,
    /// Index, equal to its APIC ID.
    pub id: u32,
}

/// A vCPU shared between its thread, which runs it, and the VM handle, which reads its state
/// while the VM is paused (the thread holds the lock only around `KVM_RUN` and the exit).
pub type SharedVcpu = Arc<Mutex<Vcpu>>;

impl Vcpu {
    /// Runs the vCPU until the VM is exiting or this vCPU ends it, parking while it is paused.
    pub fn run(vcpu: &SharedVcpu, buses: &IoBuses, state: &RunState) {
        let flag: *mut u8 = &mut lock(vcpu).fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|cell| cell.set(flag));
        let exit = loop {
            state.park_while_paused();
            if state.is_exiting() {
                break None;
            }
            if let Some(exit) = lock(vcpu).step(buses) {
                break Some(exit);
            }
        };
        IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
        if let Some(exit) = exit {
            state.finish(exit);
        }
    }

    /// Runs the guest until its next exit and handles it; returns how the guest ended, if it did.
    fn step(&mut self, buses: &IoBuses) -> Option<GuestExit> {
        let reason = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                buses.pio.read(u64::from(port), data);
                return None;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                buses.pio.write(u64::from(port), data);
                return None;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
                return None;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                return None;
            }
            Ok(VcpuExit::IrqWindowOpen | VcpuExit::Intr) => return None,
            Ok(VcpuExit::Shutdown) => {
                return Some(GuestExit::TripleFault {
                    vcpu: self.id,
                    registers: self.registers().map(Box::new),
                });
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                return Some(GuestExit::PoweredOff { status: None });
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                return Some(GuestExit::Reset);
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _)) => CrashReason::GuestCrash,
            Ok(VcpuExit::FailEntry(reason, cpu)) => CrashReason::FailedEntry { reason, cpu },
            Ok(VcpuExit::InternalError) => self.internal_error(),
            Ok(other) => CrashReason::UnexpectedExit(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) if e.errno() == libc::EAGAIN => return None,
            Err(e) => CrashReason::RunFailed(e.to_string()),
        };
        let registers = self.registers();
        Some(GuestExit::Crashed(Box::new(Crash {
            vcpu: self.id,
            reason,
            registers,
        })))
    }

    fn internal_error(&mut self) -> CrashReason {
        // SAFETY: KVM fills the `internal` member of the exit union for KVM_EXIT_INTERNAL_ERROR,
        // the exit just returned.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        CrashReason::InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
        }
    }

    fn registers(&self) -> Option<CpuRegisters> {
        Some(CpuRegisters::from_kvm(
            &self.fd.get_regs().ok()?,
            &self.fd.get_sregs().ok()?,
        ))
    }
}
