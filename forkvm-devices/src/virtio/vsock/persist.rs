//! What a socket device carries across a fork or into a snapshot ([`VsockState`]): only the
//! guest's CID, since connections do not survive a fork.

use std::path::Path;

use super::VsockError;
use super::device::Vsock;
use crate::virtio::saved::SavedStateError;

/// A socket device at a fork. Connections do not survive it: each child's device starts with
/// none, new host endpoints, and a transport reset for its guest.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    cid: u64,
}

impl VsockState {
    /// Checks a state read back from a snapshot: the CID is one a guest may have.
    pub fn check(&self) -> Result<(), SavedStateError> {
        if !(3..u64::from(u32::MAX)).contains(&self.cid) {
            return Err(SavedStateError::new(
                "cid",
                self.cid,
                "not a guest CID (3 to 2^32 - 2)",
            ));
        }
        Ok(())
    }
}

impl Vsock {
    /// A forked child's device: the guest keeps its CID, host programs reach it through
    /// `uds_path` (if given) and [`Vsock::connector`], and the guest is sent a transport reset
    /// so that it drops the connections it had.
    pub fn from_state(state: &VsockState, uds_path: Option<&Path>) -> Result<Self, VsockError> {
        let mut device = Self::new(state.cid, uds_path)?;
        device.reset_pending = true;
        Ok(device)
    }

    /// What a child's device continues from (see [`Vsock::from_state`]).
    pub(super) fn state(&self) -> VsockState {
        VsockState { cid: self.cid }
    }
}
