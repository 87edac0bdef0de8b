//! Children prepared ahead of forks: the part of a fork that can be done before it.
//!
//! Creating a child's KVM VM (memory slots, interrupt controllers) and vCPUs is the part of
//! a fork that grows with memory size on some hosts (KVM allocates per-page slot metadata up
//! front). A [`Shell`] is all of that over placeholder RAM; a fork maps the frozen image into it
//! in place and loads the state. The placeholder already maps the file the next image will most
//! likely be (the parent's own file before its first fork, its last image while it stays
//! paused, the snapshot's image for a snapshot's own), so that fork maps nothing at all.
//! [`crate::Vm::prepare_forks`] creates shells at once; [`crate::Vm::keep_forks_ready`] keeps a
//! number of them ready, topping the pool up on a background thread after each fork that used
//! some; [`super::Snapshot::prepare`] prepares children of one snapshot.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use forkvm_devices::sync::lock;
use forkvm_devices::virtio::block::layer_file;
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::probe::host_caps;
use crate::error::Error;
use crate::error::setup_err;
use crate::identity::IdentityPage;
use crate::memory::{Expected, PlaceholderRam};
use crate::network::{Network, PreparedNetwork};
use crate::seccomp::{self, SeccompPolicy, ThreadKind};
use crate::vstate::kvm::{create_vcpus, create_vm};
use crate::vstate::threads::SpareThreads;
use crate::vstate::vcpu::Vcpu;

/// A child VM created ahead of a fork: memory slots over placeholder RAM, interrupt
/// controllers, vCPUs with their CPUID, and its threads, waiting.
pub(crate) struct Shell {
    // Declared before `ram` and `identity_page`, so the VM (and its memory slots) is destroyed
    // before the mappings.
    pub vm_fd: VmFd,
    pub vcpus: Vec<Vcpu>,
    pub ram: PlaceholderRam,
    pub identity_page: IdentityPage,
    /// The child's event-loop and vCPU threads, started.
    pub threads: SpareThreads,
    /// Files for the overlays of the child's disks, sized (one per block device).
    pub layer_files: Vec<File>,
    /// The child's user-mode network, made ahead, if the VM has one.
    pub network: Option<PreparedNetwork>,
}

impl Shell {
    /// A shell for a VM shaped as `shape`.
    pub(crate) fn new(kvm: &Kvm, shape: ShellShape) -> Result<Self, Error> {
        let ShellShape {
            memory_size,
            vcpus,
            disks,
            expected,
            network,
            seccomp,
        } = shape;
        let span = crate::phases::span("shell.ram");
        let ram = PlaceholderRam::new(memory_size, expected)?;
        let identity_page = IdentityPage::new()?;
        drop(span);
        let span = crate::phases::span("shell.vm");
        let vm_fd = create_vm(kvm, &ram, &identity_page)?;
        drop(span);
        let span = crate::phases::span("shell.threads");
        let threads = SpareThreads::spawn(vcpus, seccomp).map_err(|source| Error::Thread {
            what: "prepared child",
            source,
        })?;
        drop(span);
        let span = crate::phases::span("shell.caps");
        let caps = host_caps(kvm)?;
        drop(span);
        let span = crate::phases::span("shell.vcpus");
        let vcpus = create_vcpus(kvm, &vm_fd, &caps, vcpus, |_, _| Ok(()))?;
        drop(span);
        let layer_files = disks
            .iter()
            .map(|&size| layer_file(size))
            .collect::<std::io::Result<_>>()
            .map_err(|e| setup_err("virtio-blk overlay", e))?;
        let network = match &network {
            Some(network) => network.prepare()?,
            None => None,
        };
        Ok(Self {
            vm_fd,
            vcpus,
            ram,
            identity_page,
            threads,
            layer_files,
            network,
        })
    }
}

/// What a shell is made for: a VM of `memory_size` bytes, `vcpus` vCPUs and block devices of
/// `disks` bytes each, whose RAM maps `expected`, what the image it will most likely adopt maps
/// (see [`PlaceholderRam::new`]).
#[derive(Clone)]
pub(crate) struct ShellShape {
    pub memory_size: u64,
    pub vcpus: u8,
    pub disks: Vec<u64>,
    pub expected: Option<Expected>,
    /// The network of the VM's children, if it has one.
    pub network: Option<Network>,
    /// The seccomp policy of the children's threads.
    pub seccomp: SeccompPolicy,
}

/// The shells one VM has ready, and how many it keeps ready.
#[derive(Default)]
pub(crate) struct ShellPool {
    shells: Mutex<Vec<Shell>>,
    /// How many shells [`crate::Vm::keep_forks_ready`] asked to keep.
    target: AtomicUsize,
    /// The thread topping the pool up, and what it makes next.
    refill: Mutex<Refill>,
    /// Wakes the refill thread: shells are wanted, or the pool closed.
    wanted_changed: Condvar,
    /// Set when the VM goes away: the refill thread stops.
    closed: AtomicBool,
}

/// The refill thread's side of the pool. The thread stays while shells are wanted and for
/// [`REFILL_IDLE`] after, waiting to be woken: a fork that used a shell only wakes it, rather
/// than starting a thread in its path (with many VMs in the process that costs ~0.6 ms).
#[derive(Default)]
struct Refill {
    thread: Option<JoinHandle<()>>,
    /// Whether the thread is in its loop (set and cleared under the lock).
    running: bool,
    /// The shape of the next shells, when it changed (a fork's parent maps a new image).
    shape: Option<ShellShape>,
}

/// How long the refill thread waits for more work before it ends.
const REFILL_IDLE: Duration = Duration::from_secs(5);

impl ShellPool {
    /// A ready shell, if there is one.
    pub(crate) fn take(&self) -> Option<Shell> {
        lock(&self.shells).pop()
    }

    /// How many shells are ready.
    pub(crate) fn len(&self) -> usize {
        lock(&self.shells).len()
    }

    /// Adds a ready shell.
    pub(crate) fn push(&self, shell: Shell) {
        lock(&self.shells).push(shell);
    }

    /// Makes `n` more shells of `shape` with `kvm`, here and now.
    pub(crate) fn prepare(&self, kvm: &Kvm, shape: &ShellShape, n: usize) -> Result<(), Error> {
        for _ in 0..n {
            self.push(Shell::new(kvm, shape.clone())?);
        }
        Ok(())
    }

    /// Keeps `n` shells ready from now on (0: stop refilling).
    pub(crate) fn set_target(&self, n: usize) {
        self.target.store(n, Ordering::SeqCst);
    }

    /// Tops the pool up with shells of `shape` made with `kvm` on the refill thread, if the pool
    /// is short: wakes the thread, or starts it if there is none.
    pub(crate) fn refill(self: &Arc<Self>, kvm: Arc<Kvm>, shape: impl FnOnce() -> ShellShape) {
        if !self.wanted() {
            return;
        }
        let mut refill = lock(&self.refill);
        if refill.running {
            refill.shape = Some(shape());
            self.wanted_changed.notify_all();
            return;
        }
        if let Some(done) = refill.thread.take() {
            // Out of its loop: ending, if not ended.
            let _ = done.join();
        }
        let (pool, shape) = (self.clone(), shape());
        let parent = seccomp::current();
        // The VMs this pool makes may end on filtered threads: their exit hooks need a thread
        // started from an unfiltered one (this, when the embedder keeps restores ready).
        let hooks = crate::vstate::run_state::hook_user();
        let spawned = thread::Builder::new()
            .name("forkvm-prepare".into())
            .spawn(move || {
                let _hooks = hooks;
                seccomp::enter_or_log(ThreadKind::Prepare, shape.seccomp, parent);
                pool.refill_loop(&kvm, shape);
            });
        match spawned {
            Ok(thread) => {
                refill.thread = Some(thread);
                refill.running = true;
            }
            Err(e) => log::warn!("cannot start the thread preparing children: {e}"),
        }
    }

    /// The refill thread: makes shells while they are wanted, then waits to be woken; ends when
    /// the pool closes, on an error, or after [`REFILL_IDLE`] with nothing to do.
    fn refill_loop(&self, kvm: &Kvm, mut shape: ShellShape) {
        let mut refill = lock(&self.refill);
        loop {
            if let Some(next) = refill.shape.take() {
                shape = next;
            }
            if self.closed.load(Ordering::SeqCst) {
                break;
            }
            if self.wanted() {
                drop(refill);
                let made = Shell::new(kvm, shape.clone());
                refill = lock(&self.refill);
                match made {
                    Ok(shell) => self.push(shell),
                    Err(e) => {
                        log::warn!(
                            "cannot prepare a child for the next fork: {}",
                            forkvm_devices::chain::ErrorChain(&e)
                        );
                        break;
                    }
                }
                continue;
            }
            let (woken, waited) = self
                .wanted_changed
                .wait_timeout(refill, REFILL_IDLE)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            refill = woken;
            if waited.timed_out() && !self.wanted() && refill.shape.is_none() {
                break;
            }
        }
        refill.running = false;
    }

    fn wanted(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.len() < self.target.load(Ordering::SeqCst)
    }

    /// Tells the refill thread to stop after the shell it is making, without waiting.
    pub(crate) fn stop_refilling(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Under the lock, so that a thread about to wait sees the flag or gets the wake-up.
        drop(lock(&self.refill));
        self.wanted_changed.notify_all();
    }

    /// Stops the refill thread and waits for it.
    pub(crate) fn close(&self) {
        self.stop_refilling();
        let thread = lock(&self.refill).thread.take();
        if let Some(thread) = thread {
            // The thread only creates shells; a panic in it has nothing to report here.
            let _ = thread.join();
        }
    }
}
