//! `forkvm_vm`: a built VM (`forkvm::Vm`): start, wait, stop, pause, resume, memory, identity,
//! devices, fork, snapshot and restore, vsock.

use std::ffi::c_char;
use std::os::fd::IntoRawFd;
use std::sync::Arc;
use std::time::Duration;

use forkvm::{BalloonHandle, GuestExit, Vm};

use crate::console::{child_arg, forkvm_child, slice_arg};
use crate::error::forkvm_status::FORKVM_ERR_TIMED_OUT;
use crate::error::{Failure, ffi, forkvm_status};
use crate::handle::Registry;
use crate::{bytes_arg, out_arg, str_arg};

/// A VM (`forkvm::Vm`). Made by `forkvm_builder_build`, `forkvm_vm_fork` or
/// `forkvm_vm_restore`; freed (and stopped, if it runs) by `forkvm_vm_free`. Thread-safe.
pub struct forkvm_vm {
    _private: [u8; 0],
}

pub(crate) static VMS: Registry<Vm> = Registry::new("forkvm_vm");

/// How a guest ended (`GuestExit`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_exit_kind {
    /// It has not ended (only from `forkvm_vm_exit`).
    FORKVM_EXIT_RUNNING = 0,
    /// The guest powered off; `status` is what it wrote to the debug-exit port, if
    /// `has_status`.
    FORKVM_EXIT_POWERED_OFF = 1,
    /// The guest asked for a reset (how a Linux guest without ACPI shuts down).
    FORKVM_EXIT_RESET = 2,
    /// vCPU `vcpu` triple-faulted.
    FORKVM_EXIT_TRIPLE_FAULT = 3,
    /// KVM could not run vCPU `vcpu` any further.
    FORKVM_EXIT_CRASHED = 4,
    /// The host stopped it (`forkvm_vm_stop`, `forkvm_vm_free`).
    FORKVM_EXIT_STOPPED = 5,
}

/// A description of how a guest ended.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct forkvm_exit {
    /// What happened.
    pub kind: forkvm_exit_kind,
    /// Whether `status` is set (`FORKVM_EXIT_POWERED_OFF` through the debug-exit port).
    pub has_status: bool,
    /// The guest's exit status.
    pub status: u32,
    /// The vCPU, for `FORKVM_EXIT_TRIPLE_FAULT` and `FORKVM_EXIT_CRASHED`.
    pub vcpu: u32,
    /// Whether `rip` is set (the faulting vCPU's registers could be read).
    pub has_registers: bool,
    /// The faulting vCPU's instruction pointer.
    pub rip: u64,
    /// The whole story as text, NUL-terminated (cut at 1023 bytes): reason and registers.
    pub description: [c_char; 1024],
}

impl forkvm_exit {
    fn from_exit(exit: Option<&GuestExit>) -> Self {
        let mut out = Self {
            kind: forkvm_exit_kind::FORKVM_EXIT_RUNNING,
            has_status: false,
            status: 0,
            vcpu: 0,
            has_registers: false,
            rip: 0,
            description: [0; 1024],
        };
        let Some(exit) = exit else {
            return out;
        };
        let registers = match exit {
            GuestExit::PoweredOff { status } => {
                out.kind = forkvm_exit_kind::FORKVM_EXIT_POWERED_OFF;
                out.has_status = status.is_some();
                out.status = status.unwrap_or(0);
                None
            }
            GuestExit::Reset => {
                out.kind = forkvm_exit_kind::FORKVM_EXIT_RESET;
                None
            }
            GuestExit::TripleFault { vcpu, registers } => {
                out.kind = forkvm_exit_kind::FORKVM_EXIT_TRIPLE_FAULT;
                out.vcpu = *vcpu;
                registers.as_deref()
            }
            GuestExit::Crashed(crash) => {
                out.kind = forkvm_exit_kind::FORKVM_EXIT_CRASHED;
                out.vcpu = crash.vcpu;
                crash.registers.as_ref()
            }
            GuestExit::Stopped => {
                out.kind = forkvm_exit_kind::FORKVM_EXIT_STOPPED;
                None
            }
            // An exit newer than this binding: not a clean end; the description says what.
            _ => {
                out.kind = forkvm_exit_kind::FORKVM_EXIT_CRASHED;
                None
            }
        };
        if let Some(registers) = registers {
            out.has_registers = true;
            out.rip = registers.rip;
        }
        let text = exit.to_string();
        let len = text.len().min(out.description.len() - 1);
        for (to, from) in out.description.iter_mut().zip(&text.as_bytes()[..len]) {
            *to = *from as c_char;
        }
        out
    }
}

/// Writes `exit` to `out` unless it is NULL.
fn put_exit(out: *mut forkvm_exit, exit: Option<&GuestExit>) {
    // SAFETY: an optional out-pointer: NULL or valid for writes for the call.
    if let Some(out) = unsafe { out.as_mut() } {
        *out = forkvm_exit::from_exit(exit);
    }
}

/// Stops the VM if it runs, and frees it; NULL is ignored. A call on it in flight on another
/// thread returns (a wait with `FORKVM_EXIT_STOPPED`). Returns at once: the VM's threads,
/// devices, KVM VM and memory are released on forkvm's own threads afterwards (see
/// `forkvm_wait_for_releases`), except the names it holds on the host (a vsock socket path,
/// published ports, a TAP interface), released before this returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_free(vm: *mut forkvm_vm) -> forkvm_status {
    ffi(|| {
        if !vm.is_null() {
            // A call in flight holds the VM too: stopped here, it returns.
            if let Err(shared) = Arc::try_unwrap(VMS.remove(vm)?) {
                shared.stop();
            }
        }
        Ok(())
    })
}

/// How many things freed VMs and forks let go of (KVM VMs, memory) are still being released in
/// the background.
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_pending_releases() -> u64 {
    forkvm::pending_releases() as u64
}

/// Waits up to `timeout_ms` until everything freed so far is released and the threads that
/// released it have ended (for a shutdown path, or a test counting threads and fds);
/// `FORKVM_ERR_TIMED_OUT` if that takes longer.
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_wait_for_releases(timeout_ms: u64) -> forkvm_status {
    ffi(|| {
        if forkvm::wait_for_releases(Duration::from_millis(timeout_ms)) {
            Ok(())
        } else {
            Err(Failure::new(
                FORKVM_ERR_TIMED_OUT,
                format!("not all released within {timeout_ms} ms"),
            ))
        }
    })
}

/// Starts the vCPU threads and the event loop.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_start(vm: *const forkvm_vm) -> forkvm_status {
    ffi(|| Ok(VMS.get(vm)?.start()?))
}

/// Blocks until the guest ends (or the VM is stopped from another thread) and says how in
/// `*exit` (may be NULL). Every VMM thread has exited when it returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_wait(
    vm: *const forkvm_vm,
    exit: *mut forkvm_exit,
) -> forkvm_status {
    ffi(|| {
        let ended = VMS.get(vm)?.wait()?;
        put_exit(exit, Some(&ended));
        Ok(())
    })
}

/// Ends the VM and waits for its threads; `*exit` (may be NULL) says how it ended:
/// `FORKVM_EXIT_STOPPED`, or the guest's own end if that came first. Stopping a stopped VM
/// (or one never started) does nothing more.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_stop(
    vm: *const forkvm_vm,
    exit: *mut forkvm_exit,
) -> forkvm_status {
    ffi(|| {
        let ended = VMS.get(vm)?.stop();
        put_exit(exit, Some(&ended));
        Ok(())
    })
}

/// How the guest ended, without blocking: `FORKVM_EXIT_RUNNING` while it runs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_exit(
    vm: *const forkvm_vm,
    exit: *mut forkvm_exit,
) -> forkvm_status {
    ffi(|| {
        let exit = out_arg(exit, "exit")?;
        *exit = forkvm_exit::from_exit(VMS.get(vm)?.exit().as_ref());
        Ok(())
    })
}

/// Pauses a running VM: its vCPUs and devices hold still until `forkvm_vm_resume`. Pausing a
/// paused VM does nothing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_pause(vm: *const forkvm_vm) -> forkvm_status {
    ffi(|| Ok(VMS.get(vm)?.pause()?))
}

/// Lets a paused VM run again; does nothing to a VM that is not paused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_resume(vm: *const forkvm_vm) -> forkvm_status {
    ffi(|| Ok(VMS.get(vm)?.resume()?))
}

/// Whether the VM is paused, into `*paused`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_is_paused(
    vm: *const forkvm_vm,
    paused: *mut bool,
) -> forkvm_status {
    ffi(|| {
        let paused = out_arg(paused, "paused")?;
        *paused = VMS.get(vm)?.is_paused();
        Ok(())
    })
}

/// Reads `len` bytes of guest memory at guest-physical `addr` into `buf` (consistent while the
/// VM is paused).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_read_memory(
    vm: *const forkvm_vm,
    addr: u64,
    buf: *mut u8,
    len: usize,
) -> forkvm_status {
    ffi(|| {
        let vm = VMS.get(vm)?;
        if buf.is_null() && len > 0 {
            return Err(Failure::null("buf"));
        }
        let buf = if len == 0 {
            &mut [][..]
        } else {
            // SAFETY: non-NULL, and `buf` is valid for writes of `len` bytes for the call.
            unsafe { std::slice::from_raw_parts_mut(buf, len) }
        };
        Ok(vm.read_memory(addr, buf)?)
    })
}

/// Writes `len` bytes from `buf` into guest memory at guest-physical `addr` (in a forked VM,
/// only this VM's copy).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_write_memory(
    vm: *const forkvm_vm,
    addr: u64,
    buf: *const u8,
    len: usize,
) -> forkvm_status {
    ffi(|| {
        let vm = VMS.get(vm)?;
        Ok(vm.write_memory(addr, bytes_arg(buf, len, "buf")?)?)
    })
}

/// Who a VM is (`forkvm::Identity`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct forkvm_identity {
    /// 0 for a booted VM; a fork child or a restored snapshot has its source's + 1.
    pub generation: u64,
    /// Random, different for every VM.
    pub id: [u8; 16],
}

/// This VM's identity, as its guest reads it on its identity page.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_identity(
    vm: *const forkvm_vm,
    identity: *mut forkvm_identity,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(identity, "identity")?;
        let identity = VMS.get(vm)?.identity();
        *out = forkvm_identity {
            generation: identity.generation,
            id: identity.id,
        };
        Ok(())
    })
}

/// Guest memory size in bytes (`*size`), and host memory backing it now (`*allocated`, may be
/// NULL: skipped).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_memory(
    vm: *const forkvm_vm,
    size: *mut u64,
    allocated: *mut u64,
) -> forkvm_status {
    ffi(|| {
        let vm = VMS.get(vm)?;
        *out_arg(size, "size")? = vm.memory_size();
        // SAFETY: an optional out-pointer: NULL or valid for writes for the call.
        if let Some(allocated) = unsafe { allocated.as_mut() } {
            *allocated = vm.memory_allocated_bytes()?;
        }
        Ok(())
    })
}

/// How long the last fork or snapshot of this VM held it paused, in nanoseconds, into
/// `*nanos`; -1 before the first.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_last_pause(
    vm: *const forkvm_vm,
    nanos: *mut i64,
) -> forkvm_status {
    ffi(|| {
        let nanos = out_arg(nanos, "nanos")?;
        *nanos = VMS
            .get(vm)?
            .last_pause()
            .map_or(-1, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        Ok(())
    })
}

/// One token bucket of a rate limit (`forkvm::Bucket`): `size` tokens (bytes or requests),
/// refilled from empty in `refill_ms` milliseconds, plus `one_time_burst` tokens once. A
/// `size` of 0 limits nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_bucket {
    /// The most tokens it holds; 0: no limit.
    pub size: u64,
    /// Extra tokens available once, before the bucket's own.
    pub one_time_burst: u64,
    /// How long an empty bucket takes to fill, in milliseconds (above 0 when `size` is).
    pub refill_ms: u64,
}

/// A virtio device's rate limit (`forkvm::RateLimit`): bytes moved and requests served.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_rate_limit {
    /// Bytes between guest memory and the host.
    pub bytes: forkvm_bucket,
    /// Requests (descriptor chains).
    pub ops: forkvm_bucket,
}

fn bucket(b: forkvm_bucket) -> Option<forkvm::Bucket> {
    (b.size != 0).then(|| {
        forkvm::Bucket::new(b.size, Duration::from_millis(b.refill_ms))
            .with_one_time_burst(b.one_time_burst)
    })
}

/// Replaces the rate limit of virtio device `device` (an index into `forkvm_vm_devices`)
/// while the VM runs or before it starts (`forkvm::Vm::set_rate_limit`): its buckets start
/// full; NULL lifts the limit. Fork children and snapshots keep the limit in force.
/// `FORKVM_ERR_NO_DEVICE` for an index out of range, `FORKVM_ERR_INVALID_ARGUMENT` for a
/// bucket with a size but no refill time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_set_rate_limit(
    vm: *const forkvm_vm,
    device: usize,
    limit: *const forkvm_rate_limit,
) -> forkvm_status {
    ffi(|| {
        // SAFETY: NULL or a valid `forkvm_rate_limit` for the call.
        let limit = unsafe { from_c_limit(limit) };
        VMS.get(vm)?.set_rate_limit(device, limit)?;
        Ok(())
    })
}

/// Replaces the limit on what virtio device `device` pushes to the guest on its own — frames
/// for a network device, host data for a vsock device — while the VM runs or before it starts
/// (`forkvm::Vm::set_rx_rate_limit`), independently of `forkvm_vm_set_rate_limit`: its buckets
/// start full; NULL lifts the limit. Data beyond it waits on the host side (nothing is dropped).
/// Fork children and snapshots keep it. `FORKVM_ERR_NO_DEVICE` for an index out of range,
/// `FORKVM_ERR_INVALID_ARGUMENT` for a device without a receive direction (block, console,
/// entropy, balloon) or a bucket with a size but no refill time.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_set_rx_rate_limit(
    vm: *const forkvm_vm,
    device: usize,
    limit: *const forkvm_rate_limit,
) -> forkvm_status {
    ffi(|| {
        // SAFETY: NULL or a valid `forkvm_rate_limit` for the call.
        let limit = unsafe { from_c_limit(limit) };
        VMS.get(vm)?.set_rx_rate_limit(device, limit)?;
        Ok(())
    })
}

/// The rate limit in force on virtio device `device` (an index into `forkvm_vm_devices`), into
/// `*limit`: a bucket of size 0 is no limit; `refill_ms` is rounded down to whole milliseconds.
/// `FORKVM_ERR_NO_DEVICE` for an index out of range.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_rate_limit(
    vm: *const forkvm_vm,
    device: usize,
    limit: *mut forkvm_rate_limit,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(limit, "limit")?;
        *out = to_c_limit(device_info(vm, device)?.rate_limit);
        Ok(())
    })
}

/// The receive-direction limit in force on virtio device `device` (see
/// `forkvm_vm_set_rx_rate_limit`), into `*limit`, as `forkvm_vm_rate_limit` gives the other.
/// `FORKVM_ERR_NO_DEVICE` for an index out of range, `FORKVM_ERR_INVALID_ARGUMENT` for a device
/// without a receive direction.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_rx_rate_limit(
    vm: *const forkvm_vm,
    device: usize,
    limit: *mut forkvm_rate_limit,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(limit, "limit")?;
        let rx = device_info(vm, device)?.rx_rate_limit.ok_or_else(|| {
            Failure::from(forkvm::Error::InvalidRateLimit(
                forkvm::RateLimitError::NoReceiveDirection,
            ))
        })?;
        *out = to_c_limit(rx);
        Ok(())
    })
}

/// Device `device` of `vm` (`FORKVM_ERR_NO_DEVICE` for an index out of range).
fn device_info(vm: *const forkvm_vm, device: usize) -> Result<forkvm::DeviceInfo, Failure> {
    VMS.get(vm)?
        .devices()
        .into_iter()
        .nth(device)
        .ok_or_else(|| Failure::from(forkvm::Error::NoSuchDevice(device)))
}

/// `*limit` as forkvm's limit; NULL (and buckets of size 0) is no limit.
///
/// # Safety
/// `limit` is NULL or points to a valid `forkvm_rate_limit` for the call.
unsafe fn from_c_limit(limit: *const forkvm_rate_limit) -> forkvm::RateLimit {
    // SAFETY: the caller's promise.
    let limit = unsafe { limit.as_ref() }.copied().unwrap_or_default();
    forkvm::RateLimit {
        bytes: bucket(limit.bytes),
        ops: bucket(limit.ops),
    }
}

/// forkvm's limit as C's (a bucket of size 0 is none).
fn to_c_limit(limit: forkvm::RateLimit) -> forkvm_rate_limit {
    let to_c = |b: Option<forkvm::Bucket>| {
        b.map_or_else(forkvm_bucket::default, |b| forkvm_bucket {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_ms: u64::try_from(b.refill_time.as_millis()).unwrap_or(u64::MAX),
        })
    };
    forkvm_rate_limit {
        bytes: to_c(limit.bytes),
        ops: to_c(limit.ops),
    }
}

/// One of a VM's virtio devices (`forkvm::DeviceInfo`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_device_info {
    /// Virtio device type (1 net, 2 block, 3 console, 4 entropy, 5 balloon, 19 vsock).
    pub device_type: u32,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The driver's status register (0 until a driver touches it; bit 0x40 = needs reset).
    pub status: u32,
}

/// The VM's virtio devices: sets `*count` to how many there are and copies up to `capacity`
/// of them into `devices` (NULL when `capacity` is 0); `FORKVM_ERR_BUFFER_TOO_SMALL` if
/// `capacity < *count`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_devices(
    vm: *const forkvm_vm,
    devices: *mut forkvm_device_info,
    capacity: usize,
    count: *mut usize,
) -> forkvm_status {
    ffi(|| {
        let count = out_arg(count, "count")?;
        let infos = VMS.get(vm)?.devices();
        *count = infos.len();
        for (i, info) in infos.iter().take(capacity).enumerate() {
            // SAFETY: `devices` holds `capacity` writable entries (non-NULL since capacity > i).
            let slot =
                unsafe { devices.add(i).as_mut() }.ok_or_else(|| Failure::null("devices"))?;
            *slot = forkvm_device_info {
                device_type: info.kind.virtio_id(),
                mmio_base: info.mmio_base,
                irq: info.irq,
                status: info.status,
            };
        }
        if capacity < infos.len() {
            return Err(Failure::new(
                forkvm_status::FORKVM_ERR_BUFFER_TOO_SMALL,
                format!("the VM has {} devices, room for {capacity}", infos.len()),
            ));
        }
        Ok(())
    })
}

/// Creates `count` children's KVM VMs ahead of time, so that later forks only map memory and
/// load state.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_prepare_forks(
    vm: *const forkvm_vm,
    count: usize,
) -> forkvm_status {
    ffi(|| Ok(VMS.get(vm)?.prepare_forks(count)?))
}

/// Keeps `count` prepared children ready, topped up on a background thread after each fork.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_keep_forks_ready(
    vm: *const forkvm_vm,
    count: usize,
) -> forkvm_status {
    ffi(|| {
        VMS.get(vm)?.keep_forks_ready(count);
        Ok(())
    })
}

/// How many prepared children are ready, into `*count`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_prepared_forks(
    vm: *const forkvm_vm,
    count: *mut usize,
) -> forkvm_status {
    ffi(|| {
        let count = out_arg(count, "count")?;
        *count = VMS.get(vm)?.prepared_forks();
        Ok(())
    })
}

/// Splits this running (or paused) VM into `count` new running VMs, all continuing from this
/// instant, written to `out[0..count]`. `children` holds `count` descriptions of their host
/// ends, or is NULL: all output discarded. The parent continues (or stays paused). On failure
/// nothing is written to `out`. Free each child with `forkvm_vm_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_fork(
    vm: *const forkvm_vm,
    children: *const forkvm_child,
    count: usize,
    out: *mut *mut forkvm_vm,
) -> forkvm_status {
    ffi(|| {
        let vm = VMS.get(vm)?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let specs = if children.is_null() {
            (0..count).map(|_| child_arg(std::ptr::null())).collect()
        } else {
            slice_arg(children, count, "children")?
                .iter()
                .map(|child| child_arg(child))
                .collect::<Result<Vec<_>, _>>()
        }?;
        for (i, child) in vm.fork(specs)?.into_iter().enumerate() {
            // SAFETY: `out` is non-NULL and holds `count` writable handles; `fork` returns one
            // VM per entry of `specs`, which has `count`.
            unsafe { *out.add(i) = VMS.insert(child) };
        }
        Ok(())
    })
}

/// Writes this running (or paused) VM's complete state to the directory `dir` (created).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_snapshot(
    vm: *const forkvm_vm,
    dir: *const c_char,
) -> forkvm_status {
    ffi(|| Ok(VMS.get(vm)?.snapshot(str_arg(dir, "dir")?)?))
}

/// Starts a VM from the snapshot in `dir`, with the host ends in `child` (NULL: output
/// discarded), into `*out`. Free it with `forkvm_vm_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_restore(
    dir: *const c_char,
    child: *const forkvm_child,
    out: *mut *mut forkvm_vm,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let vm = Vm::restore(str_arg(dir, "dir")?, child_arg(child)?)?;
        *out = VMS.insert(vm);
        Ok(())
    })
}

/// Keeps `n` children prepared for restores of the snapshot in `dir`: it stays loaded and each
/// `forkvm_vm_restore` of `dir` starts in a child made ahead (refilled in the background), until
/// a new snapshot is saved there. 0 lets the directory go.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_keep_restores_ready(dir: *const c_char, n: u32) -> forkvm_status {
    ffi(|| Ok(Vm::keep_restores_ready(str_arg(dir, "dir")?, n as usize)?))
}

/// How many children are prepared for restores of `dir` (`forkvm_keep_restores_ready`); 0 for
/// NULL or a directory not kept ready.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_restores_ready(dir: *const c_char) -> u32 {
    str_arg(dir, "dir").map_or(0, |dir| {
        u32::try_from(Vm::restores_ready(dir)).unwrap_or(u32::MAX)
    })
}

/// Opens a stream to guest vsock `port` in-process, waiting at most `timeout_ms` for the guest
/// to accept; `*fd` is a connected Unix stream socket the caller owns (close it to disconnect).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_vsock_connect(
    vm: *const forkvm_vm,
    port: u32,
    timeout_ms: u64,
    fd: *mut i32,
) -> forkvm_status {
    ffi(|| {
        let fd = out_arg(fd, "fd")?;
        let stream = VMS
            .get(vm)?
            .vsock_connect(port, Duration::from_millis(timeout_ms))?;
        *fd = stream.into_raw_fd();
        Ok(())
    })
}

/// The balloon's state (`forkvm::BalloonHandle`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_balloon_info {
    /// The target the host set, in 4 KiB pages.
    pub target_pages: u64,
    /// The pages the guest has put in the balloon.
    pub actual_pages: u64,
    /// Bytes given back to the host by inflation so far.
    pub inflated_bytes: u64,
    /// Bytes taken back by the guest through deflation so far.
    pub deflated_bytes: u64,
    /// Bytes reclaimed through free page reporting so far.
    pub reported_bytes: u64,
    /// Requests refused (outside RAM, malformed).
    pub rejected_requests: u64,
    /// How many statistics updates the guest sent.
    pub stats_updates: u64,
}

fn balloon_of(vm: &Vm) -> Result<&BalloonHandle, Failure> {
    vm.balloon().ok_or_else(|| {
        Failure::new(
            forkvm_status::FORKVM_ERR_NO_DEVICE,
            "this VM has no balloon: add one with forkvm_builder_balloon",
        )
    })
}

/// Sets the balloon's target in 4 KiB pages (the guest gives that much memory back).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_balloon_set_target(
    vm: *const forkvm_vm,
    pages: u64,
) -> forkvm_status {
    ffi(|| {
        let vm = VMS.get(vm)?;
        balloon_of(&vm)?
            .set_target_pages(pages)
            .map_err(|e| Failure::invalid(e.to_string()))
    })
}

/// The balloon's state, into `*info`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_balloon_info(
    vm: *const forkvm_vm,
    info: *mut forkvm_balloon_info,
) -> forkvm_status {
    ffi(|| {
        let info = out_arg(info, "info")?;
        let vm = VMS.get(vm)?;
        let balloon = balloon_of(&vm)?;
        *info = forkvm_balloon_info {
            target_pages: balloon.target_pages(),
            actual_pages: balloon.actual_pages(),
            inflated_bytes: balloon.inflated_bytes(),
            deflated_bytes: balloon.deflated_bytes(),
            reported_bytes: balloon.reported_bytes(),
            rejected_requests: balloon.rejected_requests(),
            stats_updates: balloon.stats_updates(),
        };
        Ok(())
    })
}

/// Asks the guest for fresh memory statistics (they arrive later: `stats_updates` grows).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_balloon_request_stats(vm: *const forkvm_vm) -> forkvm_status {
    ffi(|| {
        let vm = VMS.get(vm)?;
        balloon_of(&vm)?.request_stats();
        Ok(())
    })
}

/// One memory statistic from the guest (tags: virtio's `VIRTIO_BALLOON_S_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_balloon_stat {
    /// Which statistic.
    pub tag: u16,
    /// Its value.
    pub value: u64,
}

/// The guest's latest memory statistics: sets `*count` to how many (0 before the first) and
/// copies up to `capacity` into `stats`; `FORKVM_ERR_BUFFER_TOO_SMALL` if `capacity < *count`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_balloon_stats(
    vm: *const forkvm_vm,
    stats: *mut forkvm_balloon_stat,
    capacity: usize,
    count: *mut usize,
) -> forkvm_status {
    ffi(|| {
        let count = out_arg(count, "count")?;
        let vm = VMS.get(vm)?;
        let entries = balloon_of(&vm)?
            .stats()
            .map(|s| s.entries().to_vec())
            .unwrap_or_default();
        *count = entries.len();
        for (i, &(tag, value)) in entries.iter().take(capacity).enumerate() {
            // SAFETY: `stats` holds `capacity` writable entries (non-NULL since capacity > i).
            let slot = unsafe { stats.add(i).as_mut() }.ok_or_else(|| Failure::null("stats"))?;
            *slot = forkvm_balloon_stat { tag, value };
        }
        if capacity < entries.len() {
            return Err(Failure::new(
                forkvm_status::FORKVM_ERR_BUFFER_TOO_SMALL,
                format!("{} statistics, room for {capacity}", entries.len()),
            ));
        }
        Ok(())
    })
}
