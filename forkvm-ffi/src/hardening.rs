//! Seccomp (`forkvm::SeccompPolicy`, the process-wide policy and the denials counted) and what
//! reads a snapshot (`forkvm_vm_restore_with` and its `FORKVM_LOAD_*` flags). See
//! `docs/seccomp.md` and `docs/rate-limits.md`.

use std::ffi::c_char;

use forkvm::{LoadOptions, SeccompPolicy, Vm};

use crate::console::{child_arg, forkvm_child};
use crate::error::{Failure, ffi, forkvm_status};
use crate::vm::{VMS, forkvm_vm};
use crate::{out_arg, str_arg};

/// What a forkvm thread's system call outside its allowlist does (one of the
/// `FORKVM_SECCOMP_*` values; `docs/seccomp.md`).
pub type forkvm_seccomp_policy = u32;
/// The call fails with `EPERM` and is counted (`forkvm_get_seccomp_denials`). The default.
pub const FORKVM_SECCOMP_DENY: forkvm_seccomp_policy = 0;
/// The kernel ends the thread (a VM whose thread is killed hangs: prefer `KILL_PROCESS`).
pub const FORKVM_SECCOMP_KILL_THREAD: forkvm_seccomp_policy = 1;
/// The kernel ends the whole process.
pub const FORKVM_SECCOMP_KILL_PROCESS: forkvm_seccomp_policy = 2;
/// No filter.
pub const FORKVM_SECCOMP_OFF: forkvm_seccomp_policy = 3;

/// The policy `value` names.
pub(crate) fn policy_arg(value: forkvm_seccomp_policy) -> Result<SeccompPolicy, Failure> {
    match value {
        FORKVM_SECCOMP_DENY => Ok(SeccompPolicy::Deny),
        FORKVM_SECCOMP_KILL_THREAD => Ok(SeccompPolicy::KillThread),
        FORKVM_SECCOMP_KILL_PROCESS => Ok(SeccompPolicy::KillProcess),
        FORKVM_SECCOMP_OFF => Ok(SeccompPolicy::Off),
        other => Err(Failure::invalid(format!(
            "unknown seccomp policy {other} (FORKVM_SECCOMP_DENY, _KILL_THREAD, _KILL_PROCESS or _OFF)"
        ))),
    }
}

/// Sets the seccomp policy of the threads forkvm starts from now on for the whole process and
/// of VMs whose builder sets none (`forkvm_builder_seccomp`); threads running keep theirs.
/// `FORKVM_ERR_INVALID_ARGUMENT` for a value that is not a `FORKVM_SECCOMP_*`.
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_set_seccomp_policy(policy: forkvm_seccomp_policy) -> forkvm_status {
    ffi(|| {
        forkvm::set_seccomp_policy(policy_arg(policy)?);
        Ok(())
    })
}

/// The process-wide seccomp policy (`forkvm_set_seccomp_policy`), into `*policy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_get_seccomp_policy(
    policy: *mut forkvm_seccomp_policy,
) -> forkvm_status {
    ffi(|| {
        *out_arg(policy, "policy")? = match forkvm::seccomp_policy() {
            SeccompPolicy::Deny => FORKVM_SECCOMP_DENY,
            SeccompPolicy::KillThread => FORKVM_SECCOMP_KILL_THREAD,
            SeccompPolicy::KillProcess => FORKVM_SECCOMP_KILL_PROCESS,
            SeccompPolicy::Off => FORKVM_SECCOMP_OFF,
            // A policy newer than this binding.
            other => return Err(Failure::invalid(format!("seccomp policy {other:?}"))),
        };
        Ok(())
    })
}

/// The seccomp denials counted in this process so far (`forkvm::SeccompDenials`): system calls
/// of forkvm's threads outside their allowlist, each of which failed with `EPERM`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_seccomp_denials {
    /// All denied calls.
    pub total: u64,
    /// Denied on vCPU threads.
    pub vcpu: u64,
    /// Denied on event-loop threads (and the DNS threads they start).
    pub event_loop: u64,
    /// Denied on the threads preparing children.
    pub prepare: u64,
    /// Denied on the reaper's threads.
    pub reaper: u64,
    /// Whether `last_syscall` is set (a call was denied).
    pub has_last_syscall: bool,
    /// The number of the last denied system call (x86-64 numbering).
    pub last_syscall: i64,
    /// Threads that run unfiltered because the kernel refused their filter.
    pub install_failures: u64,
}

/// The seccomp denials counted so far, into `*denials`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_get_seccomp_denials(
    denials: *mut forkvm_seccomp_denials,
) -> forkvm_status {
    ffi(|| {
        let d = forkvm::seccomp_denials();
        *out_arg(denials, "denials")? = forkvm_seccomp_denials {
            total: d.total,
            vcpu: d.vcpu,
            event_loop: d.event_loop,
            prepare: d.prepare,
            reaper: d.reaper,
            has_last_syscall: d.last_syscall.is_some(),
            last_syscall: d.last_syscall.unwrap_or(0),
            install_failures: d.install_failures,
        };
        Ok(())
    })
}

/// How `forkvm_vm_restore_with` reads a snapshot: 0, or `FORKVM_LOAD_*` values or'ed together
/// (`forkvm::LoadOptions`).
pub type forkvm_load_flags = u32;
/// Reads all of the memory and disk files and checks them against their checksums
/// (`state.json` is always checked): a damaged file gets `FORKVM_ERR_SNAPSHOT`. Costs a read of
/// every byte.
pub const FORKVM_LOAD_VERIFY_DATA: forkvm_load_flags = 1;
/// Copies the memory into a sealed memory file instead of mapping the snapshot's `memory`, so
/// that nothing done to the file later (a truncation, a write) reaches the VM. Costs a copy.
pub const FORKVM_LOAD_COPY_MEMORY: forkvm_load_flags = 2;

fn load_options(flags: forkvm_load_flags) -> Result<LoadOptions, Failure> {
    let known = FORKVM_LOAD_VERIFY_DATA | FORKVM_LOAD_COPY_MEMORY;
    if flags & !known != 0 {
        return Err(Failure::invalid(format!(
            "unknown load flags {:#x}",
            flags & !known
        )));
    }
    Ok(LoadOptions::new()
        .verify_data(flags & FORKVM_LOAD_VERIFY_DATA != 0)
        .copy_memory(flags & FORKVM_LOAD_COPY_MEMORY != 0))
}

/// `forkvm_vm_restore` reading the snapshot as `flags` say (`FORKVM_LOAD_*`; unknown bits get
/// `FORKVM_ERR_INVALID_ARGUMENT`). The directory is read anew even if it is kept ready
/// (`forkvm_keep_restores_ready`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_restore_with(
    dir: *const c_char,
    child: *const forkvm_child,
    flags: forkvm_load_flags,
    out: *mut *mut forkvm_vm,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let options = load_options(flags)?;
        let vm = Vm::restore_with(str_arg(dir, "dir")?, child_arg(child)?, options)?;
        *out = VMS.insert(vm);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_policies_are_checked() {
        let both = load_options(FORKVM_LOAD_VERIFY_DATA | FORKVM_LOAD_COPY_MEMORY).unwrap();
        assert!(both.verify_data && both.copy_memory);
        assert_eq!(load_options(0).unwrap(), LoadOptions::default());
        assert!(load_options(4).is_err());
        assert_eq!(policy_arg(FORKVM_SECCOMP_OFF).unwrap(), SeccompPolicy::Off);
        assert!(policy_arg(4).is_err());
    }
}
