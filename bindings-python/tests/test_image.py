"""forkvm's Linux image through the binding: the agent's exec, files and PTY, and a fork.

Needs the image: $FORKVM_IMAGE_KERNEL (guest/kernel/build.sh) and $FORKVM_IMAGE_ROOTFS
(guest/rootfs/build.sh), which bindings-python/test.sh sets when the image is built; skipped
otherwise. Boots Linux (~30 s here)."""

import os

import pytest

import forkvm

KERNEL = os.environ.get("FORKVM_IMAGE_KERNEL")
ROOTFS = os.environ.get("FORKVM_IMAGE_ROOTFS")
BOOT_TIMEOUT = 300.0

pytestmark = pytest.mark.skipif(
    not (KERNEL and ROOTFS and os.path.exists(KERNEL) and os.path.exists(ROOTFS)),
    reason="the Linux image is not built: set FORKVM_IMAGE_KERNEL and FORKVM_IMAGE_ROOTFS "
    "(guest/kernel/build.sh, guest/rootfs/build.sh print them; bindings-python/test.sh does)",
)


def test_exec_files_pty_and_fork_through_the_agent() -> None:
    console = forkvm.ConsoleBuffer()
    assert KERNEL and ROOTFS
    with forkvm.VM(
        kernel=KERNEL,
        cmdline=forkvm.IMAGE_CMDLINE,
        memory_mib=forkvm.IMAGE_MEMORY_MIB,
        disks=[forkvm.Disk(ROOTFS, read_only=True)],
        vsock_cid=3,
        console=console,
    ) as vm:
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
