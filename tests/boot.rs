//! The test guest and generated images boot through each entry path on this host's KVM and end
//! the way they ask to.

use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, ConsoleInput, ConsoleOutput, GuestExit, VmBuilder};
use forkvm_tests::{
    REPORT_RSI, TempFile, fake_bzimage, fake_elf, run_image, run_test_guest, test_guest,
    test_guest_vm, wait_for_output,
};

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn test_guest_boots_through_pvh_takes_timer_interrupts_and_checks_memory() {
    let (exit, console) = run_test_guest("mode=exit");
    assert_eq!(
        exit,
        GuestExit::PoweredOff { status: Some(0) },
        "console:\n{console}"
    );
    assert!(console.starts_with("forkvm test guest\n"), "{console}");
    for line in ["ticks ok", "memcheck ok 8 MiB", "test guest: done"] {
        assert!(console.contains(line), "missing {line:?} in:\n{console}");
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn guest_status_reaches_the_host() {
    let (exit, _) = run_test_guest("mode=exit memcheck=1 exit_code=42");
    assert_eq!(exit, GuestExit::PoweredOff { status: Some(42) });
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn i8042_reset_ends_the_vm_as_reset() {
    let (exit, console) = run_test_guest("mode=reset");
    assert_eq!(exit, GuestExit::Reset, "{console}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn triple_fault_is_reported_with_registers() {
    let (exit, console) = run_test_guest("mode=triple-fault");
    let GuestExit::TripleFault { vcpu, registers } = exit else {
        panic!("{exit:?}\n{console}")
    };
    assert_eq!(vcpu, 0);
    let registers = registers.expect("registers at the fault");
    assert_eq!(registers.cs & 3, 3, "the fault was raised in ring 3");
    assert_ne!(registers.efer & (1 << 10), 0, "in long mode");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn without_debug_exit_the_guest_falls_back_to_reset() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=exit memcheck=1", &console)
        .debug_exit(false)
        .build()
        .unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait().unwrap(), GuestExit::Reset, "{}", console.text());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn bzimage_boots_through_the_64_bit_protocol_with_the_zero_page_in_rsi() {
    let exit = run_image("bzImage", &fake_bzimage(&REPORT_RSI));
    assert_eq!(
        exit,
        GuestExit::PoweredOff {
            status: Some(forkvm::ZERO_PAGE_ADDR as u32)
        }
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn elf_without_pvh_note_boots_through_the_64_bit_protocol() {
    let exit = run_image("vmlinux", &fake_elf(0x20_0000, &REPORT_RSI, 0));
    assert_eq!(
        exit,
        GuestExit::PoweredOff {
            status: Some(forkvm::ZERO_PAGE_ADDR as u32)
        }
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memory_above_the_mmio_hole_boots() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=exit memcheck=1", &console)
        .memory_mib(4096 + 64)
        .build()
        .unwrap();
    assert_eq!(vm.memory_size(), (4096 + 64) << 20);
    assert_succeeds(&vm, &console);
}

/// Runs a built test-guest VM and checks it ends with status 0.
fn assert_succeeds(vm: &forkvm::Vm, console: &ConsoleBuffer) {
    vm.start().unwrap();
    assert_eq!(
        vm.wait().unwrap(),
        GuestExit::PoweredOff { status: Some(0) },
        "{}",
        console.text()
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn several_vcpus_boot_with_an_mp_table() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=exit memcheck=1", &console)
        .vcpus(4)
        .build()
        .unwrap();
    assert_succeeds(&vm, &console);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn serial_input_reaches_the_guest_and_its_echo_comes_back() {
    let console = ConsoleBuffer::new();
    let (vm, writer) = forkvm_tests::echo_guest(&console);
    // More than the UART's 64-byte FIFO, so input must pause and resume.
    let input: String = (0..200)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .filter(|c| *c != 'q')
        .collect();
    std::io::Write::write_all(&mut &writer, format!("{input}q").as_bytes()).unwrap();
    assert_eq!(
        vm.wait().unwrap(),
        GuestExit::PoweredOff { status: Some(0) }
    );
    let text = console.text();
    assert!(text.contains(&format!("{input}q")), "{text}");
    assert!(text.contains("echo done"), "{text}");
}

/// Runs `mode=virtio-console` with about 10 KiB of numbered lines (many times the guest's
/// 256-byte receive buffers, so the input is split across dozens of them) and the 0x04
/// terminator on the virtio-console's input, written before `start()` (before the guest has
/// any receive buffer) or once the guest's banner arrived; checks that the guest's echo, its
/// input upper-cased, came back complete and in order after the banner.
fn virtio_console_echoes(input_before_start: bool) {
    const BANNER: &str = "virtio-console ready\n";
    let input: String = (0..270)
        .map(|i| format!("line {i:05} abcdefghijklmnopqrstuvwxyz\n"))
        .collect();
    let mut bytes = input.clone().into_bytes();
    bytes.push(0x04);
    let (reader, writer) = std::io::pipe().unwrap();
    let serial = ConsoleBuffer::new();
    let hvc = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=virtio-console", &serial)
        .virtio_console(
            ConsoleOutput::Buffer(hvc.clone()),
            Some(ConsoleInput::Fd(reader.into())),
        )
        .build()
        .unwrap();
    // The pipe holds 64 KiB, so neither write blocks.
    if input_before_start {
        std::io::Write::write_all(&mut &writer, &bytes).unwrap();
    }
    vm.start().unwrap();
    if !input_before_start {
        wait_for_output(&hvc, BANNER);
        std::io::Write::write_all(&mut &writer, &bytes).unwrap();
    }
    let exit = vm.wait().unwrap();
    let (serial, hvc) = (serial.text(), hvc.contents());
    let echo = hvc.strip_prefix(BANNER.as_bytes()).unwrap_or_else(|| {
        panic!(
            "exit {exit:?}; the virtio console does not start with the banner:\n{}\n\
             serial:\n{serial}",
            String::from_utf8_lossy(&hvc)
        )
    });
    let expected = input.to_uppercase().into_bytes();
    if echo != expected {
        let at = echo
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(echo.len().min(expected.len()));
        let around = |b: &[u8]| {
            String::from_utf8_lossy(&b[at.saturating_sub(40).min(b.len())..b.len().min(at + 40)])
                .into_owned()
        };
        panic!(
            "exit {exit:?}; the echo ({} of {} bytes) differs from byte {at}:\n got {:?}\nwant \
             {:?}\nserial:\n{serial}",
            echo.len(),
            expected.len(),
            around(echo),
            around(&expected),
        );
    }
    assert_eq!(exit, GuestExit::PoweredOff { status: Some(0) }, "{serial}");
    assert!(
        serial.contains(&format!("virtio-console ok echoed={}", input.len())),
        "{serial}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_console_input_reaches_the_guest_and_its_echo_comes_back() {
    virtio_console_echoes(false);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_console_input_sent_before_the_guest_has_buffers_is_not_lost() {
    virtio_console_echoes(true);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn console_goes_to_a_file_or_a_callback() {
    let file = TempFile::with_contents("console.log", b"");
    let vm = VmBuilder::new()
        .kernel(test_guest())
        .memory_mib(32)
        .cmdline("mode=exit memcheck=1")
        .debug_exit(true)
        .console(ConsoleOutput::File(file.path().to_owned()))
        .build()
        .unwrap();
    vm.start().unwrap();
    vm.wait().unwrap();
    assert!(
        std::fs::read_to_string(file.path())
            .unwrap()
            .starts_with("forkvm test guest\n")
    );

    let (sender, receiver) = std::sync::mpsc::channel();
    let vm = VmBuilder::new()
        .kernel(test_guest())
        .memory_mib(32)
        .cmdline("mode=exit memcheck=1")
        .debug_exit(true)
        .console(ConsoleOutput::Callback(Box::new(move |bytes| {
            sender.send(bytes.to_vec()).unwrap()
        })))
        .build()
        .unwrap();
    vm.start().unwrap();
    vm.wait().unwrap();
    drop(vm);
    let text: Vec<u8> = receiver.iter().flatten().collect();
    assert!(text.starts_with(b"forkvm test guest\n"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn stop_ends_a_spinning_guest() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=spin", &console)
        .vcpus(2)
        .build()
        .unwrap();
    vm.start().unwrap();
    forkvm_tests::wait_for_output(&console, "spinning");
    assert_eq!(vm.exit(), None);
    assert_eq!(vm.stop(), GuestExit::Stopped);
    assert_eq!(
        vm.wait().unwrap(),
        GuestExit::Stopped,
        "waiting again returns the same end"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn stop_from_another_thread_ends_a_halted_guest_and_wakes_the_waiter() {
    let console = ConsoleBuffer::new();
    let vm = std::sync::Arc::new(test_guest_vm("mode=halt", &console).build().unwrap());
    vm.start().unwrap();
    forkvm_tests::wait_for_output(&console, "halting");
    let waiter = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.wait().unwrap())
    };
    let stopper = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.stop())
    };
    assert_eq!(stopper.join().unwrap(), GuestExit::Stopped);
    assert_eq!(waiter.join().unwrap(), GuestExit::Stopped);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dropping_a_running_vm_stops_it() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=spin", &console).build().unwrap();
    vm.start().unwrap();
    forkvm_tests::wait_for_output(&console, "spinning");
    drop(vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn lifecycle_misuse_is_an_error() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=exit memcheck=1", &console)
        .build()
        .unwrap();
    assert!(matches!(vm.wait(), Err(forkvm::Error::NotStarted)));
    vm.start().unwrap();
    assert!(matches!(vm.start(), Err(forkvm::Error::AlreadyStarted)));
    vm.wait().unwrap();
    let stopped_early = test_guest_vm("mode=exit", &console).build().unwrap();
    assert_eq!(stopped_early.stop(), GuestExit::Stopped);
    assert!(matches!(
        stopped_early.start(),
        Err(forkvm::Error::AlreadyStarted)
    ));
}

#[test]
fn the_vm_handle_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<forkvm::Vm>();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn generated_pvh_image_runs_its_first_instruction() {
    let exit = run_image(
        "pvh",
        &forkvm_tests::fake_pvh_elf(0x10_0000, &forkvm_tests::EXIT_AT_ONCE),
    );
    assert_eq!(exit, GuestExit::PoweredOff { status: Some(0) });
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn test_guest_reads_entropy_from_virtio_rng() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=virtio-rng", &console)
        .rng()
        .build()
        .unwrap();
    let devices = vm.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(
        (
            devices[0].kind.virtio_id(),
            devices[0].mmio_base,
            devices[0].irq
        ),
        (4, 0xd000_0000, 5)
    );
    assert_eq!(devices[0].status, 0, "no driver yet");
    assert!(vm.balloon().is_none(), "no balloon unless asked for");
    assert_succeeds(&vm, &console);
    assert!(
        console.text().contains("virtio-rng ok"),
        "{}",
        console.text()
    );
    assert_eq!(
        vm.devices()[0].status,
        0xf,
        "the driver brought the device live"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn test_guest_writes_and_reads_back_a_sector_over_virtio_blk() {
    // 1 MiB image whose sector 5 starts with 0xa5.
    let mut bytes = vec![0u8; 1 << 20];
    bytes[5 * 512] = 0xa5;
    let disk = TempFile::with_contents("boot-disk", &bytes);
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=virtio-blk blk_sector=5 blk_expect=a5", &console)
        .block(disk.path(), false)
        .build()
        .unwrap();
    assert_succeeds(&vm, &console);
    assert!(
        console
            .text()
            .contains("virtio-blk ok capacity=2048 id=forkvm-disk-0"),
        "{}",
        console.text()
    );
    let written = std::fs::read(disk.path()).unwrap();
    assert_ne!(
        written[5 * 512..6 * 512],
        bytes[5 * 512..6 * 512],
        "the guest's pattern reached the image"
    );
    assert_eq!(written[6 * 512..], bytes[6 * 512..], "nothing else changed");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn direct_io_disk_works_end_to_end() {
    let disk = TempFile::with_contents("boot-disk-direct", &vec![0u8; 1 << 20]);
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=virtio-blk", &console)
        .disk(forkvm::DiskConfig::new(disk.path()).direct_io(true))
        .build()
        .unwrap();
    assert_succeeds(&vm, &console);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn read_only_disk_refuses_the_guests_write() {
    let disk = TempFile::with_contents("boot-disk-ro", &vec![0x3cu8; 1 << 20]);
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=virtio-blk blk_readonly=1 blk_expect=3c", &console)
        .block(disk.path(), true)
        .build()
        .unwrap();
    assert_succeeds(&vm, &console);
    assert!(
        std::fs::read(disk.path())
            .unwrap()
            .iter()
            .all(|b| *b == 0x3c)
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn test_guest_inflates_the_balloon_and_the_host_gets_the_memory_back() {
    const TOUCHED: u64 = 512;
    const TARGET: u64 = 384;
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm(
        &format!("mode=virtio-balloon balloon_pages={TOUCHED}"),
        &console,
    )
    .balloon(forkvm::BalloonConfig::new())
    .build()
    .unwrap();
    assert_eq!(vm.devices()[0].kind, forkvm::DeviceKind::Balloon);
    let balloon = vm.balloon().expect("the VM has a balloon").clone();
    vm.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !console.text().contains("touched") {
        assert!(
            Instant::now() < deadline && vm.exit().is_none(),
            "the guest never touched its pages:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = vm.memory_allocated_bytes().unwrap();
    balloon.set_target_pages(TARGET).unwrap();
    assert_eq!(
        vm.wait().unwrap(),
        GuestExit::PoweredOff { status: Some(0) },
        "{}",
        console.text()
    );
    let after = vm.memory_allocated_bytes().unwrap();
    let expected = TARGET * 4096;
    assert_eq!(balloon.actual_pages(), TARGET, "{}", console.text());
    assert_eq!(balloon.inflated_bytes(), expected);
    assert_eq!(balloon.rejected_requests(), 0);
    let freed = before.saturating_sub(after);
    assert!(
        freed <= expected && freed + (64 << 10) >= expected,
        "{before} bytes backed the guest before, {after} after: {freed} freed, {expected} expected"
    );
    assert!(console.text().contains("virtio-balloon ok inflated=384"));
}
