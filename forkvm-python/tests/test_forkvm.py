"""forkvm's Python binding on the freestanding test guest: the end-to-end scenario every
binding runs, device and life-cycle calls, misuse, threads and asyncio."""

import asyncio
import gc
import inspect
import os
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest

import forkvm

from conftest import counter_address, generation_lines, lines, resources, wait_until

# Guest RAM the test guest never uses (it lives in its first MiBs): room for host writes.
SCRATCH = 24 << 20


def id_of(vm: forkvm.VM) -> int:
    """The VM id as the guest prints it: its first 8 bytes, little-endian."""
    return int.from_bytes(vm.identity.id[:8], "little")


def test_build_start_banner_fork_into_3_isolation_stop_and_nothing_leaks(guest: str) -> None:
    gc.collect()
    before = resources()
    console = forkvm.ConsoleBuffer()
    with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=generation", console=console) as vm:
        wait_until("the banner", lambda: "forkvm test guest" in lines(console))
        wait_until("generation 0", lambda: len(generation_lines(console)) == 1)
        assert generation_lines(console) == [(0, id_of(vm))]
        assert vm.identity.generation == 0

        consoles = [forkvm.ConsoleBuffer() for _ in range(3)]
        children = vm.fork(consoles)
        assert len(children) == 3
        wait_until("the children's generation lines", lambda: all(generation_lines(out) for out in consoles))
        for child, out in zip(children, consoles):
            assert generation_lines(out) == [(1, id_of(child))]
            assert child.identity.generation == 1
        assert len({id_of(c) for c in children} | {id_of(vm)}) == 4
        time.sleep(0.05)
        assert generation_lines(console) == [(0, id_of(vm))], "the parent printed more"

        # Memory: each VM's writes are its own.
        for i, child in enumerate(children):
            child.write_memory(SCRATCH, b"child %d" % i)
        for i, child in enumerate(children):
            assert child.read_memory(SCRATCH, 7) == b"child %d" % i
        assert vm.read_memory(SCRATCH, 7) == bytes(7)

        for child in children:
            assert child.stop().kind == "stopped"
            child.close()
        exit = vm.stop()
        assert exit.kind == "stopped" and str(exit) == "stopped by the host"
    assert vm.closed
    del vm, children, child
    gc.collect()
    assert resources() == before, "threads or fds leaked (threads, fds)"


def test_wait_reports_the_debug_exit_status(guest: str) -> None:
    with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=exit exit_code=7", debug_exit=True, console=None) as vm:
        exit = vm.wait()
        assert (exit.kind, exit.status) == ("powered_off", 7)
        assert vm.exit == exit
        assert "status 7" in str(exit)


def test_pause_resume_and_memory(guest: str) -> None:
    console = forkvm.ConsoleBuffer()
    with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=console) as vm:
        wait_until("the counter", lambda: counter_address(console) != 0)
        addr = counter_address(console)
        read = lambda: int.from_bytes(vm.read_memory(addr, 8), "little")  # noqa: E731
        wait_until("the guest counts", lambda: read() > 0)
        vm.pause()
        assert vm.is_paused
        frozen = read()
        time.sleep(0.02)
        assert read() == frozen
        vm.resume()
        assert not vm.is_paused
        wait_until("the guest counts again", lambda: read() > frozen)


def test_snapshot_and_restore(guest: str, tmp_path: Path) -> None:
    console = forkvm.ConsoleBuffer()
    with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=generation", console=console) as vm:
        wait_until("generation 0", lambda: bool(generation_lines(console)))
        vm.snapshot(tmp_path / "snap")
        assert vm.last_pause is not None and vm.last_pause > 0
    restored_console = forkvm.ConsoleBuffer()
    with forkvm.VM.restore(tmp_path / "snap", console=forkvm.Child(restored_console)) as restored:
        wait_until("the restored VM's line", lambda: bool(generation_lines(restored_console)))
        assert generation_lines(restored_console)[-1] == (1, id_of(restored))
    with pytest.raises(forkvm.SnapshotError):
        forkvm.VM.restore(tmp_path, console=None)
    again = asyncio.run(forkvm.VM.restore_async(tmp_path / "snap", console=None))
    assert again.identity.generation == 1
    again.close()
    # Kept ready: restores start in children made ahead, refilled after each.
    assert forkvm.VM.restores_ready(tmp_path / "snap") == 0
    forkvm.VM.keep_restores_ready(tmp_path / "snap", 1)
    for _ in range(2):
        wait_until("a restore ready", lambda: forkvm.VM.restores_ready(tmp_path / "snap") == 1)
        with forkvm.VM.restore(tmp_path / "snap", console=None) as ready:
            assert ready.identity.generation == 1
    forkvm.VM.keep_restores_ready(tmp_path / "snap", 0)
    assert forkvm.VM.restores_ready(tmp_path / "snap") == 0
    with pytest.raises(forkvm.SnapshotError):
        forkvm.VM.keep_restores_ready(tmp_path, 1)


def test_devices_and_prepared_forks(guest: str) -> None:
    hvc = forkvm.ConsoleBuffer()
    with forkvm.VM(
        kernel=guest,
        memory_mib=32,
        cmdline="mode=spin",
        console=None,
        rng=True,
        virtio_consoles=[hvc],
        vsock_cid=3,
        balloon=forkvm.Balloon(deflate_on_oom=True),
    ) as vm:
        assert sorted(d.device_type for d in vm.devices) == [3, 4, 5, 19]
        assert vm.balloon is not None and vm.balloon.target_pages == 0
        assert vm.memory_size == 32 << 20
        vm.prepare_forks(1)
        assert vm.prepared_forks == 1
        (child,) = vm.fork(1)
        with child:
            assert child.identity.generation == 1
            assert sorted(d.device_type for d in child.devices) == [3, 4, 5, 19]


def test_misuse_raises_forkvm_errors(guest: str) -> None:
    vm = forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=None)
    with pytest.raises(forkvm.NotStartedError):
        vm.wait()
    with pytest.raises(forkvm.NotStartedError):
        vm.pause()
    vm.start()
    with pytest.raises(forkvm.AlreadyStartedError):
        vm.start()
    with pytest.raises(forkvm.GuestMemoryError):
        vm.read_memory(1 << 40, 8)
    # No vsock device: the agent cannot be reached (the quick check of the agent's errors).
    with pytest.raises(forkvm.NoDeviceError, match="no vsock device"):
        vm.exec(["true"])
    vm.stop()
    with pytest.raises(forkvm.NotRunningError, match="stopped by the host"):
        vm.pause()
    with pytest.raises(forkvm.NotRunningError):
        vm.fork(1)
    assert vm.wait().kind == "stopped"
    vm.close()
    vm.close()
    for call in (vm.start, vm.wait, vm.stop, vm.pause, lambda: vm.fork(1), lambda: vm.is_paused):
        with pytest.raises(forkvm.ClosedError):
            call()
    assert issubclass(forkvm.ClosedError, forkvm.NotRunningError)
    assert repr(vm) == "VM(closed)"


def test_bad_configurations(guest: str, tmp_path: Path) -> None:
    with pytest.raises(forkvm.InvalidArgumentError):
        forkvm.VM(kernel=guest, vcpus=0, console=None)
    with pytest.raises(forkvm.InvalidArgumentError, match="too little"):
        forkvm.VM(kernel=guest, memory_mib=1, console=None)
    with pytest.raises(forkvm.BootError):
        forkvm.VM(kernel=tmp_path / "missing", memory_mib=32, console=None)
    with pytest.raises(forkvm.KvmError):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, kvm_device=tmp_path / "kvm")
    with pytest.raises(ValueError):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, vsock_uds_path=tmp_path / "v")


def test_sizes_and_timeouts_out_of_range_raise_and_never_wrap(guest: str) -> None:
    # 2**44 + 256 MiB once built a 256 MiB VM: the byte count's top bits were dropped.
    with pytest.raises(forkvm.InvalidArgumentError, match="too much"):
        forkvm.VM(kernel=guest, memory_mib=2**44 + 256, console=None)
    for memory_mib, vcpus in ((-1, 1), (2**64, 1), (32, 2**32), (32, -1)):
        with pytest.raises(OverflowError):
            forkvm.VM(kernel=guest, memory_mib=memory_mib, vcpus=vcpus, console=None)
    # Not `with`: that would start it.
    vm = forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=None, vsock_cid=3)
    for timeout in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            vm.agent(timeout=timeout)
    # A VM never started fails at once, whatever the timeout (it waited without end).
    started = time.monotonic()
    with pytest.raises(forkvm.NotStartedError):
        vm.agent(timeout=1e18)
    assert time.monotonic() - started < 1
    vm.close()


def test_errors_have_their_kind_and_their_cause_once(guest: str, tmp_path: Path) -> None:
    with pytest.raises(forkvm.KvmError, match="kvm does not exist"):
        forkvm.VM(kernel=guest, memory_mib=32, console=None, kvm_device=tmp_path / "kvm")
    missing = tmp_path / "missing"
    with pytest.raises(forkvm.BootError) as raised:
        forkvm.VM(kernel=missing, memory_mib=32, console=None)
    message = str(raised.value)
    assert message.startswith(f"cannot read kernel {missing}: No such file or directory"), message
    assert message.count("No such file or directory") == 1, message


def test_wrong_argument_types_raise_type_error(guest: str) -> None:
    with pytest.raises(TypeError):
        forkvm.VM(kernel=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        forkvm.VM(kernel=guest, memory_mib="lots")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        forkvm.VM(kernel=guest, console=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        forkvm.VM(kernel=guest, disks=[42])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        forkvm.VM(guest, 32)  # type: ignore
    with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=None) as vm:
        with pytest.raises(TypeError):
            vm.write_memory(SCRATCH, "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            vm.fork("three")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            vm.fork([42])  # type: ignore[list-item]
        with pytest.raises(OverflowError):
            vm.read_memory(-1, 8)
        with pytest.raises(TypeError):
            vm.exec("true")  # type: ignore[arg-type]


def test_a_console_callback_that_raises_is_reported_not_fatal(guest: str) -> None:
    seen: List[bytes] = []
    reported: List[BaseException] = []

    def callback(data: bytes) -> None:
        seen.append(data)
        raise RuntimeError("callback failed")

    old_hook = sys.unraisablehook

    def hook(unraisable: "sys.UnraisableHookArgs") -> None:
        if unraisable.exc_value is not None:
            reported.append(unraisable.exc_value)

    sys.unraisablehook = hook
    try:
        with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=callback) as vm:
            wait_until("output and reports", lambda: b"spinning" in b"".join(seen) and bool(reported))
            assert vm.exit is None, "the VM ended"
            assert isinstance(reported[0], RuntimeError)
    finally:
        sys.unraisablehook = old_hook


def test_a_vm_with_a_console_callback_collected_without_close_stops(guest: str) -> None:
    seen: List[bytes] = []
    vm = forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=generation", console=seen.append)
    vm.start()
    wait_until("output", lambda: b"spinning" in b"".join(seen))
    (child,) = vm.fork([seen.append])
    # Dropping the last references stops each VM while its vCPU thread may wait for the GIL
    # in the callback: the binding releases the GIL to join it.
    del vm, child
    gc.collect()


def test_blocking_calls_release_the_gil(guest: str) -> None:
    vms = [forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=None) for _ in range(2)]
    exits: List[forkvm.Exit] = []

    def run(vm: forkvm.VM) -> None:
        vm.start()
        exits.append(vm.wait())

    threads = [threading.Thread(target=run, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    # Both threads sit in wait() while this one runs Python and stops them.
    time.sleep(0.1)
    assert all(t.is_alive() for t in threads)
    for vm in vms:
        vm.stop()
    for t in threads:
        t.join(timeout=10)
    assert [e.kind for e in exits] == ["stopped", "stopped"]
    for vm in vms:
        vm.close()


def test_asyncio_variants(guest: str) -> None:
    async def main() -> forkvm.Exit:
        vm = forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=exit exit_code=3", debug_exit=True, console=None)
        await vm.start_async()
        children = await vm.fork_async(1)
        exits = await asyncio.gather(vm.wait_async(), children[0].wait_async())
        assert [e.status for e in exits] == [3, 3]
        return await vm.stop_async()

    assert asyncio.run(main()).kind == "powered_off"


# Every *_async method and its blocking twin (forkvm/__init__.py makes the former from the latter).
ASYNC_TWINS = [
    (forkvm.VM, ["start", "wait", "stop", "pause", "fork", "snapshot", "restore", "agent", "exec", "spawn"]),
    (forkvm.VM, ["write_file", "read_file"]),
    (forkvm.Agent, ["exec", "spawn", "write_file", "read_file"]),
    (forkvm.Pty, ["read", "read_until"]),
    (forkvm.Process, ["read", "wait"]),
]


@pytest.mark.parametrize("cls,name", [(cls, name) for cls, names in ASYNC_TWINS for name in names])
def test_async_variants_are_their_twins_in_a_thread(cls: type, name: str) -> None:
    blocking, made = getattr(cls, name), getattr(cls, f"{name}_async")
    assert inspect.iscoroutinefunction(made)
    assert (made.__name__, made.__qualname__, made.__module__) == (
        f"{name}_async",
        f"{cls.__name__}.{name}_async",
        "forkvm",
    )
    assert inspect.signature(made) == inspect.signature(blocking)
    assert blocking.__doc__ and blocking.__doc__ in made.__doc__
    assert "asyncio.to_thread" in made.__doc__
    # The static method stays one (called on the class, no instance).
    assert isinstance(inspect.getattr_static(cls, f"{name}_async"), staticmethod) == (name == "restore")


def test_async_variants_raise_their_twins_errors_and_leave_the_loop_running(guest: str) -> None:
    vm = forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=None)
    with pytest.raises(forkvm.NotStartedError):
        asyncio.run(vm.wait_async())
    vm.start()
    # No vsock device: spawn fails as exec does, blocking or awaited.
    with pytest.raises(forkvm.NoDeviceError, match="no vsock device"):
        vm.spawn(["true"])
    with pytest.raises(forkvm.NoDeviceError, match="no vsock device"):
        asyncio.run(vm.spawn_async(["true"], env={"A": "b"}, timeout=1.0))
    with pytest.raises(TypeError):
        asyncio.run(vm.spawn_async(["true"], no_such_option=1))  # type: ignore[call-arg]

    async def wait_then_stop() -> forkvm.Exit:
        # wait() blocks in a worker thread while the event loop goes on and stops the VM.
        waiting = asyncio.ensure_future(vm.wait_async())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await vm.stop_async()
        return await asyncio.wait_for(waiting, 10)

    assert asyncio.run(wait_then_stop()).kind == "stopped"
    vm.close()
    with pytest.raises(forkvm.ClosedError):
        asyncio.run(vm.stop_async())


def test_async_iteration_over_a_process_reads_in_a_thread() -> None:
    # (The image test iterates a real one.)
    assert inspect.iscoroutinefunction(forkvm.Process.__anext__)
    assert not inspect.iscoroutinefunction(forkvm.Process.__aiter__)
    for name in ("__aiter__", "__anext__"):
        method = getattr(forkvm.Process, name)
        assert method.__qualname__ == f"Process.{name}"
        assert "asyncio.to_thread" in method.__doc__


def test_process_is_made_by_spawn_only() -> None:
    with pytest.raises(TypeError):
        forkvm.Process()  # type: ignore[call-arg]
    assert "Process" in forkvm.__all__


def test_console_input_from_a_pipe(guest: str) -> None:
    console = forkvm.ConsoleBuffer()
    read_end, write_end = os.pipe()
    try:
        vm = forkvm.VM(
            kernel=guest, memory_mib=32, cmdline="mode=echo", debug_exit=True, console=console, console_input=read_end
        )
    finally:
        os.close(read_end)  # the VM holds a duplicate
    with vm:
        os.write(write_end, b"hi q")
        assert vm.wait().status == 0
        assert "hi q\necho done" in console.text()
    os.close(write_end)


def test_vsock_connect_and_a_child_with_its_own_socket(guest: str, tmp_path: Path) -> None:
    console = forkvm.ConsoleBuffer()
    vm = forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=vsock-listen vsock_port=77", console=console, vsock_cid=3)
    with vm:
        wait_until("the listener", lambda: "vsock-listen: listening on port 77" in console.text())
        with vm.vsock_connect(77, timeout=10) as sock:
            sock.settimeout(10)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        (child,) = vm.fork([forkvm.Child(None, vsock_uds_path=tmp_path / "child.sock")])
        with child:
            assert (tmp_path / "child.sock").exists()


def test_a_fork_child_used_as_a_context_manager_keeps_its_lifecycle(guest: str) -> None:
    """`with child:` (which starts a VM, and takes "already started" as success) leaves a fork
    child running and whole: it pauses, resumes, forks and stops as any VM does."""
    console = forkvm.ConsoleBuffer()
    with forkvm.VM(kernel=guest, memory_mib=32, cmdline="mode=spin", console=console) as vm:
        wait_until("the counter", lambda: counter_address(console) != 0)
        (child,) = vm.fork([forkvm.ConsoleBuffer()])
        with child:
            child.pause()
            assert child.is_paused
            (grandchild,) = child.fork([forkvm.ConsoleBuffer()])
            child.resume()
            assert not child.is_paused
            assert grandchild.stop().kind == "stopped"
            grandchild.close()
        assert child.closed, "leaving the block stopped and closed the child"
