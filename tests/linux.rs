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

use forkvm::{BalloonConfig, ConsoleBuffer, ConsoleOutput, GuestExit, VmBuilder, VsockConfig};
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
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
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
        .vsock(VsockConfig::new(3).uds_path(&uds))
        .balloon(BalloonConfig::new().free_page_reporting(true))
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
    let mut balloon_seen = 0;
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
        balloon_seen = balloon_seen.max(balloon.actual_pages());
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
    // Linux's virtio-balloon driver inflated to the target and said so (while it ran: newer 6.1
    // stable kernels reset virtio devices at shutdown, and a reset balloon's size is 0).
    assert_eq!(balloon_seen, BALLOON_MIB << 8);
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

/// Boots Linux with a shell reading commands from hvc0, forks it while the shell waits for
/// input, and runs a command in each child (and the parent) through its own virtio console: each
/// answers on its own console only, reads its own entropy from virtio-rng, and ends on its own.
/// (Entropy the guest buffered before the fork is the same in every child: reseeding the guest's
/// RNG after a fork is the guest agent's job, told by the identity page.)
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_booted_linux_guest_forks_and_each_child_runs_its_own_command() {
    let kernel = built_artifact("guest/kernel/build.sh");
    let initramfs = built_artifact("guest/initramfs/build.sh");
    let hvc = ConsoleBuffer::new();
    let (reader, mut input) = std::io::pipe().unwrap();
    let parent = VmBuilder::new()
        .kernel(&kernel)
        .initrd(&initramfs)
        // /init runs `sh` on hvc0 (its /dev/console) before it ends the VM.
        .cmdline("console=ttyS0 console=hvc0 forkvm.init=sh")
        .memory_mib(128)
        .rng()
        .virtio_console(
            ConsoleOutput::Buffer(hvc.clone()),
            Some(forkvm::ConsoleInput::Fd(reader.into())),
        )
        .vsock(VsockConfig::new(3))
        .console(ConsoleOutput::Discard)
        .build()
        .expect("build the Linux VM");
    parent.start().unwrap();
    // Input typed before the shell opens its terminal would be lost: wait for its prompt. The
    // terminal echoes what is typed, so the markers are computed by the shell.
    wait_for_text(&parent, &hvc, "/ # ");
    input.write_all(b"echo shell-$((6*7))\n").unwrap();
    wait_for_text(&parent, &hvc, "shell-42");
    // Let the shell get back to reading its input.
    std::thread::sleep(Duration::from_millis(500));

    let mut ends = Vec::new();
    let children = parent
        .fork((0..2).map(|i| {
            let hvc = ConsoleBuffer::new();
            let (reader, writer) = std::io::pipe().unwrap();
            ends.push((hvc.clone(), writer, i));
            forkvm::Child::new(ConsoleOutput::Discard).virtio_console(
                ConsoleOutput::Buffer(hvc),
                Some(forkvm::ConsoleInput::Fd(reader.into())),
            )
        }))
        .unwrap();
    // The guest's virtio-rng driver and hwrng core buffer entropy ahead of reads, and that
    // buffer is copied into every child with the rest of memory: look at bytes past it, which
    // come from each VM's own device.
    let command = |n: u32| {
        format!("echo child-$(({n}+100)); head -c 512 /dev/hwrng | tail -c 8 | od -An -tx1; exit\n")
    };
    input.write_all(command(0).as_bytes()).unwrap();
    for (_, writer, i) in &mut ends {
        writer.write_all(command(*i + 1).as_bytes()).unwrap();
    }
    let mut entropy = Vec::new();
    for (n, (vm, hvc)) in std::iter::once((&parent, &hvc))
        .chain(children.iter().zip(ends.iter().map(|(hvc, _, _)| hvc)))
        .enumerate()
    {
        let mine = format!("child-{}", n + 100);
        wait_for_text(vm, hvc, &mine);
        assert_eq!(vm.wait().unwrap(), GuestExit::Reset, "{}", hvc.text());
        let text = hvc.text();
        for other in (100..103).filter(|&o| o != n + 100) {
            assert!(!text.contains(&format!("child-{other}\r")), "{text}");
        }
        let after = text
            .rsplit(&format!("{mine}\r\n"))
            .next()
            .unwrap_or_default();
        let hex = after.lines().next().unwrap_or_default().trim().to_owned();
        assert_eq!(hex.split(' ').count(), 8, "8 bytes from /dev/hwrng: {text}");
        entropy.push(hex);
    }
    entropy.sort();
    entropy.dedup();
    assert_eq!(
        entropy.len(),
        3,
        "each VM read its own entropy: {entropy:?}"
    );
}

/// Waits (at most 120 s: every process spawn in this guest is slow here) for `needle` on
/// `console` while `vm` runs.
fn wait_for_text(vm: &forkvm::Vm, console: &ConsoleBuffer, needle: &str) {
    let t0 = Instant::now();
    while !console.text().contains(needle) {
        assert!(
            vm.exit().is_none() && t0.elapsed() < Duration::from_secs(120),
            "no {needle:?} ({:?}); console:\n{}",
            vm.exit(),
            console.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
