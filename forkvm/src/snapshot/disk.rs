//! [`Snapshot::save`] and [`Snapshot::load`]: a snapshot in a directory, and back.
//!
//! A snapshot directory holds `memory` (guest RAM laid out as forkvm's memory file: the low
//! range, then the range above the MMIO hole; pages never written are holes), `state.json`
//! (versioned: the format, the forkvm version and the host CPU it was taken on, then each vCPU's
//! state, the interrupt controllers, clock (and PIT, for VMs that had one) and UART, the VM's
//! identity, and each virtio device's window, IRQ, transport registers, queue positions and own
//! state: [`super::state`]), one `disk-<device index>` per block device, and `checksums.json`
//! ([`super::checksum`]). The snapshot was captured with the VM paused, exactly as for a fork;
//! the files are written from it whatever the VM does meanwhile (the frozen image does not
//! change), into a fresh directory that then takes the target's place in one step
//! ([`super::files`]): a snapshot already there stays whole until the new one is.
//!
//! Loading trusts nothing in the directory: files are opened without following links, must be
//! regular files of this user (or root), the state is checked field by field before anything is
//! mapped or allocated, and the files' lengths against it; `state.json` is checked against its
//! checksum always, the memory and disks when [`LoadOptions::verify_data`] asks. A restored VM
//! maps `memory` privately (restoring costs the same for any memory size, and restoring twice
//! gives two independent VMs), or, with [`LoadOptions::copy_memory`], a sealed copy of it that no
//! change to the file reaches. Each block device's disk, as it was at the snapshot, is read
//! from its file with private overlays for the restored VMs' writes; a restored VM's devices
//! continue as a fork child's do ([`super::spawn`]).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::checksum::{CHECKSUM_FILE, Checksums, FileSum, MAX_CHECKSUM_BYTES};
use super::files::{NewSnapshot, SnapshotDir, is_missing};
use super::state::{MAX_STATE_BYTES, SNAPSHOT_FORMAT, SnapshotState, host_cpu};
use super::{Snapshot, SnapshotParts};
use crate::error::Error;
use crate::error::{FileProblem, SnapshotError};
use crate::memory::freeze::FrozenRam;
use crate::virtio::FrozenDevice;
use crate::vstate::ThreadSetup;
pub use forkvm_devices::virtio::saved::DISK_FILE_PREFIX;
use forkvm_devices::virtio::saved::SnapshotFiles;

/// The state file; its presence marks a complete snapshot.
pub const STATE_FILE: &str = "state.json";
/// The memory file.
pub const MEMORY_FILE: &str = "memory";

/// How [`Snapshot::load_with`] reads a snapshot; the default is what [`Snapshot::load`] does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Reads all of the memory and disk files and checks them against their checksums
    /// (`state.json` is always checked). Costs a read of every byte (see
    /// `docs/design/snapshot-files.md`).
    pub verify_data: bool,
    /// Copies the memory into a sealed memory file instead of mapping the snapshot's `memory`:
    /// nothing that happens to the file afterwards (a truncation, a write) reaches the VMs
    /// spawned from it. Without it, a truncated file kills the process with `SIGBUS` when its
    /// missing pages are touched. Costs a copy of the memory's data, and that much RAM.
    pub copy_memory: bool,
}

impl LoadOptions {
    /// The default: no check of the large files, the memory file mapped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`LoadOptions::verify_data`].
    pub fn verify_data(mut self, on: bool) -> Self {
        self.verify_data = on;
        self
    }

    /// Sets [`LoadOptions::copy_memory`].
    pub fn copy_memory(mut self, on: bool) -> Self {
        self.copy_memory = on;
        self
    }
}

/// Writes `point` to `dir` (created if missing; a snapshot already there is replaced once the
/// new one is complete).
pub(super) fn save(point: &Snapshot, dir: &Path) -> Result<(), Error> {
    let io_err = |what: &'static str| {
        move |source| Error::Snapshot {
            path: dir.to_owned(),
            what,
            source,
        }
    };
    let new = NewSnapshot::create(dir).map_err(io_err("creating the directory"))?;
    let mut sums = Checksums::new();
    let memory = new
        .write(MEMORY_FILE, &mut |file| point.image.copy_data_to(file))
        .map_err(io_err("writing the memory"))?;
    sums.insert(
        MEMORY_FILE,
        FileSum::of_file(&memory).map_err(io_err("summing the memory"))?,
    );
    drop(memory);
    let mut files = Writing {
        new: &new,
        sums: &mut sums,
    };
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
    let text = serde_json::to_vec(&state)
        .map_err(|e| io_err("writing the state")(std::io::Error::other(e)))?;
    sums.insert(STATE_FILE, FileSum::of_bytes(&text));
    let sums = sums.to_json();
    new.write(CHECKSUM_FILE, &mut |mut file| file.write_all(&sums))
        .map_err(io_err("writing the checksums"))?;
    new.write(STATE_FILE, &mut |mut file| file.write_all(&text))
        .map_err(io_err("writing the state"))?;
    new.commit()
        .map_err(io_err("putting the snapshot in place"))
}

/// Parses and checks a state file's bytes, without a directory, KVM or host checks: what
/// [`Snapshot::check_state_file`] does.
pub(super) fn check_state_file(bytes: &[u8]) -> Result<(), SnapshotError> {
    SnapshotState::parse(bytes)?.check()
}

/// Reads the snapshot in `path` (see the module docs for the checks).
pub(super) fn load(path: &Path, options: LoadOptions) -> Result<Snapshot, Error> {
    let invalid = |reason: SnapshotError| Error::SnapshotInvalid {
        path: path.to_owned(),
        reason,
    };
    let dir = SnapshotDir::open(path).map_err(invalid)?;
    let text = dir.read(STATE_FILE, MAX_STATE_BYTES).map_err(|e| match e {
        SnapshotError::File {
            problem: FileProblem::Open(error),
            ..
        } if error.kind() == std::io::ErrorKind::NotFound => invalid(SnapshotError::Missing {
            file: STATE_FILE,
            error,
        }),
        e => invalid(e),
    })?;
    let sums = match dir.read(CHECKSUM_FILE, MAX_CHECKSUM_BYTES) {
        Ok(bytes) => Some(Checksums::parse(&bytes).map_err(invalid)?),
        Err(e) if is_missing(&e) => None,
        Err(e) => return Err(invalid(e)),
    };
    if let Some(sums) = &sums {
        sums.verify_bytes(STATE_FILE, SNAPSHOT_FORMAT, &text)
            .map_err(invalid)?;
    }
    let state = SnapshotState::parse(&text).map_err(invalid)?;
    check_compatible(&state)?;
    if sums.is_none() && state.format >= SNAPSHOT_FORMAT {
        return Err(invalid(SnapshotError::NoChecksum {
            file: STATE_FILE.to_owned(),
            format: state.format,
        }));
    }
    state.check().map_err(invalid)?;
    let format = state.format;
    let verify = |name: &str, file: &File| match (&sums, options.verify_data) {
        (Some(sums), true) => sums.verify_file(name, format, file),
        _ => Ok(()),
    };
    let memory = dir.open_file(MEMORY_FILE).map_err(invalid)?;
    let len = memory
        .metadata()
        .map_err(|e| invalid(SnapshotError::file(MEMORY_FILE, FileProblem::Read(e))))?
        .len();
    if len != state.memory_size {
        return Err(invalid(SnapshotError::file(
            MEMORY_FILE,
            FileProblem::Length {
                len,
                expected: state.memory_size,
            },
        )));
    }
    verify(MEMORY_FILE, &memory).map_err(invalid)?;
    let image = if options.copy_memory {
        FrozenRam::copied_from(&memory, state.memory_size).map_err(|error| {
            invalid(SnapshotError::Copy {
                file: MEMORY_FILE,
                error,
            })
        })?
    } else {
        FrozenRam::from_file(memory, state.memory_size)
    };
    let files = Reading {
        dir: &dir,
        verify: &verify,
    };
    let devices = open_devices(&files, state.devices).map_err(invalid)?;
    Ok(Snapshot::new(SnapshotParts {
        kvm: None,
        setup: ThreadSetup {
            kick_signal: crate::kick_signal(),
            seccomp: crate::seccomp_policy(),
        },
        image,
        cpu: state.cpu,
        serial: state.serial,
        debug_exit: state.debug_exit,
        devices,
        identity: state.identity,
        network: None,
        network_connections: state.network_connections,
    }))
}

/// Refuses a snapshot of another format, forkvm version or host CPU model.
fn check_compatible(state: &SnapshotState) -> Result<(), Error> {
    let format_ok = (super::state::OLDEST_FORMAT..=SNAPSHOT_FORMAT).contains(&state.format);
    let checks = [
        (
            "snapshot format",
            state.format.to_string(),
            SNAPSHOT_FORMAT.to_string(),
            format_ok,
        ),
        (
            "forkvm version",
            state.forkvm_version.clone(),
            env!("CARGO_PKG_VERSION").to_owned(),
            false,
        ),
        ("host CPU", state.host_cpu.clone(), host_cpu(), false),
    ];
    for (what, theirs, ours, accepted) in checks {
        if !accepted && theirs != ours {
            return Err(Error::SnapshotIncompatible {
                what,
                snapshot: theirs,
                here: ours,
            });
        }
    }
    Ok(())
}

/// Opens the files of each device a snapshot saved (a disk's content).
fn open_devices(
    files: &Reading<'_>,
    devices: Vec<FrozenDevice>,
) -> Result<Vec<FrozenDevice>, SnapshotError> {
    devices
        .into_iter()
        .enumerate()
        .map(|(index, mut device)| {
            device.state.device = device
                .state
                .device
                .from_saved(files)
                .map_err(|e| device_error(index, e))?;
            Ok(device)
        })
        .collect()
}

/// Device `index`'s error: a file's own problem as it was raised, the rest as the device's.
fn device_error(index: usize, error: std::io::Error) -> SnapshotError {
    if !error
        .get_ref()
        .is_some_and(|inner| inner.is::<SnapshotError>())
    {
        return SnapshotError::Device { index, error };
    }
    match error
        .into_inner()
        .map(|inner| inner.downcast::<SnapshotError>())
    {
        Some(Ok(own)) => *own,
        _ => SnapshotError::Device {
            index,
            error: std::io::Error::other("a device file's error was lost"),
        },
    }
}

/// A snapshot directory as devices see it when it is loaded: only plain names of device files
/// open, with the checks of [`SnapshotDir::open_file`] (and their checksums', if asked).
struct Reading<'a> {
    dir: &'a SnapshotDir,
    verify: &'a dyn Fn(&str, &File) -> Result<(), SnapshotError>,
}

impl SnapshotFiles for Reading<'_> {
    fn write(
        &mut self,
        name: &str,
        _write: &mut dyn FnMut(&File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        Err(std::io::Error::other(format!(
            "{name}: a snapshot being loaded is not written"
        )))
    }

    fn open(&self, name: &str) -> std::io::Result<File> {
        let plain = Path::new(name).file_name() == Some(name.as_ref());
        if !plain || !name.starts_with(DISK_FILE_PREFIX) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("disk file {name:?} is not a disk of the snapshot"),
            ));
        }
        let file = self.dir.open_file(name).map_err(to_io)?;
        (self.verify)(name, &file).map_err(to_io)?;
        Ok(file)
    }
}

fn to_io(e: SnapshotError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// A new snapshot as devices see it when it is saved: each file written, synced and summed.
struct Writing<'a> {
    new: &'a NewSnapshot,
    sums: &'a mut Checksums,
}

impl SnapshotFiles for Writing<'_> {
    fn write(
        &mut self,
        name: &str,
        write: &mut dyn FnMut(&File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let file = self.new.write(name, write)?;
        self.sums.insert(name, FileSum::of_file(&file)?);
        Ok(())
    }

    fn open(&self, name: &str) -> std::io::Result<File> {
        Err(std::io::Error::other(format!(
            "{name}: a snapshot being written is not read"
        )))
    }
}
