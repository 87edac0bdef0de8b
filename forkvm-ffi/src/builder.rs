//! `forkvm_builder`: a VM's configuration (`forkvm::VmBuilder`), and `forkvm_builder_build`.

use std::ffi::c_char;
use std::sync::Mutex;

use forkvm::{BalloonConfig, DiskConfig, VmBuilder, VsockConfig};

use crate::console::{input_arg, output_arg};
use crate::error::{Failure, ffi, forkvm_status};
use crate::handle::Registry;
use crate::hardening::{forkvm_seccomp_policy, policy_arg};
use crate::network::{forkvm_network, network_arg};
use crate::vm::{VMS, forkvm_vm};
use crate::{forkvm_output, opt_str_arg, out_arg, str_arg};

/// A VM's configuration (`VmBuilder`). Made by `forkvm_builder_new`, set with the
/// `forkvm_builder_*` setters, turned into a VM by `forkvm_builder_build` (after which it is
/// spent: setters and a second build fail), freed with `forkvm_builder_free`.
pub struct forkvm_builder {
    _private: [u8; 0],
}

/// `None` once built.
static BUILDERS: Registry<Mutex<Option<VmBuilder>>> = Registry::new("forkvm_builder");

/// Converts a setter's arguments with `prepare`, then replaces the builder behind `builder`
/// with the setter applied to it (a setter whose arguments are refused changes nothing).
fn with_builder<F: FnOnce(VmBuilder) -> VmBuilder>(
    builder: *const forkvm_builder,
    prepare: impl FnOnce() -> Result<F, Failure>,
) -> forkvm_status {
    ffi(|| {
        let entry = BUILDERS.get(builder)?;
        let set = prepare()?;
        let mut slot = entry.lock().unwrap_or_else(|e| e.into_inner());
        let current = slot
            .take()
            .ok_or_else(|| Failure::invalid("this forkvm_builder was built already"))?;
        *slot = Some(set(current));
        Ok(())
    })
}

/// Makes a builder with the defaults (1 vCPU, 128 MiB, `console=ttyS0`, serial console on
/// standard output, no kernel yet) into `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_new(out: *mut *mut forkvm_builder) -> forkvm_status {
    ffi(|| {
        *out_arg(out, "out")? = BUILDERS.insert(Mutex::new(Some(VmBuilder::new())));
        Ok(())
    })
}

/// Frees a builder (built or not); NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_free(builder: *mut forkvm_builder) -> forkvm_status {
    ffi(|| {
        if !builder.is_null() {
            BUILDERS.remove(builder)?;
        }
        Ok(())
    })
}

/// The kernel: an ELF `vmlinux` (PVH entry) or a bzImage.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_kernel(
    builder: *mut forkvm_builder,
    path: *const c_char,
) -> forkvm_status {
    with_builder(builder, || {
        let path = str_arg(path, "path")?;
        Ok(move |b: VmBuilder| b.kernel(path))
    })
}

/// An initrd / initramfs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_initrd(
    builder: *mut forkvm_builder,
    path: *const c_char,
) -> forkvm_status {
    with_builder(builder, || {
        let path = str_arg(path, "path")?;
        Ok(move |b: VmBuilder| b.initrd(path))
    })
}

/// The kernel command line, replacing `console=ttyS0` (forkvm appends its platform parameters).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_cmdline(
    builder: *mut forkvm_builder,
    cmdline: *const c_char,
) -> forkvm_status {
    with_builder(builder, || {
        let cmdline = str_arg(cmdline, "cmdline")?;
        Ok(move |b: VmBuilder| b.cmdline(cmdline))
    })
}

/// The number of vCPUs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_vcpus(
    builder: *mut forkvm_builder,
    count: u32,
) -> forkvm_status {
    with_builder(builder, || Ok(move |b: VmBuilder| b.vcpus(count)))
}

/// Guest memory in MiB.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_memory_mib(
    builder: *mut forkvm_builder,
    mib: u64,
) -> forkvm_status {
    with_builder(builder, || Ok(move |b: VmBuilder| b.memory_mib(mib)))
}

/// Where the serial console's output goes (`output` is copied; NULL discards).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_console(
    builder: *mut forkvm_builder,
    output: *const forkvm_output,
) -> forkvm_status {
    with_builder(builder, || {
        let output = output_arg(output)?;
        Ok(move |b: VmBuilder| b.console(output))
    })
}

/// Feeds the serial console from `fd` (duplicated: the caller keeps its own).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_console_input(
    builder: *mut forkvm_builder,
    fd: i32,
) -> forkvm_status {
    with_builder(builder, || {
        let input = input_arg(fd)?.ok_or_else(|| Failure::invalid("a negative input fd"))?;
        Ok(move |b: VmBuilder| b.console_input(input))
    })
}

/// Whether the test-only debug-exit port (0xf4) is there.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_debug_exit(
    builder: *mut forkvm_builder,
    enabled: bool,
) -> forkvm_status {
    with_builder(builder, || Ok(move |b: VmBuilder| b.debug_exit(enabled)))
}

/// Adds a virtio-rng device (`/dev/hwrng`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_rng(builder: *mut forkvm_builder) -> forkvm_status {
    with_builder(builder, || Ok(|b: VmBuilder| b.rng()))
}

/// Adds a virtio-blk disk over the raw image `path` (`/dev/vda`, `/dev/vdb`, ... in order).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_disk(
    builder: *mut forkvm_builder,
    path: *const c_char,
    read_only: bool,
    direct_io: bool,
) -> forkvm_status {
    with_builder(builder, || {
        let disk = DiskConfig::new(str_arg(path, "path")?)
            .read_only(read_only)
            .direct_io(direct_io);
        Ok(move |b: VmBuilder| b.disk(disk))
    })
}

/// Adds a virtio console (`/dev/hvc0`, ...): its output (copied; NULL discards) and the fd its
/// input comes from (duplicated), or `FORKVM_NO_FD`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_virtio_console(
    builder: *mut forkvm_builder,
    output: *const forkvm_output,
    input_fd: i32,
) -> forkvm_status {
    with_builder(builder, || {
        let (output, input) = (output_arg(output)?, input_arg(input_fd)?);
        Ok(move |b: VmBuilder| b.virtio_console(output, input))
    })
}

/// Adds a virtio-vsock device giving the guest `cid`; with a `uds_path` (else NULL), host
/// programs also reach it through that Unix socket (Firecracker's hybrid style).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_vsock(
    builder: *mut forkvm_builder,
    cid: u64,
    uds_path: *const c_char,
) -> forkvm_status {
    with_builder(builder, || {
        let mut vsock = VsockConfig::new(cid);
        if let Some(path) = opt_str_arg(uds_path, "uds_path")? {
            vsock = vsock.uds_path(path);
        }
        Ok(move |b: VmBuilder| b.vsock(vsock))
    })
}

/// Adds a virtio-balloon device (driven with the `forkvm_vm_balloon_*` functions).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_balloon(
    builder: *mut forkvm_builder,
    deflate_on_oom: bool,
    free_page_reporting: bool,
) -> forkvm_status {
    with_builder(builder, || {
        let balloon = BalloonConfig::new()
            .deflate_on_oom(deflate_on_oom)
            .free_page_reporting(free_page_reporting);
        Ok(move |b: VmBuilder| b.balloon(balloon))
    })
}

/// Adds a virtio-net device with forkvm's user-mode network as `network` describes (copied: the
/// caller keeps and frees its `forkvm_network`). Published ports are bound when the VM is built.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_network(
    builder: *mut forkvm_builder,
    network: *const forkvm_network,
) -> forkvm_status {
    with_builder(builder, || {
        let network = network_arg(network)?;
        Ok(move |b: VmBuilder| b.network(network))
    })
}

/// The KVM device to open (default `/dev/kvm`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_kvm_device(
    builder: *mut forkvm_builder,
    path: *const c_char,
) -> forkvm_status {
    with_builder(builder, || {
        let path = str_arg(path, "path")?;
        Ok(move |b: VmBuilder| b.kvm_device(path))
    })
}

/// The seccomp policy of this VM's threads and its children's (a `FORKVM_SECCOMP_*` value;
/// default: the process-wide policy, `forkvm_set_seccomp_policy`). See `docs/seccomp.md`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_seccomp(
    builder: *mut forkvm_builder,
    policy: forkvm_seccomp_policy,
) -> forkvm_status {
    with_builder(builder, || {
        let policy = policy_arg(policy)?;
        Ok(move |b: VmBuilder| b.seccomp(policy))
    })
}

/// Kicks the VM's vCPU threads with `SIGRTMIN + offset` instead of `SIGRTMIN + 2`, for a program
/// that uses that signal itself (a negative offset, or one past `SIGRTMAX`, fails at build).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_kick_signal_offset(
    builder: *mut forkvm_builder,
    offset: i32,
) -> forkvm_status {
    with_builder(builder, || {
        Ok(move |b: VmBuilder| b.kick_signal_offset(offset))
    })
}

/// Whether the build may replace a handler the program installed for the kick signal (default:
/// no, the build fails with `FORKVM_ERR_INVALID_ARGUMENT`). Handlers are per process: the
/// program's is gone for the whole process.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_replace_signal_handler(
    builder: *mut forkvm_builder,
    replace: bool,
) -> forkvm_status {
    with_builder(builder, || {
        Ok(move |b: VmBuilder| b.replace_signal_handler(replace))
    })
}

/// Validates the configuration, creates the VM and loads the guest into `*out` (not started:
/// `forkvm_vm_start`). Spends the builder, even when it fails; free it still.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_builder_build(
    builder: *mut forkvm_builder,
    out: *mut *mut forkvm_vm,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let entry = BUILDERS.get(builder)?;
        let config = entry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Failure::invalid("this forkvm_builder was built already"))?;
        *out = VMS.insert(config.build()?);
        Ok(())
    })
}
