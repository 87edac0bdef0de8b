//! Forking test guests that have virtio devices: each child gets its own copy of every device,
//! at the same place, with its queues where the driver left them.

use std::io::Write;
use std::time::Duration;

use forkvm::{BalloonConfig, Child, ConsoleBuffer, ConsoleInput, ConsoleOutput, Vm, VsockConfig};
use forkvm_tests::{BlkMailbox, assert_exits_ok, test_guest_vm, wait_for_output};

const TIMEOUT: Duration = Duration::from_secs(20);

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn children_have_copies_of_every_device_in_the_same_place() {
    let serial = ConsoleBuffer::new();
    let parent = test_guest_vm("mode=spin", &serial)
        .rng()
        .virtio_console(ConsoleOutput::Discard, None)
        .vsock(VsockConfig::new(3))
        .balloon(BalloonConfig::new())
        .build()
        .unwrap();
    parent.start().unwrap();
    wait_for_output(&serial, "spinning");
    parent.balloon().unwrap().set_target_mib(2).unwrap();
    let children = parent
        .fork([ConsoleOutput::Discard, ConsoleOutput::Discard])
        .unwrap();
    for child in &children {
        assert_eq!(child.devices(), parent.devices());
        let balloon = child.balloon().expect("the child's balloon");
        assert_eq!(balloon.target_pages(), 512, "the target is carried over");
        // The child's handle is its own.
        balloon.set_target_mib(1).unwrap();
        assert_eq!(parent.balloon().unwrap().target_pages(), 512);
        assert_eq!(child.exit(), None);
    }
    assert!(!parent.is_paused());
}

/// Starts the console-echo guest, waits for its banner, forks it into children whose virtio
/// consoles have their own input pipes and outputs, and checks that every VM (the parent too)
/// echoes exactly its own input.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_virtio_console_continues_in_every_child_with_its_own_host_end() {
    let serial = ConsoleBuffer::new();
    let hvc = ConsoleBuffer::new();
    let (reader, mut writer) = std::io::pipe().unwrap();
    let parent = test_guest_vm("mode=virtio-console", &serial)
        .virtio_console(
            ConsoleOutput::Buffer(hvc.clone()),
            Some(ConsoleInput::Fd(reader.into())),
        )
        .build()
        .unwrap();
    parent.start().unwrap();
    wait_for_output(&hvc, "virtio-console ready\n");
    // Typed before the fork, taken by nobody yet: every VM gets it.
    writer.write_all(b"before ").unwrap();
    let mut ends = Vec::new();
    let children = parent
        .fork((0..2).map(|i| {
            let (serial, hvc) = (ConsoleBuffer::new(), ConsoleBuffer::new());
            let (reader, writer) = std::io::pipe().unwrap();
            ends.push((serial.clone(), hvc.clone(), writer, i));
            Child::new(ConsoleOutput::Buffer(serial)).virtio_console(
                ConsoleOutput::Buffer(hvc),
                Some(ConsoleInput::Fd(reader.into())),
            )
        }))
        .unwrap();
    writer.write_all(b"parent\x04").unwrap();
    for (_, _, writer, i) in &mut ends {
        writer
            .write_all(format!("child {i}\x04").as_bytes())
            .unwrap();
    }
    assert_exits_ok(&parent, &serial);
    for ((serial, hvc, _, i), child) in ends.iter().zip(&children) {
        assert_exits_ok(child, serial);
        let echo = hvc.text();
        assert!(
            echo.ends_with(&format!("CHILD {i}")) && !echo.contains("PARENT"),
            "child {i} echoed {echo:?}"
        );
        assert!(
            !echo.contains("ready"),
            "the banner went out before the fork"
        );
    }
    let echo = hvc.text();
    assert!(
        echo.ends_with("PARENT") && !echo.contains("CHILD"),
        "{echo:?}"
    );
}

/// A guest holding a vsock connection is forked: each child's guest receives a transport reset
/// and loses the connection, while the parent's connection carries on.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn vsock_connections_end_in_children_with_a_transport_reset_and_survive_in_the_parent() {
    let serial = ConsoleBuffer::new();
    let socket =
        std::env::temp_dir().join(format!("forkvm-fork-vsock-{}.sock", std::process::id()));
    let parent = test_guest_vm("mode=vsock-listen vsock_port=77", &serial)
        .vsock(VsockConfig::new(3))
        .build()
        .unwrap();
    parent.start().unwrap();
    wait_for_output(&serial, "vsock-listen: listening on port 77");
    let mut stream = parent.vsock_connect(77, TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let echo = |stream: &mut std::os::unix::net::UnixStream, data: &[u8]| {
        stream.write_all(data).unwrap();
        let mut got = vec![0; data.len()];
        std::io::Read::read_exact(stream, &mut got).unwrap();
        assert_eq!(got, data);
    };
    echo(&mut stream, b"before the fork");

    let consoles = [ConsoleBuffer::new(), ConsoleBuffer::new()];
    let children = parent
        .fork(consoles.iter().enumerate().map(|(i, c)| {
            let child = Child::new(ConsoleOutput::Buffer(c.clone()));
            if i == 0 {
                child.vsock_uds_path(&socket)
            } else {
                child
            }
        }))
        .unwrap();
    assert!(socket.exists(), "the first child listens on its own socket");
    for (child, console) in children.iter().zip(&consoles) {
        assert_exits_ok(child, console);
        let text = console.text();
        assert!(
            text.contains("vsock: event 0\n"),
            "no transport reset: {text}"
        );
        assert!(
            text.contains("vsock-listen: reset by the host after echoing 15 bytes"),
            "{text}"
        );
    }
    drop(children);
    assert!(!socket.exists(), "the child's socket is removed with it");
    echo(&mut stream, b"after the fork, still the parent's");
    drop(stream);
    assert_exits_ok(&parent, &serial);
    let text = serial.text();
    assert!(!text.contains("vsock: event"), "{text}");
    assert!(
        text.contains("after 49 bytes echoed") || text.contains("echoing 49 bytes"),
        "{text}"
    );
}

/// A disk image of 64 sectors, sector `n` filled with byte `n`.
fn disk_image(name: &str) -> forkvm_tests::TempFile {
    let bytes: Vec<u8> = (0..64 * 512).map(|i| (i / 512) as u8).collect();
    forkvm_tests::TempFile::with_contents(name, &bytes)
}

/// The first 8 bytes of sector 2 of the image at `path`.
fn sector_2(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u64::from_le_bytes(bytes[1024..1032].try_into().unwrap())
}

/// The parent and two children (one prepared ahead, one not; and a grandchild) write their own
/// value into the same sector of their disk, in turns the host orders; each reads back only its own, the parent's reach its
/// image file, the children's never do.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn block_devices_fork_copy_on_write_at_any_depth() {
    let image = disk_image("fork.img");
    let serial = ConsoleBuffer::new();
    let parent = test_guest_vm("mode=blk-mailbox", &serial)
        .block(image.path(), false)
        .build()
        .unwrap();
    parent.start().unwrap();
    let mailbox = BlkMailbox::find(&serial);
    mailbox.write(&parent, &serial, 0x1111);
    assert_eq!(sector_2(image.path()), 0x1111);

    // One child prepared ahead (its overlay file made then), one not.
    parent.prepare_forks(1).unwrap();
    let consoles = [ConsoleBuffer::new(), ConsoleBuffer::new()];
    let children = parent
        .fork(consoles.iter().map(|c| ConsoleOutput::Buffer(c.clone())))
        .unwrap();
    assert_eq!(parent.prepared_forks(), 0);
    let vms: Vec<(&Vm, &ConsoleBuffer)> = std::iter::once((&parent, &serial))
        .chain(children.iter().zip(&consoles))
        .collect();
    for (vm, console) in &vms {
        assert_eq!(mailbox.read(vm, console), 0x1111, "the disk at the fork");
    }
    for (i, (vm, console)) in vms.iter().enumerate() {
        mailbox.write(vm, console, 0xa000 + i as u64);
    }
    for (i, (vm, console)) in vms.iter().enumerate() {
        assert_eq!(mailbox.read(vm, console), 0xa000 + i as u64);
    }
    assert_eq!(
        sector_2(image.path()),
        0xa000,
        "only the parent writes its image"
    );

    let g_console = ConsoleBuffer::new();
    let grandchild = children[0]
        .fork([ConsoleOutput::Buffer(g_console.clone())])
        .unwrap()
        .remove(0);
    mailbox.write(&children[0], &consoles[0], 0xdddd);
    assert_eq!(mailbox.read(&grandchild, &g_console), 0xa001);
    mailbox.write(&grandchild, &g_console, 0xeeee);
    assert_eq!(mailbox.read(&children[0], &consoles[0]), 0xdddd);
    assert_eq!(mailbox.read(&children[1], &consoles[1]), 0xa002);
    assert_eq!(mailbox.read(&parent, &serial), 0xa000);
    for (vm, console) in vms.iter().chain([&(&grandchild, &g_console)]) {
        mailbox.exit(vm);
        assert_exits_ok(vm, console);
    }
    assert_eq!(sector_2(image.path()), 0xa000);
}
