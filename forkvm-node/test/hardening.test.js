'use strict';
// Issue 15's hardening from Node: rate limits (a disk's reads slowed, changed at run time,
// shown in `devices`), the seccomp policy per VM and process-wide and its denials, the kick
// signal options, and the options of a restore.
const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const forkvm = require('..');
const { VM, ConsoleBuffer } = forkvm;
const { guest, waitFor } = require('./helpers');

// Guest RAM the test guest never uses.
const SCRATCH = 24 << 20;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const u64 = (vm, addr) => Number(vm.readMemory(addr, 8).readBigUInt64LE(0));
const hexAfter = async (console, prefix) => {
  const text = await waitFor(console, (t) => new RegExp(`${prefix}0x[0-9a-f]+\\n`).test(t));
  return parseInt(text.match(new RegExp(`${prefix}0x([0-9a-f]+)`))[1], 16);
};
const tmp = (name) => fs.mkdtempSync(path.join(os.tmpdir(), `forkvm-node-${name}-`));

test('a rate-limited disk reads slower until the limit is lifted at run time', async () => {
  const dir = tmp('rate');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, Buffer.alloc(1 << 20));
  // 64 KiB a second: 16 reads of 4 KiB (and 16 more from the full bucket at the start).
  const rateLimit = { bytes: { size: 64 * 1024, refillTimeMs: 1000 } };
  const console = new ConsoleBuffer();
  const started = Date.now();
  const vm = await VM.build({
    kernel: guest, memoryMib: 32, cmdline: 'mode=blk-loop blk_kib=4', console,
    disks: [{ path: image, readOnly: true, rateLimit }],
  });
  try {
    const disk = vm.devices.findIndex((d) => d.deviceType === 2);
    assert.deepStrictEqual(vm.devices[disk].rateLimit.bytes,
      { size: 64 * 1024, refillTimeMs: 1000, oneTimeBurst: 0 });
    assert.ok(vm.devices[disk].rateLimit.ops == null);
    await vm.start();
    const counter = await hexAfter(console, 'blk-loop counter at ');
    await sleep(1000);
    const reads = u64(vm, counter);
    const took = (Date.now() - started) / 1000;
    assert.ok(reads > 0 && reads <= 16 + 16 * took + 16, `${reads} reads in ${took} s`);

    vm.setRateLimit(disk, null);
    assert.ok(vm.devices[disk].rateLimit.bytes == null && vm.devices[disk].rateLimit.ops == null);
    const before = u64(vm, counter);
    await sleep(500);
    assert.ok(u64(vm, counter) - before > 50, 'unlimited reads run at the host\'s speed');

    vm.setRateLimit(disk, { ops: { size: 2, refillTimeMs: 3600000, oneTimeBurst: 1 } });
    assert.deepStrictEqual(vm.devices[disk].rateLimit.ops, { size: 2, refillTimeMs: 3600000, oneTimeBurst: 1 });
    const [child] = await vm.fork(1);
    assert.strictEqual(child.devices[disk].rateLimit.ops.size, 2);
    await child.close();
    assert.throws(() => vm.setRateLimit(99, null), { code: 'NO_DEVICE', name: 'NoDeviceError' });
  } finally {
    await vm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('vsock and network limits show in the device list', async () => {
  const vsock = { ops: { size: 100, refillTimeMs: 500 } };
  const net = { bytes: { size: 1 << 20, refillTimeMs: 1000, oneTimeBurst: 4096 } };
  const vm = await VM.build({
    kernel: guest, memoryMib: 32, cmdline: 'mode=spin', vsockCid: 3, vsockRateLimit: vsock,
    vsockRxRateLimit: net, network: { rateLimit: net, rxRateLimit: vsock },
  });
  const byType = Object.fromEntries(vm.devices.map((d) => [d.deviceType, d.rateLimit]));
  assert.strictEqual(byType[19].ops.size, 100);
  assert.strictEqual(byType[19].ops.refillTimeMs, 500);
  assert.deepStrictEqual(byType[1].bytes, { size: 1 << 20, refillTimeMs: 1000, oneTimeBurst: 4096 });
  // What the host pushes to the guest has a limit of its own, on net and vsock only.
  const rx = Object.fromEntries(vm.devices.map((d) => [d.deviceType, d.rxRateLimit]));
  assert.strictEqual(rx[1].ops.size, 100);
  assert.deepStrictEqual(rx[19].bytes, { size: 1 << 20, refillTimeMs: 1000, oneTimeBurst: 4096 });
  const nic = vm.devices.findIndex((d) => d.deviceType === 1);
  vm.setRxRateLimit(nic, null);
  assert.ok(vm.devices[nic].rxRateLimit.ops == null && vm.devices[nic].rxRateLimit.bytes == null);
  assert.strictEqual(vm.devices[nic].rateLimit.bytes.size, 1 << 20);
  assert.throws(() => vm.setRxRateLimit(99, null), { code: 'NO_DEVICE' });
  await vm.close();
  assert.throws(() => VM.build({ kernel: guest, vsockRateLimit: vsock }), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => VM.build({ kernel: guest, vsockRxRateLimit: vsock }), { code: 'INVALID_ARGUMENT' });
  const plain = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin', rng: true });
  assert.ok(plain.devices[0].rxRateLimit == null);
  assert.throws(() => plain.setRxRateLimit(0, vsock),
    (e) => e.code === 'INVALID_ARGUMENT' && /receive direction/.test(e.message));
  await plain.close();
});

test('invalid buckets are refused with a clear error', async () => {
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin', rng: true });
  const bad = [
    [{ size: 0, refillTimeMs: 1000 }, /size above 0/],
    [{ size: 4096, refillTimeMs: 0 }, /refill time above 0/],
    [{ size: -1, refillTimeMs: 1000 }, /limit\.bytes\.size must be a whole number/],
    [{ size: 1.5, refillTimeMs: 1000 }, /size must be a whole number/],
    [{ size: NaN, refillTimeMs: 1000 }, /size must be a whole number/],
    [{ size: 2 ** 64, refillTimeMs: 1000 }, /size must be a whole number/],
    [{ size: 1, refillTimeMs: -5 }, /refillTimeMs must be a whole number/],
    [{ size: 1, refillTimeMs: Infinity }, /refillTimeMs must be a whole number/],
    [{ size: 1, refillTimeMs: 10, oneTimeBurst: -1 }, /oneTimeBurst must be a whole number/],
  ];
  for (const [bytes, message] of bad) {
    assert.throws(() => vm.setRateLimit(0, { bytes }),
      (e) => e instanceof forkvm.InvalidArgumentError && e.code === 'INVALID_ARGUMENT' && message.test(e.message),
      JSON.stringify(bytes));
  }
  assert.throws(() => vm.setRateLimit(0, { bytes: { size: 'lots', refillTimeMs: 1 } }), TypeError);
  assert.throws(() => vm.setRateLimit(-1, null), { code: 'INVALID_ARGUMENT' });
  assert.throws(() => VM.build({ kernel: guest, disks: [{ path: '/x', rateLimit: { ops: { size: 0, refillTimeMs: 1 } } }] }),
    (e) => e.code === 'INVALID_ARGUMENT' && /disks\[0\]\.rateLimit\.ops/.test(e.message));
  assert.throws(() => VM.build({ kernel: guest, network: { rateLimit: { bytes: { size: 1, refillTimeMs: 0 } } } }),
    { code: 'INVALID_ARGUMENT' });
  await vm.close();
});

test('the seccomp policy round-trips and the denials have their shape', () => {
  assert.strictEqual(forkvm.seccompPolicy(), 'deny');
  try {
    for (const policy of ['off', 'killProcess', 'killThread', 'deny']) {
      forkvm.setSeccompPolicy(policy);
      assert.strictEqual(forkvm.seccompPolicy(), policy);
    }
  } finally {
    forkvm.setSeccompPolicy('deny');
  }
  assert.throws(() => forkvm.setSeccompPolicy('kill_thread'),
    (e) => e instanceof forkvm.InvalidArgumentError && /unknown seccomp policy/.test(e.message));
  assert.throws(() => forkvm.setSeccompPolicy(3), TypeError);
  const d = forkvm.seccompDenials();
  for (const key of ['total', 'vcpu', 'eventLoop', 'prepare', 'reaper', 'installFailures']) {
    assert.ok(Number.isInteger(d[key]) && d[key] >= 0, key);
  }
  assert.strictEqual(d.total, d.vcpu + d.eventLoop + d.prepare + d.reaper);
  assert.ok(d.total === 0 ? d.lastSyscall == null : Number.isInteger(d.lastSyscall));
});

test('a VM runs under its own seccomp policy; a bad one is refused', async () => {
  for (const seccomp of ['off', 'deny']) {
    const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=exit exit_code=3', debugExit: true, seccomp });
    await vm.start();
    const exit = await vm.wait();
    assert.deepStrictEqual([exit.kind, exit.status], ['poweredOff', 3]);
    await vm.close();
  }
  assert.throws(() => VM.build({ kernel: guest, seccomp: 'none' }),
    (e) => e.code === 'INVALID_ARGUMENT' && /seccomp: unknown seccomp policy "none"/.test(e.message));
});

test('the kick signal: another offset, replacing a handler when allowed, a bad offset refused', async () => {
  const vm = await VM.build({
    kernel: guest, memoryMib: 32, cmdline: 'mode=exit exit_code=3', debugExit: true,
    kickSignalOffset: 6, replaceSignalHandler: true,
  });
  await vm.start();
  assert.strictEqual((await vm.wait()).status, 3);
  await vm.close();
  await assert.rejects(VM.build({ kernel: guest, kickSignalOffset: 1000 }), /not a real-time signal/);
  for (const offset of [-1, 1.5, NaN, 2 ** 40]) {
    assert.throws(() => VM.build({ kernel: guest, kickSignalOffset: offset }),
      (e) => e.code === 'INVALID_ARGUMENT' && /kickSignalOffset/.test(e.message), String(offset));
  }
});

test('restore options: a damaged memory file loads plainly, fails verified; a copied restore runs', async () => {
  const dir = tmp('load');
  const snap = path.join(dir, 'snap');
  const console = new ConsoleBuffer();
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin', console });
  await vm.start();
  const counter = await hexAfter(console, 'spinning, counter at ');
  const seven = Buffer.alloc(8);
  seven.writeBigUInt64LE(7n);
  vm.writeMemory(SCRATCH, seven);
  await vm.snapshot(snap);
  await vm.close();
  const nine = Buffer.alloc(8);
  nine.writeBigUInt64LE(9n);
  const fd = fs.openSync(path.join(snap, 'memory'), 'r+');
  fs.writeSync(fd, nine, 0, 8, SCRATCH);
  fs.closeSync(fd);
  try {
    const plain = await VM.restore(snap, null);
    assert.strictEqual(u64(plain, SCRATCH), 9);
    await plain.close();
    await assert.rejects(VM.restore(snap, null, { verifyData: true }),
      (e) => e instanceof forkvm.SnapshotError && /damaged/.test(e.message));
    const copied = await VM.restore(snap, null, { copyMemory: true });
    assert.strictEqual(u64(copied, SCRATCH), 9);
    const first = u64(copied, counter);
    const end = Date.now() + 10000;
    while (u64(copied, counter) === first && Date.now() < end) await sleep(5);
    assert.notStrictEqual(u64(copied, counter), first);
    await copied.close();
    assert.throws(() => VM.restore(snap, null, { verifyData: 'yes' }), TypeError);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
