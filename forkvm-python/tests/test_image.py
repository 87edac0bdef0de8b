"""forkvm's Linux image through the binding: the agent's exec, files, PTY and spawned
processes (iterated, awaited, closed), a fork, and the network (whose policy lets the guest
reach only the host's 127.0.0.1, through the gateway 10.0.2.2).

Needs the image: $FORKVM_IMAGE_KERNEL (guest/kernel/build.sh) and $FORKVM_IMAGE_ROOTFS
(guest/rootfs/build.sh), which forkvm-python/test.sh sets when the image is built; skipped
otherwise. Boots Linux once for the module (~30 s here)."""

import asyncio
import os
import signal
import socket
import threading
import time
from typing import Callable, Iterator, List, Tuple

import pytest

import forkvm

KERNEL = os.environ.get("FORKVM_IMAGE_KERNEL")
ROOTFS = os.environ.get("FORKVM_IMAGE_ROOTFS")
BOOT_TIMEOUT = 300.0

pytestmark = pytest.mark.skipif(
    not (KERNEL and ROOTFS and os.path.exists(KERNEL) and os.path.exists(ROOTFS)),
    reason="the Linux image is not built: set FORKVM_IMAGE_KERNEL and FORKVM_IMAGE_ROOTFS "
    "(guest/kernel/build.sh, guest/rootfs/build.sh print them; forkvm-python/test.sh does)",
)


@pytest.fixture(scope="module")
def vm() -> Iterator[forkvm.VM]:
    """The Linux image booted, its agent up."""
    assert KERNEL and ROOTFS
    with forkvm.VM(
        kernel=KERNEL,
        cmdline=forkvm.IMAGE_CMDLINE,
        memory_mib=forkvm.IMAGE_MEMORY_MIB,
        disks=[forkvm.Disk(ROOTFS, read_only=True)],
        vsock_cid=3,
        console=forkvm.ConsoleBuffer(),
        network=forkvm.Network(deny_all=True, allow=["127.0.0.1/32"], loopback_only=True),
    ) as vm:
        vm.agent(timeout=BOOT_TIMEOUT)
        yield vm


def test_exec_files_pty_and_fork_through_the_agent(vm: forkvm.VM) -> None:
    agent = vm.agent(timeout=BOOT_TIMEOUT)
    assert agent.ping() > 0

    result = vm.exec(["echo", "hello"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"hello\n", b"")
    assert result.success
    result = vm.exec(["sh", "-c", "cat; echo $X >&2; exit 3"], stdin=b"in", env={"X": "y"})
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"in", b"y\n")
    result = vm.exec(["sleep", "10"], timeout=0.5)
    assert result.timed_out
    with pytest.raises(forkvm.CommandNotFoundError):
        vm.exec(["no-such-program"])

    data = os.urandom(100_000)
    assert vm.write_file("/tmp/data", data) == len(data)
    assert vm.read_file("/tmp/data") == data
    assert vm.stat("/tmp/data").size == len(data)
    assert "data" in [e.name for e in vm.list_dir("/tmp")]
    with pytest.raises(forkvm.AgentError):
        vm.read_file("/no/such/file")

    chunks = []
    status = agent.exec_streaming(["sh", "-c", "echo out; echo err >&2"], lambda s, b: chunks.append((s, b)))
    assert status.exit_code == 0 and ("stdout", b"out\n") in chunks

    with vm.pty(["sh"], rows=24, cols=80) as pty:
        pty.write(b"echo pty-$((40 + 2))\n")
        assert "pty-42" in pty.read_until("pty-42", timeout=60)
        pty.resize(30, 100)

    (child,) = vm.fork([forkvm.ConsoleBuffer()])
    with child:
        child.write_file("/tmp/who", b"child")
        assert child.read_file("/tmp/who") == b"child"
        assert vm.exec(["cat", "/tmp/who"]).exit_code != 0, "the child's file is in the parent"


def read_stdout(process: forkvm.Process, size: int) -> bytes:
    """`size` bytes of the process's standard output, read event by event."""
    out = b""
    while len(out) < size:
        event = process.read(timeout=30)
        assert isinstance(event, tuple), f"expected output, got {event!r}"
        stream, data = event
        assert stream == "stdout"
        out += data
    return out


def test_spawn_feeds_stdin_and_reads_back_exactly_what_was_written(vm: forkvm.VM) -> None:
    agent = vm.agent()
    process = agent.spawn(["cat"])
    assert process.pid > 1
    assert process.read(timeout=0.2) is None, "cat printed before it was fed"
    process.write_stdin(b"hello\n")
    assert read_stdout(process, 6) == b"hello\n"
    data = os.urandom(200_000)
    process.write_stdin(data)
    process.close_stdin()
    result = process.wait(timeout=60)
    assert (result.exit_code, result.signal, result.timed_out, result.stderr) == (0, None, False, b"")
    assert result.stdout == data
    # Its end stays: read returns it again, wait returns it with no more output.
    status = process.read()
    assert isinstance(status, forkvm.ExitStatus) and status.exit_code == 0
    assert process.wait().stdout == b""
    assert list(process) == []
    process.close()
    process.close()
    with pytest.raises(forkvm.ClosedError):
        process.write_stdin(b"more")


def test_spawn_options_streams_and_iteration(vm: forkvm.VM) -> None:
    process = vm.spawn(
        ["sh", "-c", "cat; echo $X; pwd; echo err >&2; exit 3"], stdin=b"in:", env={"X": "y"}, cwd="/tmp"
    )
    process.close_stdin()
    chunks: List[Tuple[str, bytes]] = list(process)
    out = b"".join(data for stream, data in chunks if stream == "stdout")
    err = b"".join(data for stream, data in chunks if stream == "stderr")
    assert (out, err) == (b"in:y\n/tmp\n", b"err\n")
    result = process.wait()
    assert (result.exit_code, result.success, result.stdout) == (3, False, b"")
    with pytest.raises(forkvm.CommandNotFoundError):
        vm.spawn(["no-such-program"])
    with pytest.raises(ValueError):
        vm.agent().spawn([])


def test_kill_and_signal_a_spawned_process(vm: forkvm.VM) -> None:
    process = vm.spawn(["sleep", "100"])
    assert process.read(timeout=0.2) is None
    with pytest.raises(forkvm.TimedOutError):
        process.wait(timeout=0.3)
    process.kill()
    result = process.wait(timeout=30)
    assert (result.exit_code, result.signal, result.success) == (None, signal.SIGKILL, False)

    # A signal from another thread while this one waits (the process is shared, not locked).
    process = vm.spawn(["sh", "-c", "echo early; exec sleep 100"])
    assert read_stdout(process, 6) == b"early\n"  # it runs: the signal cannot come first
    timer = threading.Timer(0.5, process.signal, (signal.SIGTERM,))
    timer.start()
    result = process.wait(timeout=30)
    timer.join()
    assert (result.signal, result.exit_code, result.stdout) == (signal.SIGTERM, None, b"")

    # Output a timed-out wait read is not lost.
    process = vm.spawn(["sh", "-c", "echo early; exec sleep 100"])
    with pytest.raises(forkvm.TimedOutError):
        process.wait(timeout=3.0)
    process.kill()
    assert process.wait(timeout=30).stdout == b"early\n"

    # The agent's own timeout ends it, as exec's does.
    result = vm.spawn(["sleep", "100"], timeout=0.5).wait(timeout=30)
    assert result.timed_out

    # Leaving a with block kills what still runs.
    with vm.spawn(["sleep", "100"]) as process:
        pid = process.pid
    # (SIGKILL is sent when close() returns; the agent reaps it soon after.)
    gone = vm.exec(["sh", "-c", f"for i in $(seq 100); do kill -0 {pid} || exit 0; sleep 0.1; done; exit 1"])
    assert gone.exit_code == 0, "the process outlived its handle"


def test_spawn_async(vm: forkvm.VM) -> None:
    async def main() -> forkvm.ExecResult:
        process = await vm.spawn_async(["cat"], stdin=b"abc")
        assert await process.read_async(timeout=30) == ("stdout", b"abc")
        process.close_stdin()
        return await process.wait_async(timeout=30)

    result = asyncio.run(main())
    assert (result.exit_code, result.stdout) == (0, b"")


def test_a_closed_or_detached_pty_raises_closed_error(vm: forkvm.VM) -> None:
    with vm.pty(["sh"]) as pty:
        pty.write(b"echo up\n")
        pty.read_until("up", timeout=60)
    assert repr(pty) == f"Pty(session={pty.session}, closed)"
    calls = [
        lambda: pty.write(b"x"),
        lambda: pty.read(timeout=0.1),
        lambda: pty.read_until("x", timeout=0.1),
        lambda: pty.resize(10, 10),
        lambda: asyncio.run(pty.read_async(timeout=0.1)),
    ]
    for call in calls:
        with pytest.raises(forkvm.ClosedError, match="closed or detached"):
            call()
    pty.close()  # a second time: nothing

    pty = vm.pty(["sh"])
    pty.detach()
    with pytest.raises(forkvm.ClosedError) as raised:
        pty.write(b"echo again\n")
    assert isinstance(raised.value, forkvm.Error)
    with vm.agent().pty_attach(pty.session) as again:  # the session ran on
        again.write(b"echo again-$((1 + 1))\n")
        assert "again-2" in again.read_until("again-2", timeout=60)


def test_async_for_over_a_process(vm: forkvm.VM) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 4"

    async def main() -> Tuple[List[Tuple[str, bytes]], forkvm.ExecResult]:
        process = await vm.spawn_async(["sh", "-c", script])
        chunks: List[Tuple[str, bytes]] = [chunk async for chunk in process]
        # Ended: a second async for yields nothing, wait returns at once.
        assert [chunk async for chunk in process] == []
        return chunks, await process.wait_async(timeout=30)

    chunks, result = asyncio.run(main())
    out = b"".join(data for stream, data in chunks if stream == "stdout")
    err = b"".join(data for stream, data in chunks if stream == "stderr")
    assert (out, err) == (b"out1\nout2\nout3\n", b"err1\nerr2\nerr3\n")
    assert {stream for stream, _ in chunks} == {"stdout", "stderr"}
    assert (result.exit_code, result.stdout, result.stderr) == (4, b"", b"")
    # The same output, iterated blocking.
    process = vm.spawn(["sh", "-c", script])
    blocking = list(process)
    assert b"".join(d for s, d in blocking if s == "stdout") == out
    assert b"".join(d for s, d in blocking if s == "stderr") == err

    # A closed handle raises ClosedError from async for as from iteration.
    async def closed() -> None:
        process = await vm.spawn_async(["sleep", "100"])
        process.close()
        async for _ in process:
            pass

    with pytest.raises(forkvm.ClosedError):
        asyncio.run(closed())


ECHO = """import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(c.recv(100).upper())
    c.close()
"""

DIAL = """import socket, sys
print(socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=10).recv(100).decode())
"""


def echo(connect: Callable[[], socket.socket]) -> bytes:
    """What the guest's echo server answers to b"ping" on a connection from `connect`, retried
    while the guest refuses (its server not listening yet)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with connect() as stream:
                stream.settimeout(30)
                stream.sendall(b"ping")
                answer = stream.recv(100)
        except OSError:
            answer = b""
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def test_network_connect_tcp_publish_and_the_host_loopback(vm: forkvm.VM) -> None:
    vm.write_file("/tmp/echo.py", ECHO.encode())
    server = vm.spawn(["python3", "/tmp/echo.py"])
    try:
        assert echo(lambda: vm.connect_tcp(7000)) == b"PING"
        host, port = vm.publish(7000)
        assert echo(lambda: socket.create_connection((host, port), timeout=10)) == b"PING"
    finally:
        server.close()

    # The guest reaches a listener on the host's 127.0.0.1 through the gateway, as allowed.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host_port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"hello from the host")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        vm.write_file("/tmp/dial.py", DIAL.encode())
        result = vm.exec(["python3", "/tmp/dial.py", str(host_port)], timeout=60)
        assert result.stdout == b"hello from the host\n", result
        thread.join(timeout=10)

        # With everything denied, the same dial is refused and counted.
        vm.set_network_policy(deny_all=True)
        before = vm.network_stats()["denied_total"]
        result = vm.exec(["python3", "/tmp/dial.py", str(host_port)], timeout=60)
        assert result.exit_code != 0
        stats = vm.network_stats()
        assert stats["denied_total"] > before
        assert stats["denied_by_reason"].get("loopback", 0) + stats["denied_by_reason"].get("deny_all", 0) > 0
