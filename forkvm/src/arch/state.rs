//! The architectural state a copy of a paused VM needs to continue from the same instruction:
//! each vCPU's registers, FPU/XSAVE, control and debug registers, MSRs, local APIC, run state
//! and pending events, and the VM's in-kernel PIC, IOAPIC, clock and PIT (VMs made by older versions had one).
//!
//! Captured only while the VM is paused (every vCPU out of `KVM_RUN`, any pending port or MMIO
//! access completed), and restored into freshly created vCPUs that already have their CPUID, in
//! the order KVM needs: run state, registers, control registers (which also set the mode the
//! rest is read in), XSAVE, XCRs, debug registers, local APIC, MSRs, and pending events last.

use std::sync::OnceLock;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY, Msrs,
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::error::{Error, kvm_err};

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// The legacy FPU and SSE state where KVM has no XSAVE (zeroed, and not read, where it has:
    /// the XSAVE area holds it, and reading it costs one more ioctl).
    #[serde(with = "LegacyFpu")]
    fpu: kvm_fpu,
    /// The XSAVE area (all vector state), where KVM has one.
    xsave: Option<Box<kvm_xsave>>,
    xcrs: Option<kvm_xcrs>,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
}

/// `kvm_fpu` for serde (kvm-bindings offers none), field by field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu")]
struct LegacyFpu {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// The VM-wide state: interrupt controllers, kvmclock and, for a VM that has one, the PIT.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    irqchips: [kvm_irqchip; 3],
    /// forkvm no longer gives its VMs a PIT (its guests use the local APIC's TSC-deadline timer,
    /// and KVM gives each PIT a kernel thread); snapshots of VMs that had one carry its state
    /// and get one again when they are restored.
    #[serde(default)]
    pit: Option<kvm_pit_state2>,
    clock: kvm_clock_data,
}

/// The MSRs this host's KVM lets a vCPU read, found once per process: KVM's index list, less
/// those a read refuses (reading stops at the first refusal, so each is tried on its own once).
fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<&'static [u32], Error> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list);
    }
    let all = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let readable = all
        .as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .is_ok_and(|mut one| vcpu.get_msrs(&mut one).is_ok_and(|n| n == 1))
        })
        .collect();
    Ok(LIST.get_or_init(|| readable))
}

fn has_xsave(kvm: &Kvm) -> bool {
    static XSAVE: OnceLock<bool> = OnceLock::new();
    *XSAVE.get_or_init(|| kvm.check_extension(Cap::Xsave) && kvm.check_extension(Cap::Xcrs))
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn capture(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, Error> {
        let xsave = has_xsave(kvm);
        let indices = readable_msrs(kvm, vcpu)?;
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Setup {
            what: "MSR list",
            reason: format!("{e:?}"),
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if read != entries.len() {
            return Err(Error::Setup {
                what: "vCPU state",
                reason: format!("KVM read {read} of {} MSRs", entries.len()),
            });
        }
        Ok(Self {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: if xsave {
                kvm_fpu::default()
            } else {
                vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?
            },
            xsave: if xsave {
                Some(Box::new(
                    vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
                ))
            } else {
                None
            },
            xcrs: if xsave {
                Some(vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?)
            } else {
                None
            },
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
            mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// How many MSRs the state holds (a state read from a file may hold any number).
    pub fn msr_count(&self) -> usize {
        self.msrs.len()
    }

    /// Writes the state into a new vCPU that has its CPUID.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        match &self.xsave {
            // SAFETY: forkvm never enables KVM_CAP_XSAVE2 (no dynamically enabled state such as
            // AMX), so KVM reads exactly the size of `kvm_xsave` that `xsave` is.
            Some(xsave) => unsafe { vcpu.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?,
            None => vcpu.set_fpu(&self.fpu).map_err(kvm_err("KVM_SET_FPU"))?,
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|e| Error::Setup {
            what: "MSR list",
            reason: format!("{e:?}"),
        })?;
        let written = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != self.msrs.len() {
            return Err(Error::Setup {
                what: "vCPU state",
                reason: format!("KVM wrote {written} of {} MSRs", self.msrs.len()),
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))
    }
}

/// Gives `vm` (which has its irqchip) an in-kernel PIT, with the PC speaker port a dummy: only
/// for a snapshot of a VM made when forkvm's VMs had one.
fn create_pit(vm: &VmFd) -> Result<(), Error> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))
}

impl VmState {
    /// Reads the VM-wide state of a paused VM.
    pub fn capture(vm: &VmFd) -> Result<Self, Error> {
        let mut irqchips = [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]
        .map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        for chip in &mut irqchips {
            vm.get_irqchip(chip).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        }
        Ok(Self {
            irqchips,
            pit: match vm.get_pit2() {
                Ok(pit) => Some(pit),
                // No PIT in this VM.
                Err(e) if e.errno() == libc::ENXIO => None,
                Err(e) => return Err(kvm_err("KVM_GET_PIT2")(e)),
            },
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a new VM that has its irqchip and no PIT, creating the PIT if the
    /// state has one. The clock continues from the captured instant (only the stable-clock flag
    /// of the captured data is kept).
    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        if let Some(pit) = &self.pit {
            create_pit(vm)?;
            vm.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        }
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::probe::host_caps;
    use crate::vstate::kvm::create_vcpus;

    /// Where KVM has no XSAVE, the legacy FPU area carries the x87 and SSE state: written into a
    /// new vCPU, it reads back the same. (This host has XSAVE, so the state is made to look as
    /// if it had none. Its KVM does not carry MXCSR through KVM_GET_FPU/KVM_SET_FPU at all, so
    /// MXCSR is not checked.)
    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn the_legacy_fpu_state_is_restored_where_there_is_no_xsave() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpus = create_vcpus(&kvm, &vm, &host_caps(&kvm).unwrap(), 2, |_, _| Ok(())).unwrap();
        let mut fpu = vcpus[0].fd.get_fpu().unwrap();
        fpu.fcw = 0x07f;
        fpu.xmm[3] = [0xab; 16];
        vcpus[0].fd.set_fpu(&fpu).unwrap();
        let mut state = VcpuState::capture(&kvm, &vcpus[0].fd).unwrap();
        state.xsave = None;
        state.xcrs = None;
        state.fpu = vcpus[0].fd.get_fpu().unwrap();
        let before = vcpus[1].fd.get_fpu().unwrap();
        assert_ne!(before.xmm[3], fpu.xmm[3]);
        state.restore(&vcpus[1].fd).unwrap();
        let after = vcpus[1].fd.get_fpu().unwrap();
        assert_eq!((after.fcw, after.xmm[3]), (fpu.fcw, fpu.xmm[3]));
    }

    /// A new VM has no PIT (its guests use the local APIC timer; KVM starts a kernel thread
    /// per PIT); the state of one made with a PIT (older snapshots) gives the VM it is
    /// restored into a PIT in the same state.
    #[test]
    #[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
    fn new_vms_have_no_pit_and_a_captured_pit_is_restored_with_one() {
        let kvm = Kvm::new().unwrap();
        let ram = crate::memory::GuestRam::new(16 << 20).unwrap();
        let identity = crate::identity::IdentityPage::new().unwrap();
        let vm = crate::vstate::kvm::create_vm(&kvm, &ram, &identity).unwrap();
        let state = VmState::capture(&vm).unwrap();
        assert!(state.pit.is_none());

        let old = kvm.create_vm().unwrap();
        old.create_irq_chip().unwrap();
        create_pit(&old).unwrap();
        let mut pit = old.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        old.set_pit2(&pit).unwrap();
        let old_state = VmState::capture(&old).unwrap();
        assert!(old_state.pit.is_some());
        // Through the snapshot file's JSON, as a snapshot of an older version holds it.
        let old_state: VmState =
            serde_json::from_str(&serde_json::to_string(&old_state).unwrap()).unwrap();
        let restored = crate::vstate::kvm::create_vm(&kvm, &ram, &identity).unwrap();
        old_state.restore(&restored).unwrap();
        let back = restored.get_pit2().unwrap();
        assert_eq!((back.channels[0].count, back.channels[0].mode), (0x1234, 2));
    }
}
