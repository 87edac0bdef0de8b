'use strict';
// Misuse gets a clear error, never a crash.
const test = require('node:test');
const assert = require('node:assert');
const forkvm = require('..');
const { VM, ConsoleBuffer, ForkvmError, NotRunningError } = forkvm;
const { guest } = require('./helpers');

test('calls on a stopped VM reject with coded errors', async () => {
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin' });
  await assert.rejects(vm.wait(), { code: 'NOT_STARTED' });
  await assert.rejects(vm.pause(), { code: 'NOT_STARTED' });
  await vm.start();
  await vm.stop();
  for (const call of [() => vm.pause(), () => vm.resume(), () => vm.fork(1), () => vm.snapshot('/tmp/x')]) {
    await assert.rejects(call(), (e) => e instanceof NotRunningError && e instanceof ForkvmError &&
      e instanceof Error && e.code === 'NOT_RUNNING' && /not running/.test(e.message));
  }
  await assert.rejects(vm.start(), { code: 'ALREADY_STARTED', name: 'AlreadyStartedError' });
  assert.throws(() => vm.readMemory(0xffffffff0, 4), { code: 'MEMORY' });
  await vm.close();
  await vm.close();
  assert.strictEqual(vm.isClosed, true);
  assert.throws(() => vm.isPaused, { code: 'CLOSED' });
  await assert.rejects(vm.start(), { code: 'CLOSED' }); // a promise that rejects, not a throw
  await assert.rejects(vm.fork(1), { code: 'CLOSED', name: 'ClosedError' });
});

test('wrong argument types throw TypeError', async () => {
  assert.throws(() => VM.build({ kernel: 42 }), TypeError);
  assert.throws(() => VM.build('vmlinux'), TypeError);
  assert.throws(() => VM.build({ kernel: guest, memoryMib: 'lots' }), TypeError);
  assert.throws(() => VM.build({ kernel: guest, console: 42 }), (e) => e instanceof TypeError && e.code === 'INVALID_TYPE');
  assert.throws(() => new VM(), Error);
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin', console: null });
  assert.throws(() => vm.readMemory('0', 4), TypeError);
  assert.throws(() => vm.writeMemory(0, 'not a buffer'), TypeError);
  assert.throws(() => vm.fork('three'), TypeError);
  assert.throws(() => vm.readMemory(-1, 4), { code: 'INVALID_ARGUMENT' });
  await vm.close();
});

test('bad configurations get coded errors', async () => {
  await assert.rejects(VM.build({ kernel: '/nonexistent/vmlinux' }), ForkvmError);
  await assert.rejects(VM.build({ kernel: guest, vcpus: 0 }), { code: 'INVALID_ARGUMENT' });
  await assert.rejects(VM.build({ kernel: guest, memoryMib: 1 }), { code: 'INVALID_ARGUMENT' });
  await assert.rejects(VM.restore('/nonexistent'), { code: 'SNAPSHOT' });
});

test('a failed build has its kind as code and its cause in the message, once', async () => {
  await assert.rejects(VM.build({ kernel: guest, kvmDevice: '/nonexistent/kvm' }),
    (e) => e instanceof forkvm.KvmError && e.code === 'KVM' &&
      /\/nonexistent\/kvm does not exist/.test(e.message));
  await assert.rejects(VM.build({ kernel: '/nonexistent/vmlinux' }), (e) => {
    assert.strictEqual(e.code, 'BOOT');
    assert.match(e.message, /^cannot read kernel \/nonexistent\/vmlinux: No such file or directory/);
    assert.strictEqual(e.message.split('No such file or directory').length, 2, e.message);
    return true;
  });
});

test('sizes, counts, ports and timeouts out of range are refused, never wrapped', async () => {
  // napi's own u32 conversion wraps: 2 ** 32 + 256 MiB once built a 256 MiB VM, -1 was 4294967295.
  for (const options of [{ memoryMib: 2 ** 32 + 256 }, { memoryMib: -1 }, { memoryMib: 2 ** 44 + 256 },
    { memoryMib: NaN }, { vcpus: 2 ** 32 + 1 }, { vcpus: -1 }, { vsockCid: 2 ** 32 + 3 }]) {
    await assert.rejects(async () => VM.build({ kernel: guest, console: null, ...options }),
      { code: 'INVALID_ARGUMENT' }, JSON.stringify(options));
  }
  assert.throws(() => new ConsoleBuffer(-1), { code: 'INVALID_ARGUMENT' });
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin', console: null, vsockCid: 3 });
  await assert.rejects(async () => vm.fork(-1), { code: 'INVALID_ARGUMENT' });
  await assert.rejects(async () => vm.prepareForks(2 ** 32 + 1), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => vm.readMemory(0, 2 ** 32 + 4), { code: 'INVALID_ARGUMENT' });
  await assert.rejects(async () => vm.agentReady(-1), { code: 'INVALID_ARGUMENT' });
  await assert.rejects(async () => vm.exec(['true'], { timeoutMs: 1.5 }), { code: 'INVALID_ARGUMENT' });
  await assert.rejects(async () => vm.vsockConnect(2 ** 32 + 52), { code: 'INVALID_ARGUMENT' });
  // A VM never started: its agent fails at once, whatever the timeout.
  const started = Date.now();
  await assert.rejects(vm.agentReady(2 ** 53 - 1), { code: 'NOT_STARTED' });
  assert.ok(Date.now() - started < 1000);
  await vm.close();
});

test('the agent of a VM without vsock: NO_DEVICE', async () => {
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin', console: null });
  await vm.start();
  await assert.rejects(vm.exec(['true']), { code: 'NO_DEVICE' });
  await assert.rejects(vm.readFile('/etc/hostname'), { code: 'NO_DEVICE' });
  await assert.rejects(vm.pty(['sh']), { code: 'NO_DEVICE' });
  await assert.rejects(vm.ping(), { code: 'NO_DEVICE', name: 'NoDeviceError' });
  await assert.rejects(vm.execStreaming(['true'], () => {}), { code: 'NO_DEVICE' });
  await assert.rejects(vm.spawn(['cat'], { stdin: 'x' }), { code: 'NO_DEVICE' });
  assert.throws(() => vm.execStreaming(['true'], 'not a function'), TypeError);
  await assert.rejects(vm.vsockConnect(1234), { code: 'NO_DEVICE' });
  assert.throws(() => vm.setBalloonTarget(1), { code: 'NO_DEVICE' });
  await vm.close();
});

test('a console callback that throws does not crash the process', async () => {
  const warnings = [];
  const onWarning = (w) => warnings.push(w);
  process.on('warning', onWarning);
  let calls = 0;
  const vm = await VM.build({
    kernel: guest, memoryMib: 32, cmdline: 'mode=generation',
    console: () => { calls++; throw new Error('boom'); },
  });
  await vm.start();
  const end = Date.now() + 10000;
  while (warnings.length === 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
  await vm.close();
  process.off('warning', onWarning);
  assert.ok(calls > 0);
  assert.match(String(warnings[0].message), /console callback threw: Error: boom/);
});

test('ConsoleBuffer keeps the last bytes', () => {
  const b = new ConsoleBuffer(4);
  assert.strictEqual(b.text(), '');
  assert.deepStrictEqual(b.take(), Buffer.alloc(0));
});
