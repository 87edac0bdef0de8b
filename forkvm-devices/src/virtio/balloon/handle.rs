//! The host's side of a balloon ([`BalloonHandle`]), the statistics it reads
//! ([`BalloonStats`]), and the state the device and its handles share.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::{BalloonError, PAGES_PER_MIB};

/// Host requests waiting for the event loop.
pub(super) const PENDING_TARGET: u32 = 1 << 0;
pub(super) const PENDING_STATS: u32 = 1 << 1;

/// Memory statistics the guest reported, as (tag, value) pairs in the guest's order.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonStats {
    pub(super) entries: Vec<(u16, u64)>,
}

impl BalloonStats {
    /// The value reported for `tag` (see [`stat_tag`]); the last one wins if repeated.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| *v)
    }

    /// Every reported entry.
    pub fn entries(&self) -> &[(u16, u64)] {
        &self.entries
    }
}

/// State shared by the device and its handles.
pub(super) struct Shared {
    pub(super) ram_pages: u64,
    pub(super) target: AtomicU32,
    pub(super) actual: AtomicU32,
    pub(super) stats: Mutex<Option<BalloonStats>>,
    pub(super) stats_updates: AtomicU64,
    pub(super) inflated: AtomicU64,
    pub(super) deflated: AtomicU64,
    pub(super) reported: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) pending: AtomicU32,
    pub(super) event: EventFd,
}

impl Shared {
    pub(super) fn request(&self, what: u32) {
        self.pending.fetch_or(what, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            crate::ratelimit::guest_warn!("virtio-balloon: cannot signal the device: {e}");
        }
    }

    pub(super) fn lock_stats(&self) -> MutexGuard<'_, Option<BalloonStats>> {
        crate::sync::lock(&self.stats)
    }
}

/// The host's side of a balloon: set its target, read what the guest did. Cloneable, `Send` and
/// `Sync`; requests take effect on the VM's event loop.
#[derive(Clone)]
pub struct BalloonHandle {
    pub(super) shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Asks the guest to hold `pages` 4 KiB pages in its balloon (0 deflates it completely).
    pub fn set_target_pages(&self, pages: u64) -> Result<(), BalloonError> {
        let max = self.shared.ram_pages;
        let too_large = BalloonError::TargetTooLarge {
            requested: pages,
            max,
        };
        if pages > max {
            return Err(too_large);
        }
        let pages = u32::try_from(pages).map_err(|_| too_large)?;
        self.shared.target.store(pages, Ordering::SeqCst);
        self.shared.request(PENDING_TARGET);
        Ok(())
    }

    /// Asks the guest to hold `mib` MiB in its balloon.
    pub fn set_target_mib(&self, mib: u64) -> Result<(), BalloonError> {
        self.set_target_pages(mib.saturating_mul(PAGES_PER_MIB))
    }

    /// The target the host set, in pages.
    pub fn target_pages(&self) -> u64 {
        u64::from(self.shared.target.load(Ordering::SeqCst))
    }

    /// The balloon's size as the guest last wrote it (`actual`), in pages.
    pub fn actual_pages(&self) -> u64 {
        u64::from(self.shared.actual.load(Ordering::SeqCst))
    }

    /// Asks the guest for fresh statistics: the device returns the guest's stats buffer, and the
    /// guest posts it again filled in. Watch [`Self::stats_updates`] to see it arrive. Ignored
    /// while the driver is not live or has no buffer posted.
    pub fn request_stats(&self) {
        self.shared.request(PENDING_STATS);
    }

    /// The statistics the guest last posted, if any.
    pub fn stats(&self) -> Option<BalloonStats> {
        self.shared.lock_stats().clone()
    }

    /// How many statistics buffers the guest has posted.
    pub fn stats_updates(&self) -> u64 {
        self.shared.stats_updates.load(Ordering::SeqCst)
    }

    /// Bytes of guest memory given back to the host by inflating, in total: a page counts each
    /// time it joins the balloon, not again while it stays there (a deflation, or a driver
    /// reset, takes it out).
    pub fn inflated_bytes(&self) -> u64 {
        self.shared.inflated.load(Ordering::SeqCst)
    }

    /// Bytes the guest took back by deflating, in total.
    pub fn deflated_bytes(&self) -> u64 {
        self.shared.deflated.load(Ordering::SeqCst)
    }

    /// Bytes of free memory the guest reported and the host reclaimed, in total.
    pub fn reported_bytes(&self) -> u64 {
        self.shared.reported.load(Ordering::SeqCst)
    }

    /// Malformed requests the device dropped.
    pub fn rejected_requests(&self) -> u64 {
        self.shared.rejected.load(Ordering::SeqCst)
    }
}
