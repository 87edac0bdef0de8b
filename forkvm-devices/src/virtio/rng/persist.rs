//! What an entropy device carries across a fork or into a snapshot: nothing
//! ([`DeviceState::Rng`]), so a child's device is a new one.

use super::device::Rng;
use crate::virtio::DeviceState;

impl Rng {
    /// A forked child's entropy device: the device keeps no state, so it is a new one.
    pub fn from_state() -> Self {
        Self::new()
    }

    /// What a child's device continues from (see [`Rng::from_state`]).
    pub(super) fn state(&self) -> DeviceState {
        DeviceState::Rng
    }
}
