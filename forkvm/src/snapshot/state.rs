//! The state file of a snapshot directory (`state.json`, [`SnapshotState`]): everything but the
//! memory and the disks' contents, parsed and then checked before anything is made from it.
//!
//! A state file comes from a directory someone else may have written: it is read only up to
//! [`MAX_STATE_BYTES`] (so every list in it is bounded by that), and every number that is used
//! as a size, an index or an address is range-checked with checked arithmetic
//! ([`SnapshotState::check`]) before any memory is mapped or allocated for it; a value out of
//! range is a [`SnapshotError::Field`] naming the field.

use std::collections::HashSet;
use std::sync::Arc;

use forkvm_devices::legacy::SerialState;
use forkvm_devices::virtio::saved::VirtioStateCheck;
use kvm_bindings::KVM_MAX_MSR_ENTRIES;
use serde::{Deserialize, Serialize};

use super::CpuState;
use crate::boot::mptable::MAX_MPTABLE_VCPUS;
use crate::error::{FileProblem, SnapshotError};
use crate::identity::Identity;
use crate::memory::{MIN_MEMORY_MIB, ram_ranges};
use crate::network::GuestConnection;
use crate::virtio::{FIRST_VIRTIO_IRQ, FrozenDevice, LAST_VIRTIO_IRQ, is_virtio_slot};

/// Version of the snapshot format; a snapshot of another version is refused. Format 3 records
/// checksums of its files (`checksums.json`); format 2 (the same state, no checksums) still
/// loads, unverified.
pub const SNAPSHOT_FORMAT: u32 = 3;
/// The oldest format still loaded: the last without checksums.
pub(super) const OLDEST_FORMAT: u32 = 2;
/// The largest state file read: a VM with 254 vCPUs writes about 2 MiB.
pub(super) const MAX_STATE_BYTES: u64 = 16 << 20;
/// The largest guest memory a snapshot may hold: 1 TiB.
pub(super) const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// The most TCP connections a state may list for a restored network to reset.
const MAX_CONNECTIONS: usize = 1 << 16;
/// The UART's receive FIFO (vm-superio's).
const SERIAL_FIFO: usize = 64;

/// Everything but the memory.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotState {
    pub format: u32,
    pub forkvm_version: String,
    pub host_cpu: String,
    pub memory_size: u64,
    pub debug_exit: bool,
    /// The vCPUs' and the VM's state (`vcpus`, `vm`).
    #[serde(flatten)]
    pub cpu: Arc<CpuState>,
    #[serde(with = "SerialRegisters")]
    pub serial: SerialState,
    /// The snapshotted VM's identity; a restored VM is its next generation.
    pub identity: Identity,
    /// Virtio devices: where each sits, its transport registers and queues, its own state.
    pub devices: Vec<FrozenDevice>,
    /// The guest's TCP connections through its network, which a restored VM's new network
    /// resets (absent in snapshots of VMs without a network).
    #[serde(default)]
    pub network_connections: Vec<GuestConnection>,
}

/// `SerialState` for serde (vm-superio offers none), field by field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialRegisters {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The host CPU as a snapshot records it: vendor, family, model and stepping.
pub(super) fn host_cpu() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{} family {} model {} stepping {}",
        field("vendor_id"),
        field("cpu family"),
        field("model"),
        field("stepping")
    )
}

impl SnapshotState {
    /// Parses a state file's bytes (not checked yet: [`SnapshotState::check`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if len > MAX_STATE_BYTES {
            return Err(SnapshotError::file(
                super::STATE_FILE,
                FileProblem::TooLarge {
                    len,
                    max: MAX_STATE_BYTES,
                },
            ));
        }
        serde_json::from_slice(bytes).map_err(|error| SnapshotError::Parse {
            file: super::STATE_FILE,
            error,
        })
    }

    /// Checks every value that is used as a size, an index or an address: the format, the
    /// memory size, the vCPUs and their MSRs, the UART's buffer, each device's place, transport
    /// and own state, and the connections to reset.
    pub fn check(&self) -> Result<(), SnapshotError> {
        use SnapshotError as E;
        if !(OLDEST_FORMAT..=SNAPSHOT_FORMAT).contains(&self.format) {
            return Err(E::field(
                "format",
                self.format,
                "not a format this forkvm loads",
            ));
        }
        let mib = 1 << 20;
        if self.memory_size < MIN_MEMORY_MIB * mib
            || self.memory_size > MAX_MEMORY_BYTES
            || !self.memory_size.is_multiple_of(mib)
        {
            return Err(E::field(
                "memory_size",
                self.memory_size,
                "not a whole number of MiB from 2 MiB to 1 TiB",
            ));
        }
        let vcpus = self.cpu.vcpus.len();
        if vcpus == 0 || vcpus > usize::from(MAX_MPTABLE_VCPUS) {
            return Err(E::field(
                "vcpus",
                format_args!("{vcpus} vCPUs"),
                "not 1 to 254",
            ));
        }
        for (index, vcpu) in self.cpu.vcpus.iter().enumerate() {
            if vcpu.msr_count() > KVM_MAX_MSR_ENTRIES {
                return Err(E::field(
                    format!("vcpus[{index}].msrs"),
                    format_args!("{} MSRs", vcpu.msr_count()),
                    "more than KVM takes (256)",
                ));
            }
        }
        if self.serial.in_buffer.len() > SERIAL_FIFO {
            return Err(E::field(
                "serial.in_buffer",
                format_args!("{} bytes", self.serial.in_buffer.len()),
                "more than the UART's FIFO holds (64)",
            ));
        }
        self.check_devices()?;
        if self.network_connections.len() > MAX_CONNECTIONS {
            return Err(E::field(
                "network_connections",
                format_args!("{} connections", self.network_connections.len()),
                "more than a network tracks",
            ));
        }
        Ok(())
    }

    /// Checks each device's window and IRQ (a free virtio slot, none used twice), transport
    /// and own state.
    fn check_devices(&self) -> Result<(), SnapshotError> {
        use SnapshotError as E;
        let slots = usize::try_from(LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1).unwrap_or(0);
        if self.devices.len() > slots {
            return Err(E::field(
                "devices",
                format_args!("{} devices", self.devices.len()),
                "more than there are virtio slots",
            ));
        }
        let ranges = ram_ranges(self.memory_size);
        let in_ram = |addr: u64, len: u64| {
            ranges.iter().any(|range| {
                let (Some(end), Some(range_end)) = (
                    addr.checked_add(len),
                    range.guest_addr.checked_add(range.size),
                ) else {
                    return false;
                };
                addr >= range.guest_addr && end <= range_end
            })
        };
        let (mut bases, mut irqs) = (HashSet::new(), HashSet::new());
        for (index, device) in self.devices.iter().enumerate() {
            let at = format!("devices[{index}]");
            if !is_virtio_slot(device.base, device.irq)
                || !bases.insert(device.base)
                || !irqs.insert(device.irq)
            {
                return Err(E::field(
                    format!("{at}.base"),
                    format_args!("{:#x} with IRQ {}", device.base, device.irq),
                    "not a free virtio slot",
                ));
            }
            let check = VirtioStateCheck {
                index,
                ram_bytes: self.memory_size,
                in_ram: &in_ram,
            };
            device
                .state
                .check_saved(&check)
                .map_err(|e| E::saved_field(&format!("{at}.state"), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// State files of real snapshots (the fuzz target's seeds, written by an integration test).
    const SEEDS: [&str; 3] = [
        include_str!("../../../fuzz/seeds/snapshot_state/seed-spinning.json"),
        include_str!("../../../fuzz/seeds/snapshot_state/seed-virtio.json"),
        include_str!("../../../fuzz/seeds/snapshot_state/seed-disk.json"),
    ];

    fn check(state: &Value) -> Result<(), SnapshotError> {
        SnapshotState::parse(&serde_json::to_vec(state).unwrap())?.check()
    }

    /// The field a refusal names.
    fn refused(state: &Value) -> String {
        match check(state) {
            Err(SnapshotError::Field { field, .. }) => field,
            other => panic!("not refused by field: {other:?}"),
        }
    }

    /// Real state files pass; each value used as a size, an index or an address is refused
    /// out of range, naming its field (no KVM needed: this runs where the integration tests
    /// cannot).
    #[test]
    fn each_out_of_range_value_is_refused_by_name() {
        for seed in SEEDS {
            SnapshotState::parse(seed.as_bytes())
                .unwrap()
                .check()
                .unwrap();
        }
        let spinning: Value = serde_json::from_str(SEEDS[0]).unwrap();
        let virtio: Value = serde_json::from_str(SEEDS[1]).unwrap();
        type Tamper = fn(&mut Value);
        let cases: [(&Value, &str, Tamper); 12] = [
            (&spinning, "format", |s| s["format"] = 1.into()),
            (&spinning, "memory_size", |s| s["memory_size"] = 0.into()),
            (&spinning, "vcpus", |s| {
                let one = s["vcpus"][0].clone();
                s["vcpus"] = vec![one; 255].into()
            }),
            (&spinning, "vcpus[1].msrs", |s| {
                let msr = s["vcpus"][1]["msrs"][0].clone();
                s["vcpus"][1]["msrs"] = vec![msr; 257].into()
            }),
            (&spinning, "network_connections", |s| {
                let any = json!([["10.0.2.15:1", "10.0.2.2:2"]]);
                s["network_connections"] = vec![any[0].clone(); (1 << 16) + 1].into()
            }),
            (&virtio, "devices[2].irq", |s| {
                s["devices"][2]["irq"] = 6.into()
            }),
            (&virtio, "devices[1].state.transport.status", |s| {
                s["devices"][1]["state"]["transport"]["status"] = 0x100.into()
            }),
            (
                &virtio,
                "devices[1].state.transport.queues[1].desc_table",
                |s| {
                    // Past the end of guest RAM (32 MiB), below the MMIO hole.
                    s["devices"][1]["state"]["transport"]["queues"][1]["desc_table"] =
                        (64u64 << 20).into()
                },
            ),
            (
                &virtio,
                "devices[1].state.device.Console.pending_input",
                |s| {
                    s["devices"][1]["state"]["device"]["Console"]["pending_input"] =
                        vec![0u8; (64 << 10) + 1].into()
                },
            ),
            // The console pushes nothing to the guest on its own: no receive limit.
            (&virtio, "devices[1].state.transport.rx_rate_limit", |s| {
                s["devices"][1]["state"]["transport"]["rx_rate_limit"] = json!({
                    "bytes": { "size": 1, "one_time_burst": 0,
                        "refill_time": { "secs": 1, "nanos": 0 } },
                    "ops": null
                })
            }),
            (&virtio, "devices[2].state.transport.rx_rate_limit", |s| {
                s["devices"][2]["state"]["transport"]["rx_rate_limit"] = json!({
                    "bytes": null,
                    "ops": { "size": 0, "one_time_burst": 0,
                        "refill_time": { "secs": 1, "nanos": 0 } }
                })
            }),
            (&virtio, "devices[2].state.device.Vsock.cid", |s| {
                s["devices"][2]["state"]["device"]["Vsock"]["cid"] = 2.into()
            }),
        ];
        for (seed, field, tamper) in cases {
            let mut state = seed.clone();
            tamper(&mut state);
            let named = refused(&state);
            // A slot used twice is named at its window.
            let field = field.replace("devices[2].irq", "devices[2].base");
            assert_eq!(named, field);
        }
        // A ring whose end overflows an address is refused, not wrapped.
        let mut state = virtio.clone();
        state["devices"][1]["state"]["transport"]["queues"][0]["desc_table"] =
            (u64::MAX - 15).into();
        assert!(matches!(check(&state), Err(SnapshotError::Field { .. })));
        // Bytes that are not a state are a parse error; too many are refused unread.
        assert!(matches!(
            SnapshotState::parse(b"{\"format\": 3"),
            Err(SnapshotError::Parse { .. })
        ));
        let huge = vec![b' '; usize::try_from(MAX_STATE_BYTES).unwrap() + 1];
        assert!(matches!(
            SnapshotState::parse(&huge),
            Err(SnapshotError::File {
                problem: FileProblem::TooLarge { .. },
                ..
            })
        ));
    }
}
