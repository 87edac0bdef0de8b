//! [`Vm`]: the handle to a built VM — start it, wait for it, pause, resume and stop it, capture
//! and fork it ([`capture`]). Dropping it stops the guest and releases every thread, fd and
//! mapping.
//!
//! Its life is one state machine, checked by every call before it changes anything: built,
//! running (paused while any pause hold is taken: a user's [`Vm::pause`], a [`PauseGuard`], a
//! capture), ended. Starting a running VM changes nothing.

mod capture;
mod extensions;
mod teardown;

pub use extensions::Extensions;

use std::mem::ManuallyDrop;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use forkvm_devices::virtio::vsock::host::VsockConnector;

use forkvm_devices::legacy::SerialPort;
use forkvm_devices::virtio::balloon::BalloonHandle;
use kvm_ioctls::Kvm;

use crate::console::Delivery;
use crate::error::Error;
use crate::exit::GuestExit;
use crate::identity::Identity;
use crate::machine::Machine;
use crate::memory::GuestRam;
use crate::network::{NetworkHandle, VmNetwork};
use crate::seccomp::ThreadKind;
use crate::snapshot::pool::ShellPool;
use crate::virtio::{AttachedDevice, DeviceInfo};
use crate::vstate::event_loop::EventLoop;
use crate::vstate::run_state::{PauseGuard, RunState};
use crate::vstate::threads::{EVENTS_THREAD, SpareThreads, run_on_thread, vcpu_thread};
use crate::vstate::vcpu::{IoBuses, SharedVcpu, Vcpu};
use forkvm_devices::sync::lock;
use teardown::KernelParts;

#[doc(hidden)]
impl std::ops::Deref for Vm {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

#[doc(hidden)]
impl std::ops::DerefMut for Vm {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

/// Where a VM is in its life.
enum Phase {
    /// Built, not started: the event loop waits for its thread.
    Built { event_loop: Box<EventLoop> },
    /// Threads running.
    Running { event_thread: JoinHandle<()> },
    /// Ended and joined (or stopped before it started).
    Ended,
}

/// A VM built by [`crate::VmBuilder`]. `Send + Sync`: any thread may wait for or stop it.
///
/// One pointer: what the VM holds is one allocation, which dropping the VM hands whole to the
/// reaper's threads. So the caller frees nothing, and a `Vec` of a thousand VMs is 8 KiB:
/// freeing a larger one (a separate mapping) would wait behind the dropped VMs' unmaps for the
/// process's mappings lock (0.55 s for 1,000 VMs on the development host).
pub struct Vm {
    inner: ManuallyDrop<Box<Inner>>,
}

/// What a [`Vm`] holds. (`pub` only because `Vm` dereferences to it inside the crate: the type
/// cannot be named outside, and nothing of it is public.)
#[expect(missing_debug_implementations, reason = "`Vm`'s `Debug` shows it")]
pub struct Inner {
    phase: Mutex<Phase>,
    pub(crate) state: Arc<RunState>,
    buses: Arc<IoBuses>,
    pub(crate) vcpus: Vec<SharedVcpu>,
    pub(crate) serial: Arc<Mutex<SerialPort>>,
    pub(crate) debug_exit: bool,
    pub(crate) devices: Vec<AttachedDevice>,
    vsock: Option<VsockConnector>,
    balloon: Option<BalloonHandle>,
    pub(crate) network: Option<VmNetwork>,
    pub(crate) kvm: Arc<Kvm>,
    /// The KVM VM, its RAM and identity page: released on the reaper's threads.
    kernel: ManuallyDrop<KernelParts>,
    /// Who the VM is; its guest reads it on its identity page.
    pub(crate) identity: Identity,
    /// The pause hold [`Vm::pause`] parks here, which [`Vm::resume`] releases.
    user_pause: Mutex<Option<PauseGuard>>,
    /// Serializes captures, and keeps the last while the VM has not run since: a capture of a
    /// VM that stayed paused (and whose memory the host did not write) reuses it. (A paused
    /// VM's local APIC timers may fire meanwhile: a child then continues from the instant of
    /// the capture, as a whole.)
    last_capture: Mutex<Option<capture::LastCapture>>,
    /// Counts the host's writes into guest memory ([`Vm::write_memory`]).
    host_writes: AtomicU64,
    /// What crates layered on forkvm keep for this VM ([`Vm::extensions`]).
    extensions: Extensions,
    /// Children created ahead of forks ([`Vm::prepare_forks`], [`Vm::keep_forks_ready`]).
    pub(crate) shells: Arc<ShellPool>,
    /// How long the last fork or snapshot held this VM paused ([`Vm::last_pause`]).
    pub(crate) last_pause: Mutex<Option<Duration>>,
    /// Threads started ahead, which [`Vm::start`] uses.
    spare_threads: Mutex<SpareThreads>,
    /// The deliveries of console output to callbacks, which [`Vm::wait`] drains.
    console_deliveries: Vec<Weak<Delivery>>,
    /// Whether the VM holds names on the host (a vsock socket path, published ports, a TAP
    /// interface) that dropping it gives back before it returns.
    host_names: bool,
    /// Where dropping the VM puts what it leaves to the reaper, allocated with the VM.
    /// (In a mutex, which makes it `Sync`; only `drop` takes it.)
    teardown: Mutex<Option<Box<std::mem::MaybeUninit<teardown::Teardown>>>>,
}

impl Vm {
    pub(crate) fn new(parts: Machine) -> Self {
        let host_names = parts.vsock_uds
            || parts
                .network
                .as_ref()
                .is_some_and(VmNetwork::holds_host_names);
        let inner = Inner {
            phase: Mutex::new(Phase::Built {
                event_loop: Box::new(parts.event_loop),
            }),
            state: parts.state,
            buses: parts.buses,
            vcpus: parts
                .vcpus
                .into_iter()
                .map(|v| Arc::new(Mutex::new(v)))
                .collect(),
            serial: parts.serial,
            debug_exit: parts.debug_exit,
            devices: parts.devices,
            vsock: parts.vsock,
            balloon: parts.balloon,
            network: parts.network,
            kvm: parts.kvm,
            kernel: ManuallyDrop::new(KernelParts {
                vm_fd: parts.vm_fd,
                ram: Mutex::new(parts.ram),
                identity_page: parts.identity_page,
            }),
            identity: parts.identity,
            user_pause: Mutex::default(),
            last_capture: Mutex::default(),
            host_writes: AtomicU64::new(0),
            extensions: Extensions::default(),
            shells: Arc::default(),
            last_pause: Mutex::default(),
            spare_threads: Mutex::new(parts.threads),
            console_deliveries: parts.console_deliveries,
            host_names,
            // Written (zeroed) now, so that the drop neither allocates nor touches new pages.
            teardown: Mutex::new(Some(Box::new(std::mem::MaybeUninit::zeroed()))),
        };
        Self {
            inner: ManuallyDrop::new(Box::new(inner)),
        }
    }

    /// Starts the vCPU threads and the event loop (on threads started ahead where the VM has
    /// them). Where threads must be started, they are held until all of them are, then let go
    /// at once: a vCPU that ran its guest at once could take the CPU from the thread still
    /// starting the others (for a scheduler tick, with 2 CPUs and 2 vCPUs). Threads started
    /// ahead only get their jobs: holding them would wake each twice.
    ///
    /// Starting a VM that runs (a fork child or a restored VM runs from the start) or that ended
    /// (stopped before it started, too) changes nothing and returns [`Error::AlreadyStarted`].
    pub fn start(&self) -> Result<(), Error> {
        let mut phase = self.lock_phase();
        if !matches!(&*phase, Phase::Built { .. }) || self.state.is_exiting() {
            return Err(Error::AlreadyStarted);
        }
        let Phase::Built { event_loop } = std::mem::replace(&mut *phase, Phase::Ended) else {
            return Err(Error::AlreadyStarted);
        };
        let mut spare = std::mem::take(&mut *lock(&self.spare_threads));
        let held = !spare.ready_for(self.vcpus.len());
        if held {
            self.state.hold_at_start();
        }
        let state = self.state.clone();
        let policy = self.state.setup().seccomp;
        let event_thread = run_on_thread(
            spare.events.take(),
            EVENTS_THREAD.into(),
            ThreadKind::EventLoop,
            policy,
            move || event_loop.run(&state),
        )
        .map_err(|source| Error::Thread {
            what: "event loop",
            source,
        })?;
        *phase = Phase::Running { event_thread };
        drop(phase);

        let mut threads = self.state.threads();
        for (id, vcpu) in self.vcpus.iter().enumerate() {
            let (vcpu, state, buses) = (vcpu.clone(), self.state.clone(), self.buses.clone());
            let spawned = run_on_thread(
                spare.vcpus.pop_front(),
                vcpu_thread(id as u32),
                ThreadKind::Vcpu,
                policy,
                move || {
                    Vcpu::run(&vcpu, &buses, &state);
                    drop((vcpu, buses));
                    state.vcpu_left();
                },
            );
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    drop(threads);
                    self.stop();
                    return Err(Error::Thread {
                        what: "vCPU",
                        source,
                    });
                }
            }
        }
        drop(threads);
        if held {
            // The hold the threads started under.
            self.state.release();
        }
        Ok(())
    }

    /// Blocks until the guest ends (or [`Vm::stop`] is called) and returns how it ended.
    /// Every VMM thread has exited when this returns, and console callbacks have received all
    /// the output.
    pub fn wait(&self) -> Result<GuestExit, Error> {
        if matches!(*self.lock_phase(), Phase::Built { .. }) && !self.state.is_exiting() {
            return Err(Error::NotStarted);
        }
        let exit = self.state.wait();
        if let Phase::Running { event_thread } =
            std::mem::replace(&mut *self.lock_phase(), Phase::Ended)
        {
            // The event loop only returns; a panic in it has nothing to add to `exit`.
            let _ = event_thread.join();
        }
        for delivery in self.console_deliveries.iter().filter_map(Weak::upgrade) {
            delivery.drain();
        }
        Ok(exit)
    }

    /// Ends the VM from the host, from any thread, and waits for its threads. Returns how it
    /// ended: [`GuestExit::Stopped`], or the guest's own end if that came first.
    pub fn stop(&self) -> GuestExit {
        self.state.finish(GuestExit::Stopped);
        self.wait().unwrap_or(GuestExit::Stopped)
    }

    /// Pauses a running VM: every vCPU stops at an instruction boundary and the event loop stops
    /// serving devices, so guest memory and device state hold still until [`Vm::resume`]. The
    /// guest notices nothing but the time that passed. Pausing a VM this way twice does
    /// nothing more; forks and snapshots taken meanwhile leave it paused. For pauses that
    /// compose (each holder's own, released on drop) use [`Vm::pause_guard`].
    pub fn pause(&self) -> Result<(), Error> {
        let mut user = lock(&self.user_pause);
        if user.is_some() {
            return match self.state.exit() {
                None => Ok(()),
                exit => Err(Error::NotRunning(Box::new(exit))),
            };
        }
        *user = Some(self.pause_guard()?);
        Ok(())
    }

    /// Releases the pause [`Vm::pause`] took: the VM runs again unless other holds remain
    /// ([`Vm::pause_guard`], a capture in progress). Does nothing to a VM that is not paused
    /// that way.
    pub fn resume(&self) -> Result<(), Error> {
        let phase = self.lock_phase();
        let Phase::Running { .. } = &*phase else {
            return Err(self.not_running(&phase));
        };
        drop(phase);
        let hold = lock(&self.user_pause).take();
        drop(hold);
        Ok(())
    }

    /// Pauses a running VM (as [`Vm::pause`]) and returns the hold: the VM stays paused at least
    /// until the guard is dropped, whatever other threads pause, resume, fork or snapshot
    /// meanwhile, and runs again when the last hold is released. Fails if the VM has not
    /// started or has ended, or if its threads do not stop within 5 s.
    pub fn pause_guard(&self) -> Result<PauseGuard, Error> {
        {
            let phase = self.lock_phase();
            if !matches!(&*phase, Phase::Running { .. }) {
                return Err(self.not_running(&phase));
            }
        }
        match PauseGuard::take(&self.state, self.vcpus.len() + 1) {
            Some(guard) => Ok(guard),
            None => match self.state.exit() {
                Some(exit) => Err(Error::NotRunning(Box::new(Some(exit)))),
                None if self.state.is_exiting() => Err(Error::NotRunning(Box::new(None))),
                None => Err(Error::PauseTimedOut),
            },
        }
    }

    /// Whether the VM is paused (by [`Vm::pause`], a [`PauseGuard`] or a capture in progress).
    pub fn is_paused(&self) -> bool {
        self.state.is_paused() && self.state.exit().is_none()
    }

    fn not_running(&self, phase: &Phase) -> Error {
        match phase {
            Phase::Built { .. } => Error::NotStarted,
            _ => Error::NotRunning(Box::new(self.state.exit())),
        }
    }

    /// How the guest ended, without blocking; `None` while it runs.
    pub fn exit(&self) -> Option<GuestExit> {
        self.state.exit()
    }

    /// `Ok` while the VM runs (paused or not); else why not: [`Error::NotStarted`] before
    /// [`Vm::start`], [`Error::NotRunning`] once it ends or is ending. For layers that talk to
    /// the guest (the agent client) and must fail at once rather than wait for a dead guest.
    pub fn check_running(&self) -> Result<(), Error> {
        let phase = self.lock_phase();
        if matches!(&*phase, Phase::Built { .. }) || self.state.is_exiting() {
            return Err(self.not_running(&phase));
        }
        Ok(())
    }

    /// Runs `hook` once with the VM's exit when it ends — on the thread that ends it when that
    /// is the caller of [`Vm::stop`] or of the drop, or on forkvm's exit-hooks thread when a
    /// vCPU or the event loop ends it (hooks never run under forkvm's seccomp filters; one
    /// thread runs them all, in turn), so keep it short and never call back into this VM from
    /// it — or at once, here, if it has ended. Hooks are kept until the VM ends: register one
    /// per VM, not one per request.
    pub fn on_exit(&self, hook: impl FnOnce(&GuestExit) + Send + 'static) {
        self.state.on_exit(Box::new(hook));
    }

    /// The VM's virtio devices: type, window, IRQ, driver status and rate limits.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(AttachedDevice::info).collect()
    }

    /// Replaces the rate limit of virtio device `device` (an index into [`Vm::devices`]) while
    /// the VM runs: its buckets start full, and requests waiting for tokens are looked at again
    /// at once. [`RateLimit::unlimited`](crate::RateLimit::unlimited) lifts it. Fork children
    /// and snapshots take the limit in force.
    pub fn set_rate_limit(&self, device: usize, limit: crate::RateLimit) -> Result<(), Error> {
        self.devices
            .get(device)
            .ok_or(Error::NoSuchDevice(device))?
            .set_rate_limit(limit)
    }

    /// Replaces the limit on what virtio device `device` (an index into [`Vm::devices`]) pushes
    /// to the guest on its own — frames for a network device, host data for a vsock device —
    /// while the VM runs: its buckets start full, and data held back for tokens is delivered
    /// on the event loop's next turn if the new limit allows. Independent of
    /// [`Vm::set_rate_limit`]; fork children and snapshots take it. Fails with
    /// [`RateLimitError::NoReceiveDirection`](crate::RateLimitError::NoReceiveDirection) for
    /// a device without a receive direction (block, console, entropy, balloon).
    pub fn set_rx_rate_limit(&self, device: usize, limit: crate::RateLimit) -> Result<(), Error> {
        self.devices
            .get(device)
            .ok_or(Error::NoSuchDevice(device))?
            .set_rx_rate_limit(limit)
    }

    /// Opens a stream to `port` in the guest through the vsock device, in-process (no file
    /// system involved). Waits at most `timeout` for the guest to accept; fails if the VM has
    /// no vsock device, the guest refuses (nothing listens on the port, or its driver is not up
    /// yet) or does not answer in time. Dropping the stream closes the connection.
    pub fn vsock_connect(&self, port: u32, timeout: Duration) -> Result<UnixStream, Error> {
        let connector = self.vsock.as_ref().ok_or(Error::NoVsock)?;
        connector
            .connect(port, timeout)
            .map_err(|source| Error::VsockConnect { port, source })
    }

    /// A handle that opens in-process vsock connections to this VM's guest (as
    /// [`Vm::vsock_connect`]) without borrowing the VM, if it has a vsock device.
    pub fn vsock_dialer(&self) -> Option<VsockDialer> {
        self.vsock.clone().map(VsockDialer)
    }

    /// The network added with [`crate::VmBuilder::network`] (or given to a fork child), if any:
    /// change its policy, read its counters, publish ports, connect to guest ports.
    pub fn network(&self) -> Option<&NetworkHandle> {
        self.network
            .as_ref()
            .and_then(|network| network.handle.as_ref())
    }

    /// Opens a TCP connection to `port` in the guest through its network, in-process (no host
    /// listener): the stream's other end is bridged to the guest's TCP socket. A guest that
    /// refuses (nothing listens) shows as a stream that ends at once. Fails if the VM has no
    /// user-mode network.
    pub fn connect_tcp(&self, port: u16) -> Result<UnixStream, Error> {
        let handle = self.network().ok_or(Error::NoNetwork)?;
        handle
            .connect_tcp(port)
            .map_err(|source| Error::NetworkConnect { port, source })
    }

    /// State that crates layered on forkvm keep for this VM, one value per type (the guest
    /// agent client keeps its connection there); dropped with the VM handle.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The balloon added with [`crate::VmBuilder::balloon`], if any: set its target, read what
    /// the guest gave back and its memory statistics.
    pub fn balloon(&self) -> Option<&BalloonHandle> {
        self.balloon.as_ref()
    }

    /// Reads guest memory at guest-physical `addr` into `buf` (for debuggers, tests, and hosts
    /// that share a structure with the guest). Consistent only while the VM is paused.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        use vm_memory::Bytes;
        self.lock_ram()
            .memory
            .read_slice(buf, vm_memory::GuestAddress(addr))
            .map_err(|_| Error::GuestAddress {
                addr,
                len: buf.len(),
            })
    }

    /// Writes `buf` into guest memory at guest-physical `addr` (the guest sees it as if one of
    /// its own CPUs had written it; in a forked VM only this VM does). Pause the VM first unless
    /// the guest expects the change.
    pub fn write_memory(&self, addr: u64, buf: &[u8]) -> Result<(), Error> {
        use vm_memory::Bytes;
        let written = self
            .lock_ram()
            .memory
            .write_slice(buf, vm_memory::GuestAddress(addr))
            .map_err(|_| Error::GuestAddress {
                addr,
                len: buf.len(),
            });
        // After the write: a capture that read the count before it is not reused.
        self.host_writes.fetch_add(1, Ordering::SeqCst);
        written
    }

    /// Who this VM is: generation 0 when booted, one more than its source's for a fork child or
    /// a restored snapshot, and an id no other VM has. Its guest reads the same on its identity
    /// page ([`crate::identity`]).
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// How long the last [`Vm::fork`] or [`Vm::snapshot`] of this VM held it paused: from the
    /// pause request until it ran again (state read, memory frozen); for a VM that was already
    /// paused, how long its state and memory were being captured. `None` before the first.
    pub fn last_pause(&self) -> Option<Duration> {
        *lock(&self.last_pause)
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.lock_ram().size()
    }

    /// Host memory backing guest RAM now, in bytes: what the guest touched, less what the balloon
    /// and free page reporting gave back. Once the VM was forked (or is a fork or a restored
    /// snapshot), only the pages it holds on its own count: those it wrote since, not the
    /// frozen image it shares with the other VMs of the fork.
    pub fn memory_allocated_bytes(&self) -> Result<u64, Error> {
        Ok(self.lock_ram().allocated_bytes()?)
    }

    pub(crate) fn lock_ram(&self) -> MutexGuard<'_, GuestRam> {
        lock(&self.kernel.ram)
    }

    fn lock_phase(&self) -> MutexGuard<'_, Phase> {
        lock(&self.phase)
    }
}

/// Opens in-process vsock connections to one VM's guest: [`Vm::vsock_dialer`]. Cloneable and
/// `Send + Sync`; connections fail once the VM is gone.
#[derive(Clone)]
pub struct VsockDialer(VsockConnector);

impl VsockDialer {
    /// Opens a stream to `port` in the guest, as [`Vm::vsock_connect`] (whose
    /// [`Error::VsockConnect`] carries the same I/O error).
    pub fn connect(&self, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
        self.0.connect(port, timeout)
    }
}

impl std::fmt::Debug for VsockDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VsockDialer")
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match &*self.lock_phase() {
            Phase::Built { .. } => "built",
            Phase::Running { .. } => "running",
            Phase::Ended => "ended",
        };
        f.debug_struct("Vm")
            .field("identity", &self.identity)
            .field("phase", &phase)
            .field("paused", &self.is_paused())
            .field("exit", &self.exit())
            .field("vcpus", &self.vcpus.len())
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use crate::{ConsoleBuffer, ConsoleOutput, Vm, VmBuilder};

    /// Dropping a VM does not wait for the reaper (here held busy): its teardown is counted as
    /// pending. A VM with a vsock socket path gives the path back before the drop returns all
    /// the same.
    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn a_drop_leaves_the_teardown_to_the_reaper_but_gives_back_host_names_at_once() {
        let halted = |vsock: Option<crate::VsockConfig>| {
            let console = ConsoleBuffer::new();
            let mut builder = VmBuilder::new()
                .kernel(crate::test_guest::path())
                .memory_mib(32)
                .cmdline("mode=halt")
                .console(ConsoleOutput::Buffer(console.clone()));
            if let Some(vsock) = vsock {
                builder = builder.vsock(vsock);
            }
            let vm = builder.build().unwrap();
            vm.start().unwrap();
            wait_until("the guest halts", || console.text().contains("halting"));
            vm
        };
        let plain = halted(None);
        let path = std::env::temp_dir().join(format!("forkvm-drop-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let named = halted(Some(crate::VsockConfig::new(3).uds_path(&path)));
        assert!(path.exists());

        let hold = crate::reaper::Hold::all_threads();
        let pending = crate::pending_releases();
        drop(plain);
        assert!(
            crate::pending_releases() > pending,
            "the teardown waits for the reaper"
        );
        drop(named);
        assert!(
            !path.exists(),
            "the socket path is given back before drop returns"
        );
        drop(hold);
        assert!(crate::wait_for_releases(Duration::from_secs(60)));
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !done() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The test guest counting in `mode=spin` on 32 MiB, and the address of its counter.
    fn spinning_vm() -> (Vm, u64) {
        let console = ConsoleBuffer::new();
        let vm = VmBuilder::new()
            .kernel(crate::test_guest::path())
            .memory_mib(32)
            .cmdline("mode=spin")
            .console(ConsoleOutput::Buffer(console.clone()))
            .build()
            .unwrap();
        vm.start().unwrap();
        let mut addr = 0;
        wait_until("the counter's address", || {
            let text = console.text();
            let line = text
                .split("counter at ")
                .nth(1)
                .and_then(|r| r.split_once('\n'));
            if let Some((hex, _)) = line {
                addr = u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
            }
            addr != 0
        });
        (vm, addr)
    }

    fn counter(vm: &Vm, addr: u64) -> u64 {
        let mut bytes = [0u8; 8];
        vm.read_memory(addr, &mut bytes).unwrap();
        u64::from_le_bytes(bytes)
    }

    fn in_image(image: &std::sync::Arc<crate::memory::freeze::FrozenRam>, addr: u64) -> u64 {
        image
            .map()
            .unwrap()
            .memory
            .read_obj(GuestAddress(addr))
            .unwrap()
    }

    /// The memory design of fork on real KVM: a paused VM's RAM is re-mapped privately over
    /// its frozen image in place, and the VM runs on (KVM re-faults through the same memory
    /// slots) without ever writing into the image.
    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn a_running_vm_continues_over_its_frozen_image() {
        let (vm, addr) = spinning_vm();
        wait_until("the guest counts", || counter(&vm, addr) > 0);
        vm.pause().unwrap();
        let frozen = counter(&vm, addr);
        let image = vm.lock_ram().freeze().unwrap();
        assert_eq!(in_image(&image, addr), frozen);
        vm.resume().unwrap();
        wait_until("the guest counts over private memory", || {
            counter(&vm, addr) > frozen
        });
        assert_eq!(
            in_image(&image, addr),
            frozen,
            "the running VM wrote into its image"
        );
        vm.stop();
    }

    /// The guest's own writes (through KVM's page tables, not the host's) after a draft of a
    /// freeze write-protected its RAM are tracked: the image holds the counter at the pause,
    /// not the value the draft copied while the guest ran.
    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn guest_writes_between_a_draft_and_the_pause_are_in_the_image() {
        let (vm, addr) = spinning_vm();
        wait_until("the guest counts", || counter(&vm, addr) > 0);
        vm.pause().unwrap();
        vm.lock_ram().freeze().unwrap();
        vm.resume().unwrap();
        for _ in 0..5 {
            let before = counter(&vm, addr);
            wait_until("the guest counts", || counter(&vm, addr) > before);
            let draft = Some(vm.lock_ram().draft_freeze().unwrap());
            let drafted = draft.as_ref().and_then(|d| d.copied_u64(addr));
            // The guest counts on over the write-protected page.
            wait_until("the guest counts after the draft", || {
                counter(&vm, addr) > drafted.unwrap_or(before) + 1000
            });
            vm.pause().unwrap();
            let paused = counter(&vm, addr);
            let drafted = drafted.expect("writes are tracked on this host");
            assert!(paused > drafted + 1000, "the guest wrote after the draft");
            let image = vm.lock_ram().freeze_from(draft).unwrap();
            assert_eq!(in_image(&image, addr), paused, "drafted {drafted}");
            vm.resume().unwrap();
        }
        vm.stop();
    }
}
