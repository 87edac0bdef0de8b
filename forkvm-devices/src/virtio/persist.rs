//! The one contract by which every device continues in a new VM (a fork child, a restored
//! snapshot): its [`DeviceState`] says what it needs from the host ([`HostNeeds`]), the VMM
//! gives exactly that ([`HostEnds`]), and the state turns itself back into a device
//! ([`DeviceState::into_device`]) with the handles the VM keeps to it ([`DeviceHandles`]).
//! The VMM's side is a loop over the states; adding a device touches this crate only.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::balloon::{Balloon, BalloonHandle, RamDiscard};
use super::block::Block;
use super::console::Console;
use super::net::{Net, NetBackend, Unconnected};
use super::rng::Rng;
use super::vsock::host::VsockConnector;
use super::vsock::{Vsock, VsockError};
use super::{DeviceState, VirtioDevice};

/// What a device needs from the host to continue from its state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostNeeds {
    /// A console: its output (and its input, if the host gives one).
    pub console: bool,
    /// A disk: an overlay file for the copy's writes, of this many bytes (made ahead for a
    /// prepared child, or made at once when none is given).
    pub overlay_bytes: Option<u64>,
    /// A vsock device: where host programs reach it (a Unix socket path), if anywhere.
    pub vsock_uds: bool,
    /// A balloon: the discard handle of the new VM's RAM.
    pub ram_discard: bool,
    /// A network device: a backend of its own (flows are not shared with the parent).
    pub network: bool,
}

/// The host ends a device gets in a new VM; what its [`HostNeeds`] did not ask for is ignored.
#[derive(Default)]
pub struct HostEnds {
    /// Where a console writes (discarded when not given).
    pub console_output: Option<Box<dyn Write + Send>>,
    /// Where a console reads from.
    pub console_input: Option<OwnedFd>,
    /// A disk's overlay file, sized ahead (made when not given).
    pub overlay: Option<File>,
    /// A vsock device's Unix socket path.
    pub vsock_uds_path: Option<PathBuf>,
    /// A balloon's discard handle on the new VM's RAM.
    pub ram_discard: Option<Arc<dyn RamDiscard>>,
    /// A network device's backend (unconnected when not given).
    pub net_backend: Option<Box<dyn NetBackend>>,
}

impl std::fmt::Debug for HostEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEnds")
            .field("console_output", &self.console_output.is_some())
            .field("console_input", &self.console_input)
            .field("overlay", &self.overlay)
            .field("vsock_uds_path", &self.vsock_uds_path)
            .field("ram_discard", &self.ram_discard.is_some())
            .field("net_backend", &self.net_backend.is_some())
            .finish()
    }
}

/// The handles a VM keeps to a device it continued.
#[derive(Default)]
pub struct DeviceHandles {
    /// A vsock device's in-process connector.
    pub vsock: Option<VsockConnector>,
    /// A balloon's handle.
    pub balloon: Option<BalloonHandle>,
}

impl std::fmt::Debug for DeviceHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandles")
            .field("vsock", &self.vsock.is_some())
            .field("balloon", &self.balloon.is_some())
            .finish()
    }
}

/// Why a device could not continue from its state.
#[derive(Debug, thiserror::Error)]
pub enum ContinueError {
    /// Its host ends could not be set up (an overlay, a console, a balloon without RAM).
    #[error("cannot continue {device}")]
    Io {
        /// The device.
        device: &'static str,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Its vsock host endpoint could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
}

fn failed(device: &'static str) -> impl FnOnce(io::Error) -> ContinueError {
    move |source| ContinueError::Io { device, source }
}

/// A device continued from its state, with its handles.
pub type Continued = (Box<dyn VirtioDevice>, DeviceHandles);

impl DeviceState {
    /// What this device needs from the host to continue.
    pub fn needs(&self) -> HostNeeds {
        match self {
            Self::Rng | Self::SavedBlock(_) => HostNeeds::default(),
            Self::Block(disk) => HostNeeds {
                overlay_bytes: Some(disk.disk_bytes()),
                ..HostNeeds::default()
            },
            Self::Console(_) => HostNeeds {
                console: true,
                ..HostNeeds::default()
            },
            Self::Vsock(_) => HostNeeds {
                vsock_uds: true,
                ..HostNeeds::default()
            },
            Self::Balloon(_) => HostNeeds {
                ram_discard: true,
                ..HostNeeds::default()
            },
            Self::Net(_) => HostNeeds {
                network: true,
                ..HostNeeds::default()
            },
        }
    }

    /// A copy of the device this state was frozen from, connected to `ends`. A snapshot's saved
    /// disk ([`DeviceState::SavedBlock`]) must be opened first; a balloon needs a discard handle;
    /// a network device given no backend is [`Unconnected`].
    pub fn into_device(&self, ends: HostEnds) -> Result<Continued, ContinueError> {
        let mut handles = DeviceHandles::default();
        let device: Box<dyn VirtioDevice> = match self {
            Self::Rng => Box::new(Rng::from_state()),
            Self::Block(state) => Box::new(
                match ends.overlay {
                    Some(overlay) => Block::from_state_over(state, overlay),
                    None => Block::from_state(state),
                }
                .map_err(failed("virtio-blk"))?,
            ),
            Self::SavedBlock(saved) => {
                return Err(failed("virtio-blk")(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("disk {} of a snapshot was not opened", saved.file),
                )));
            }
            Self::Console(state) => {
                let output = ends.console_output.unwrap_or_else(|| Box::new(io::sink()));
                let mut console =
                    Console::from_state(state, output).map_err(failed("virtio-console"))?;
                if let Some(input) = ends.console_input {
                    console = console
                        .with_input(input)
                        .map_err(failed("virtio-console input"))?;
                }
                Box::new(console)
            }
            Self::Vsock(state) => {
                let device = Vsock::from_state(state, ends.vsock_uds_path.as_deref())?;
                handles.vsock = Some(device.connector());
                Box::new(device)
            }
            Self::Balloon(state) => {
                let discard = ends.ram_discard.ok_or_else(|| {
                    failed("virtio-balloon")(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a balloon needs the VM's RAM",
                    ))
                })?;
                let device =
                    Balloon::from_state(state, discard).map_err(failed("virtio-balloon"))?;
                handles.balloon = Some(device.handle());
                Box::new(device)
            }
            Self::Net(state) => {
                let backend = ends.net_backend.unwrap_or_else(|| Box::new(Unconnected));
                Box::new(Net::from_state(state, backend))
            }
        };
        Ok((device, handles))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::console::ConsoleState;

    struct KeepAll;

    impl RamDiscard for KeepAll {
        fn discard(&self, _addr: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    /// Every kind of state says what it needs and turns back into a device of its own type,
    /// with the handles the VM keeps to it; what it needs and does not get is refused.
    #[test]
    fn each_state_continues_from_what_it_says_it_needs() {
        let rng = DeviceState::Rng;
        assert_eq!(rng.needs(), HostNeeds::default());
        let (device, handles) = rng.into_device(HostEnds::default()).unwrap();
        assert_eq!(device.device_type(), 4);
        assert!(handles.vsock.is_none() && handles.balloon.is_none());

        let console = DeviceState::Console(ConsoleState::default());
        assert!(console.needs().console);
        let (device, _) = console.into_device(HostEnds::default()).unwrap();
        assert_eq!(device.device_type(), 3);

        let mut balloon = Balloon::new(1 << 20, false, false, Arc::new(KeepAll)).unwrap();
        let state = balloon.freeze().unwrap();
        assert!(state.needs().ram_discard);
        assert!(matches!(
            state.into_device(HostEnds::default()),
            Err(ContinueError::Io { .. })
        ));
        let (device, handles) = state
            .into_device(HostEnds {
                ram_discard: Some(Arc::new(KeepAll)),
                ..HostEnds::default()
            })
            .unwrap();
        assert_eq!(device.device_type(), 5);
        assert!(handles.balloon.is_some());

        let mut net = Net::new([2, 0, 0, 0, 0, 1], Box::new(Unconnected));
        let state = net.freeze().unwrap();
        assert_eq!(
            state.needs(),
            HostNeeds {
                network: true,
                ..HostNeeds::default()
            }
        );
        for ends in [
            HostEnds::default(),
            HostEnds {
                net_backend: Some(Box::new(Unconnected)),
                ..HostEnds::default()
            },
        ] {
            let (device, handles) = state.into_device(ends).unwrap();
            assert_eq!(device.device_type(), 1);
            let mut mac = [0u8; 6];
            device.read_config(0, &mut mac);
            assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
            assert!(handles.vsock.is_none() && handles.balloon.is_none());
        }
    }
}
