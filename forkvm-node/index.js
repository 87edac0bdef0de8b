'use strict';
// forkvm for Node: the native addon (forkvm.node, built from src/ by `npm install`) and an
// `Error` subclass per error code. Every method is the addon's; this file only turns its
// errors into those classes (and napi's argument errors into `TypeError`) and keeps a console
// or output callback that throws from taking the process down.

const net = require('node:net');
const native = require('./forkvm.node');

/** Base class of every error forkvm reports; `code` says what failed. */
class ForkvmError extends Error {}
Object.defineProperty(ForkvmError.prototype, 'name', { value: 'ForkvmError' });

const CODES = [
  'INVALID_ARGUMENT', 'NOT_STARTED', 'ALREADY_STARTED', 'NOT_RUNNING', 'TIMED_OUT', 'IO', 'KVM',
  'BOOT', 'MEMORY', 'SNAPSHOT', 'NO_DEVICE', 'VSOCK', 'AGENT_NOT_READY', 'COMMAND_NOT_FOUND',
  'CONNECTION_LOST', 'AGENT', 'BUSY', 'UNSUPPORTED', 'OTHER', 'PANIC', 'CLOSED',
];
/** Error class by code: NOT_RUNNING -> NotRunningError, ... */
const errors = { ForkvmError };
const byCode = {};
for (const code of CODES) {
  const name = code.toLowerCase().replace(/(^|_)(\w)/g, (_, __, c) => c.toUpperCase()) + 'Error';
  const cls = { [name]: class extends ForkvmError {} }[name];
  Object.defineProperty(cls.prototype, 'name', { value: name });
  errors[name] = cls;
  byCode[code] = cls;
}
// Codes napi uses when an argument has the wrong JS type; the addon's own is INVALID_TYPE.
const TYPE_CODES = new Set([
  'INVALID_TYPE', 'InvalidArg', 'ObjectExpected', 'StringExpected', 'NameExpected',
  'FunctionExpected', 'NumberExpected', 'BooleanExpected', 'ArrayExpected', 'BigintExpected',
  'DateExpected', 'ArrayBufferExpected',
]);

function convert(e) {
  if (e instanceof Error && typeof e.code === 'string') {
    if (TYPE_CODES.has(e.code)) {
      Object.setPrototypeOf(e, TypeError.prototype);
      e.code = 'INVALID_TYPE';
    } else if (byCode[e.code]) {
      Object.setPrototypeOf(e, byCode[e.code].prototype);
    }
  }
  return e;
}
function rethrow(e) {
  throw convert(e);
}
function wrap(fn) {
  return function (...args) {
    try {
      const result = fn.apply(this, args);
      return result instanceof Promise ? result.catch(rethrow) : result;
    } catch (e) {
      throw convert(e);
    }
  };
}
function wrapAll(target) {
  for (const key of Object.getOwnPropertyNames(target)) {
    if (key === 'constructor' || key === 'prototype' || key === 'length' || key === 'name') continue;
    const d = Object.getOwnPropertyDescriptor(target, key);
    if (typeof d.value === 'function') d.value = wrap(d.value);
    else if (d.get) d.get = wrap(d.get);
    else continue;
    Object.defineProperty(target, key, d);
  }
}

// A console callback runs on the JS thread; one that throws gets a warning (the first time),
// not a crash, and keeps being called.
function guard(sink) {
  if (typeof sink !== 'function') return sink;
  let warned = false;
  return (chunk) => {
    try {
      sink(chunk);
    } catch (e) {
      if (!warned) {
        warned = true;
        process.emitWarning(`forkvm console callback threw: ${(e && e.stack) || e}`, 'ForkvmWarning');
      }
    }
  };
}
const isPlain = (o) => o !== null && typeof o === 'object' && !(o instanceof native.ConsoleBuffer);
function guardConsoles(o) {
  if (!isPlain(o)) return guard(o);
  const out = { ...o, console: guard(o.console) };
  if (Array.isArray(o.virtioConsoles)) {
    out.virtioConsoles = o.virtioConsoles.map((c) => (isPlain(c) ? { ...c, output: guard(c.output) } : c));
  }
  return out;
}

// Methods and getters are wrapped in place; the class's static methods are not configurable,
// so `VM` is a subclass with wrapped statics, of which every native VM counts as an instance.
const NativeVM = native.Vm;
for (const proto of [NativeVM.prototype, native.Pty.prototype, native.Process.prototype, native.ConsoleBuffer.prototype]) {
  wrapAll(proto);
}
const { fork, execStreaming } = NativeVM.prototype;
NativeVM.prototype.fork = function (children) {
  return fork.call(this, Array.isArray(children) ? children.map(guardConsoles) : children);
};
// An output callback that throws is not called again; the promise rejects with its exception
// once the command has ended.
NativeVM.prototype.execStreaming = function (argv, onOutput, options) {
  if (typeof onOutput !== 'function') return execStreaming.call(this, argv, onOutput, options);
  let failed = false;
  let failure;
  const guarded = (stream, data) => {
    if (failed) return;
    try {
      onOutput(stream, data);
    } catch (e) {
      failed = true;
      failure = e;
    }
  };
  return execStreaming.call(this, argv, guarded, options).then((exit) => {
    if (failed) throw failure;
    return exit;
  });
};
// A connection to a guest TCP port as a `net.Socket` over the stream's fd (which it owns).
NativeVM.prototype.connectTcp = function (port) {
  return this.connectTcpFd(port).then((fd) => new net.Socket({ fd, readable: true, writable: true }));
};
const nativeBuild = wrap(NativeVM.build);
const nativeRestore = wrap(NativeVM.restore);
const nativeKeepRestoresReady = wrap(NativeVM.keepRestoresReady);
class VM extends NativeVM {
  /** Builds a VM (not started). */
  static build(options) {
    return nativeBuild.call(NativeVM, guardConsoles(options));
  }

  /** Starts a VM from a snapshot directory (`options`: `{ verifyData, copyMemory }`). */
  static restore(dir, child, options) {
    return nativeRestore.call(NativeVM, dir, guardConsoles(child), options);
  }

  /** Keeps `n` children prepared for restores of the snapshot in `dir` (0: no longer). */
  static keepRestoresReady(dir, n) {
    return nativeKeepRestoresReady.call(NativeVM, dir, n);
  }

  static [Symbol.hasInstance](value) {
    return value instanceof NativeVM;
  }
}
if (typeof Symbol.asyncDispose === 'symbol') {
  for (const proto of [NativeVM.prototype, native.Process.prototype]) {
    proto[Symbol.asyncDispose] = function () {
      return this.close();
    };
  }
}

module.exports = {
  VM,
  Vm: VM,
  Pty: native.Pty,
  Process: native.Process,
  ConsoleBuffer: native.ConsoleBuffer,
  version: native.version,
  waitForReleases: native.waitForReleases,
  setSeccompPolicy: wrap(native.setSeccompPolicy),
  seccompPolicy: native.seccompPolicy,
  seccompDenials: native.seccompDenials,
  IMAGE_CMDLINE: native.IMAGE_CMDLINE,
  ...errors,
};
