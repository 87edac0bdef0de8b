//! The `VM` class: `forkvm::Vm` with promises for everything that blocks.

use std::os::fd::IntoRawFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use napi::bindgen_prelude::{AsyncTask, Buffer, Either};
use napi::{Env, JsObject, JsUnknown, ValueType};
use napi_derive::napi;

use crate::console;
use crate::convert;
use crate::error::{Failure, Outcome, sync};
use crate::limits::{self, RateLimit, RestoreOptions};
use crate::network::{self, NetworkOptions};
use crate::task::{Blocking, blocking, run, spawn, spawn_run};

/// A virtio block device.
#[napi(object)]
pub struct DiskOptions {
    /// The raw image file.
    pub path: String,
    /// Attach it read-only (writes fail in the guest).
    pub read_only: Option<bool>,
    /// Open the image with `O_DIRECT`.
    pub direct_io: Option<bool>,
    /// A limit on the guest's requests to it (`vm.setRateLimit` changes it while it runs).
    pub rate_limit: Option<RateLimit>,
}

/// A virtio console (the guest's `hvc0`, `hvc1`, ...).
#[napi(object, object_to_js = false)]
pub struct VirtioConsoleOptions {
    /// Where its output goes (as `console`).
    #[napi(ts_type = "ConsoleBuffer | 'stdout' | string | null | ((chunk: Buffer) => void)")]
    pub output: Option<JsUnknown>,
    /// Its input: `'stdin'` or a file descriptor (duplicated).
    #[napi(ts_type = "'stdin' | number")]
    pub input: Option<JsUnknown>,
}

/// A virtio balloon (`{}` for the defaults).
#[napi(object)]
pub struct BalloonOptions {
    /// The guest may take pages back when it runs out of memory.
    pub deflate_on_oom: Option<bool>,
    /// The guest reports free pages, which are given back to the host.
    pub free_page_reporting: Option<bool>,
}

/// How to build a VM; only `kernel` is required.
#[napi(object, object_to_js = false)]
pub struct VmOptions {
    /// The guest kernel: an ELF `vmlinux` (PVH entry) or a bzImage.
    pub kernel: String,
    /// An initrd.
    pub initrd: Option<String>,
    /// The kernel command line (default `console=ttyS0`).
    pub cmdline: Option<String>,
    /// Guest memory in MiB (default 256).
    pub memory_mib: Option<f64>,
    /// vCPUs (default 1).
    pub vcpus: Option<f64>,
    /// Where the serial console goes: a `ConsoleBuffer`, `'stdout'`, a file path, a function
    /// receiving `Buffer`s, or `null`/omitted to discard it.
    #[napi(ts_type = "ConsoleBuffer | 'stdout' | string | null | ((chunk: Buffer) => void)")]
    pub console: Option<JsUnknown>,
    /// Serial console input: `'stdin'` or a file descriptor (duplicated).
    #[napi(ts_type = "'stdin' | number")]
    pub console_input: Option<JsUnknown>,
    /// A virtio-rng device.
    pub rng: Option<bool>,
    /// Virtio block devices, `/dev/vda` first.
    pub disks: Option<Vec<DiskOptions>>,
    /// A virtio-vsock device with this guest CID.
    pub vsock_cid: Option<f64>,
    /// The vsock device's Unix socket path (Firecracker-style `CONNECT <port>`).
    pub vsock_uds_path: Option<String>,
    /// A virtio balloon.
    pub balloon: Option<BalloonOptions>,
    /// The debug-exit port 0xf4 (test guests).
    pub debug_exit: Option<bool>,
    /// Virtio consoles.
    pub virtio_consoles: Option<Vec<VirtioConsoleOptions>>,
    /// The KVM device (default `/dev/kvm`).
    pub kvm_device: Option<String>,
    /// A virtio-net device with forkvm's user-mode network (`{}` for the defaults).
    pub network: Option<NetworkOptions>,
    /// A limit on what the guest sends through the vsock device.
    pub vsock_rate_limit: Option<RateLimit>,
    /// A limit on what the host sends the guest through it (the rest waits in host sockets).
    pub vsock_rx_rate_limit: Option<RateLimit>,
    /// The seccomp policy of this VM's threads (default: the process-wide `seccompPolicy()`).
    #[napi(ts_type = "'deny' | 'killThread' | 'killProcess' | 'off'")]
    pub seccomp: Option<String>,
    /// Kick vCPUs with `SIGRTMIN + kickSignalOffset` (default 2).
    pub kick_signal_offset: Option<f64>,
    /// Replace a handler the program installed for the kick signal (default: the build
    /// rejects with `INVALID_ARGUMENT`).
    pub replace_signal_handler: Option<bool>,
}

/// How a guest ended.
#[napi(object)]
pub struct Exit {
    /// `'poweredOff'`, `'reset'`, `'tripleFault'`, `'crashed'` or `'stopped'`.
    pub kind: String,
    /// The debug-exit status of a powered-off test guest.
    pub status: Option<u32>,
    /// The vCPU of a triple fault or crash.
    pub vcpu: Option<u32>,
    /// What happened, in words (registers included for faults and crashes).
    pub description: String,
}

impl From<forkvm::GuestExit> for Exit {
    fn from(exit: forkvm::GuestExit) -> Self {
        use forkvm::GuestExit as G;
        let description = exit.to_string();
        let (kind, status, vcpu) = match exit {
            G::PoweredOff { status } => ("poweredOff", status, None),
            G::Reset => ("reset", None, None),
            G::TripleFault { vcpu, .. } => ("tripleFault", None, Some(vcpu)),
            G::Crashed(crash) => ("crashed", None, Some(crash.vcpu)),
            G::Stopped => ("stopped", None, None),
            // An exit newer than this binding: not a clean end; the description says what.
            _ => ("crashed", None, None),
        };
        Self {
            kind: kind.into(),
            status,
            vcpu,
            description,
        }
    }
}

/// Who a VM is (the guest reads the same on its identity page).
#[napi(object)]
pub struct Identity {
    /// 0 when booted; a fork child or restored snapshot has its source's + 1.
    pub generation: i64,
    /// The VM's random 16-byte id, in hex (byte 0 first).
    pub id: String,
}

/// A virtio device of a VM.
#[napi(object)]
pub struct Device {
    /// Virtio device type (1 net, 2 block, 3 console, 4 entropy, 5 balloon, 19 vsock).
    pub device_type: u32,
    /// Guest-physical base of its virtio-mmio window.
    pub mmio_base: f64,
    /// Its interrupt line.
    pub irq: u32,
    /// The driver's status register.
    pub status: u32,
    /// The rate limit in force (`vm.setRateLimit`).
    pub rate_limit: RateLimit,
    /// The limit on what a network or vsock device pushes to the guest (`vm.setRxRateLimit`);
    /// absent for devices without a receive direction.
    pub rx_rate_limit: Option<RateLimit>,
}

/// The balloon's state.
#[napi(object)]
pub struct BalloonInfo {
    /// Pages the host asked for.
    pub target_pages: f64,
    /// Pages the guest has given.
    pub actual_pages: f64,
    /// Bytes freed by inflation so far.
    pub inflated_bytes: f64,
    /// Bytes returned by deflation so far.
    pub deflated_bytes: f64,
    /// Bytes freed by free page reporting so far.
    pub reported_bytes: f64,
    /// The guest's last memory statistics: `[tag, value]` pairs.
    pub stats: Option<Vec<Vec<f64>>>,
}

/// A fork child's or restored VM's host ends.
#[napi(object, object_to_js = false)]
pub struct ChildOptions {
    /// Its serial console (as `VmOptions.console`).
    #[napi(ts_type = "ConsoleBuffer | 'stdout' | string | null | ((chunk: Buffer) => void)")]
    pub console: Option<JsUnknown>,
    /// Its serial console input.
    #[napi(ts_type = "'stdin' | number")]
    pub console_input: Option<JsUnknown>,
    /// The host ends of its virtio consoles, in the parent's order.
    pub virtio_consoles: Option<Vec<VirtioConsoleOptions>>,
    /// Its vsock Unix socket path.
    pub vsock_uds_path: Option<String>,
    /// Its own network (default: like its source's, with the policy in force, no published
    /// ports).
    pub network: Option<NetworkOptions>,
}

/// A virtual machine. Made by `VM.build`, `VM.restore` or `vm.fork`; every method that may
/// block returns a promise and runs on node's thread pool. `close()` (or garbage collection)
/// stops it and frees its threads, memory and file descriptors.
#[napi]
#[allow(clippy::upper_case_acronyms)] // The JS class name.
pub struct VM {
    vm: RwLock<Option<Arc<forkvm::Vm>>>,
}

impl VM {
    /// Wraps a Rust VM.
    pub fn new(vm: forkvm::Vm) -> Self {
        Self {
            vm: RwLock::new(Some(Arc::new(vm))),
        }
    }

    /// The VM, for a task; fails once closed.
    pub(crate) fn get(&self) -> Outcome<Arc<forkvm::Vm>> {
        self.with(Arc::clone)
    }

    /// `setRateLimit` and `setRxRateLimit`: checks the arguments, then `set`s the limit.
    fn replace_limit(
        &self,
        device: f64,
        limit: Option<RateLimit>,
        set: fn(&forkvm::Vm, usize, forkvm::RateLimit) -> Result<(), forkvm::Error>,
    ) -> Outcome<()> {
        let device = convert::usize_arg(device, "device")?;
        let limit = limits::rate_limit(limit, "limit")?;
        let vm = self.get()?;
        Ok(set(&vm, device, limit)?)
    }

    /// Runs `f` on the VM; fails once closed.
    fn with<T>(&self, f: impl FnOnce(&Arc<forkvm::Vm>) -> T) -> Outcome<T> {
        let guard = self.vm.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(f).ok_or_else(|| Failure::closed("VM"))
    }
}

impl Drop for VM {
    /// A VM dropped by the garbage collector without `close()` is stopped and freed on a thread
    /// of its own, not in the collector's finalizer on the JS thread (stopping joins threads).
    fn drop(&mut self) {
        let vm = self.vm.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(vm) = vm {
            // If no thread can be started, the closure (and the VM) is dropped right here.
            let _ = std::thread::Builder::new()
                .name("forkvm-node-drop".into())
                .spawn(move || drop(vm));
        }
    }
}

/// Builder settings from `options` (converted on the JS thread).
fn builder(env: Env, options: VmOptions) -> Outcome<forkvm::VmBuilder> {
    let mut b = forkvm::VmBuilder::new()
        .kernel(options.kernel)
        .console(console::output(env, options.console, "console")?);
    if let Some(initrd) = options.initrd {
        b = b.initrd(initrd);
    }
    if let Some(cmdline) = options.cmdline {
        b = b.cmdline(cmdline);
    }
    if let Some(mib) = options.memory_mib {
        b = b.memory_mib(convert::whole(mib, "memoryMib", forkvm::MAX_MEMORY_MIB)?);
    }
    if let Some(vcpus) = options.vcpus {
        b = b.vcpus(convert::u32_arg(vcpus, "vcpus")?);
    }
    if let Some(policy) = options.seccomp {
        b = b.seccomp(limits::seccomp_policy_arg(&policy, "seccomp")?);
    }
    if let Some(offset) = options.kick_signal_offset {
        b = b.kick_signal_offset(limits::kick_signal_offset(offset)?);
    }
    b = b.replace_signal_handler(options.replace_signal_handler.unwrap_or(false));
    if let Some(input) = console::input(options.console_input, "consoleInput")? {
        b = b.console_input(input);
    }
    if options.rng == Some(true) {
        b = b.rng();
    }
    for (i, disk) in options.disks.unwrap_or_default().into_iter().enumerate() {
        let limit = limits::rate_limit(disk.rate_limit, &format!("disks[{i}].rateLimit"))?;
        b = b.disk(
            forkvm::DiskConfig::new(disk.path)
                .read_only(disk.read_only.unwrap_or(false))
                .direct_io(disk.direct_io.unwrap_or(false))
                .rate_limit(limit),
        );
    }
    if options.vsock_cid.is_none()
        && (options.vsock_rate_limit.is_some() || options.vsock_rx_rate_limit.is_some())
    {
        return Err(Failure::invalid(
            "vsockRateLimit and vsockRxRateLimit need a vsockCid",
        ));
    }
    if let Some(cid) = options.vsock_cid {
        let mut vsock = forkvm::VsockConfig::new(convert::u32_arg(cid, "vsockCid")?.into())
            .rate_limit(limits::rate_limit(
                options.vsock_rate_limit,
                "vsockRateLimit",
            )?)
            .rx_rate_limit(limits::rate_limit(
                options.vsock_rx_rate_limit,
                "vsockRxRateLimit",
            )?);
        if let Some(path) = options.vsock_uds_path {
            vsock = vsock.uds_path(path);
        }
        b = b.vsock(vsock);
    }
    if let Some(balloon) = options.balloon {
        b = b.balloon(
            forkvm::BalloonConfig::new()
                .deflate_on_oom(balloon.deflate_on_oom.unwrap_or(false))
                .free_page_reporting(balloon.free_page_reporting.unwrap_or(false)),
        );
    }
    if let Some(enabled) = options.debug_exit {
        b = b.debug_exit(enabled);
    }
    for (i, c) in options
        .virtio_consoles
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let output = console::output(env, c.output, &format!("virtioConsoles[{i}].output"))?;
        let input = console::input(c.input, &format!("virtioConsoles[{i}].input"))?;
        b = b.virtio_console(output, input);
    }
    if let Some(path) = options.kvm_device {
        b = b.kvm_device(path);
    }
    if let Some(network) = options.network {
        b = b.network(network::network(network)?);
    }
    Ok(b)
}

/// A fork child or restore target from a JS value: a console sink, or a `ChildOptions` object.
fn child(env: Env, value: Option<JsUnknown>, what: &str) -> Outcome<forkvm::Child> {
    let is_options = match &value {
        Some(v) => {
            v.get_type()? == ValueType::Object && !console::ConsoleBuffer::instance_of(env, v)?
        }
        None => false,
    };
    if !is_options {
        return Ok(forkvm::Child::new(console::output(env, value, what)?));
    }
    let Some(value) = value else {
        return Ok(forkvm::Child::new(forkvm::ConsoleOutput::Discard));
    };
    // SAFETY: the value's type was checked to be an object.
    let object = unsafe { value.cast::<JsObject>() };
    // SAFETY: `object` is a live object of `env`.
    let options: ChildOptions = unsafe {
        napi::bindgen_prelude::FromNapiValue::from_napi_value(
            env.raw(),
            napi::NapiRaw::raw(&object),
        )
    }?;
    let mut c = forkvm::Child::new(console::output(
        env,
        options.console,
        &format!("{what}.console"),
    )?);
    if let Some(input) = console::input(options.console_input, &format!("{what}.consoleInput"))? {
        c = c.console_input(input);
    }
    for (i, v) in options
        .virtio_consoles
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let output = console::output(env, v.output, &format!("{what}.virtioConsoles[{i}].output"))?;
        let input = console::input(v.input, &format!("{what}.virtioConsoles[{i}].input"))?;
        c = c.virtio_console(output, input);
    }
    if let Some(path) = options.vsock_uds_path {
        c = c.vsock_uds_path(path);
    }
    if let Some(network) = options.network {
        c = c.network(network::network(network)?);
    }
    Ok(c)
}

fn wrap_vm(_: Env, vm: forkvm::Vm) -> napi::Result<VM> {
    Ok(VM::new(vm))
}

fn wrap_vms(_: Env, vms: Vec<forkvm::Vm>) -> napi::Result<Vec<VM>> {
    Ok(vms.into_iter().map(VM::new).collect())
}

fn exit_to_js(_: Env, exit: forkvm::GuestExit) -> napi::Result<Exit> {
    Ok(exit.into())
}

fn nonnegative(value: i64, what: &str) -> Outcome<u64> {
    u64::try_from(value).map_err(|_| Failure::invalid(format!("{what} must not be negative")))
}

#[napi]
impl VM {
    /// Builds a VM (validates `options`, creates the KVM VM, loads the guest); not started.
    #[napi(ts_return_type = "Promise<VM>")]
    pub fn build(
        env: Env,
        options: VmOptions,
    ) -> napi::Result<AsyncTask<Blocking<forkvm::Vm, VM>>> {
        let b = sync(env, || builder(env, options))?;
        Ok(blocking(move || Ok(b.build()?), wrap_vm))
    }

    /// Starts a VM from the snapshot in `dir`, its host ends from `child` (a console sink or
    /// `ChildOptions`; discarded output if omitted), reading it as `options` say (with
    /// `verifyData` or `copyMemory` the directory is loaded anew, even if kept ready). The VM
    /// runs at once.
    #[napi(ts_return_type = "Promise<VM>")]
    pub fn restore(
        env: Env,
        dir: String,
        #[napi(
            ts_arg_type = "ConsoleBuffer | 'stdout' | string | null | ((chunk: Buffer) => void) | ChildOptions"
        )]
        child: Option<JsUnknown>,
        options: Option<RestoreOptions>,
    ) -> napi::Result<AsyncTask<Blocking<forkvm::Vm, VM>>> {
        let c = sync(env, || self::child(env, child, "child"))?;
        let load = limits::load_options(options);
        Ok(blocking(
            move || {
                Ok(match load {
                    Some(load) => forkvm::Vm::restore_with(dir, c, load)?,
                    None => forkvm::Vm::restore(dir, c)?,
                })
            },
            wrap_vm,
        ))
    }

    /// Keeps `n` children prepared for restores of the snapshot in `dir`: it stays loaded and
    /// each `restore` of it starts in a child made ahead (refilled in the background), until a
    /// new snapshot is saved there. 0 lets the directory go.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn keep_restores_ready(dir: String, n: f64) -> AsyncTask<Blocking<(), ()>> {
        run(move || {
            let n = convert::count(n, "n")?;
            Ok(forkvm::Vm::keep_restores_ready(dir, n)?)
        })
    }

    /// How many children are prepared for restores of `dir` (`keepRestoresReady`).
    #[napi]
    pub fn restores_ready(dir: String) -> u32 {
        u32::try_from(forkvm::Vm::restores_ready(dir)).unwrap_or(u32::MAX)
    }

    /// Starts the vCPUs and the event loop.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn start(&self) -> napi::Result<AsyncTask<Blocking<(), ()>>> {
        let vm = self.get();
        Ok(run(move || Ok(vm?.start()?)))
    }

    /// Resolves when the guest ends (or `stop()` is called) with how it ended.
    #[napi(ts_return_type = "Promise<Exit>")]
    pub fn wait(&self, env: Env) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn(env, move || Ok(vm?.wait()?), exit_to_js)
    }

    /// Ends the VM and waits for its threads; resolves with how it ended (`'stopped'`, or the
    /// guest's own end if that came first).
    #[napi(ts_return_type = "Promise<Exit>")]
    pub fn stop(&self) -> napi::Result<AsyncTask<Blocking<forkvm::GuestExit, Exit>>> {
        let vm = self.get();
        Ok(blocking(move || Ok(vm?.stop()), exit_to_js))
    }

    /// Stops the VM and frees everything it holds (threads, memory, file descriptors) as soon
    /// as no other call uses it; every later call fails with code `CLOSED`. Closing twice is
    /// fine.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self) -> AsyncTask<Blocking<(), ()>> {
        let vm = self.vm.write().unwrap_or_else(|e| e.into_inner()).take();
        run(move || {
            if let Some(vm) = vm {
                vm.stop();
                drop(vm);
            }
            Ok(())
        })
    }

    /// Pauses every vCPU and the device loop.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn pause(&self) -> napi::Result<AsyncTask<Blocking<(), ()>>> {
        let vm = self.get();
        Ok(run(move || Ok(vm?.pause()?)))
    }

    /// Lets a paused VM run again.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn resume(&self) -> napi::Result<AsyncTask<Blocking<(), ()>>> {
        let vm = self.get();
        Ok(run(move || Ok(vm?.resume()?)))
    }

    /// Whether the VM is paused.
    #[napi(getter)]
    pub fn is_paused(&self, env: Env) -> napi::Result<bool> {
        sync(env, || self.with(|vm| vm.is_paused()))
    }

    /// Whether `close()` was called.
    #[napi(getter)]
    pub fn is_closed(&self) -> bool {
        self.vm.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// How the guest ended, or `null` while it runs.
    #[napi(getter)]
    pub fn exit(&self, env: Env) -> napi::Result<Option<Exit>> {
        sync(env, || self.with(|vm| vm.exit().map(Exit::from)))
    }

    /// Who the VM is.
    #[napi(getter)]
    pub fn identity(&self, env: Env) -> napi::Result<Identity> {
        sync(env, || {
            self.with(|vm| {
                let identity = vm.identity();
                Identity {
                    generation: identity.generation.try_into().unwrap_or(i64::MAX),
                    id: identity.id.iter().map(|b| format!("{b:02x}")).collect(),
                }
            })
        })
    }

    /// Guest memory size in bytes.
    #[napi(getter)]
    pub fn memory_size(&self, env: Env) -> napi::Result<f64> {
        sync(env, || self.with(|vm| vm.memory_size() as f64))
    }

    /// Host memory backing guest RAM now, in bytes.
    #[napi]
    pub fn memory_allocated_bytes(&self, env: Env) -> napi::Result<f64> {
        sync(env, || Ok(self.get()?.memory_allocated_bytes()? as f64))
    }

    /// How long the last fork or snapshot held the VM paused, in milliseconds (`null` before
    /// the first).
    #[napi(getter)]
    pub fn last_pause_ms(&self, env: Env) -> napi::Result<Option<f64>> {
        sync(env, || {
            self.with(|vm| vm.last_pause().map(|d| d.as_secs_f64() * 1e3))
        })
    }

    /// The VM's virtio devices.
    #[napi(getter)]
    pub fn devices(&self, env: Env) -> napi::Result<Vec<Device>> {
        sync(env, || {
            self.with(|vm| {
                vm.devices()
                    .into_iter()
                    .map(|d| Device {
                        device_type: d.kind.virtio_id(),
                        mmio_base: d.mmio_base as f64,
                        irq: d.irq,
                        status: d.status,
                        rate_limit: limits::rate_limit_to_js(d.rate_limit),
                        rx_rate_limit: d.rx_rate_limit.map(limits::rate_limit_to_js),
                    })
                    .collect()
            })
        })
    }

    /// Replaces the rate limit of device `device` (an index into `devices`) while the VM runs or
    /// before it starts: its buckets start full; `null` lifts it. Fork children and snapshots
    /// keep the limit in force. `NO_DEVICE` for an index out of range.
    #[napi]
    pub fn set_rate_limit(
        &self,
        env: Env,
        device: f64,
        limit: Option<RateLimit>,
    ) -> napi::Result<()> {
        sync(env, || {
            self.replace_limit(device, limit, forkvm::Vm::set_rate_limit)
        })
    }

    /// Replaces the limit on what device `device` (a network or vsock device) pushes to the
    /// guest, apart from `setRateLimit`'s: `null` lifts it; data beyond it waits on the host
    /// side. `INVALID_ARGUMENT` for a device without a receive direction, `NO_DEVICE` for an
    /// index out of range.
    #[napi]
    pub fn set_rx_rate_limit(
        &self,
        env: Env,
        device: f64,
        limit: Option<RateLimit>,
    ) -> napi::Result<()> {
        sync(env, || {
            self.replace_limit(device, limit, forkvm::Vm::set_rx_rate_limit)
        })
    }

    /// Reads `length` bytes of guest-physical memory at `addr` (consistent while paused).
    #[napi]
    pub fn read_memory(&self, env: Env, addr: i64, length: f64) -> napi::Result<Buffer> {
        sync(env, || {
            let addr = nonnegative(addr, "addr")?;
            let vm = self.get()?;
            // Bounded before the buffer is made: no more than the VM has.
            let length = convert::whole(length, "length", vm.memory_size())?;
            let mut buf = vec![0u8; usize::try_from(length).unwrap_or(usize::MAX)];
            self.get()?.read_memory(addr, &mut buf)?;
            Ok(buf.into())
        })
    }

    /// Writes `data` into guest-physical memory at `addr` (only this VM's copy).
    #[napi]
    pub fn write_memory(&self, env: Env, addr: i64, data: Buffer) -> napi::Result<()> {
        sync(env, || {
            let addr = nonnegative(addr, "addr")?;
            Ok(self.get()?.write_memory(addr, &data)?)
        })
    }

    /// Splits the running (or paused) VM into children continuing from this instant: `n`
    /// children with discarded output, or one per entry (a console sink or `ChildOptions`).
    #[napi(ts_return_type = "Promise<VM[]>")]
    pub fn fork(
        &self,
        env: Env,
        #[napi(
            ts_arg_type = "number | Array<ConsoleBuffer | 'stdout' | string | null | ((chunk: Buffer) => void) | ChildOptions>"
        )]
        children: Either<f64, Vec<JsUnknown>>,
    ) -> napi::Result<AsyncTask<Blocking<Vec<forkvm::Vm>, Vec<VM>>>> {
        let (vm, children) = sync(env, || {
            let vm = self.get();
            let children = match children {
                Either::A(n) => (0..convert::count(n, "children")?)
                    .map(|_| forkvm::Child::new(forkvm::ConsoleOutput::Discard))
                    .collect(),
                Either::B(values) => values
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| child(env, Some(v), &format!("children[{i}]")))
                    .collect::<Outcome<Vec<_>>>()?,
            };
            Ok((vm, children))
        })?;
        Ok(blocking(move || Ok(vm?.fork(children)?), wrap_vms))
    }

    /// Writes the VM's complete state to the directory `dir`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn snapshot(&self, dir: String) -> napi::Result<AsyncTask<Blocking<(), ()>>> {
        let vm = self.get();
        Ok(run(move || Ok(vm?.snapshot(dir)?)))
    }

    /// Creates `n` children's KVM VMs ahead of forks.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn prepare_forks(&self, n: f64) -> napi::Result<AsyncTask<Blocking<(), ()>>> {
        let vm = self.get();
        Ok(run(move || {
            let n = convert::count(n, "n")?;
            Ok(vm?.prepare_forks(n)?)
        }))
    }

    /// Keeps `n` prepared children ready, topped up on a background thread after each fork.
    #[napi]
    pub fn keep_forks_ready(&self, env: Env, n: f64) -> napi::Result<()> {
        sync(env, || {
            let n = convert::count(n, "n")?;
            self.with(|vm| vm.keep_forks_ready(n))
        })
    }

    /// How many prepared children there are.
    #[napi(getter)]
    pub fn prepared_forks(&self, env: Env) -> napi::Result<u32> {
        sync(env, || self.with(|vm| vm.prepared_forks() as u32))
    }

    /// Opens a stream to the guest's vsock `port` (waiting at most `timeoutMs`, default 5000);
    /// resolves with its file descriptor, which the caller owns (`new net.Socket({ fd })`).
    #[napi(ts_return_type = "Promise<number>")]
    pub fn vsock_connect(
        &self,
        env: Env,
        port: f64,
        timeout_ms: Option<f64>,
    ) -> napi::Result<JsObject> {
        let vm = self.get();
        let (port, timeout) = sync(env, || {
            Ok((
                convert::u32_arg(port, "port")?,
                convert::millis_or(timeout_ms, "timeoutMs", Duration::from_millis(5000))?,
            ))
        })?;
        spawn_run(env, move || {
            Ok(vm?.vsock_connect(port, timeout)?.into_raw_fd())
        })
    }

    /// Asks the guest's balloon to hold `mib` MiB.
    #[napi]
    pub fn set_balloon_target(&self, env: Env, mib: f64) -> napi::Result<()> {
        sync(env, || {
            let mib = convert::u32_arg(mib, "mib")?;
            let vm = self.get()?;
            let balloon = vm
                .balloon()
                .ok_or_else(|| Failure::new("NO_DEVICE", "this VM has no balloon"))?;
            balloon
                .set_target_mib(mib.into())
                .map_err(|e| Failure::new("OTHER", e.to_string()))
        })
    }

    /// Asks the guest for fresh memory statistics (they arrive in `balloon.stats`).
    #[napi]
    pub fn request_balloon_stats(&self, env: Env) -> napi::Result<()> {
        sync(env, || {
            let vm = self.get()?;
            vm.balloon()
                .ok_or_else(|| Failure::new("NO_DEVICE", "this VM has no balloon"))?
                .request_stats();
            Ok(())
        })
    }

    /// The balloon's state, or `null` without one.
    #[napi(getter)]
    pub fn balloon(&self, env: Env) -> napi::Result<Option<BalloonInfo>> {
        sync(env, || {
            self.with(|vm| {
                vm.balloon().map(|b| BalloonInfo {
                    target_pages: b.target_pages() as f64,
                    actual_pages: b.actual_pages() as f64,
                    inflated_bytes: b.inflated_bytes() as f64,
                    deflated_bytes: b.deflated_bytes() as f64,
                    reported_bytes: b.reported_bytes() as f64,
                    stats: b.stats().map(|s| {
                        s.entries()
                            .iter()
                            .map(|&(tag, value)| vec![tag.into(), value as f64])
                            .collect()
                    }),
                })
            })
        })
    }
}
