//! What a network device carries across a fork or into a snapshot ([`NetState`]): its MAC
//! address. Flows do not survive: each child's device gets a fresh backend, and the frames
//! waiting in the parent's stay there. The features the driver accepted are the transport's
//! state: restoring it acks them again, which tells the new backend the checksum offloads the
//! guest uses (`Net::set_checksum_offload`).

use super::NetBackend;
use super::device::Net;

/// A network device at a fork: its MAC address.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    mac: [u8; 6],
}

impl NetState {
    /// The MAC address the copy keeps.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl Net {
    /// A network device that continues from `state`, connected to `backend`.
    pub fn from_state(state: &NetState, backend: Box<dyn NetBackend>) -> Self {
        Self::new(state.mac, backend)
    }

    /// What a child's device continues from (see [`Net::from_state`]).
    pub(super) fn state(&self) -> NetState {
        NetState { mac: self.mac }
    }
}
