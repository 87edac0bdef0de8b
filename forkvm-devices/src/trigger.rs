//! Ways a device signals the rest of the VMM: an interrupt line or an exit request.

use std::io;
use std::sync::Arc;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd that KVM injects through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// Creates a new, unasserted line.
    pub fn new() -> io::Result<Self> {
        EventFd::new(libc::EFD_NONBLOCK).map(Self)
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A request from a device to end the VM, handled synchronously by the VMM's callback.
#[derive(Clone)]
pub struct ExitTrigger(Arc<dyn Fn() + Send + Sync>);

impl ExitTrigger {
    /// Wraps the callback that ends the VM.
    pub fn new(on_exit: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(on_exit))
    }
}

impl std::fmt::Debug for ExitTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExitTrigger")
    }
}

impl Trigger for ExitTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}
