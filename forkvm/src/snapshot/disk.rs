//! [`Snapshot::save`] and [`Snapshot::load`]: a snapshot in a directory, and back.
//!
//! A snapshot directory holds `memory` (guest RAM laid out as forkvm's memory file: the low
//! range, then the range above the MMIO hole; pages never written are holes) and `state.json`
//! (versioned: the format, the forkvm version and the host CPU it was taken on, then each vCPU's
//! state, the interrupt controllers, clock (and PIT, for VMs that had one) and UART, the VM's
//! identity, and each virtio device's window, IRQ, transport registers, queue positions and own
//! state). The snapshot was captured with the VM paused, exactly as for a fork; the files are
//! written from it whenever the VM does meanwhile (the frozen image does not change). Each file is written under a temporary name, fsynced and
//! renamed, `state.json` last and only after any old one was removed, so a directory whose
//! snapshot did not finish never has a `state.json`. A restored VM maps `memory` privately:
//! restoring costs the same for any memory size, and restoring twice gives two independent VMs.
//! Each block device's disk, as it was at the snapshot, goes to `disk-<device index>` (sparse;
//! the VM may go on writing its image meanwhile, its old content is preserved for the copy as
//! for a fork child). A restored VM's devices continue as a fork child's do ([`super::spawn`]):
//! its identity is the next generation, its vsock connections are gone, and its disks read the
//! snapshot's disk files and write private overlays, so the snapshot never changes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use forkvm_devices::legacy::SerialState;
use serde::{Deserialize, Serialize};

use super::{CpuState, Snapshot, SnapshotParts};
use crate::boot::mptable::MAX_MPTABLE_VCPUS;
use crate::error::Error;
use crate::identity::Identity;
use crate::memory::freeze::FrozenRam;
use crate::network::GuestConnection;
use crate::virtio::FrozenDevice;
use crate::vstate::ThreadSetup;
pub use forkvm_devices::virtio::saved::DISK_FILE_PREFIX;
use forkvm_devices::virtio::saved::SnapshotFiles;

/// Version of the snapshot format; a snapshot of another version is refused.
pub const SNAPSHOT_FORMAT: u32 = 2;
/// The state file; its presence marks a complete snapshot.
pub const STATE_FILE: &str = "state.json";
/// The memory file.
pub const MEMORY_FILE: &str = "memory";

/// Everything but the memory.
#[derive(Serialize, Deserialize)]
struct SnapshotState {
    format: u32,
    forkvm_version: String,
    host_cpu: String,
    memory_size: u64,
    debug_exit: bool,
    /// The vCPUs' and the VM's state (`vcpus`, `vm`).
    #[serde(flatten)]
    cpu: Arc<CpuState>,
    #[serde(with = "SerialRegisters")]
    serial: SerialState,
    /// The snapshotted VM's identity; a restored VM is its next generation.
    identity: Identity,
    /// Virtio devices: where each sits, its transport registers and queues, its own state.
    devices: Vec<FrozenDevice>,
    /// The guest's TCP connections through its network, which a restored VM's new network
    /// resets (absent in snapshots of VMs without a network).
    #[serde(default)]
    network_connections: Vec<GuestConnection>,
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
fn host_cpu() -> String {
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

/// Writes `point` to `dir` (created if missing; a snapshot already there is replaced).
pub(super) fn save(point: &Snapshot, dir: &Path) -> Result<(), Error> {
    let io_err = |what: &'static str| {
        move |source| Error::Snapshot {
            path: dir.to_owned(),
            what,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io_err("creating the directory"))?;
    // No state file while the new snapshot is incomplete.
    match std::fs::remove_file(dir.join(STATE_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err("removing the old state")(e));
        }
        _ => sync_dir(dir).map_err(io_err("syncing the directory"))?,
    }
    write_atomically(dir, MEMORY_FILE, &mut |file| point.image.copy_data_to(file))
        .map_err(io_err("writing the memory"))?;
    let mut files = Directory(dir);
    let devices = point
        .devices
        .iter()
        .enumerate()
        .map(|(index, device)| {
            let mut device = device.clone();
            device.state.device = device.state.device.to_saved(index, &mut files)?;
            Ok(device)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io_err("writing a device's files"))?;
    let state = SnapshotState {
        format: SNAPSHOT_FORMAT,
        forkvm_version: env!("CARGO_PKG_VERSION").to_owned(),
        host_cpu: host_cpu(),
        memory_size: point.image.size(),
        debug_exit: point.debug_exit,
        cpu: point.cpu.clone(),
        serial: point.serial.clone(),
        identity: point.identity,
        devices,
        network_connections: point.network_connections.clone(),
    };
    write_atomically(dir, STATE_FILE, &mut |file| {
        let mut writer = BufWriter::new(file);
        serde_json::to_writer(&mut writer, &state).map_err(std::io::Error::other)?;
        writer.flush()
    })
    .map_err(io_err("writing the state"))
}

/// Reads the snapshot in `dir`, checking that it is complete, of this format, forkvm version and
/// CPU model, and that its files agree with its state.
pub(super) fn load(dir: &Path) -> Result<Snapshot, Error> {
    let bad = |reason: String| Error::SnapshotInvalid {
        path: dir.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).map_err(|e| {
        bad(format!(
            "no readable {STATE_FILE} ({e}): not a snapshot, or one that did not finish"
        ))
    })?;
    let state: SnapshotState =
        serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
    let here = (
        SNAPSHOT_FORMAT,
        env!("CARGO_PKG_VERSION").to_owned(),
        host_cpu(),
    );
    for (what, theirs, ours) in [
        (
            "snapshot format",
            state.format.to_string(),
            here.0.to_string(),
        ),
        ("forkvm version", state.forkvm_version.clone(), here.1),
        ("host CPU", state.host_cpu.clone(), here.2),
    ] {
        if theirs != ours {
            return Err(Error::SnapshotIncompatible {
                what,
                snapshot: theirs,
                here: ours,
            });
        }
    }
    if state.cpu.vcpus.is_empty() || state.cpu.vcpus.len() > usize::from(MAX_MPTABLE_VCPUS) {
        return Err(bad(format!("{} vCPUs", state.cpu.vcpus.len())));
    }
    let memory =
        File::open(dir.join(MEMORY_FILE)).map_err(|e| bad(format!("{MEMORY_FILE}: {e}")))?;
    let len = memory
        .metadata()
        .map_err(|e| bad(format!("{MEMORY_FILE}: {e}")))?
        .len();
    if len != state.memory_size {
        return Err(bad(format!(
            "{MEMORY_FILE} holds {len} bytes, the state says {}",
            state.memory_size
        )));
    }
    Ok(Snapshot::new(SnapshotParts {
        kvm: None,
        setup: ThreadSetup {
            kick_signal: crate::kick_signal(),
            seccomp: crate::seccomp_policy(),
        },
        image: FrozenRam::from_file(memory, state.memory_size),
        cpu: state.cpu,
        serial: state.serial,
        debug_exit: state.debug_exit,
        devices: open_disks(dir, state.devices)?,
        identity: state.identity,
        network: None,
        network_connections: state.network_connections,
    }))
}

/// Opens the files of each device a snapshot in `dir` saved (a disk's content).
fn open_disks(dir: &Path, devices: Vec<FrozenDevice>) -> Result<Vec<FrozenDevice>, Error> {
    let files = Directory(dir);
    devices
        .into_iter()
        .map(|mut device| {
            device.state.device = device.state.device.from_saved(&files)?;
            Ok(device)
        })
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::SnapshotInvalid {
            path: dir.to_owned(),
            reason: e.to_string(),
        })
}

/// A snapshot directory as devices see it: new files are written atomically, and only plain
/// names of device files can be opened.
struct Directory<'a>(&'a Path);

impl SnapshotFiles for Directory<'_> {
    fn write(
        &mut self,
        name: &str,
        write: &mut dyn FnMut(&File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        write_atomically(self.0, name, write)
    }

    fn open(&self, name: &str) -> std::io::Result<File> {
        let plain = Path::new(name).file_name() == Some(name.as_ref());
        if !plain || !name.starts_with(DISK_FILE_PREFIX) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("disk file {name:?} is not a disk of the snapshot"),
            ));
        }
        File::open(self.0.join(name))
    }
}

/// Writes `dir/name` through a temporary file that is fsynced and then renamed into place.
fn write_atomically(
    dir: &Path,
    name: &str,
    write: &mut dyn FnMut(&File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let temporary: PathBuf = dir.join(format!(".{name}.tmp"));
    let file = File::create(&temporary)?;
    let written = write(&file).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    std::fs::rename(&temporary, dir.join(name))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
