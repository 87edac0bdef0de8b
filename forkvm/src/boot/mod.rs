//! Loading a guest kernel and writing what it expects to find at start-up.
//!
//! Two entry paths, chosen by the image:
//! - an ELF `vmlinux` carrying a PVH note starts through the PVH entry (32-bit protected mode,
//!   `hvm_start_info` in `rbx`) — the fastest way to boot Linux, and how test guests start;
//! - a bzImage, or an ELF without a PVH note, starts through the 64-bit Linux boot protocol
//!   (long mode on identity page tables, `boot_params` in `rsi`).

pub mod mptable;
mod params;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::setup_header;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START};
use crate::memory::GuestRam;

/// Errors loading a kernel, an initrd or the boot parameters.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelUnreadable {
        /// The kernel path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a kernel forkvm can boot: neither an ELF image nor a bzImage")]
    UnknownKernelFormat {
        /// The kernel path.
        path: PathBuf,
    },
    /// The kernel image, once loaded, would not fit in guest memory.
    #[error(
        "kernel {path} does not fit in {memory_mib} MiB of guest memory (it needs memory up to \
         {needed:#x}); give the VM more memory"
    )]
    KernelTooLarge {
        /// The kernel path.
        path: PathBuf,
        /// Guest memory size.
        memory_mib: u64,
        /// Highest guest address the kernel needs.
        needed: u64,
    },
    /// The loader rejected the image (corrupt, truncated, or it does not fit in guest memory).
    #[error(
        "cannot load kernel {path} ({kind}; the image is corrupt, truncated, or does not fit \
         in {memory_mib} MiB of guest memory)"
    )]
    KernelLoad {
        /// The kernel path.
        path: PathBuf,
        /// "ELF" or "bzImage".
        kind: &'static str,
        /// Guest memory size.
        memory_mib: u64,
        /// The loader's error.
        #[source]
        source: loader::Error,
    },
    /// The initrd file cannot be opened or read.
    #[error("cannot read initrd {path}")]
    InitrdUnreadable {
        /// The initrd path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory: {available} bytes are \
             free above the kernel; give the VM more memory"
    )]
    InitrdTooLarge {
        /// The initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room left above the kernel.
        available: u64,
    },
    /// The command line is too long or contains invalid characters.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {what} into guest memory: {reason}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit PVH entry; `rbx` points at `hvm_start_info`.
    Pvh,
    /// 64-bit Linux boot protocol; `rsi` points at `boot_params`.
    Linux64,
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// Guest-physical entry point.
    pub entry: u64,
}

/// A kernel placed in guest memory.
struct LoadedKernel {
    entry: BootEntry,
    /// First byte above the kernel (including room it needs to decompress itself).
    end: u64,
    /// The bzImage header, for the zero page (ELF images have none).
    header: Option<setup_header>,
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What to boot.
pub struct BootSpec<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Optional initrd path.
    pub initrd: Option<&'a Path>,
    /// Full kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table).
    pub vcpus: u8,
}

/// Loads the kernel and initrd and writes the command line, memory map and MP table.
/// Returns where the boot vCPU must start.
pub fn load(ram: &GuestRam, spec: &BootSpec<'_>) -> Result<BootEntry, BootError> {
    let cmdline = build_cmdline(spec.cmdline)?;
    let kernel = load_kernel(ram, spec.kernel)?;
    let initrd = spec
        .initrd
        .map(|path| load_initrd(ram, path, &kernel))
        .transpose()?;
    loader::load_cmdline(&ram.memory, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(|e| {
        BootError::Write {
            what: "command line",
            reason: e.to_string(),
        }
    })?;
    let cmdline_len = spec.cmdline.len() as u32 + 1;
    match kernel.entry.protocol {
        BootProtocol::Pvh => params::write_pvh(ram, initrd)?,
        BootProtocol::Linux64 => params::write_zero_page(ram, kernel.header, cmdline_len, initrd)?,
    }
    mptable::write(&ram.memory, spec.vcpus)?;
    Ok(kernel.entry)
}

fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !text.is_empty() {
        cmdline
            .insert_str(text)
            .map_err(|e| BootError::Cmdline(format!("{e} ({} bytes)", text.len())))?;
    }
    Ok(cmdline)
}

#[derive(Clone, Copy)]
enum ImageKind {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File, path: &Path) -> Result<ImageKind, BootError> {
    let unreadable = |source| BootError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 0x206];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(unreadable)? {
            0 => break,
            n => filled += n,
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(ImageKind::Elf)
    } else if filled >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(ImageKind::BzImage)
    } else {
        Err(BootError::UnknownKernelFormat {
            path: path.to_owned(),
        })
    }
}

fn load_kernel(ram: &GuestRam, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelUnreadable {
        path: path.to_owned(),
        source,
    })?;
    let kind = detect_format(&mut file, path)?;
    let memory_mib = ram.size() >> 20;
    let load_err = |kind, source| BootError::KernelLoad {
        path: path.to_owned(),
        kind,
        memory_mib,
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let kernel = match kind {
        ImageKind::Elf => {
            let result =
                Elf::load(&ram.memory, None, &mut file, highmem).map_err(|e| load_err("ELF", e))?;
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    protocol: BootProtocol::Pvh,
                    entry: addr.0,
                },
                _ => BootEntry {
                    protocol: BootProtocol::Linux64,
                    entry: result.kernel_load.0,
                },
            };
            LoadedKernel {
                entry,
                end: result.kernel_end,
                header: None,
            }
        }
        ImageKind::BzImage => {
            let result = BzImage::load(&ram.memory, None, &mut file, highmem)
                .map_err(|e| load_err("bzImage", e))?;
            let header = result.setup_header;
            // The kernel decompresses itself in place and needs `init_size` bytes from its start.
            let init_end = result.kernel_load.0 + header.map_or(0, |h| u64::from(h.init_size));
            LoadedKernel {
                // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
                entry: BootEntry {
                    protocol: BootProtocol::Linux64,
                    entry: result.kernel_load.0 + 0x200,
                },
                end: result.kernel_end.max(init_end),
                header,
            }
        }
    };
    if kernel.end > ram.low_end()
        || ram
            .memory
            .find_region(GuestAddress(kernel.entry.entry))
            .is_none()
    {
        return Err(BootError::KernelTooLarge {
            path: path.to_owned(),
            memory_mib,
            needed: kernel.end,
        });
    }
    Ok(kernel)
}

fn load_initrd(
    ram: &GuestRam,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<InitrdPlacement, BootError> {
    let unreadable = |source| BootError::InitrdUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    // The initrd goes as high as the kernel allows in low memory, page aligned.
    let ceiling = kernel.header.map_or(ram.low_end(), |h| {
        ram.low_end().min(u64::from(h.initrd_addr_max) + 1)
    });
    let floor = kernel.end.next_multiple_of(4096);
    let addr = ceiling
        .checked_sub(size)
        .map(|top| top & !0xfff)
        .filter(|addr| *addr >= floor)
        .ok_or_else(|| BootError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            available: ceiling.saturating_sub(floor),
        })?;
    ram.memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| unreadable(io::Error::other(e.to_string())))?;
    Ok(InitrdPlacement { addr, size })
}
