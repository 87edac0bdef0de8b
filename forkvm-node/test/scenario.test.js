'use strict';
// The scenario every binding runs: build, start, read the serial banner, fork into 3, check
// isolation through the guest's output and memory, stop; no threads or fds left behind.
const test = require('node:test');
const assert = require('node:assert');
const { VM, ConsoleBuffer } = require('..');
const { guest, waitFor, generationLine, threads, fds } = require('./helpers');

test('build, start, banner, fork into 3, isolation, stop, nothing leaked', async () => {
  // Warm up node's thread pool and forkvm's one-time host probe, so they are not counted.
  const warm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=exit' });
  await warm.close();
  const [threads0, fds0] = [threads(), fds()];

  const console = new ConsoleBuffer();
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=generation', console });
  assert.strictEqual(vm.isPaused, false);
  await vm.start();
  const parent = vm.identity;
  assert.strictEqual(parent.generation, 0);
  assert.match(parent.id, /^[0-9a-f]{32}$/);
  await waitFor(console, (t) => t.includes(generationLine(parent)));

  const consoles = [0, 1, 2].map(() => new ConsoleBuffer());
  const children = await vm.fork(consoles);
  assert.strictEqual(children.length, 3);
  assert.ok(children.every((c) => c instanceof VM));
  const ids = new Set();
  for (const [i, child] of children.entries()) {
    const identity = child.identity;
    assert.strictEqual(identity.generation, 1);
    ids.add(identity.id);
    await waitFor(consoles[i], (t) => t.includes(generationLine(identity)));
  }
  assert.strictEqual(ids.size, 3);
  assert.ok(!ids.has(parent.id));
  // The parent printed nothing more; each child printed only its own line.
  assert.strictEqual(console.text().match(/generation /g).length, 1);
  for (const [i, c] of consoles.entries()) {
    assert.strictEqual(c.text(), generationLine(children[i].identity), `child ${i}`);
  }

  // Memory: a write in one child is seen by no other VM.
  const addr = 0x200000;
  await children[0].pause();
  const before = vm.readMemory(addr, 8);
  children[0].writeMemory(addr, Buffer.from('forkvm!!'));
  assert.strictEqual(children[0].readMemory(addr, 8).toString(), 'forkvm!!');
  assert.deepStrictEqual(children[1].readMemory(addr, 8), before);
  assert.deepStrictEqual(vm.readMemory(addr, 8), before);
  await children[0].resume();

  for (const child of children) {
    assert.strictEqual((await child.stop()).kind, 'stopped');
    await child.close();
  }
  const exit = await vm.stop();
  assert.strictEqual(exit.kind, 'stopped');
  assert.deepStrictEqual(vm.exit, exit);
  await vm.close();

  assert.strictEqual(threads(), threads0, 'threads after');
  assert.strictEqual(fds(), fds0, 'fds after');
});

test('a guest that exits reports its status', async () => {
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=exit exit_code=7', debugExit: true });
  await vm.start();
  const exit = await vm.wait();
  assert.strictEqual(exit.kind, 'poweredOff');
  assert.strictEqual(exit.status, 7);
  await vm.close();
});

test('pause, resume, snapshot and restore', async (t) => {
  const console = new ConsoleBuffer();
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=generation', console });
  await vm.start();
  await waitFor(console, (s) => s.includes('generation 0'));
  await vm.pause();
  assert.strictEqual(vm.isPaused, true);
  await vm.resume();
  assert.strictEqual(vm.isPaused, false);
  const dir = require('node:fs').mkdtempSync(require('node:path').join(require('node:os').tmpdir(), 'forkvm-node-'));
  t.after(() => require('node:fs').rmSync(dir, { recursive: true, force: true }));
  await vm.snapshot(`${dir}/snap`);
  const restoredConsole = new ConsoleBuffer();
  const restored = await VM.restore(`${dir}/snap`, restoredConsole);
  assert.strictEqual(restored.identity.generation, 1);
  await waitFor(restoredConsole, (s) => s.includes(generationLine(restored.identity)));
  await restored.close();
  // Kept ready: restores start in children made ahead, refilled after each.
  assert.strictEqual(VM.restoresReady(`${dir}/snap`), 0);
  await VM.keepRestoresReady(`${dir}/snap`, 1);
  for (let round = 0; round < 2; round++) {
    const end = Date.now() + 10000;
    while (VM.restoresReady(`${dir}/snap`) < 1 && Date.now() < end) await new Promise((r) => setTimeout(r, 5));
    assert.strictEqual(VM.restoresReady(`${dir}/snap`), 1);
    const ready = await VM.restore(`${dir}/snap`);
    assert.strictEqual(ready.identity.generation, 1);
    await ready.close();
  }
  await VM.keepRestoresReady(`${dir}/snap`, 0);
  assert.strictEqual(VM.restoresReady(`${dir}/snap`), 0);
  await assert.rejects(VM.keepRestoresReady(dir, 1), { code: 'SNAPSHOT' });
  await vm.close();
});

test('console to a callback, a file, and children described by ChildOptions', async (t) => {
  const chunks = [];
  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=generation', console: (b) => chunks.push(b) });
  await vm.start();
  const text = () => Buffer.concat(chunks).toString();
  const end = Date.now() + 10000;
  while (!text().includes(generationLine(vm.identity)) && Date.now() < end) await new Promise((r) => setTimeout(r, 5));
  assert.ok(text().includes(generationLine(vm.identity)), text());
  assert.ok(chunks.every((c) => Buffer.isBuffer(c)));

  const file = require('node:path').join(require('node:os').tmpdir(), `forkvm-node-${process.pid}.log`);
  t.after(() => require('node:fs').rmSync(file, { force: true }));
  const [child] = await vm.fork([{ console: file }]);
  const fend = Date.now() + 10000;
  const read = () => require('node:fs').readFileSync(file, 'utf8');
  while (!read().includes(generationLine(child.identity)) && Date.now() < fend) await new Promise((r) => setTimeout(r, 5));
  assert.ok(read().includes(generationLine(child.identity)));
  const [a, b] = await vm.fork(2);
  assert.strictEqual(a.identity.generation, 1);
  for (const v of [child, a, b, vm]) await v.close();
});

test('many pending wait()s do not hold up stop()', async () => {
  // wait() runs on a thread of its own, not on libuv's pool of 4: with 6 VMs waited for, the
  // stops must still run (on the pool they would queue behind the waits forever).
  const vms = await Promise.all([...Array(6)].map(() => VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=halt', console: null })));
  for (const vm of vms) await vm.start();
  const waits = vms.map((vm) => vm.wait());
  const exits = await Promise.all(vms.map((vm) => vm.stop()));
  assert.ok(exits.every((e) => e.kind === 'stopped'));
  assert.ok((await Promise.all(waits)).every((e) => e.kind === 'stopped'));
  await Promise.all(vms.map((vm) => vm.close()));
});
