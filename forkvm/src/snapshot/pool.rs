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
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use forkvm_devices::sync::lock;
use forkvm_devices::virtio::block::layer_file;
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::probe::host_caps;
use crate::error::Error;
use crate::error::setup_err;
use crate::identity::IdentityPage;
use crate::memory::{Expected, PlaceholderRam};
use crate::network::{Network, PreparedNetwork};
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
        } = shape;
        let ram = PlaceholderRam::new(memory_size, expected)?;
        let identity_page = IdentityPage::new()?;
        let vm_fd = create_vm(kvm, &ram, &identity_page)?;
        let threads = SpareThreads::spawn(vcpus).map_err(|source| Error::Thread {
            what: "prepared child",
            source,
        })?;
        let vcpus = create_vcpus(kvm, &vm_fd, &host_caps(kvm)?, vcpus, |_, _| Ok(()))?;
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
}

/// The shells one VM has ready, and how many it keeps ready.
#[derive(Default)]
pub(crate) struct ShellPool {
    shells: Mutex<Vec<Shell>>,
    /// How many shells [`crate::Vm::keep_forks_ready`] asked to keep.
    target: AtomicUsize,
    /// The thread topping the pool up, while there is one.
    refill: Mutex<Option<JoinHandle<()>>>,
    /// Set when the VM goes away: the refill thread stops.
    closed: AtomicBool,
}

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

    /// Keeps `n` shells ready from now on (0: stop refilling).
    pub(crate) fn set_target(&self, n: usize) {
        self.target.store(n, Ordering::SeqCst);
    }

    /// Starts a thread that tops the pool up with shells of `shape` made with `kvm`, if the pool
    /// is short and no such thread runs.
    pub(crate) fn refill(self: &Arc<Self>, kvm: Arc<Kvm>, shape: impl FnOnce() -> ShellShape) {
        if !self.wanted() {
            return;
        }
        let mut refill = lock(&self.refill);
        if refill.as_ref().is_some_and(|thread| !thread.is_finished()) {
            return;
        }
        if let Some(done) = refill.take() {
            let _ = done.join();
        }
        let (pool, shape) = (self.clone(), shape());
        let spawned = thread::Builder::new()
            .name("forkvm-prepare".into())
            .spawn(move || {
                while pool.wanted() {
                    match Shell::new(&kvm, shape.clone()) {
                        Ok(shell) => pool.push(shell),
                        Err(e) => {
                            log::warn!(
                                "cannot prepare a child for the next fork: {}",
                                forkvm_devices::chain::ErrorChain(&e)
                            );
                            return;
                        }
                    }
                }
            });
        match spawned {
            Ok(thread) => *refill = Some(thread),
            Err(e) => log::warn!("cannot start the thread preparing children: {e}"),
        }
    }

    fn wanted(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.len() < self.target.load(Ordering::SeqCst)
    }

    /// Tells the refill thread to stop after the shell it is making, without waiting.
    pub(crate) fn stop_refilling(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Stops the refill thread and waits for it.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(thread) = lock(&self.refill).take() {
            // The thread only creates shells; a panic in it has nothing to report here.
            let _ = thread.join();
        }
    }
}
