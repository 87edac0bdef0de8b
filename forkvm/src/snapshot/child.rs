//! [`Child`]: how a VM spawned from a snapshot reaches the host.

use std::collections::VecDeque;
use std::path::PathBuf;

use crate::console::{ConsoleInput, ConsoleOutput};
use crate::network::Network;

/// How one child of a fork reaches the host: its serial console and input, the host ends of
/// its virtio consoles, its vsock Unix socket and its network. A [`ConsoleOutput`] converts into a child
/// with only a serial console (its virtio consoles' output is discarded, and host programs
/// reach its vsock device only through [`crate::Vm::vsock_connect`]).
#[derive(Debug)]
pub struct Child {
    pub(super) console: ConsoleOutput,
    pub(super) console_input: Option<ConsoleInput>,
    pub(super) virtio_consoles: VecDeque<(ConsoleOutput, Option<ConsoleInput>)>,
    pub(super) vsock_uds_path: Option<PathBuf>,
    pub(super) network: Option<Network>,
}

impl Child {
    /// A child whose serial console writes to `console`.
    pub fn new(console: ConsoleOutput) -> Self {
        Self {
            console,
            console_input: None,
            virtio_consoles: VecDeque::new(),
            vsock_uds_path: None,
            network: None,
        }
    }

    /// Feeds the child's serial console from `input`.
    pub fn console_input(mut self, input: ConsoleInput) -> Self {
        self.console_input = Some(input);
        self
    }

    /// The host end of the child's next virtio console (the first call is for the parent's
    /// first virtio console, and so on): its output, and its input if given.
    pub fn virtio_console(mut self, output: ConsoleOutput, input: Option<ConsoleInput>) -> Self {
        self.virtio_consoles.push_back((output, input));
        self
    }

    /// Where host programs reach the child's vsock device, as [`crate::VsockConfig::uds_path`] (the
    /// parent's socket stays the parent's).
    pub fn vsock_uds_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.vsock_uds_path = Some(path.into());
        self
    }
}

impl Child {
    /// The child's network, if its source has one (without this: a network like the source's,
    /// with the policy it had at the capture, no published ports, and for a snapshot loaded from
    /// a directory the defaults). Each child has a network of its own either way.
    pub fn network(mut self, network: Network) -> Self {
        self.network = Some(network);
        self
    }
}

impl From<ConsoleOutput> for Child {
    fn from(console: ConsoleOutput) -> Self {
        Self::new(console)
    }
}
