//! Snapshot directories someone else may write, or change under a restored VM: links and FIFOs
//! in place of its files, damaged and out-of-range files, a memory file truncated under a VM,
//! and saves that fail midway or meet links at their temporary names.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkvm::{
    CHECKSUM_FILE, ConsoleBuffer, ConsoleOutput, Error, FileProblem, LoadOptions, MEMORY_FILE,
    STATE_FILE, Snapshot, SnapshotError, Vm,
};
use forkvm_tests::{
    BlkMailbox, TempFile, read_u64, rewrite_snapshot_state, spinning_guest, wait_until_above,
};
use serde_json::{Value, json};

/// Scratch memory the spinning test guest does not use.
const SCRATCH: u64 = 20 << 20;

fn snapshot_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkvm-snapfiles-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Why restoring `dir` with `options` is refused.
fn refusal(dir: &Path, options: LoadOptions) -> SnapshotError {
    match Vm::restore_with(dir, ConsoleOutput::Discard, options) {
        Ok(_) => panic!("restored a snapshot that should be refused"),
        Err(Error::SnapshotInvalid { reason, .. }) => reason,
        Err(e) => panic!("refused for another reason: {e}"),
    }
}

/// A spinning guest snapshotted into a new `dir` with 7 at `SCRATCH`; the VM keeps running.
fn spinning_snapshot(name: &str) -> (Vm, u64, PathBuf) {
    let dir = snapshot_dir(name);
    let (vm, addr, _console) = spinning_guest(1);
    wait_until_above(&vm, addr, 0);
    vm.write_memory(SCRATCH, &7u64.to_le_bytes()).unwrap();
    vm.snapshot(&dir).unwrap();
    (vm, addr, dir)
}

/// A disk guest (64 sectors, the mailbox sector holding 0x1111) snapshotted into a new `dir`.
fn disk_snapshot(name: &str, image: &TempFile) -> (Vm, ConsoleBuffer, BlkMailbox, PathBuf) {
    let serial = ConsoleBuffer::new();
    let vm = forkvm_tests::test_guest_vm("mode=blk-mailbox", &serial)
        .block(image.path(), false)
        .build()
        .unwrap();
    vm.start().unwrap();
    let mailbox = BlkMailbox::find(&serial);
    mailbox.write(&vm, &serial, 0x1111);
    let dir = snapshot_dir(name);
    vm.snapshot(&dir).unwrap();
    (vm, serial, mailbox, dir)
}

/// A disk file replaced by a link to a host file of the same length is refused, by name: the
/// guest must never read a host file through its disk.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_disk_file_replaced_by_a_link_is_refused() {
    let image = TempFile::with_contents("linked.img", &[7u8; 64 * 512]);
    let (vm, _serial, mailbox, dir) = disk_snapshot("link", &image);
    mailbox.exit(&vm);
    let secret = TempFile::with_contents("host-secret", &[0x5a; 64 * 512]);
    let disk = dir.join(format!("{}0", forkvm::DISK_FILE_PREFIX));
    std::fs::remove_file(&disk).unwrap();
    symlink(secret.path(), &disk).unwrap();
    let err = refusal(&dir, LoadOptions::new());
    assert!(
        matches!(&err, SnapshotError::File { file, problem: FileProblem::Symlink } if file == "disk-0"),
        "{err}"
    );
    // The memory file too.
    std::fs::remove_file(&disk).unwrap();
    let memory = dir.join(MEMORY_FILE);
    let len = std::fs::metadata(&memory).unwrap().len();
    std::fs::rename(&memory, dir.join("elsewhere")).unwrap();
    symlink(dir.join("elsewhere"), &memory).unwrap();
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), len);
    let err = refusal(&dir, LoadOptions::new());
    assert!(
        matches!(&err, SnapshotError::File { file, problem: FileProblem::Symlink } if file == MEMORY_FILE),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A FIFO as `state.json` is refused at once: the restore must not wait for a writer.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_fifo_as_state_file_is_refused_without_blocking() {
    let (vm, _, dir) = spinning_snapshot("fifo");
    vm.stop();
    let state = dir.join(STATE_FILE);
    std::fs::remove_file(&state).unwrap();
    let c_path = std::ffi::CString::new(state.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let (done, result) = std::sync::mpsc::channel();
    let restoring = dir.clone();
    std::thread::spawn(move || {
        let _ = done.send(refusal(&restoring, LoadOptions::new()).to_string());
    });
    let outcome = result.recv_timeout(Duration::from_secs(10));
    if outcome.is_err() {
        // Free the blocked restore: a writer opens and closes the FIFO.
        let _ = std::fs::OpenOptions::new().write(true).open(&state);
    }
    let err = outcome.expect("the restore blocked on a FIFO");
    assert!(
        err.contains("state.json: is a FIFO, not a regular file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Files of another user are refused (this process's own and root's are taken).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn files_of_another_user_are_refused() {
    let (vm, _, dir) = spinning_snapshot("owner");
    vm.stop();
    let memory = dir.join(MEMORY_FILE);
    if std::os::unix::fs::chown(&memory, Some(54_321), None).is_err() {
        // Not root: another user's file cannot be made here.
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    let err = refusal(&dir, LoadOptions::new());
    assert!(
        matches!(&err, SnapshotError::File { file, problem: FileProblem::Owner { owner: 54_321, .. } } if file == MEMORY_FILE),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A VM restored with its memory copied keeps its memory when the snapshot's memory file is
/// truncated under it: the host process survives (no SIGBUS) and so does the guest.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_memory_file_truncated_under_a_vm_restored_with_a_copy_does_not_reach_it() {
    let (vm, addr, dir) = spinning_snapshot("truncated");
    vm.stop();
    let restored = Vm::restore_with(
        &dir,
        ConsoleOutput::Discard,
        LoadOptions::new().copy_memory(true),
    )
    .unwrap();
    let counter = wait_until_above(&restored, addr, 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap()
        .set_len(0)
        .unwrap();
    // Pages the VM never touched come from the copy, not the truncated file.
    assert_eq!(read_u64(&restored, SCRATCH), 7);
    let mut page = vec![0u8; 1 << 20];
    restored.read_memory(SCRATCH + 4096, &mut page).unwrap();
    wait_until_above(&restored, addr, counter);
    restored.stop();
    // The truncated snapshot is refused, by name.
    let err = refusal(&dir, LoadOptions::new());
    assert!(
        matches!(&err, SnapshotError::File { file, problem: FileProblem::Length { len: 0, .. } } if file == MEMORY_FILE),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The temporary directories of saves beside `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_str().unwrap();
    std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// A save that fails midway (the disk image shrank under the VM, so its copy fails after the
/// memory was written) leaves the previous snapshot whole and loadable, and no temporary
/// directory behind.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_save_that_fails_midway_leaves_the_previous_snapshot_loadable() {
    let image = TempFile::with_contents("shrinking.img", &[7u8; 64 * 512]);
    let (vm, serial, mailbox, dir) = disk_snapshot("midway", &image);
    mailbox.write(&vm, &serial, 0x2222);
    std::fs::OpenOptions::new()
        .write(true)
        .open(image.path())
        .unwrap()
        .set_len(512)
        .unwrap();
    let err = vm.snapshot(&dir).unwrap_err();
    assert!(
        err.to_string().contains("writing a device's files"),
        "{err}"
    );
    mailbox.exit(&vm);
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    let console = ConsoleBuffer::new();
    let restored = Vm::restore(&dir, ConsoleOutput::Buffer(console.clone())).unwrap();
    assert_eq!(
        mailbox.read(&restored, &console),
        0x1111,
        "the previous snapshot"
    );
    mailbox.exit(&restored);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Saving over a snapshot never follows links planted at the names earlier versions used for
/// their temporary files: the files they point to are not written.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn saving_over_a_snapshot_never_follows_links_at_temporary_names() {
    let (vm, _, dir) = spinning_snapshot("tmplinks");
    let victims: Vec<_> = [MEMORY_FILE, STATE_FILE, "disk-0"]
        .iter()
        .map(|name| {
            let victim = TempFile::with_contents("victim", b"precious");
            symlink(victim.path(), dir.join(format!(".{name}.tmp"))).unwrap();
            victim
        })
        .collect();
    vm.write_memory(SCRATCH, &8u64.to_le_bytes()).unwrap();
    vm.snapshot(&dir).unwrap();
    vm.stop();
    for victim in &victims {
        assert_eq!(std::fs::read(victim.path()).unwrap(), b"precious");
    }
    let restored = Vm::restore(&dir, ConsoleOutput::Discard).unwrap();
    assert_eq!(read_u64(&restored, SCRATCH), 8, "the new snapshot");
    restored.stop();
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    // A directory holding other files than a snapshot's is not replaced.
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let err = restored_vm_snapshot_error(&dir);
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Why saving a new VM's snapshot into `dir` fails.
fn restored_vm_snapshot_error(dir: &Path) -> String {
    let (vm, _, _console) = spinning_guest(1);
    let err = forkvm::error_chain(&vm.snapshot(dir).unwrap_err());
    vm.stop();
    err
}

/// `state.json` is checked against its checksum always, the memory when asked; a snapshot of
/// this format without checksums is refused, one of format 2 (which had none) loads.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn damaged_files_are_found_by_their_checksums() {
    let (vm, _, dir) = spinning_snapshot("checksums");
    vm.stop();
    let state_path = dir.join(STATE_FILE);
    let state = std::fs::read_to_string(&state_path).unwrap();
    // One flipped digit of the identity: valid JSON, damaged file.
    let at = state.find("\"generation\":").unwrap() + "\"generation\":".len();
    let mut damaged = state.clone().into_bytes();
    damaged[at] = if damaged[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&state_path, &damaged).unwrap();
    let err = refusal(&dir, LoadOptions::new());
    assert!(
        matches!(&err, SnapshotError::Checksum { file, .. } if file == STATE_FILE),
        "{err}"
    );
    std::fs::write(&state_path, &state).unwrap();

    // A flipped byte of memory: found only when the data is verified.
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap();
    use std::os::unix::fs::FileExt;
    memory.write_all_at(&9u64.to_le_bytes(), SCRATCH).unwrap();
    let restored = Vm::restore(&dir, ConsoleOutput::Discard).unwrap();
    assert_eq!(read_u64(&restored, SCRATCH), 9, "not verified by default");
    restored.stop();
    let err = refusal(&dir, LoadOptions::new().verify_data(true));
    assert!(
        matches!(&err, SnapshotError::Checksum { file, .. } if file == MEMORY_FILE),
        "{err}"
    );
    memory.write_all_at(&7u64.to_le_bytes(), SCRATCH).unwrap();
    let restored = Vm::restore_with(
        &dir,
        ConsoleOutput::Discard,
        LoadOptions::new().verify_data(true),
    )
    .unwrap();
    assert_eq!(read_u64(&restored, SCRATCH), 7);
    restored.stop();

    std::fs::remove_file(dir.join(CHECKSUM_FILE)).unwrap();
    let err = refusal(&dir, LoadOptions::new());
    assert!(matches!(err, SnapshotError::NoChecksum { .. }), "{err}");
    let format = format!("\"format\":{}", forkvm::SNAPSHOT_FORMAT);
    std::fs::write(&state_path, state.replacen(&format, "\"format\":2", 1)).unwrap();
    let restored = Vm::restore(&dir, ConsoleOutput::Discard).unwrap();
    assert_eq!(read_u64(&restored, SCRATCH), 7, "format 2 loads unverified");
    restored.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every number of the state that is used as a size, an index or an address is range-checked
/// before anything is allocated, and a bad one is refused naming its field.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn out_of_range_state_values_are_refused_by_name() {
    let image = TempFile::with_contents("ranges.img", &[7u8; 64 * 512]);
    let (vm, _serial, mailbox, dir) = disk_snapshot("ranges", &image);
    mailbox.exit(&vm);
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
    Snapshot::check_state_file(text.as_bytes()).unwrap();
    let state: Value = serde_json::from_str(&text).unwrap();
    type Tamper = fn(&mut Value);
    let cases: [(&str, Tamper); 9] = [
        ("memory_size", |s| s["memory_size"] = (1u64 << 60).into()),
        ("memory_size", |s| s["memory_size"] = 4097.into()),
        ("vcpus", |s| s["vcpus"] = json!([])),
        ("serial.in_buffer", |s| {
            s["serial"]["in_buffer"] = vec![0u8; 65].into()
        }),
        ("devices[0].base", |s| {
            s["devices"][0]["base"] = 0x1000.into()
        }),
        ("devices[0].state.device.SavedBlock.capacity_sectors", |s| {
            s["devices"][0]["state"]["device"]["SavedBlock"]["capacity_sectors"] =
                (1u64 << 55).into()
        }),
        ("devices[0].state.transport.queues[0].size", |s| {
            s["devices"][0]["state"]["transport"]["queues"][0]["size"] = 3.into()
        }),
        ("devices[0].state.transport.queues", |s| {
            let queue = s["devices"][0]["state"]["transport"]["queues"][0].clone();
            s["devices"][0]["state"]["transport"]["queues"] = vec![queue; 17].into()
        }),
        ("devices", |s| {
            let one = s["devices"][0].clone();
            s["devices"] = vec![one; 20].into()
        }),
    ];
    for (field, tamper) in &cases {
        let mut tampered = state.clone();
        tamper(&mut tampered);
        let bytes = serde_json::to_vec(&tampered).unwrap();
        let err = Snapshot::check_state_file(&bytes).unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Field { field: named, .. } if named == field),
            "{field}: {err}"
        );
    }
    // Through a restore too, with the checksum made to match: a capacity whose byte count
    // overflows to the disk file's length is refused, not multiplied.
    let mut tampered = state.clone();
    (cases[5].1)(&mut tampered);
    rewrite_snapshot_state(&dir, &serde_json::to_string(&tampered).unwrap());
    let err = refusal(&dir, LoadOptions::new());
    assert!(matches!(err, SnapshotError::Field { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The state files of real snapshots (a spinning guest with two vCPUs, a guest with virtio rng,
/// console and vsock, a guest with a disk) pass the state check as they are. With
/// `FORKVM_SNAPSHOT_SEEDS=<dir>`, they are written there as `seed-*.json`: the seeds of the
/// `snapshot_state` fuzz target (`fuzz/seeds/snapshot_state/`).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn state_files_of_real_snapshots_pass_the_state_check() {
    let mut states = Vec::new();
    let dir = snapshot_dir("seeds");
    let (vm, addr, _console) = spinning_guest(2);
    wait_until_above(&vm, addr, 0);
    vm.snapshot(&dir).unwrap();
    vm.stop();
    states.push(("spinning", std::fs::read(dir.join(STATE_FILE)).unwrap()));

    // Its drivers set up (queues ready) before the snapshot.
    let (serial, hvc) = (ConsoleBuffer::new(), ConsoleBuffer::new());
    let vm = forkvm_tests::test_guest_vm("mode=virtio-console", &serial)
        .rng()
        .virtio_console(ConsoleOutput::Buffer(hvc.clone()), None)
        .vsock(forkvm::VsockConfig::new(3))
        .build()
        .unwrap();
    vm.start().unwrap();
    forkvm_tests::wait_for_output(&hvc, "virtio-console ready\n");
    vm.snapshot(&dir).unwrap();
    vm.stop();
    states.push(("virtio", std::fs::read(dir.join(STATE_FILE)).unwrap()));

    let image = TempFile::with_contents("seed.img", &[7u8; 64 * 512]);
    let (vm, _serial, mailbox, disk_dir) = disk_snapshot("seeds-disk", &image);
    mailbox.exit(&vm);
    states.push(("disk", std::fs::read(disk_dir.join(STATE_FILE)).unwrap()));

    let seeds = std::env::var_os("FORKVM_SNAPSHOT_SEEDS").map(PathBuf::from);
    for (name, state) in &states {
        Snapshot::check_state_file(state).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(seeds) = &seeds {
            std::fs::write(seeds.join(format!("seed-{name}.json")), state).unwrap();
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&disk_dir).unwrap();
}
