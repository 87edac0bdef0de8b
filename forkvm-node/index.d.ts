// forkvm for Node. The classes and option types are generated from the Rust source by napi
// (native.d.ts, checked by test.sh); the error classes come from index.js.
export * from './native'
import { Vm } from './native'
export { Vm as VM }
import type { Socket } from 'net'

declare module './native' {
  interface Vm {
    /**
     * Connects to the guest's TCP `port` in-process through its network (no host listener), as
     * a `net.Socket`; when nothing listens in the guest, the socket ends at once. Rejects with
     * `NoDeviceError` for a VM without a network.
     */
    connectTcp(port: number): Promise<Socket>
  }
}

/** Base class of every error forkvm reports; `code` says what failed. */
export declare class ForkvmError extends Error {
  code: string
}
export declare class InvalidArgumentError extends ForkvmError {}
export declare class NotStartedError extends ForkvmError {}
export declare class AlreadyStartedError extends ForkvmError {}
export declare class NotRunningError extends ForkvmError {}
export declare class TimedOutError extends ForkvmError {}
export declare class IoError extends ForkvmError {}
export declare class KvmError extends ForkvmError {}
export declare class BootError extends ForkvmError {}
export declare class MemoryError extends ForkvmError {}
export declare class SnapshotError extends ForkvmError {}
export declare class NoDeviceError extends ForkvmError {}
export declare class VsockError extends ForkvmError {}
export declare class AgentNotReadyError extends ForkvmError {}
export declare class CommandNotFoundError extends ForkvmError {}
export declare class ConnectionLostError extends ForkvmError {}
export declare class AgentError extends ForkvmError {}
export declare class BusyError extends ForkvmError {}
export declare class UnsupportedError extends ForkvmError {}
export declare class OtherError extends ForkvmError {}
export declare class PanicError extends ForkvmError {}
export declare class ClosedError extends ForkvmError {}
