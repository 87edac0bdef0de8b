"""forkvm: an in-process KVM virtual machine monitor with copy-on-write VM fork.

A thin layer over the Rust API (the extension module ``forkvm._forkvm``)::

    with forkvm.VM(kernel="vmlinux", memory_mib=256, console=forkvm.ConsoleBuffer()) as vm:
        children = vm.fork(3)

Every blocking call releases the GIL; each ``*_async`` method runs its blocking twin in a
thread (``asyncio.to_thread``). Errors are ``forkvm.Error`` and its subclasses.
"""

import atexit

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
    NoDeviceError,
    NotRunningError,
    NotStartedError,
    Pty,
    SnapshotError,
    TimedOutError,
    UnsupportedError,
    VsockError,
    stop_all,
)

# VMs still running when the interpreter exits are stopped first, so that no console callback
# runs on a vCPU thread while the interpreter is being torn down.
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
    "NoDeviceError",
    "NotRunningError",
    "NotStartedError",
    "Pty",
    "SnapshotError",
    "TimedOutError",
    "UnsupportedError",
    "VsockError",
    "stop_all",
]
