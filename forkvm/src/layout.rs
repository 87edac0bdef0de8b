//! The guest-physical memory map of an x86_64 forkvm guest: where RAM lies around the 32-bit MMIO
//! hole and where the VMM places boot structures.
//!
//! Boot structures live in the first MiB, below the kernel:
//!
//! | address   | what                                                     |
//! |-----------|----------------------------------------------------------|
//! | `0x0500`  | boot GDT (4 entries), then an empty IDT                  |
//! | `0x6000`  | PVH `hvm_start_info`, module list, memory map             |
//! | `0x7000`  | Linux zero page (`boot_params`) for bzImage boot          |
//! | `0x8ff0`  | initial stack pointer for the 64-bit Linux entry          |
//! | `0x9000`  | identity page tables (PML4, PDPT, PD: first 1 GiB)        |
//! | `0x20000` | kernel command line                                      |
//! | `0x9fc00` | MP table (start of the EBDA, reserved in the e820 map)    |
//! | `0x100000`| kernel image (or its own load address), initrd near the top of low RAM |

/// Boot GDT (null, code, data, TSS).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Empty boot IDT, right after the GDT.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// PVH start-of-day structure.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd), after `hvm_start_info` (56 bytes).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map, after the one-entry module list (32 bytes).
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Most memory-map entries the PVH area holds before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) as usize / 24;
/// Linux `boot_params` for the 64-bit boot protocol.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack pointer for the 64-bit Linux entry (grows down from below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the identity map used by the 64-bit entry.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory of the identity map (512 × 2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted, including its NUL (x86 Linux `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and configuration table; also the start of the reserved EBDA.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// First byte of high memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM above this continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// The identity page ([`crate::identity`]), in the MMIO hole just below the virtio windows.
pub const IDENTITY_PAGE_ADDR: u64 = 0xcfff_f000;
/// Size of the identity page.
pub const IDENTITY_PAGE_SIZE: u64 = 0x1000;
/// Start of the area holding virtio-mmio device windows (in the MMIO hole).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of the virtio-mmio area.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Address KVM uses for the real-mode TSS on hosts that need it (three pages in the hole).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
