// forkvm for Node as an ES module: the CommonJS index.js, with named exports.
import forkvm from './index.js';

export const {
  VM, Vm, Pty, Process, ConsoleBuffer, version, waitForReleases, setSeccompPolicy, seccompPolicy, seccompDenials, IMAGE_CMDLINE, ForkvmError, InvalidArgumentError, NotStartedError, AlreadyStartedError, NotRunningError, TimedOutError, IoError, KvmError, BootError, MemoryError, SnapshotError, NoDeviceError, VsockError, AgentNotReadyError, CommandNotFoundError, ConnectionLostError, AgentError, BusyError, UnsupportedError, OtherError, PanicError, ClosedError,
} = forkvm;
export default forkvm;
