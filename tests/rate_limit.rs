//! Rate limits on a running VM's disk: requests beyond the bucket wait, a limit changed at run
//! time applies at once, and fork children and restored snapshots keep the limit. And the
//! receive direction's limit on vsock: what the host sends the guest is paced, none of it lost.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use forkvm::{Bucket, ConsoleBuffer, ConsoleOutput, DeviceKind, RateLimit, Vm, VsockConfig};
use forkvm_tests::{BlkMailbox, read_u64, test_guest_vm, wait_for_output};

/// Asks the guest for a read of its sector and waits up to `wait` for it to take and finish
/// it (it clears the command then); returns whether it did.
fn read_done_within(vm: &Vm, mailbox: u64, wait: Duration) -> bool {
    vm.write_memory(mailbox, &2u64.to_le_bytes()).unwrap();
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if read_u64(vm, mailbox) == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Waits (at most 10 s) for the guest to finish the command it has.
fn wait_served(vm: &Vm, mailbox: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_u64(vm, mailbox) != 0 {
        assert!(Instant::now() < deadline, "the request was served");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn disk_index(vm: &Vm) -> usize {
    vm.devices()
        .iter()
        .position(|d| d.kind == DeviceKind::Block)
        .unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_disk_limit_holds_requests_until_lifted_and_children_and_snapshots_keep_it() {
    let image = forkvm_tests::TempFile::with_contents("rate-limit.img", &[0u8; 64 * 512]);
    let serial = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=blk-mailbox", &serial)
        .block(image.path(), false)
        .build()
        .unwrap();
    vm.start().unwrap();
    let mailbox = BlkMailbox::find(&serial).address();
    let disk = disk_index(&vm);
    assert_eq!(vm.devices()[disk].rate_limit, RateLimit::unlimited());

    // Two requests, refilled over an hour: the third waits.
    let limit = RateLimit {
        bytes: None,
        ops: Some(Bucket::new(2, Duration::from_secs(3600))),
    };
    vm.set_rate_limit(disk, limit).unwrap();
    assert_eq!(vm.devices()[disk].rate_limit, limit);
    assert!(read_done_within(&vm, mailbox, Duration::from_secs(10)));
    assert!(read_done_within(&vm, mailbox, Duration::from_secs(10)));
    assert!(
        !read_done_within(&vm, mailbox, Duration::from_millis(300)),
        "a third request with the bucket empty\n{}",
        serial.text()
    );
    // Lifting the limit serves the waiting request at once (well within the guest driver's
    // 2 s timeout).
    vm.set_rate_limit(disk, RateLimit::unlimited()).unwrap();
    wait_served(&vm, mailbox);
    assert!(read_done_within(&vm, mailbox, Duration::from_secs(10)));

    let bad = RateLimit {
        bytes: Some(Bucket::new(1, Duration::ZERO)),
        ops: None,
    };
    assert_eq!(
        vm.set_rate_limit(disk, bad).unwrap_err().kind(),
        forkvm::ErrorKind::InvalidArgument
    );
    assert_eq!(
        vm.set_rate_limit(99, limit).unwrap_err().kind(),
        forkvm::ErrorKind::NoDevice
    );

    // A child keeps the limit in force at the fork (with full buckets): two requests, then
    // it waits too, until its own limit is lifted; the parent's stays.
    vm.set_rate_limit(disk, limit).unwrap();
    let console = ConsoleBuffer::new();
    let child = vm
        .fork([ConsoleOutput::Buffer(console.clone())])
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(child.devices()[disk].rate_limit, limit);
    assert!(read_done_within(&child, mailbox, Duration::from_secs(10)));
    assert!(read_done_within(&child, mailbox, Duration::from_secs(10)));
    assert!(!read_done_within(
        &child,
        mailbox,
        Duration::from_millis(300)
    ));
    child.set_rate_limit(disk, RateLimit::unlimited()).unwrap();
    wait_served(&child, mailbox);
    assert_eq!(
        vm.devices()[disk].rate_limit,
        limit,
        "the parent's is its own"
    );

    // A snapshot saved to disk keeps it too; the restored VM serves two requests, then waits.
    let dir = std::env::temp_dir().join(format!("forkvm-rate-limit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    vm.snapshot(&dir).unwrap();
    let restored = Vm::restore(&dir, ConsoleOutput::Discard).unwrap();
    assert_eq!(restored.devices()[disk].rate_limit, limit);
    assert!(read_done_within(
        &restored,
        mailbox,
        Duration::from_secs(10)
    ));
    assert!(read_done_within(
        &restored,
        mailbox,
        Duration::from_secs(10)
    ));
    assert!(!read_done_within(
        &restored,
        mailbox,
        Duration::from_millis(300)
    ));
    restored
        .set_rate_limit(disk, RateLimit::unlimited())
        .unwrap();
    wait_served(&restored, mailbox);
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `data` to the guest's echo on `stream` (from another thread) and reads it back;
/// returns what came back and how long it took.
fn echo(stream: &UnixStream, data: &[u8]) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.to_vec();
    let sender = std::thread::spawn(move || writer.write_all(&to_send));
    let mut back = vec![0u8; data.len()];
    let mut reader = stream.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    reader.read_exact(&mut back).expect("read the echo");
    sender.join().unwrap().expect("send to the guest");
    (back, start.elapsed())
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vsock_receive_limit_paces_what_the_host_sends_and_children_and_snapshots_keep_it() {
    let image = forkvm_tests::TempFile::with_contents("rx-limit.img", &[0u8; 64 * 512]);
    let console = ConsoleBuffer::new();
    // 128 KiB a second: 32 KiB refilled every 250 ms.
    let rx = RateLimit {
        bytes: Some(Bucket::new(32 << 10, Duration::from_millis(250))),
        ops: None,
    };
    let vm = test_guest_vm("mode=vsock-listen vsock_port=77", &console)
        .vsock(VsockConfig::new(3).rx_rate_limit(rx))
        .block(image.path(), false)
        .build()
        .unwrap();
    vm.start().unwrap();
    wait_for_output(&console, "vsock-listen: listening on port 77");
    let vsock = vm
        .devices()
        .iter()
        .position(|d| d.kind == DeviceKind::Vsock)
        .unwrap();
    assert_eq!(vm.devices()[vsock].rx_rate_limit, Some(rx));
    assert_eq!(vm.devices()[vsock].rate_limit, RateLimit::unlimited());
    let disk = disk_index(&vm);
    assert_eq!(vm.devices()[disk].rx_rate_limit, None);
    assert_eq!(
        vm.set_rx_rate_limit(disk, rx).unwrap_err().kind(),
        forkvm::ErrorKind::InvalidArgument,
        "a disk has no receive direction"
    );

    // 160 KiB: the bucket's 32 KiB at once, the rest at 128 KiB/s (packet headers add 1%).
    let stream = vm.vsock_connect(77, Duration::from_secs(20)).unwrap();
    let data: Vec<u8> = (0..160u32 << 10)
        .map(|i| i.wrapping_mul(2_654_435_761).rotate_left(7) as u8)
        .collect();
    let (back, limited) = echo(&stream, &data);
    assert!(back == data, "the echo differs");
    assert!(
        limited >= Duration::from_millis(900) && limited < Duration::from_secs(10),
        "160 KiB at 128 KiB/s after a 32 KiB burst took {limited:?}"
    );
    // Lifted at run time: the same again at full speed.
    vm.set_rx_rate_limit(vsock, RateLimit::unlimited()).unwrap();
    let (back, unlimited) = echo(&stream, &data);
    assert!(back == data, "the echo differs");
    assert!(
        unlimited < limited / 2,
        "unlimited {unlimited:?}, limited {limited:?}"
    );

    vm.set_rx_rate_limit(vsock, rx).unwrap();
    let child = vm.fork([ConsoleOutput::Discard]).unwrap().pop().unwrap();
    assert_eq!(child.devices()[vsock].rx_rate_limit, Some(rx));
    drop(child);
    let dir = std::env::temp_dir().join(format!("forkvm-rx-limit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    vm.snapshot(&dir).unwrap();
    let restored = Vm::restore(&dir, ConsoleOutput::Discard).unwrap();
    assert_eq!(restored.devices()[vsock].rx_rate_limit, Some(rx));
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}
