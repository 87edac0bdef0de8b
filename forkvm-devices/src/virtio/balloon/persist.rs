//! What a balloon carries across a fork or into a snapshot ([`BalloonState`]), and the child's
//! balloon made from it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::device::Balloon;
use super::handle::BalloonStats;
use super::{F_DEFLATE_ON_OOM, F_REPORTING, F_STATS_VQ, MAX_STATS, PAGE_SIZE, RamDiscard};
use crate::virtio::VIRTIO_F_VERSION_1;
use crate::virtio::saved::SavedStateError;

/// A balloon at a fork: what it offers, its target and size, the statistics it holds and the
/// statistics buffer the guest left with it. Each child gets its own handle and counters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    pub(super) ram_pages: u64,
    pub(super) features: u64,
    pub(super) target: u32,
    pub(super) actual: u32,
    pub(super) stats: Option<BalloonStats>,
    pub(super) stats_head: Option<u16>,
}

impl BalloonState {
    /// Checks a state read back from a snapshot of a VM with `ram_bytes` of RAM.
    pub fn check(&self, ram_bytes: u64) -> Result<(), SavedStateError> {
        if self.ram_pages > ram_bytes / PAGE_SIZE {
            return Err(SavedStateError::new(
                "ram_pages",
                self.ram_pages,
                "more pages than the VM's RAM",
            ));
        }
        self.check_shape()
    }

    /// The checks that need no VM: only known features, a target within the RAM, no
    /// more statistics than a guest may report.
    fn check_shape(&self) -> Result<(), SavedStateError> {
        let known = (1 << VIRTIO_F_VERSION_1)
            | (1 << F_STATS_VQ)
            | (1 << F_DEFLATE_ON_OOM)
            | (1 << F_REPORTING);
        if self.features & !known != 0 {
            return Err(SavedStateError::new(
                "features",
                format_args!("{:#x}", self.features),
                "features no balloon offers",
            ));
        }
        // (`actual` is what the guest says, any number: only reported, never used.)
        if u64::from(self.target) > self.ram_pages {
            return Err(SavedStateError::new(
                "target",
                self.target,
                "more pages than the balloon's RAM",
            ));
        }
        if let Some(stats) = &self.stats
            && stats.entries.len() > MAX_STATS
        {
            return Err(SavedStateError::new(
                "stats",
                format_args!("{} entries", stats.entries.len()),
                "more statistics than a guest may report",
            ));
        }
        Ok(())
    }
}

impl Balloon {
    /// A forked child's balloon, continuing from `state` (the transport tells it the features
    /// the driver accepted), with `discard` over the child's own RAM. A state no balloon could
    /// have been in (read back from a damaged snapshot) is refused.
    pub fn from_state(state: &BalloonState, discard: Arc<dyn RamDiscard>) -> io::Result<Self> {
        if let Err(e) = state.check_shape() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        let mut balloon = Self::with_features(state.ram_pages, state.features, discard)?;
        balloon.shared.target.store(state.target, Ordering::SeqCst);
        balloon.shared.actual.store(state.actual, Ordering::SeqCst);
        *balloon.shared.lock_stats() = state.stats.clone();
        balloon.stats_head = state.stats_head;
        Ok(balloon)
    }

    /// What a child's balloon continues from (see [`Balloon::from_state`]).
    pub(super) fn state(&self) -> BalloonState {
        BalloonState {
            ram_pages: self.shared.ram_pages,
            features: self.features,
            target: self.shared.target.load(Ordering::SeqCst),
            actual: self.shared.actual.load(Ordering::SeqCst),
            stats: self.shared.lock_stats().clone(),
            stats_head: self.stats_head,
        }
    }
}
