//! The Intel MultiProcessor Specification 1.4 table: tells a guest without ACPI how many CPUs
//! it has, where the IOAPIC is and how legacy IRQs are wired to it.
//!
//! Layout written at [`MPTABLE_ADDR`]: the 16-byte floating pointer, then the configuration table
//! header and its entries (one processor per vCPU, the ISA bus, the IOAPIC, one I/O interrupt per
//! IOAPIC pin, and the two local interrupts: ExtINT on LINT0, NMI on LINT1).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{HIMEM_START, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};
use crate::memory::GuestMemoryMmap;

/// Number of IOAPIC input pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
/// Most vCPUs whose entries fit between the table's start and the end of the EBDA.
pub const MAX_MPTABLE_VCPUS: u8 = 254;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Errors writing the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// More vCPUs than APIC IDs the table can describe.
    #[error("{0} vCPUs do not fit in an MP table (at most {MAX_MPTABLE_VCPUS})")]
    TooManyCpus(u8),
    /// The table would run past the reserved EBDA area.
    #[error("the MP table ({0} bytes) does not fit below 1 MiB")]
    TooLarge(usize),
    /// Guest memory rejected the write.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Writes the MP table for `vcpus` CPUs (APIC IDs 0..vcpus; the IOAPIC takes ID `vcpus`).
pub fn write(memory: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = build(vcpus)?;
    memory
        .write_slice(&table, GuestAddress(MPTABLE_ADDR))
        .map_err(MptableError::Write)
}

/// Builds the floating pointer and configuration table as bytes.
fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_MPTABLE_VCPUS {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for apic_id in 0..vcpus {
        let flags = 1 | if apic_id == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, apic_id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0 ...
    entries.extend_from_slice(b"ISA   "); // ... is ISA
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Vectored interrupt, bus-default polarity and trigger, ISA IRQ n on IOAPIC pin n.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // ExtINT and NMI to LINT0 and LINT1 of every local APIC (destination 0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let total = FLOATING_POINTER_LEN + table_len;
    if MPTABLE_ADDR as usize + total > HIMEM_START as usize {
        return Err(MptableError::TooLarge(total));
    }

    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"FORKVM  ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_LEN);
    floating.extend_from_slice(b"_MP_");
    floating
        .extend_from_slice(&((MPTABLE_ADDR as u32) + FLOATING_POINTER_LEN as u32).to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev 1.4
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&header);
    Ok(floating)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn structures_checksum_to_zero_and_point_at_each_other() {
        let t = build(4).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let physptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(physptr, MPTABLE_ADDR + 16);
        let header = &t[16..];
        assert_eq!(&header[..4], b"PCMP");
        let len = u16::from_le_bytes(header[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, header.len());
        assert_eq!(sum(header), 0);
        let entries = u16::from_le_bytes(header[34..36].try_into().unwrap());
        assert_eq!(entries, 4 + 1 + 1 + u16::from(IOAPIC_PINS) + 2);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_the_first_is_bsp() {
        let t = build(3).unwrap();
        let procs = &t[16 + HEADER_LEN..];
        for id in 0..3usize {
            let e = &procs[id * 20..id * 20 + 20];
            assert_eq!(e[0], 0);
            assert_eq!(e[1] as usize, id);
            assert_eq!(e[3], if id == 0 { 3 } else { 1 });
        }
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(matches!(build(0), Err(MptableError::TooManyCpus(0))));
        assert!(matches!(build(255), Err(MptableError::TooManyCpus(255))));
        assert!(build(MAX_MPTABLE_VCPUS).is_ok());
    }
}
