//! A real Linux guest on this host's KVM: the kernel from `guest/kernel/build.sh` and the busybox
//! initramfs from `guest/initramfs/build.sh` boot through the PVH entry; /init prints its marker
//! and reboots, which forkvm reports as a reset. Its kernel drives forkvm's virtio-rng, virtio-blk and virtio-console devices; /init's marker
//! arrives through virtio-console (hvc0), after `/bin/device-checks` read `/dev/hwrng` and wrote,
//! remounted and read back a file on an ext4 disk.
//!
//! Here guest ring 0 is emulated, so the boot takes ~15–20 s; the build scripts reuse their cache
//! (`scripts/test.sh` builds both before the tests run).

use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, ConsoleOutput, GuestExit, VmBuilder};
use forkvm_tests::{TempFile, built_artifact};

const MARKER: &str = "FORKVM-LINUX-INIT-OK";

#[test]
fn linux_boots_to_init_and_shuts_down() {
    let kernel = built_artifact("guest/kernel/build.sh");
    let initramfs = built_artifact("guest/initramfs/build.sh");
    // An empty ext4 file system for the guest to write to.
    let disk = TempFile::with_contents("linux-disk.ext4", &vec![0u8; 8 << 20]);
    let mkfs = ["mkfs.ext4", "/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .find_map(|tool| {
            std::process::Command::new(tool)
                .args(["-q", "-F"])
                .arg(disk.path())
                .status()
                .ok()
        });
    assert!(
        mkfs.is_some_and(|s| s.success()),
        "mkfs.ext4 (e2fsprogs) is needed: {mkfs:?}"
    );
    let console = ConsoleBuffer::new();
    let hvc = ConsoleBuffer::new();
    let vm = VmBuilder::new()
        .kernel(&kernel)
        .initrd(&initramfs)
        // The kernel logs to both consoles; the last one, hvc0, becomes /dev/console for /init.
        .cmdline("console=ttyS0 console=hvc0 forkvm.init=/bin/device-checks")
        .memory_mib(128)
        .rng()
        .block(disk.path(), false)
        .virtio_console(ConsoleOutput::Buffer(hvc.clone()), None)
        .console(ConsoleOutput::Buffer(console.clone()))
        .build()
        .expect("build the Linux VM");
    let t0 = Instant::now();
    vm.start().unwrap();
    let mut to_init = None;
    let mut status_seen = [0u32; 3];
    while vm.exit().is_none() {
        if to_init.is_none() && hvc.text().contains(MARKER) {
            to_init = Some(t0.elapsed());
        }
        for (seen, device) in status_seen.iter_mut().zip(vm.devices()) {
            *seen |= device.status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let exit = vm.wait().unwrap();
    let elapsed = t0.elapsed();
    let text = hvc.text();
    assert!(
        text.contains(MARKER),
        "no {MARKER} on hvc0 ({exit}); hvc0:\n{text}\nttyS0:\n{}",
        console.text()
    );
    assert_eq!(exit, GuestExit::Reset, "console:\n{text}");
    // Linux's virtio-mmio, virtio-rng, virtio-blk and virtio-console drivers found the devices from the command
    // line, negotiated features, set up their queues and went live (ACKNOWLEDGE|DRIVER|FEATURES_OK|
    // DRIVER_OK, never NEEDS_RESET); the kernel resets its devices on the way down, so look at
    // what was seen while it ran.
    assert_eq!(status_seen, [0xf, 0xf, 0xf], "{:?}", vm.devices());
    assert!(
        console.text().contains("Linux version"),
        "the kernel also logs to ttyS0"
    );
    let to_init = to_init.unwrap_or(elapsed).as_secs_f64();
    eprintln!(
        "Linux guest: /init after {to_init:.1} s, shut down after {:.1} s",
        elapsed.as_secs_f64()
    );
}
