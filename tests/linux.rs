//! A real Linux guest on this host's KVM: the kernel from `guest/kernel/build.sh` and the busybox
//! initramfs from `guest/initramfs/build.sh` boot through the PVH entry; /init prints its marker
//! and reboots, which forkvm reports as a reset. Its kernel drives forkvm's virtio-rng,
//! virtio-blk, virtio-console and virtio-vsock devices; /init's marker arrives through
//! virtio-console (hvc0), then `/bin/device-checks` reads `/dev/hwrng`, writes, remounts and reads
//! back a file on an ext4 disk, and makes a vsock round trip each way: the guest connects to a
//! host listener (a Unix socket in the hybrid style) and the host connects to a guest listener
//! in-process with `Vm::vsock_connect`. Its virtio-balloon driver inflates to the target the host
//! set before the boot.
//!
//! Here guest ring 0 is emulated, so the boot takes ~15–20 s; the build scripts reuse their cache
//! (`scripts/test.sh` builds both before the tests run).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use forkvm::{Balloon, ConsoleBuffer, ConsoleOutput, GuestExit, VmBuilder, Vsock};
use forkvm_tests::{TempFile, built_artifact};

const MARKER: &str = "FORKVM-LINUX-INIT-OK";
/// Host port the guest connects to, and guest port the host connects to (`vsock-check`).
const HOST_PORT: u32 = 5000;
const GUEST_PORT: u32 = 5001;
/// Bytes the host sends for the guest to echo (more than one 64 KiB packet).
const ECHO_BYTES: usize = 100 << 10;
/// Memory the guest is asked to give back through the balloon.
const BALLOON_MIB: u64 = 4;

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
    let sockets = std::env::temp_dir().join(format!("forkvm-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&sockets);
    std::fs::create_dir_all(&sockets).unwrap();
    let uds = sockets.join("v.sock");
    // The guest's connection to host port 5000 reaches this listener.
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    let host_side = std::thread::spawn(move || {
        let (stream, _) = listener.accept()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        (&stream).write_all(b"FORKVM-VSOCK-PONG\n")?;
        Ok::<_, std::io::Error>(line)
    });
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
        .vsock(Vsock::new(3).uds_path(&uds))
        .balloon(Balloon::new().free_page_reporting(true))
        .console(ConsoleOutput::Buffer(console.clone()))
        .build()
        .expect("build the Linux VM");
    // The balloon driver reads the target when it probes and inflates towards it.
    let balloon = vm.balloon().expect("the VM has a balloon");
    balloon.set_target_mib(BALLOON_MIB).unwrap();
    let t0 = Instant::now();
    vm.start().unwrap();
    let mut to_init = None;
    let mut echo = None;
    let mut status_seen = [0u32; 5];
    while vm.exit().is_none() {
        if to_init.is_none() && hvc.text().contains(MARKER) {
            to_init = Some(t0.elapsed());
        }
        if echo.is_none() && hvc.text().contains("FORKVM-VSOCK-TO-HOST-OK") {
            echo = Some(echo_through_guest(&vm));
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
    assert_eq!(status_seen, [0xf; 5], "{:?}", vm.devices());
    // Linux's virtio-balloon driver inflated to the target and said so.
    assert_eq!(balloon.actual_pages(), BALLOON_MIB << 8);
    assert_eq!(balloon.inflated_bytes(), BALLOON_MIB << 20);
    assert_eq!(balloon.rejected_requests(), 0);
    let ping = host_side
        .join()
        .unwrap()
        .expect("the guest's connection to the host");
    assert_eq!(ping, "FORKVM-VSOCK-PING\n");
    assert!(
        text.contains("FORKVM-VSOCK-TO-HOST-OK FORKVM-VSOCK-PONG"),
        "hvc0:\n{text}"
    );
    let echo = echo.expect("the guest's vsock-check reached its listening step");
    assert_eq!(echo.expect("the host's connection to the guest"), pattern());
    assert!(
        text.contains(&format!("FORKVM-VSOCK-FROM-HOST-OK {ECHO_BYTES}")),
        "hvc0:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&sockets);
    assert!(
        console.text().contains("Linux version"),
        "the kernel also logs to ttyS0"
    );
    let to_init = to_init.unwrap_or(elapsed).as_secs_f64();
    eprintln!(
        "Linux guest: /init after {to_init:.1} s, shut down after {:.1} s; balloon: {} KiB \
         inflated, {} KiB of free pages reported",
        elapsed.as_secs_f64(),
        balloon.inflated_bytes() >> 10,
        balloon.reported_bytes() >> 10,
    );
}

fn pattern() -> Vec<u8> {
    (0..ECHO_BYTES).map(|i| (i % 253) as u8).collect()
}

/// Connects to the guest's listener in-process, sends [`pattern`] and reads its echo back.
fn echo_through_guest(vm: &forkvm::Vm) -> std::io::Result<Vec<u8>> {
    let stream = vm
        .vsock_connect(GUEST_PORT, Duration::from_secs(30))
        .map_err(std::io::Error::other)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let reader = {
        let stream = stream.try_clone()?;
        std::thread::spawn(move || {
            let mut echoed = Vec::new();
            (&stream).read_to_end(&mut echoed).map(|_| echoed)
        })
    };
    (&stream).write_all(&pattern())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    reader.join().expect("reader thread")
}
