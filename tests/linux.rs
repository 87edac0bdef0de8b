//! A real Linux guest on this host's KVM: the kernel from `guest/kernel/build.sh` and the busybox
//! initramfs from `guest/initramfs/build.sh` boot through the PVH entry; /init prints its marker
//! and reboots, which forkvm reports as a reset. Its kernel drives forkvm's virtio-rng device.
//!
//! Here guest ring 0 is emulated, so the boot takes ~15–20 s; the build scripts reuse their cache
//! (`scripts/test.sh` builds both before the tests run).

use std::time::Instant;

use forkvm::{ConsoleBuffer, ConsoleOutput, GuestExit, VmBuilder};
use forkvm_tests::built_artifact;

const MARKER: &str = "FORKVM-LINUX-INIT-OK";

#[test]
fn linux_boots_to_init_and_shuts_down() {
    let kernel = built_artifact("guest/kernel/build.sh");
    let initramfs = built_artifact("guest/initramfs/build.sh");
    let console = ConsoleBuffer::new();
    let vm = VmBuilder::new()
        .kernel(&kernel)
        .initrd(&initramfs)
        .cmdline("console=ttyS0")
        .memory_mib(128)
        .rng()
        .console(ConsoleOutput::Buffer(console.clone()))
        .build()
        .expect("build the Linux VM");
    let t0 = Instant::now();
    vm.start().unwrap();
    let exit = vm.wait().unwrap();
    let elapsed = t0.elapsed();
    let text = console.text();
    assert!(
        text.contains(MARKER),
        "no {MARKER} on the console ({exit}); console:\n{text}"
    );
    assert_eq!(exit, GuestExit::Reset, "console:\n{text}");
    eprintln!(
        "Linux guest: booted to /init and shut down in {:.1} s",
        elapsed.as_secs_f64()
    );
}
