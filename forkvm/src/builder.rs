//! [`VmBuilder`]: what a VM is made of, validated and turned into a ready [`Vm`].

use std::path::PathBuf;
use std::sync::Arc;

use forkvm_devices::virtio::balloon::{Balloon as BalloonDevice, BalloonHandle};
use forkvm_devices::virtio::block::Block;
use forkvm_devices::virtio::console::Console;
use forkvm_devices::virtio::rate_limit::RateLimit;
use forkvm_devices::virtio::rng::Rng;
use forkvm_devices::virtio::vsock::Vsock as VsockDevice;
use forkvm_devices::virtio::vsock::host::VsockConnector;

use crate::arch::probe::{HostCaps, host_caps};
use crate::arch::regs;
use crate::boot::{self, BootSpec, mptable::MAX_MPTABLE_VCPUS};
use crate::console::{ConsoleInput, ConsoleOutput};
use crate::error::{Error, setup_err};
use crate::identity::{IDENTITY_CMDLINE_KEY, Identity, IdentityPage};
use crate::layout::IDENTITY_PAGE_ADDR;
use crate::machine::{self, LegacyConfig, MachineSpec};
use crate::memory::{GuestRam, MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use crate::network::{Network, VmNetwork};
use crate::seccomp::SeccompPolicy;
use crate::virtio::{VirtioDeviceSpec, VirtioPlan};
use crate::vm::Vm;
use crate::vstate::ThreadSetup;
use crate::vstate::kvm::{create_vcpus, create_vm, open_kvm};
use crate::vstate::threads::SpareThreads;
use crate::vstate::vcpu::{install_kick_handler, kick_signal_at};

/// Arguments forkvm gives every guest kernel, before the caller's: a reset request ends the VM
/// through the i8042 (`reboot=k`), and a kernel panic ends it at once (`panic=-1`).
pub const PLATFORM_CMDLINE: &str = "reboot=k panic=-1";
/// The caller's part of the command line when none is set: the console on the 8250 UART.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// Added on hosts that emulate guest ring 0 (see [`crate::arch::probe`]): skips boot-time checks
/// that only cost time there (the timer-IRQ check, TSC calibration against other clocks).
pub const EMULATED_HOST_CMDLINE: &str = "no_timer_check tsc=reliable no_int3_selftest";
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// Configuration of a VM; [`VmBuilder::build`] checks it and loads the guest.
#[derive(Debug)]
pub struct VmBuilder {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: String,
    vcpus: u32,
    memory_mib: u64,
    console: ConsoleOutput,
    console_input: Option<ConsoleInput>,
    debug_exit: bool,
    kvm_device: PathBuf,
    kick_signal_offset: i32,
    replace_signal_handler: bool,
    seccomp: Option<SeccompPolicy>,
    virtio: Vec<VirtioConfig>,
    vsock: Option<VsockConfig>,
    balloon: Option<BalloonConfig>,
    network: Option<Network>,
}

/// A virtio device requested from the builder.
#[derive(Debug)]
enum VirtioConfig {
    Rng,
    Block {
        disk: DiskConfig,
        serial: String,
    },
    Console {
        output: ConsoleOutput,
        input: Option<ConsoleInput>,
    },
}

impl VirtioConfig {
    fn create(self) -> Result<VirtioDeviceSpec, Error> {
        Ok(match self {
            Self::Rng => VirtioDeviceSpec::new(Box::new(Rng::new())),
            Self::Block { disk, serial } => VirtioDeviceSpec::new(Box::new(
                Block::open(&disk.path, disk.read_only, disk.direct_io, &serial).map_err(
                    |source| Error::BlockImage {
                        path: disk.path,
                        source,
                    },
                )?,
            ))
            .with_rate_limit(disk.rate_limit),
            Self::Console { output, input } => {
                let mut console = Console::new(output.into_writer()?)
                    .map_err(|e| setup_err("virtio-console", e))?;
                if let Some(input) = input {
                    console = console
                        .with_input(input.into_fd()?)
                        .map_err(|e| setup_err("virtio-console input", e))?;
                }
                VirtioDeviceSpec::new(Box::new(console))
            }
        })
    }
}

/// A virtio-blk disk: a raw image file and how to open it.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    path: PathBuf,
    read_only: bool,
    direct_io: bool,
    rate_limit: RateLimit,
}

impl DiskConfig {
    /// A writable disk over the image at `path`, through the host page cache.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            direct_io: false,
            rate_limit: RateLimit::unlimited(),
        }
    }

    /// Limits the guest's requests to the disk: bytes read and written, and requests (see
    /// [`RateLimit`]). None by default; [`Vm::set_rate_limit`] changes it while the VM runs.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Whether the guest may only read (writes fail with an I/O error).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Whether to bypass the host page cache (`O_DIRECT`); the image's file system must support
    /// it, and guest requests must suit its block size.
    pub fn direct_io(mut self, direct_io: bool) -> Self {
        self.direct_io = direct_io;
        self
    }
}

/// A virtio-vsock device: the guest's CID and how host programs reach it.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    cid: u64,
    uds_path: Option<PathBuf>,
    rate_limit: RateLimit,
    rx_rate_limit: RateLimit,
}

impl VsockConfig {
    /// A socket device giving the guest `cid` (3 to 2^32 - 2). Host programs in this process
    /// connect to guest ports with [`Vm::vsock_connect`].
    pub fn new(cid: u64) -> Self {
        Self {
            cid,
            uds_path: None,
            rate_limit: RateLimit::unlimited(),
            rx_rate_limit: RateLimit::unlimited(),
        }
    }

    /// Limits what the guest sends (packets and their bytes; see [`RateLimit`]). None by
    /// default; [`Vm::set_rate_limit`] changes it while the VM runs.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Limits what host programs send the guest (data packets, header and payload, and their
    /// count; see [`RateLimit`]), independently of [`Self::rate_limit`]. Data beyond it stays in
    /// the host sockets, so their writers block or slow down; nothing is dropped. None by
    /// default; [`Vm::set_rx_rate_limit`] changes it while the VM runs.
    pub fn rx_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rx_rate_limit = limit;
        self
    }

    /// Also listens on the Unix socket `path` (which must not exist; it is removed when the VM
    /// is dropped), in Firecracker's hybrid style: a host program connects to it, writes
    /// `CONNECT <port>\n`, reads `OK <host port>\n` and then talks to the guest's port; a guest
    /// connecting to host port `P` reaches the Unix socket `<path>_<P>`, where a host program
    /// listens.
    pub fn uds_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.uds_path = Some(path.into());
        self
    }

    fn create(self) -> Result<(VirtioDeviceSpec, VsockConnector), Error> {
        let device = VsockDevice::new(self.cid, self.uds_path.as_deref())?;
        let connector = device.connector();
        let spec = VirtioDeviceSpec::new(Box::new(device))
            .with_rate_limit(self.rate_limit)
            .with_rx_rate_limit(self.rx_rate_limit);
        Ok((spec, connector))
    }
}

/// A virtio-balloon device: the guest gives memory back to the host on request (see
/// [`crate::BalloonHandle`]). It always offers memory statistics.
#[derive(Clone, Debug, Default)]
pub struct BalloonConfig {
    deflate_on_oom: bool,
    free_page_reporting: bool,
}

impl BalloonConfig {
    /// A balloon without deflate-on-OOM or free page reporting.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the guest may take pages back from the balloon when it runs out of memory.
    pub fn deflate_on_oom(mut self, enabled: bool) -> Self {
        self.deflate_on_oom = enabled;
        self
    }

    /// Whether the guest reports its free memory, which the host then reclaims.
    pub fn free_page_reporting(mut self, enabled: bool) -> Self {
        self.free_page_reporting = enabled;
        self
    }

    /// The device for a VM with `ram`, which it frees the pages its guest gives up from.
    fn create(&self, ram: &GuestRam) -> Result<(VirtioDeviceSpec, BalloonHandle), Error> {
        let device = BalloonDevice::new(
            ram.size(),
            self.deflate_on_oom,
            self.free_page_reporting,
            ram.discarder(),
        )
        .map_err(|e| setup_err("virtio-balloon", e))?;
        let handle = device.handle();
        Ok((VirtioDeviceSpec::new(Box::new(device)), handle))
    }
}

/// The KVM device opened unless [`VmBuilder::kvm_device`] says otherwise.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

impl Default for VmBuilder {
    fn default() -> Self {
        Self {
            kernel: None,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            console: ConsoleOutput::Stdout,
            console_input: None,
            debug_exit: false,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            kick_signal_offset: crate::KICK_SIGNAL_OFFSET,
            replace_signal_handler: false,
            seccomp: None,
            virtio: Vec::new(),
            vsock: None,
            network: None,
            balloon: None,
        }
    }
}

impl VmBuilder {
    /// A VM with 1 vCPU, [`DEFAULT_MEMORY_MIB`] of memory and its console on standard output.
    pub fn new() -> Self {
        Self::default()
    }

    /// The kernel: an ELF `vmlinux` (PVH entry when it has the note) or a bzImage.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// An initrd / initramfs image.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// The caller's kernel command line (replaces [`DEFAULT_CMDLINE`]; forkvm prepends
    /// [`PLATFORM_CMDLINE`]).
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, count: u32) -> Self {
        self.vcpus = count;
        self
    }

    /// Guest memory in MiB, [`crate::MIN_MEMORY_MIB`] to [`crate::MAX_MEMORY_MIB`] ([`VmBuilder::build`]
    /// refuses other sizes).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Where the serial console's output goes.
    pub fn console(mut self, output: ConsoleOutput) -> Self {
        self.console = output;
        self
    }

    /// Where the serial console's input comes from (none by default).
    pub fn console_input(mut self, input: ConsoleInput) -> Self {
        self.console_input = Some(input);
        self
    }

    /// Adds the debug-exit port (0xf4) through which test guests end the VM with a status.
    pub fn debug_exit(mut self, enabled: bool) -> Self {
        self.debug_exit = enabled;
        self
    }

    /// Adds a virtio-rng device: the guest's `/dev/hwrng`, fed by the host's `getrandom`.
    pub fn rng(mut self) -> Self {
        self.virtio.push(VirtioConfig::Rng);
        self
    }

    /// Adds a virtio-blk disk backed by the raw image at `path` (`/dev/vda`, `/dev/vdb`, ... in
    /// the order added). A read-only disk fails the guest's writes with an I/O error.
    pub fn block(self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.disk(DiskConfig::new(path).read_only(read_only))
    }

    /// Adds a virtio-blk disk described by `disk`.
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        let index = self
            .virtio
            .iter()
            .filter(|d| matches!(d, VirtioConfig::Block { .. }))
            .count();
        self.virtio.push(VirtioConfig::Block {
            disk,
            serial: format!("forkvm-disk-{index}"),
        });
        self
    }

    /// Adds a virtio-console (the guest's `hvc0`) writing to `output`, fed from `input` if given.
    /// Use `console=hvc0` on the command line to make it the guest's console.
    pub fn virtio_console(mut self, output: ConsoleOutput, input: Option<ConsoleInput>) -> Self {
        self.virtio.push(VirtioConfig::Console { output, input });
        self
    }

    /// Adds a network: a virtio-net device with forkvm's user-mode network behind it (a VM has at
    /// most one; a second call replaces the first). With [`VmBuilder::build_from_snapshot`], it
    /// is the new VM's network instead of one like its source's.
    pub fn network(mut self, network: Network) -> Self {
        self.network = Some(network);
        self
    }

    /// Adds the virtio-vsock device (a VM has at most one; a second call replaces the first).
    pub fn vsock(mut self, vsock: VsockConfig) -> Self {
        self.vsock = Some(vsock);
        self
    }

    /// Adds a virtio-balloon device (one per VM: a second call replaces the first); the built
    /// VM's [`Vm::balloon`] drives it.
    pub fn balloon(mut self, balloon: BalloonConfig) -> Self {
        self.balloon = Some(balloon);
        self
    }

    /// Opens KVM through another device node than [`DEFAULT_KVM_DEVICE`] (e.g. in a container).
    pub fn kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_device = path.into();
        self
    }

    /// Kicks the VM's vCPU threads with the real-time signal `SIGRTMIN + offset` instead of
    /// [`crate::KICK_SIGNAL_OFFSET`], for programs that use that signal themselves. forkvm
    /// installs its handler for the signal at the first build that uses it; the handler only
    /// sets a flag of the vCPU running on the signalled thread. Fork children and VMs spawned
    /// from a capture use their source's signal.
    ///
    /// A signal's handler belongs to the whole process: if the program installed one for this
    /// signal (anything but the default action, before or after forkvm's), the build fails with
    /// [`Error::SignalTaken`] rather than replace it, unless
    /// [`VmBuilder::replace_signal_handler`] allows it.
    pub fn kick_signal_offset(mut self, offset: i32) -> Self {
        self.kick_signal_offset = offset;
        self
    }

    /// Whether this build may replace a handler the program installed for the kick signal
    /// (default: no, the build fails with [`Error::SignalTaken`]). Signal handlers are per
    /// process: the replaced handler is gone for the whole process, not just for this VM.
    pub fn replace_signal_handler(mut self, replace: bool) -> Self {
        self.replace_signal_handler = replace;
        self
    }

    /// The seccomp policy of this VM's threads (its vCPUs, event loop, the threads that prepare
    /// its children) and of its children's; default: the process-wide policy
    /// ([`crate::set_seccomp_policy`], itself [`SeccompPolicy::Deny`] by default). See
    /// `docs/seccomp.md`.
    pub fn seccomp(mut self, policy: SeccompPolicy) -> Self {
        self.seccomp = Some(policy);
        self
    }

    /// How the VM's threads are set up: the kick signal, its handler installed, and the seccomp
    /// policy, its filters compiled.
    fn thread_setup(&self) -> Result<ThreadSetup, Error> {
        let kick_signal = kick_signal_at(self.kick_signal_offset)?;
        install_kick_handler(kick_signal, self.replace_signal_handler)?;
        let seccomp = self.seccomp.unwrap_or_else(crate::seccomp_policy);
        crate::seccomp::prepare(seccomp).map_err(Error::Seccomp)?;
        Ok(ThreadSetup {
            kick_signal,
            seccomp,
        })
    }

    /// Starts a VM that continues from `snapshot` (see [`crate::Snapshot::spawn`]), connected
    /// to the host as `child` says, made with this builder's host-side options: its KVM device
    /// node. The snapshot defines the machine (memory, vCPUs, devices, guest state), so a
    /// builder that also names a kernel, an initrd or devices is refused.
    pub fn build_from_snapshot(
        mut self,
        snapshot: &crate::Snapshot,
        child: impl Into<crate::Child>,
    ) -> Result<Vm, Error> {
        if self.kernel.is_some()
            || self.initrd.is_some()
            || !self.virtio.is_empty()
            || self.vsock.is_some()
            || self.balloon.is_some()
        {
            return Err(Error::Setup {
                what: "a VM from a snapshot",
                reason: "the snapshot defines the machine: no kernel, initrd or devices may be set"
                    .into(),
            });
        }
        let kvm = Arc::new(open_kvm(&self.kvm_device)?);
        let setup = self.thread_setup()?;
        let mut child = child.into();
        if let Some(network) = self.network.take() {
            child = child.network(network);
        }
        snapshot.spawn_in(kvm, setup, child, None)
    }

    /// The full command line the guest receives on a host with `caps`.
    fn full_cmdline(
        &self,
        caps: &HostCaps,
        virtio: &VirtioPlan,
        network: Option<&VmNetwork>,
    ) -> String {
        let identity = format!("{IDENTITY_CMDLINE_KEY}={IDENTITY_PAGE_ADDR:#x}");
        let mut parts = vec![PLATFORM_CMDLINE, &identity];
        if caps.ring0_emulated {
            parts.push(EMULATED_HOST_CMDLINE);
        }
        if !caps.linux_switches.is_empty() {
            parts.push(&caps.linux_switches);
        }
        let devices = virtio.cmdline();
        if !devices.is_empty() {
            parts.push(&devices);
        }
        if let Some(dhcp) = network.and_then(|n| n.config.cmdline(&self.cmdline)) {
            parts.push(dhcp);
        }
        if !self.cmdline.is_empty() {
            parts.push(&self.cmdline);
        }
        parts.join(" ")
    }

    /// Checks the configuration, creates the VM and loads the guest. Nothing runs until
    /// [`Vm::start`]. On error everything created so far is released.
    pub fn build(mut self) -> Result<Vm, Error> {
        let kernel = self.kernel.clone().ok_or(Error::NoKernel)?;
        if self.vcpus == 0 {
            return Err(Error::NoVcpus);
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::MemoryTooSmall {
                mib: self.memory_mib,
                min: MIN_MEMORY_MIB,
            });
        }
        // The bound keeps the byte count (and RAM's end above the MMIO hole) far from u64's.
        let memory_bytes = self
            .memory_mib
            .checked_mul(1 << 20)
            .filter(|_| self.memory_mib <= MAX_MEMORY_MIB)
            .ok_or(Error::MemoryTooLarge {
                mib: self.memory_mib,
                max: MAX_MEMORY_MIB,
            })?;
        let kvm = open_kvm(&self.kvm_device)?;
        let max_vcpus = (kvm.get_max_vcpus() as u32).min(u32::from(MAX_MPTABLE_VCPUS));
        if self.vcpus > max_vcpus {
            return Err(Error::TooManyVcpus {
                requested: self.vcpus,
                max: max_vcpus,
            });
        }
        let caps = host_caps(&kvm)?;
        let setup = self.thread_setup()?;

        let ram = GuestRam::new(memory_bytes)?;
        let mut devices = std::mem::take(&mut self.virtio)
            .into_iter()
            .map(VirtioConfig::create)
            .collect::<Result<Vec<_>, _>>()?;
        let vsock_uds = self.vsock.as_ref().is_some_and(|v| v.uds_path.is_some());
        let vsock = self.vsock.take().map(VsockConfig::create).transpose()?;
        let vsock = vsock.map(|(spec, connector)| {
            devices.push(spec);
            connector
        });
        let balloon = match &self.balloon {
            Some(config) => {
                let (device, handle) = config.create(&ram)?;
                devices.push(device);
                Some(handle)
            }
            None => None,
        };
        let network = match self.network.take() {
            Some(config) => {
                let (device, handle) = config.create()?;
                devices.push(device);
                Some(VmNetwork { config, handle })
            }
            None => None,
        };
        let virtio = VirtioPlan::new(devices)?;
        let cmdline = self.full_cmdline(&caps, &virtio, network.as_ref());
        let vcpu_count = self.vcpus as u8; // checked against MAX_MPTABLE_VCPUS above
        let entry = boot::load(
            &ram,
            &BootSpec {
                kernel: &kernel,
                initrd: self.initrd.as_deref(),
                cmdline: &cmdline,
                vcpus: vcpu_count,
            },
        )?;

        let identity = Identity::first()?;
        let identity_page = IdentityPage::new()?;
        identity_page.write(&identity)?;
        let vm_fd = create_vm(&kvm, &ram, &identity_page)?;
        let vcpus = create_vcpus(&kvm, &vm_fd, &caps, vcpu_count, |id, fd| {
            regs::setup_common(fd)?;
            if id == 0 {
                regs::setup_boot_vcpu(fd, &ram.memory, entry)?;
            }
            Ok(())
        })?;
        let machine = machine::assemble(MachineSpec {
            kvm: Arc::new(kvm),
            vm_fd,
            ram,
            vcpus,
            setup,
            legacy: LegacyConfig {
                console: self.console,
                console_input: self.console_input,
                serial_state: None,
                debug_exit: self.debug_exit,
            },
            virtio,
            vsock,
            vsock_uds,
            balloon,
            network,
            identity,
            identity_page,
            threads: SpareThreads::default(),
        })?;
        Ok(Vm::new(machine))
    }
}
