//! The identity page: one page of guest-physical memory outside RAM through which a guest learns
//! that it is a new VM — a child of a fork or a restored snapshot — so that it can reseed its
//! random number generators and step its clock before doing anything else.
//!
//! The page lies at [`crate::layout::IDENTITY_PAGE_ADDR`] (in the MMIO hole, reserved in the guest's memory map)
//! and the guest kernel's command line names it as `forkvm.identity=<address>`. Layout, all
//! fields little-endian:
//!
//! | offset | size | field                                                                   |
//! |--------|------|-------------------------------------------------------------------------|
//! | `0x00` | 8    | magic, `FORKVMID`                                                        |
//! | `0x08` | 4    | layout version, [`IDENTITY_LAYOUT_VERSION`]                              |
//! | `0x0c` | 4    | reserved, 0                                                              |
//! | `0x10` | 8    | generation: 0 for a booted VM, its source's generation + 1 for a fork child or a restored snapshot |
//! | `0x18` | 16   | VM id: random, new for every VM                                          |
//! | `0x28` | 8    | host wall-clock time when this VM was made, in ns since the Unix epoch  |
//!
//! Each VM has its own page, written by the host before the VM's vCPUs first run and never
//! again, so a guest reads a consistent page whenever it looks. Where KVM allows it
//! (`KVM_CAP_READONLY_MEM`) the guest cannot write the page: a write exits to the VMM, which
//! drops it. A guest agent keeps the generation it last saw; when the page shows a larger one,
//! the VM was forked or restored under it.

use std::time::{SystemTime, UNIX_EPOCH};

use forkvm_devices::virtio::rng::fill_random;
use serde::{Deserialize, Serialize};
use vm_memory::{MmapRegion, VolatileMemory};

use crate::error::Error;
use crate::error::setup_err;
use crate::layout::IDENTITY_PAGE_SIZE;

/// The first eight bytes of the page.
pub const IDENTITY_MAGIC: [u8; 8] = *b"FORKVMID";
/// Version of the page layout described in this module.
pub const IDENTITY_LAYOUT_VERSION: u32 = 1;
/// The kernel command-line parameter giving the page's address.
pub const IDENTITY_CMDLINE_KEY: &str = "forkvm.identity";

/// Who a VM is, as its guest reads it on the identity page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// 0 for a booted VM; a fork child or a restored snapshot has its source's + 1.
    pub generation: u64,
    /// Random, different for every VM.
    pub id: [u8; 16],
}

impl Identity {
    /// The identity of a newly booted VM.
    pub(crate) fn first() -> Result<Self, Error> {
        Ok(Self {
            generation: 0,
            id: random_id()?,
        })
    }

    /// The identity of a VM made from one with this identity (a fork child, a restore).
    pub(crate) fn next(&self) -> Result<Self, Error> {
        Ok(Self {
            generation: self.generation.saturating_add(1),
            id: random_id()?,
        })
    }

    /// The page's bytes for this identity, made now.
    fn page(&self) -> [u8; 0x30] {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut page = [0u8; 0x30];
        page[..8].copy_from_slice(&IDENTITY_MAGIC);
        page[8..12].copy_from_slice(&IDENTITY_LAYOUT_VERSION.to_le_bytes());
        page[0x10..0x18].copy_from_slice(&self.generation.to_le_bytes());
        page[0x18..0x28].copy_from_slice(&self.id);
        page[0x28..0x30].copy_from_slice(&now.to_le_bytes());
        page
    }
}

fn random_id() -> Result<[u8; 16], Error> {
    let mut id = [0u8; 16];
    fill_random(&mut id).map_err(|e| setup_err("VM id", e))?;
    Ok(id)
}

/// The host memory behind one VM's identity page.
pub(crate) struct IdentityPage {
    region: MmapRegion,
}

impl IdentityPage {
    /// A zeroed page.
    pub(crate) fn new() -> Result<Self, Error> {
        let region = MmapRegion::new(IDENTITY_PAGE_SIZE as usize)
            .map_err(|e| setup_err("identity page", e))?;
        Ok(Self { region })
    }

    /// Host address of the page, for its memory slot.
    pub(crate) fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// Writes `identity` into the page (before the VM's vCPUs run).
    pub(crate) fn write(&self, identity: &Identity) -> Result<(), Error> {
        let page = identity.page();
        self.region
            .get_slice(0, page.len())
            .map(|slice| slice.copy_from(&page))
            .map_err(|e| setup_err("identity page", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_holds_magic_version_generation_and_id() {
        let page = IdentityPage::new().unwrap();
        let first = Identity::first().unwrap();
        let child = first.next().unwrap();
        assert_eq!(child.generation, 1);
        assert_ne!(child.id, first.id);
        page.write(&child).unwrap();
        let mut bytes = [0u8; 0x30];
        page.region.get_slice(0, 0x30).unwrap().copy_to(&mut bytes);
        assert_eq!(&bytes[..8], b"FORKVMID");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(bytes[0x10..0x18], 1u64.to_le_bytes());
        assert_eq!(bytes[0x18..0x28], child.id);
        let made = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap());
        assert!(made > 1_600_000_000 * 1_000_000_000, "a wall-clock time");
    }
}
