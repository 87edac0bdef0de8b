"""Type stubs for forkvm (the extension module forkvm._forkvm, re-exported)."""

import os
import socket
from types import TracebackType
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypedDict,
    Union,
    final,
)

_Path = Union[str, "os.PathLike[str]"]

_Stream = Literal["stdout", "stderr"]
"""The stream a chunk of a command's output came on."""

_ConsoleOutput = Union[None, Literal["stdout"], "ConsoleBuffer", _Path, Callable[[bytes], object]]
"""Where console output goes: discarded, standard output, a buffer, a file or a callable."""
_ConsoleInput = Union[None, Literal["stdin"], int, Any]
"""Where console input comes from: none, standard input, an fd or an object with fileno()."""
_VirtioConsole = Union[_ConsoleOutput, Tuple[_ConsoleOutput, _ConsoleInput]]

DEFAULT_MEMORY_MIB: int
IMAGE_CMDLINE: str
IMAGE_MEMORY_MIB: int
IDENTITY_PAGE_ADDR: int

def stop_all() -> None:
    """Stops every VM of this process that is still running (registered with atexit)."""

def wait_for_releases(timeout: float = 60.0) -> bool:
    """Waits until what closed VMs let go of is released in the background (and its threads
    ended); False if `timeout` seconds pass first."""
    ...

_SeccompPolicy = Literal["deny", "kill_thread", "kill_process", "off"]
"""What a forkvm thread's system call outside its allowlist does (docs/seccomp.md)."""

def set_seccomp_policy(policy: _SeccompPolicy) -> None:
    """Sets the seccomp policy of the threads forkvm starts from now on for the whole process
    and of VMs built without `seccomp=`."""

def seccomp_policy() -> _SeccompPolicy:
    """The process-wide seccomp policy."""

def seccomp_denials() -> "SeccompDenials":
    """The seccomp denials counted in this process so far."""

@final
class SeccompDenials:
    """System calls of forkvm's threads outside their allowlist, each failed with EPERM."""

    total: int
    vcpu: int
    event_loop: int
    prepare: int
    reaper: int
    last_syscall: Optional[int]
    install_failures: int

@final
class Bucket:
    """A token bucket: `size` tokens refilled from empty in `refill_time` seconds, plus
    `one_time_burst` tokens once."""

    def __new__(cls, size: int, refill_time: float, *, one_time_burst: Optional[int] = None) -> "Bucket": ...
    @property
    def size(self) -> int: ...
    @property
    def refill_time(self) -> float: ...
    @property
    def one_time_burst(self) -> int: ...

@final
class RateLimit:
    """A device's rate limit: a bucket on bytes and one on requests (None: no limit)."""

    def __new__(cls, *, bytes: Optional[Bucket] = None, ops: Optional[Bucket] = None) -> "RateLimit": ...
    @property
    def bytes(self) -> Optional[Bucket]: ...
    @property
    def ops(self) -> Optional[Bucket]: ...
    @property
    def unlimited(self) -> bool: ...

class Error(Exception): ...
class InvalidArgumentError(Error): ...
class KvmError(Error): ...
class BootError(Error): ...
class GuestMemoryError(Error): ...
class HostIoError(Error): ...
class NoDeviceError(Error): ...
class VsockError(Error): ...
class NotStartedError(Error): ...
class AlreadyStartedError(Error): ...
class NotRunningError(Error): ...
class ClosedError(NotRunningError): ...
class TimedOutError(Error): ...
class UnsupportedError(Error): ...
class SnapshotError(Error): ...
class AgentError(Error): ...
class AgentNotReadyError(AgentError): ...
class CommandNotFoundError(AgentError): ...
class ConnectionLostError(AgentError): ...

@final
class ConsoleBuffer:
    """Console output kept in memory (the last `limit` bytes)."""

    def __new__(cls, limit: int = ...) -> "ConsoleBuffer": ...
    def text(self) -> str: ...
    def contents(self) -> bytes: ...
    def take(self) -> bytes: ...

@final
class Disk:
    path: str
    read_only: bool
    direct_io: bool
    rate_limit: Optional[RateLimit]
    def __new__(
        cls, path: _Path, *, read_only: bool = False, direct_io: bool = False, rate_limit: Optional[RateLimit] = None
    ) -> "Disk": ...

@final
class Balloon:
    deflate_on_oom: bool
    free_page_reporting: bool
    def __new__(cls, *, deflate_on_oom: bool = False, free_page_reporting: bool = False) -> "Balloon": ...

@final
class BalloonHandle:
    target_pages: int
    actual_pages: int
    stats_updates: int
    inflated_bytes: int
    deflated_bytes: int
    reported_bytes: int
    rejected_requests: int
    def set_target_mib(self, mib: int) -> None: ...
    def set_target_pages(self, pages: int) -> None: ...
    def request_stats(self) -> None: ...
    def stats(self) -> Optional[List[Tuple[int, int]]]: ...

@final
class Network:
    """A VM's network: a virtio-net device with forkvm's user-mode network behind it."""

    def __new__(
        cls,
        *,
        publish: Optional[Mapping[Union[int, Tuple[str, int]], int]] = None,
        allow: Sequence[str] = ...,
        deny: Sequence[str] = ...,
        allow_domains: Sequence[str] = ...,
        deny_all: bool = False,
        hosts: Optional[Mapping[str, Sequence[str]]] = None,
        loopback_only: bool = False,
        rate_limit: Optional[RateLimit] = None,
        rx_rate_limit: Optional[RateLimit] = None,
    ) -> "Network": ...

class _DnsStats(TypedDict):
    queries: int
    answered: int
    denied_names: int
    filtered_addresses: int
    malformed: int
    busy: int

class _NetworkStats(TypedDict):
    """A VM's network counters (`VM.network_stats()`)."""

    frames_from_guest: int
    frames_to_guest: int
    frames_dropped: int
    tcp_flows_open: int
    tcp_flows_total: int
    tcp_rejected: int
    udp_flows_open: int
    udp_flows_total: int
    denied_total: int
    denied_by_reason: Dict[str, int]
    dns: _DnsStats
    down: bool

@final
class Child:
    """How one child of a fork (or a restored VM) reaches the host."""

    def __new__(
        cls,
        console: _ConsoleOutput = None,
        *,
        console_input: _ConsoleInput = None,
        virtio_consoles: Sequence[_VirtioConsole] = ...,
        vsock_uds_path: Optional[_Path] = None,
        network: Optional[Network] = None,
    ) -> "Child": ...

@final
class Exit:
    """How a guest ended."""

    kind: Literal["powered_off", "reset", "triple_fault", "crashed", "stopped"]
    status: Optional[int]
    vcpu: Optional[int]
    reason: Optional[str]

@final
class Identity:
    generation: int
    id: bytes

@final
class DeviceInfo:
    device_type: int
    mmio_base: int
    irq: int
    status: int
    rate_limit: RateLimit
    rx_rate_limit: Optional[RateLimit]

@final
class ExitStatus:
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    success: bool

@final
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    success: bool

@final
class FileStat:
    file_type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int

@final
class DirEntry:
    name: str
    file_type: Literal["file", "dir", "symlink", "other"]
    size: int

@final
class Pty:
    """A terminal session in the guest."""

    session: int
    def write(self, data: bytes) -> None: ...
    def read(self, timeout: Optional[float] = None) -> Union[bytes, ExitStatus, None]: ...
    def read_until(self, needle: str, timeout: float = 10.0) -> str: ...
    def resize(self, rows: int, cols: int) -> None: ...
    def close(self) -> None: ...
    def detach(self) -> None: ...
    async def read_async(self, timeout: Optional[float] = None) -> Union[bytes, ExitStatus, None]: ...
    async def read_until_async(self, needle: str, timeout: float = 10.0) -> str: ...
    def __enter__(self) -> "Pty": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

@final
class Process:
    """A process running in the guest (`Agent.spawn`)."""

    pid: int
    def write_stdin(self, data: bytes) -> None: ...
    def close_stdin(self) -> None: ...
    def signal(self, signal: int) -> None: ...
    def kill(self) -> None: ...
    def read(self, timeout: Optional[float] = None) -> Union[Tuple[_Stream, bytes], ExitStatus, None]: ...
    def wait(self, timeout: Optional[float] = None) -> ExecResult: ...
    def close(self) -> None: ...
    def __iter__(self) -> "Process": ...
    def __next__(self) -> Tuple[_Stream, bytes]: ...
    def __aiter__(self) -> "Process": ...
    async def __anext__(self) -> Tuple[_Stream, bytes]: ...
    def __enter__(self) -> "Process": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    async def read_async(self, timeout: Optional[float] = None) -> Union[Tuple[_Stream, bytes], ExitStatus, None]: ...
    async def wait_async(self, timeout: Optional[float] = None) -> ExecResult: ...

@final
class Agent:
    """A connected guest agent (forkvm's Linux image)."""

    is_connected: bool
    def with_timeout(self, timeout: float) -> "Agent": ...
    def ping(self) -> float: ...
    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> ExecResult: ...
    def exec_streaming(
        self,
        argv: Sequence[str],
        on_output: Callable[[_Stream, bytes], object],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> ExitStatus: ...
    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> Process: ...
    def write_file(
        self, path: str, data: bytes, *, append: bool = False, exclusive: bool = False, mode: Optional[int] = None
    ) -> int: ...
    def read_file(self, path: str) -> bytes: ...
    def stat(self, path: str) -> FileStat: ...
    def list_dir(self, path: str) -> List[DirEntry]: ...
    def mkdir(self, path: str, *, parents: bool = False) -> None: ...
    def remove(self, path: str, *, recursive: bool = False) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def pty(self, argv: Sequence[str], rows: int = 24, cols: int = 80) -> Pty: ...
    def pty_attach(self, session: int) -> Pty: ...
    def shutdown(self, action: Literal["poweroff", "reboot"] = "poweroff") -> None: ...
    async def exec_async(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> ExecResult: ...
    async def spawn_async(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> Process: ...
    async def write_file_async(
        self, path: str, data: bytes, *, append: bool = False, exclusive: bool = False, mode: Optional[int] = None
    ) -> int: ...
    async def read_file_async(self, path: str) -> bytes: ...

@final
class VM:
    """A virtual machine. `with VM(...) as vm:` starts it (unless it runs already) and stops
    and closes it at the end of the block."""

    def __new__(
        cls,
        kernel: _Path,
        *,
        initrd: Optional[_Path] = None,
        cmdline: Optional[str] = None,
        memory_mib: int = ...,  # DEFAULT_MEMORY_MIB
        vcpus: int = 1,
        console: _ConsoleOutput = ...,
        console_input: _ConsoleInput = None,
        rng: bool = False,
        disks: Sequence[Union[_Path, Disk]] = ...,
        virtio_consoles: Sequence[_VirtioConsole] = ...,
        vsock_cid: Optional[int] = None,
        vsock_uds_path: Optional[_Path] = None,
        balloon: Union[None, bool, Balloon] = None,
        debug_exit: bool = False,
        kvm_device: Optional[_Path] = None,
        network: Optional[Network] = None,
        vsock_rate_limit: Optional[RateLimit] = None,
        vsock_rx_rate_limit: Optional[RateLimit] = None,
        seccomp: Optional[_SeccompPolicy] = None,
        kick_signal_offset: Optional[int] = None,
        replace_signal_handler: bool = False,
    ) -> "VM": ...
    @staticmethod
    def restore(
        directory: _Path,
        console: Union[_ConsoleOutput, Child] = ...,
        *,
        verify_data: bool = False,
        copy_memory: bool = False,
    ) -> "VM": ...
    @staticmethod
    def keep_restores_ready(directory: _Path, n: int) -> None: ...
    @staticmethod
    def restores_ready(directory: _Path) -> int: ...
    def start(self) -> None: ...
    def wait(self) -> Exit: ...
    def stop(self) -> Exit: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    @property
    def is_paused(self) -> bool: ...
    @property
    def exit(self) -> Optional[Exit]: ...
    @property
    def devices(self) -> List[DeviceInfo]: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def last_pause(self) -> Optional[float]: ...
    @property
    def memory_size(self) -> int: ...
    def memory_allocated_bytes(self) -> int: ...
    def set_rate_limit(self, device: int, limit: Optional[RateLimit]) -> None: ...
    def set_rx_rate_limit(self, device: int, limit: Optional[RateLimit]) -> None: ...
    @property
    def balloon(self) -> Optional[BalloonHandle]: ...
    def read_memory(self, addr: int, size: int) -> bytes: ...
    def write_memory(self, addr: int, data: bytes) -> None: ...
    def fork(self, children: Union[int, Sequence[Union[_ConsoleOutput, Child]]]) -> List["VM"]: ...
    def snapshot(self, directory: _Path) -> None: ...
    def prepare_forks(self, n: int) -> None: ...
    def keep_forks_ready(self, n: int) -> None: ...
    @property
    def prepared_forks(self) -> int: ...
    def vsock_connect(self, port: int, timeout: float = 5.0) -> socket.socket: ...
    def connect_tcp(self, port: int) -> socket.socket: ...
    def publish(self, guest_port: int, host: str = "127.0.0.1", port: int = 0) -> Tuple[str, int]: ...
    def unpublish(self, port: int, host: str = "127.0.0.1") -> None: ...
    def set_network_policy(
        self,
        *,
        allow: Sequence[str] = ...,
        deny: Sequence[str] = ...,
        allow_domains: Sequence[str] = ...,
        deny_all: bool = False,
    ) -> None: ...
    def network_stats(self) -> _NetworkStats: ...
    def agent(self, timeout: float = 60.0) -> Agent: ...
    def exec(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> ExecResult: ...
    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> Process: ...
    def write_file(
        self, path: str, data: bytes, *, append: bool = False, exclusive: bool = False, mode: Optional[int] = None
    ) -> int: ...
    def read_file(self, path: str) -> bytes: ...
    def stat(self, path: str) -> FileStat: ...
    def list_dir(self, path: str) -> List[DirEntry]: ...
    def pty(self, argv: Sequence[str], rows: int = 24, cols: int = 80) -> Pty: ...
    def pty_attach(self, session: int) -> Pty: ...
    def __enter__(self) -> "VM": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    # asyncio variants (made by forkvm/__init__.py): each awaits its blocking twin run in a thread
    # (asyncio.to_thread).
    async def start_async(self) -> None: ...
    async def wait_async(self) -> Exit: ...
    async def stop_async(self) -> Exit: ...
    async def pause_async(self) -> None: ...
    async def fork_async(self, children: Union[int, Sequence[Union[_ConsoleOutput, Child]]]) -> List["VM"]: ...
    async def snapshot_async(self, directory: _Path) -> None: ...
    @staticmethod
    async def restore_async(
        directory: _Path,
        console: Union[_ConsoleOutput, Child] = ...,
        *,
        verify_data: bool = False,
        copy_memory: bool = False,
    ) -> "VM": ...
    async def agent_async(self, timeout: float = 60.0) -> Agent: ...
    async def exec_async(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> ExecResult: ...
    async def spawn_async(
        self,
        argv: Sequence[str],
        *,
        stdin: Optional[bytes] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        user: Optional[str] = None,
        clear_env: bool = False,
        timeout: Optional[float] = None,
    ) -> Process: ...
    async def write_file_async(
        self, path: str, data: bytes, *, append: bool = False, exclusive: bool = False, mode: Optional[int] = None
    ) -> int: ...
    async def read_file_async(self, path: str) -> bytes: ...

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
