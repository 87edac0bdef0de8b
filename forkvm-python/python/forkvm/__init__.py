"""forkvm: an in-process KVM virtual machine monitor with copy-on-write VM fork.

A thin layer over the Rust API (the extension module ``forkvm._forkvm``)::

    with forkvm.VM(kernel="vmlinux", memory_mib=256, console=forkvm.ConsoleBuffer()) as vm:
        children = vm.fork(3)

Every blocking call releases the GIL; each ``*_async`` method runs its blocking twin in a
thread (``asyncio.to_thread``), as ``async for`` over a ``Process`` runs its reads. Errors
are ``forkvm.Error`` and its subclasses.
"""

import asyncio
import atexit
import functools
import inspect
from typing import Any, Callable, Dict, Tuple, cast

from ._forkvm import (
    DEFAULT_MEMORY_MIB,
    IDENTITY_PAGE_ADDR,
    IMAGE_CMDLINE,
    IMAGE_MEMORY_MIB,
    VM,
    Agent,
    AgentError,
    AgentNotReadyError,
    AlreadyStartedError,
    Balloon,
    BalloonHandle,
    BootError,
    Bucket,
    Child,
    ClosedError,
    CommandNotFoundError,
    ConnectionLostError,
    ConsoleBuffer,
    DeviceInfo,
    DirEntry,
    Disk,
    Error,
    ExecResult,
    Exit,
    ExitStatus,
    FileStat,
    GuestMemoryError,
    HostIoError,
    Identity,
    InvalidArgumentError,
    KvmError,
    Network,
    NoDeviceError,
    NotRunningError,
    NotStartedError,
    Process,
    Pty,
    RateLimit,
    SeccompDenials,
    SnapshotError,
    TimedOutError,
    UnsupportedError,
    VsockError,
    seccomp_denials,
    seccomp_policy,
    set_seccomp_policy,
    stop_all,
    wait_for_releases,
)

# The ``*_async`` methods. Each is made here from its blocking twin: adding one is adding the
# twin's name below (and the method's signature to __init__.pyi, which stubtest checks against
# the twin's). They are attached to the extension's classes themselves, not to Python
# subclasses: instances come from Rust too (fork children, restored VMs, agents, processes),
# and those would never be of a subclass.
_ASYNC_METHODS: Dict[type, Tuple[str, ...]] = {
    VM: (
        "start",
        "wait",
        "stop",
        "pause",
        "fork",
        "snapshot",
        "restore",
        "agent",
        "exec",
        "spawn",
        "write_file",
        "read_file",
    ),
    Agent: ("exec", "spawn", "write_file", "read_file"),
    Pty: ("read", "read_until"),
    Process: ("read", "wait"),
}


def _async_twin(cls: type, name: str) -> None:
    """Attaches ``cls.<name>_async``: a coroutine function that awaits the blocking method
    ``name`` run in a thread (``asyncio.to_thread``); a static method if ``name`` is one."""
    blocking: Callable[..., Any] = getattr(cls, name)
    static = isinstance(inspect.getattr_static(cls, name), staticmethod)

    # functools.wraps sets __wrapped__, so inspect.signature (and stubtest) see the twin's
    # parameters rather than (*args, **kwargs).
    @functools.wraps(blocking)
    async def method(*args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(blocking, *args, **kwargs)

    method.__name__ = f"{name}_async"
    method.__qualname__ = f"{cls.__name__}.{name}_async"
    method.__module__ = __name__
    summary = f"``{cls.__name__}.{name}`` in a thread (``asyncio.to_thread``), awaited."
    method.__doc__ = f"{summary}\n\n{blocking.__doc__}" if blocking.__doc__ else summary
    setattr(cls, method.__name__, staticmethod(method) if static else method)


for _cls, _names in _ASYNC_METHODS.items():
    for _name in _names:
        _async_twin(_cls, _name)


# ``async for`` over a Process: its iteration (``Process.__next__``) one chunk at a time in a
# thread, as the ``*_async`` methods run their twins. Attached to the extension's class for the
# same reason they are.
def _process_aiter(self: Process) -> Process:
    """``async for stream, data in process``: its output as ``(stream, bytes)`` chunks until it
    ends, each read in a thread (``asyncio.to_thread``), as iterating it yields them."""
    return self


_ENDED = object()


async def _process_anext(self: Process) -> Tuple[str, bytes]:
    """The next ``(stream, bytes)`` chunk of its output, read in a thread
    (``asyncio.to_thread``); ``StopAsyncIteration`` once it ended (then ``wait()`` returns its
    status at once). A cancelled wait loses the chunk its thread goes on to read."""
    # next() with a default: a StopIteration cannot cross a future (asyncio refuses it).
    chunk = await asyncio.to_thread(next, self, _ENDED)
    if chunk is _ENDED:
        raise StopAsyncIteration
    return cast(Tuple[str, bytes], chunk)


for _name, _method in (("__aiter__", _process_aiter), ("__anext__", _process_anext)):
    _method.__name__ = _name
    _method.__qualname__ = f"Process.{_name}"
    setattr(Process, _name, _method)

# VMs still running when the interpreter exits are stopped first, so that no console callback
# runs on forkvm's threads while the interpreter is being torn down (stopping a VM waits until
# its callbacks have received all of its output).
atexit.register(stop_all)

__all__ = [
    "DEFAULT_MEMORY_MIB",
    "IDENTITY_PAGE_ADDR",
    "IMAGE_CMDLINE",
    "IMAGE_MEMORY_MIB",
    "VM",
    "Agent",
    "AgentError",
    "AgentNotReadyError",
    "AlreadyStartedError",
    "Balloon",
    "BalloonHandle",
    "BootError",
    "Bucket",
    "Child",
    "ClosedError",
    "CommandNotFoundError",
    "ConnectionLostError",
    "ConsoleBuffer",
    "DeviceInfo",
    "DirEntry",
    "Disk",
    "Error",
    "ExecResult",
    "Exit",
    "ExitStatus",
    "FileStat",
    "GuestMemoryError",
    "HostIoError",
    "Identity",
    "InvalidArgumentError",
    "KvmError",
    "Network",
    "NoDeviceError",
    "NotRunningError",
    "NotStartedError",
    "Process",
    "Pty",
    "RateLimit",
    "SeccompDenials",
    "SnapshotError",
    "TimedOutError",
    "UnsupportedError",
    "VsockError",
    "seccomp_denials",
    "seccomp_policy",
    "set_seccomp_policy",
    "stop_all",
    "wait_for_releases",
]
