//! Bad configuration and bad files get a typed error that says what is wrong.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use forkvm::BootError;
use forkvm::{ConsoleOutput, Error, VmBuilder};
use forkvm_tests::{REPORT_RSI, TempFile, fake_elf, test_guest};

fn build(builder: VmBuilder) -> Error {
    match builder.console(ConsoleOutput::Discard).build() {
        Ok(_) => panic!("the build should have failed"),
        Err(e) => e,
    }
}

fn guest() -> VmBuilder {
    VmBuilder::new().kernel(test_guest()).memory_mib(16)
}

#[test]
fn no_kernel() {
    assert!(matches!(build(VmBuilder::new()), Error::NoKernel));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn missing_kernel_names_the_path() {
    let e = build(VmBuilder::new().kernel("/nonexistent/vmlinux"));
    assert!(
        matches!(e, Error::Boot(BootError::KernelUnreadable { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn unreadable_kernel() {
    let e = build(VmBuilder::new().kernel(std::env::temp_dir()));
    assert!(
        matches!(e, Error::Boot(BootError::KernelUnreadable { .. })),
        "{e:?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn file_that_is_neither_elf_nor_bzimage() {
    let junk = TempFile::with_contents("junk", &[0x42; 4096]);
    let e = build(VmBuilder::new().kernel(junk.path()));
    assert!(
        matches!(e, Error::Boot(BootError::UnknownKernelFormat { .. })),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("neither an ELF image nor a bzImage"),
        "{e}"
    );
    let empty = TempFile::with_contents("empty", b"");
    assert!(matches!(
        build(VmBuilder::new().kernel(empty.path())),
        Error::Boot(BootError::UnknownKernelFormat { .. })
    ));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kernel_larger_than_memory() {
    // Loads at 1 MiB but claims 64 MiB of memory.
    let big = TempFile::with_contents("big", &fake_elf(0x10_0000, &REPORT_RSI, 64 << 20));
    let e = build(VmBuilder::new().kernel(big.path()).memory_mib(16));
    assert!(
        matches!(
            e,
            Error::Boot(BootError::KernelTooLarge { memory_mib: 16, .. })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("give the VM more memory"), "{e}");
    // Its bytes lie beyond the end of memory.
    let far = TempFile::with_contents("far", &fake_elf(64 << 20, &REPORT_RSI, 0));
    let e = build(VmBuilder::new().kernel(far.path()).memory_mib(16));
    assert!(
        matches!(e, Error::Boot(BootError::KernelLoad { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("does not fit in 16 MiB"), "{e}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn initrd_that_does_not_fit() {
    let initrd = TempFile::with_contents("initrd", b"");
    std::fs::File::options()
        .write(true)
        .open(initrd.path())
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let e = build(guest().initrd(initrd.path()));
    assert!(
        matches!(e, Error::Boot(BootError::InitrdTooLarge { size, .. }) if size == 32 << 20),
        "{e:?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn missing_initrd() {
    let e = build(guest().initrd("/nonexistent/initrd"));
    assert!(
        matches!(e, Error::Boot(BootError::InitrdUnreadable { .. })),
        "{e:?}"
    );
}

#[test]
fn too_little_memory() {
    assert!(matches!(
        build(guest().memory_mib(1)),
        Error::MemoryTooSmall { mib: 1, .. }
    ));
}

/// A size whose byte count does not fit in 64 bits is refused, not truncated: `2^44 + 256` MiB
/// once built a 256 MiB VM (the shift dropped the high bits).
#[test]
fn too_much_memory() {
    for mib in [(1u64 << 44) + 256, u64::MAX, forkvm::MAX_MEMORY_MIB + 1] {
        let e = build(guest().memory_mib(mib));
        assert!(
            matches!(e, Error::MemoryTooLarge { mib: m, max } if m == mib && max == forkvm::MAX_MEMORY_MIB),
            "{mib}: {e:?}"
        );
        assert_eq!(e.kind(), forkvm::ErrorKind::InvalidArgument);
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn zero_or_too_many_vcpus() {
    assert!(matches!(build(guest().vcpus(0)), Error::NoVcpus));
    let e = build(guest().vcpus(100_000));
    assert!(
        matches!(
            e,
            Error::TooManyVcpus {
                requested: 100_000,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn command_line_too_long() {
    let e = build(guest().cmdline("x".repeat(4096)));
    assert!(matches!(e, Error::Boot(BootError::Cmdline(_))), "{e:?}");
}

#[test]
fn no_kvm_device() {
    let e = build(guest().kvm_device("/nonexistent/kvm"));
    assert!(matches!(e, Error::KvmMissing(_)), "{e:?}");
    assert!(
        e.to_string().contains("/nonexistent/kvm does not exist"),
        "{e}"
    );
}

/// Runs [`kvm_permission_child`] as user `nobody`, who may not open /dev/kvm. The test binary is
/// copied where `nobody` can execute it (the checkout may not be readable by other users).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn no_permission_for_kvm() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test switches to user nobody and must run as root"
    );
    let exe = TempFile::with_contents(
        "bad-input-test",
        &std::fs::read(std::env::current_exe().unwrap()).unwrap(),
    );
    std::fs::set_permissions(exe.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The child's name in this test binary: its path less the crate's name (`bad_input::...`).
    let (_, child) = concat!(module_path!(), "::kvm_permission_child")
        .split_once("::")
        .unwrap();
    let status = std::process::Command::new(exe.path())
        .args(["--ignored", "--exact", child, "--test-threads=1"])
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the unprivileged build did not fail with KvmPermission"
    );
}

#[test]
#[ignore = "run by no_permission_for_kvm as user nobody"]
fn kvm_permission_child() {
    let e = build(VmBuilder::new().kernel("/nonexistent/vmlinux"));
    assert!(matches!(e, Error::KvmPermission(_)), "{e:?}");
    assert!(
        e.to_string().contains("permission denied opening /dev/kvm"),
        "{e}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn missing_disk_image() {
    let e = build(guest().block("/nonexistent/disk.img", false));
    assert!(matches!(e, Error::BlockImage { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
}
