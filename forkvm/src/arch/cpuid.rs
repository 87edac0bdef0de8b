//! The CPUID a guest sees: KVM's supported CPUID, normalised per vCPU (topology, hypervisor bit,
//! brand) and filtered so the guest kernel is never told of a feature the host cannot execute.
//!
//! Every feature forkvm hides or adds, and why, is listed in this file and nowhere else.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

use super::probe::HostCaps;

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One feature bit: leaf, subleaf, register and bit.
#[derive(Clone, Copy, Debug)]
struct Feature {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
}

const fn feature(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        leaf,
        subleaf,
        reg,
        bit,
    }
}

const HYPERVISOR: Feature = feature(1, 0, Reg::Ecx, 31);
const XSAVE: Feature = feature(1, 0, Reg::Ecx, 26);
/// The LAPIC's TSC-deadline timer mode. KVM emulates it in the in-kernel LAPIC but, like every
/// VMM, forkvm must advertise it itself; without it a Linux guest on an emulating host fails its
/// APIC timer calibration and its clock never advances.
const TSC_DEADLINE: Feature = feature(1, 0, Reg::Ecx, 24);

/// How a Linux guest kernel can be told to leave a feature alone when hiding it in CPUID does not
/// work (see [`unhidden_gap_switches`]).
#[derive(Clone, Copy, Debug)]
enum KernelSwitch {
    /// A parameter of its own, e.g. `noxsave`.
    Param(&'static str),
    /// A name for `clearcpuid=`.
    ClearCpuid(&'static str),
    /// Nothing to switch off: the bit follows another one.
    Follows,
}

/// A feature hidden on a host whose KVM emulates guest ring 0 (see [`super::probe`]): the guest
/// kernel would execute these instructions in ring 0, where that emulator cannot run them (or
/// runs them byte by byte). Guest user code runs natively there and is unaffected.
struct Gap {
    feature: Feature,
    switch: KernelSwitch,
}

const EMULATOR_GAPS: &[Gap] = &[
    // XSAVE: xsave/xrstor are not emulated
    Gap {
        feature: XSAVE,
        switch: KernelSwitch::Param("noxsave"),
    },
    // OSXSAVE: follows XSAVE (and reflects CR4)
    Gap {
        feature: feature(1, 0, Reg::Ecx, 27),
        switch: KernelSwitch::Follows,
    },
    // CX16: lock cmpxchg16b is not emulated
    Gap {
        feature: feature(1, 0, Reg::Ecx, 13),
        switch: KernelSwitch::ClearCpuid("cx16"),
    },
    // POPCNT: popcnt is not emulated
    Gap {
        feature: feature(1, 0, Reg::Ecx, 23),
        switch: KernelSwitch::ClearCpuid("popcnt"),
    },
    // SMAP: clac/stac are not emulated
    Gap {
        feature: feature(7, 0, Reg::Ebx, 20),
        switch: KernelSwitch::ClearCpuid("smap"),
    },
    // ERMS: rep movsb would be emulated byte by byte (slow)
    Gap {
        feature: feature(7, 0, Reg::Ebx, 9),
        switch: KernelSwitch::ClearCpuid("erms"),
    },
    // FSRM: as ERMS
    Gap {
        feature: feature(7, 0, Reg::Edx, 4),
        switch: KernelSwitch::ClearCpuid("fsrm"),
    },
];

/// The CPUID registers the probe reads back from a guest to see which hidden gaps still show.
#[cfg(test)]
pub const PROBED_REGISTERS: [(u32, &str); 3] = [(1, "ecx"), (7, "ebx"), (7, "edx")];

/// What a probe guest saw in the probed registers: leaf 1 ECX, leaf 7 EBX, leaf 7 EDX.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeenCpuid {
    /// Leaf 1 ECX.
    pub leaf1_ecx: u32,
    /// Leaf 7 subleaf 0 EBX.
    pub leaf7_ebx: u32,
    /// Leaf 7 subleaf 0 EDX.
    pub leaf7_edx: u32,
}

impl SeenCpuid {
    fn shows(&self, f: Feature) -> bool {
        let value = match (f.leaf, f.subleaf, f.reg) {
            (1, 0, Reg::Ecx) => self.leaf1_ecx,
            (7, 0, Reg::Ebx) => self.leaf7_ebx,
            (7, 0, Reg::Edx) => self.leaf7_edx,
            _ => return true, // not probed: assume the worst
        };
        value & (1 << f.bit) != 0
    }
}

/// Kernel parameters that switch off the emulator gaps a guest still sees although forkvm
/// hid them. Some hosts (seen on kvm_pvm) fill every CPUID bit KVM does not list as supported
/// from the host CPU, so a feature KVM never offered (XSAVE, POPCNT here) cannot be hidden;
/// Linux is then told with `noxsave` and `clearcpuid=`.
pub fn unhidden_gap_switches(seen: &SeenCpuid) -> Vec<String> {
    let mut params = Vec::new();
    let mut clear = Vec::new();
    for gap in EMULATOR_GAPS.iter().filter(|g| seen.shows(g.feature)) {
        match gap.switch {
            KernelSwitch::Param(p) => params.push(p.to_owned()),
            KernelSwitch::ClearCpuid(name) => clear.push(name),
            KernelSwitch::Follows => {}
        }
    }
    if !clear.is_empty() {
        params.push(format!("clearcpuid={}", clear.join(",")));
    }
    params
}

/// Added on such a host: the AMD "always saves FP error pointers" bit. Without it Linux runs
/// `fnclex; emms; fild` on every FPU restore to scrub stale pointers, which the emulator rejects.
const EMULATOR_WORKAROUNDS: &[Feature] = &[
    feature(0x8000_0008, 0, Reg::Ebx, 2), // XSAVEERPTR
];

/// State saved by XSAVE that is unusable without it: hidden together with XSAVE.
const XSAVE_DEPENDENTS: &[Feature] = &[
    feature(1, 0, Reg::Ecx, 12), // FMA
    feature(1, 0, Reg::Ecx, 28), // AVX
    feature(1, 0, Reg::Ecx, 29), // F16C
    feature(7, 0, Reg::Ebx, 5),  // AVX2
    feature(7, 0, Reg::Ebx, 16), // AVX512F
    feature(7, 0, Reg::Ebx, 17), // AVX512DQ
    feature(7, 0, Reg::Ebx, 21), // AVX512IFMA
    feature(7, 0, Reg::Ebx, 28), // AVX512CD
    feature(7, 0, Reg::Ebx, 30), // AVX512BW
    feature(7, 0, Reg::Ebx, 31), // AVX512VL
    feature(7, 0, Reg::Ecx, 1),  // AVX512VBMI
    feature(7, 0, Reg::Ecx, 3),  // PKU (its state is XSAVE-managed)
    feature(7, 0, Reg::Ecx, 6),  // AVX512VBMI2
    feature(7, 0, Reg::Ecx, 9),  // VAES
    feature(7, 0, Reg::Ecx, 10), // VPCLMULQDQ
    feature(7, 0, Reg::Ecx, 11), // AVX512VNNI
    feature(7, 0, Reg::Ecx, 12), // AVX512BITALG
    feature(7, 0, Reg::Ecx, 14), // AVX512VPOPCNTDQ
    feature(7, 0, Reg::Edx, 22), // AMX-BF16
    feature(7, 0, Reg::Edx, 23), // AVX512FP16
    feature(7, 0, Reg::Edx, 24), // AMX-TILE
    feature(7, 0, Reg::Edx, 25), // AMX-INT8
    feature(7, 1, Reg::Eax, 4),  // AVX-VNNI
    feature(7, 1, Reg::Eax, 5),  // AVX512BF16
];

/// The XSAVE state-components leaf, emptied when XSAVE is hidden.
const XSAVE_LEAF: u32 = 0xd;
const EXT_TOPOLOGY_LEAVES: [u32; 2] = [0xb, 0x1f];
const AMD_SIZE_LEAF: u32 = 0x8000_0008;
const BRAND_LEAVES: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];
const BRAND: &[u8; 48] =
    b"forkvm virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// Builds the CPUID of vCPU `vcpu_id` out of `vcpus`, from KVM's supported CPUID.
pub fn guest_cpuid(supported: &CpuId, host: &HostCaps, vcpu_id: u8, vcpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let entries = cpuid.as_mut_slice();
    set(entries, HYPERVISOR, true);
    if host.tsc_deadline_timer {
        set(entries, TSC_DEADLINE, true);
    }
    if host.ring0_emulated {
        for gap in EMULATOR_GAPS {
            set(entries, gap.feature, false);
        }
        for f in EMULATOR_WORKAROUNDS {
            set(entries, *f, true);
        }
    }
    if !has(entries, XSAVE) {
        for f in XSAVE_DEPENDENTS {
            set(entries, *f, false);
        }
        for e in entries.iter_mut().filter(|e| e.function == XSAVE_LEAF) {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
    }
    normalise_topology(entries, vcpu_id, vcpus);
    for (i, leaf) in BRAND_LEAVES.iter().enumerate() {
        if let Some(e) = entries.iter_mut().find(|e| e.function == *leaf) {
            let word = |w: usize| {
                u32::from_le_bytes(BRAND[i * 16 + w * 4..][..4].try_into().unwrap_or_default())
            };
            (e.eax, e.ebx, e.ecx, e.edx) = (word(0), word(1), word(2), word(3));
        }
    }
    cpuid
}

/// Each vCPU is one core of one package: APIC ID = vCPU index.
fn normalise_topology(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, vcpus: u8) {
    let apic_id = u32::from(vcpu_id);
    let count = u32::from(vcpus);
    let core_bits = u32::BITS - (count.max(1) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: initial APIC ID, logical processor count, CLFLUSH line size in 8-byte units.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                // EDX bit 28 (HTT): the count field above is valid.
                e.edx |= 1 << 28;
            }
            f if EXT_TOPOLOGY_LEAVES.contains(&f) => {
                e.edx = apic_id;
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, 1 << 8),                   // SMT level: one thread per core
                    1 => (core_bits, count, (2 << 8) | 1), // core level: `count` cores
                    n => (0, 0, n),                        // no further levels
                };
            }
            AMD_SIZE_LEAF => {
                // ECX: ApicIdCoreIdSize and NC (cores per package minus one).
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1).min(0xff);
            }
            _ => {}
        }
    }
}

fn find(entries: &mut [kvm_cpuid_entry2], f: Feature) -> Option<&mut kvm_cpuid_entry2> {
    entries
        .iter_mut()
        .find(|e| e.function == f.leaf && e.index == f.subleaf)
}

fn reg(entry: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn set(entries: &mut [kvm_cpuid_entry2], f: Feature, on: bool) {
    if let Some(entry) = find(entries, f) {
        let r = reg(entry, f.reg);
        if on {
            *r |= 1 << f.bit;
        } else {
            *r &= !(1 << f.bit);
        }
    }
}

fn has(entries: &mut [kvm_cpuid_entry2], f: Feature) -> bool {
    find(entries, f).is_some_and(|e| *reg(e, f.reg) & (1 << f.bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host_like() -> CpuId {
        CpuId::from_entries(&[
            entry(
                1,
                0,
                0x800f12,
                0,
                (1 << 26) | (1 << 13) | (1 << 23) | (1 << 28),
                0,
            ),
            entry(7, 0, 0, (1 << 20) | (1 << 9) | (1 << 5), 0, 1 << 4),
            entry(0xd, 0, 7, 0x340, 0x340, 0),
            entry(0xb, 1, 0, 0, 0, 0),
            entry(0x8000_0002, 0, 1, 2, 3, 4),
            entry(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
        ])
        .unwrap()
    }

    fn caps(ring0_emulated: bool, tsc_deadline_timer: bool) -> HostCaps {
        HostCaps {
            ring0_emulated,
            tsc_deadline_timer,
            linux_switches: String::new(),
        }
    }

    fn get(c: &CpuId, leaf: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == index)
            .unwrap()
    }

    #[test]
    fn emulating_host_hides_every_gap_and_xsave_state() {
        let caps = caps(true, true);
        let c = guest_cpuid(&host_like(), &caps, 0, 1);
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ecx & ((1 << 26) | (1 << 13) | (1 << 23) | (1 << 28)), 0);
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline");
        let l7 = get(&c, 7, 0);
        assert_eq!(l7.ebx & ((1 << 20) | (1 << 9) | (1 << 5)), 0);
        assert_eq!(l7.edx & (1 << 4), 0);
        let d = get(&c, 0xd, 0);
        assert_eq!((d.eax, d.ebx, d.ecx), (0, 0, 0));
        assert_ne!(get(&c, 0x8000_0008, 0).ebx & (1 << 2), 0, "XSAVEERPTR");
    }

    #[test]
    fn native_host_keeps_what_kvm_supports() {
        let caps = caps(false, false);
        let c = guest_cpuid(&host_like(), &caps, 0, 1);
        let l1 = get(&c, 1, 0);
        assert_ne!(l1.ecx & (1 << 26), 0);
        assert_ne!(l1.ecx & (1 << 13), 0);
        assert_eq!(l1.ecx & (1 << 24), 0);
        assert_eq!(get(&c, 0xd, 0).eax, 7);
        assert_eq!(get(&c, 0x8000_0008, 0).ebx & (1 << 2), 0);
    }

    #[test]
    fn topology_and_brand_are_per_vcpu() {
        let caps = caps(false, false);
        let c = guest_cpuid(&host_like(), &caps, 2, 3);
        assert_eq!(get(&c, 1, 0).ebx >> 24, 2);
        assert_eq!((get(&c, 1, 0).ebx >> 16) & 0xff, 3);
        let topo = get(&c, 0xb, 1);
        assert_eq!((topo.eax, topo.ebx, topo.edx), (2, 3, 2));
        assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xf0ff, (2 << 12) | 2);
        let brand = get(&c, 0x8000_0002, 0);
        assert_eq!(brand.eax.to_le_bytes(), *b"fork");
    }

    #[test]
    fn gaps_the_guest_still_sees_become_kernel_switches() {
        let all_hidden = SeenCpuid::default();
        assert!(unhidden_gap_switches(&all_hidden).is_empty());
        let leaky = SeenCpuid {
            leaf1_ecx: (1 << 26) | (1 << 27) | (1 << 23),
            leaf7_ebx: 1 << 20,
            leaf7_edx: 0,
        };
        assert_eq!(
            unhidden_gap_switches(&leaky),
            vec!["noxsave", "clearcpuid=popcnt,smap"]
        );
    }

    #[test]
    fn every_gap_lies_in_a_probed_register() {
        for gap in EMULATOR_GAPS {
            let f = gap.feature;
            let name = match f.reg {
                Reg::Ebx => "ebx",
                Reg::Ecx => "ecx",
                Reg::Edx => "edx",
                Reg::Eax => "eax",
            };
            assert!(
                f.subleaf == 0 && PROBED_REGISTERS.contains(&(f.leaf, name)),
                "{f:?}"
            );
        }
    }
}
