"""Issue 15's hardening from Python: rate limits on a disk (slower reads, changed at run time,
shown in the device list), vsock and the network; the seccomp policy, per VM and process-wide,
and its denials; the kick signal the program took; snapshot load options."""

import re
import signal
import time
from pathlib import Path

import pytest

import forkvm

from conftest import counter_address, lines, wait_until

# Guest RAM the test guest never uses.
SCRATCH = 24 << 20


def blk_loop_counter(console: forkvm.ConsoleBuffer) -> int:
    """The address `mode=blk-loop` prints its read count at, once it did."""
    for line in lines(console):
        m = re.fullmatch(r"blk-loop counter at 0x([0-9a-f]+)", line)
        if m:
            return int(m.group(1), 16)
    return 0


def reads(vm: forkvm.VM, counter: int) -> int:
    return int.from_bytes(vm.read_memory(counter, 8), "little")


def test_a_rate_limited_disk_reads_slower_until_the_limit_is_lifted(guest: str, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    # 64 KiB a second: 16 reads of 4 KiB (and 16 more from the full bucket at the start).
    limit = forkvm.RateLimit(bytes=forkvm.Bucket(64 * 1024, 1.0))
    console = forkvm.ConsoleBuffer()
    started = time.monotonic()
    with forkvm.VM(
        kernel=guest,
        memory_mib=32,
        cmdline="mode=blk-loop blk_kib=4",
        console=console,
        disks=[forkvm.Disk(image, read_only=True, rate_limit=limit)],
    ) as vm:
        (disk,) = [i for i, d in enumerate(vm.devices) if d.device_type == 2]
        assert vm.devices[disk].rate_limit == limit
        wait_until("the counter's address", lambda: blk_loop_counter(console) != 0)
        counter = blk_loop_counter(console)
        time.sleep(1.0)
        done, took = reads(vm, counter), time.monotonic() - started
        assert 0 < done <= 16 + 16 * took + 16, f"{done} reads in {took:.2f} s"

        vm.set_rate_limit(disk, None)
        assert vm.devices[disk].rate_limit == forkvm.RateLimit()
        assert vm.devices[disk].rate_limit.unlimited
        before = reads(vm, counter)
        time.sleep(0.5)
        assert reads(vm, counter) - before > 50, "unlimited reads run at the host's speed"

        ops = forkvm.RateLimit(ops=forkvm.Bucket(2, 3600.0, one_time_burst=1))
        vm.set_rate_limit(disk, ops)
        shown = vm.devices[disk].rate_limit
        assert shown == ops and shown.bytes is None and shown.ops is not None
        assert (shown.ops.size, shown.ops.refill_time, shown.ops.one_time_burst) == (2, 3600.0, 1)
        assert "Bucket(2, 3600.0, one_time_burst=1)" in repr(vm.devices[disk])
        (child,) = vm.fork(1)
        with child:
            assert child.devices[disk].rate_limit == ops
        with pytest.raises(forkvm.NoDeviceError):
            vm.set_rate_limit(99, None)


def test_vsock_and_network_limits_show_in_the_device_list(guest: str) -> None:
    vsock = forkvm.RateLimit(ops=forkvm.Bucket(100, 0.5))
    net = forkvm.RateLimit(bytes=forkvm.Bucket(1 << 20, 1.0), ops=forkvm.Bucket(1000, 1.0))
    vm = forkvm.VM(
        kernel=guest,
        memory_mib=32,
        cmdline="mode=spin",
        console=None,
        vsock_cid=3,
        vsock_rate_limit=vsock,
        vsock_rx_rate_limit=net,
        network=forkvm.Network(rate_limit=net, rx_rate_limit=vsock),
    )
    limits = {d.device_type: d.rate_limit for d in vm.devices}
    assert limits[19] == vsock and limits[1] == net
    # What the host pushes to the guest has a limit of its own, on net and vsock only.
    rx = {d.device_type: d.rx_rate_limit for d in vm.devices}
    assert rx[19] == net and rx[1] == vsock
    (nic,) = [i for i, d in enumerate(vm.devices) if d.device_type == 1]
    vm.set_rx_rate_limit(nic, None)
    assert vm.devices[nic].rx_rate_limit == forkvm.RateLimit()
    assert vm.devices[nic].rate_limit == net
    assert "rx_rate_limit=RateLimit(bytes=None, ops=None)" in repr(vm.devices[nic])
    vm.close()
    with pytest.raises(ValueError, match="vsock_cid"):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, vsock_rate_limit=vsock)
    with pytest.raises(ValueError, match="vsock_cid"):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, vsock_rx_rate_limit=vsock)
    with forkvm.VM(kernel=guest, memory_mib=32, console=None, rng=True) as plain:
        assert plain.devices[0].rx_rate_limit is None
        with pytest.raises(forkvm.InvalidArgumentError, match="receive direction"):
            plain.set_rx_rate_limit(0, vsock)
        with pytest.raises(forkvm.NoDeviceError):
            plain.set_rx_rate_limit(5, None)


def test_invalid_buckets_are_refused_clearly() -> None:
    with pytest.raises(forkvm.InvalidArgumentError, match="size above 0"):
        forkvm.Bucket(0, 1.0)
    with pytest.raises(forkvm.InvalidArgumentError, match="refill time above 0"):
        forkvm.Bucket(4096, 0.0)
    for size in (-1, 2**64):
        with pytest.raises(OverflowError, match="size must be from 0 to 2\\*\\*64 - 1"):
            forkvm.Bucket(size, 1.0)
    with pytest.raises(OverflowError, match="one_time_burst"):
        forkvm.Bucket(1, 1.0, one_time_burst=-5)
    for refill in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="refill_time"):
            forkvm.Bucket(1, refill)
    with pytest.raises(TypeError):
        forkvm.Bucket("lots", 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        forkvm.RateLimit(bytes=4096)  # type: ignore[arg-type]
    assert forkvm.Bucket(1, 1.0) == forkvm.Bucket(1, 1.0, one_time_burst=0)


def test_seccomp_policy_round_trip_and_denials() -> None:
    assert forkvm.seccomp_policy() == "deny"
    try:
        for policy in ("off", "kill_process", "kill_thread", "deny"):
            forkvm.set_seccomp_policy(policy)  # type: ignore[arg-type]
            assert forkvm.seccomp_policy() == policy
    finally:
        forkvm.set_seccomp_policy("deny")
    with pytest.raises(forkvm.InvalidArgumentError, match="unknown seccomp policy"):
        forkvm.set_seccomp_policy("strict")  # type: ignore[arg-type]
    assert forkvm.seccomp_policy() == "deny"
    denials = forkvm.seccomp_denials()
    counts = (denials.vcpu, denials.event_loop, denials.prepare, denials.reaper, denials.install_failures)
    assert all(isinstance(n, int) and n >= 0 for n in counts)
    assert denials.total == sum(counts[:4])
    assert denials.last_syscall is None if denials.total == 0 else isinstance(denials.last_syscall, int)
    assert repr(denials).startswith("SeccompDenials(total=")


@pytest.mark.parametrize("policy", ["off", "deny"])
def test_a_vm_runs_under_its_own_seccomp_policy(guest: str, policy: str) -> None:
    with forkvm.VM(
        kernel=guest,
        memory_mib=32,
        cmdline="mode=exit exit_code=3",
        debug_exit=True,
        console=None,
        seccomp=policy,  # type: ignore[arg-type]
    ) as vm:
        exit = vm.wait()
        assert (exit.kind, exit.status) == ("powered_off", 3)


def test_a_bad_seccomp_policy_or_kick_signal_is_refused(guest: str) -> None:
    with pytest.raises(forkvm.InvalidArgumentError, match="unknown seccomp policy"):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, seccomp="none")  # type: ignore[arg-type]
    with pytest.raises(forkvm.Error, match="not a real-time signal"):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, kick_signal_offset=1000)
    with pytest.raises(OverflowError):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, kick_signal_offset=2**40)


def test_the_programs_handler_for_the_kick_signal_is_replaced_only_when_allowed(guest: str) -> None:
    # SIGRTMIN+5, not forkvm's default SIGRTMIN+2, which the other VMs of this process use.
    sig = signal.SIGRTMIN + 5
    signal.signal(sig, lambda *_: None)
    try:
        with pytest.raises(forkvm.InvalidArgumentError, match="replace_signal_handler"):
            forkvm.VM(kernel=guest, memory_mib=32, console=None, kick_signal_offset=5)
        with forkvm.VM(
            kernel=guest,
            memory_mib=32,
            cmdline="mode=exit exit_code=3",
            debug_exit=True,
            console=None,
            kick_signal_offset=5,
            replace_signal_handler=True,
        ) as vm:
            assert vm.wait().status == 3
    finally:
        assert forkvm.wait_for_releases(60)
        signal.signal(sig, signal.SIG_DFL)


def test_load_options_verify_the_memory_and_copy_it(guest: str, tmp_path: Path) -> None:
    console = forkvm.ConsoleBuffer()
    snap = tmp_path / "snap"
    with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=console) as vm:
        wait_until("the counter's address", lambda: counter_address(console) != 0)
        vm.write_memory(SCRATCH, (7).to_bytes(8, "little"))
        vm.snapshot(snap)
    counter = counter_address(console)
    # One flipped word of memory: valid for a plain load, damaged when the data is verified.
    with open(snap / "memory", "r+b") as memory:
        memory.seek(SCRATCH)
        memory.write((9).to_bytes(8, "little"))
    with forkvm.VM.restore(snap, None) as restored:
        assert restored.read_memory(SCRATCH, 8) == (9).to_bytes(8, "little")
    with pytest.raises(forkvm.SnapshotError, match="damaged"):
        forkvm.VM.restore(snap, None, verify_data=True)
    with forkvm.VM.restore(snap, None, copy_memory=True) as copied:
        assert copied.read_memory(SCRATCH, 8) == (9).to_bytes(8, "little")
        first = copied.read_memory(counter, 8)
        wait_until("the copied VM runs", lambda: copied.read_memory(counter, 8) != first)
    with pytest.raises(TypeError):
        forkvm.VM.restore(snap, None, verify_data="yes")  # type: ignore[arg-type]
