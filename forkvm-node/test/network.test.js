'use strict';
// The network through the Node binding, on the freestanding test guest (no network driver:
// nothing in it talks on the network or listens): configuration, ports published on
// 127.0.0.1, connectTcp (the socket ends since no guest answers), policy changes, stats, fork
// children with networks of their own, and coded errors. Only 127.0.0.1 is ever dialled.
const test = require('node:test');
const assert = require('node:assert');
const net = require('node:net');
const { VM, ConsoleBuffer, NoDeviceError, InvalidArgumentError, IoError } = require('..');
const { guest, waitFor } = require('./helpers');

/** Resolves with whether a TCP connect to 127.0.0.1:port succeeds. */
function accepts(port) {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

async function until(what, pred, ms = 10000) {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

test('publish, connectTcp, policy and stats on the test guest', async () => {
  const console_ = new ConsoleBuffer();
  const vm = await VM.build({
    kernel: guest, memoryMib: 32, cmdline: 'mode=generation', console: console_,
    network: {
      publish: { 0: 80, '127.0.0.1:0': 81 },
      allow: ['127.0.0.1/32'], deny: ['10.0.0.0/8'], allowDomains: ['example.com'], denyAll: true,
      hosts: { 'db.internal': ['10.0.2.2'] }, loopbackOnly: true,
    },
  });
  try {
    await vm.start();
    await waitFor(console_, (t) => t.includes('generation 0 id '));
    assert.strictEqual(vm.devices.filter((d) => d.deviceType === 1).length, 1);

    const { host, port } = vm.publish(8080);
    assert.strictEqual(host, '127.0.0.1');
    assert.ok(port > 0);
    assert.strictEqual(await accepts(port), true);
    assert.throws(() => vm.publish(8080, '127.0.0.1', port), (e) => e instanceof IoError && /cannot publish/.test(e.message));
    vm.unpublish(port);
    assert.throws(() => vm.unpublish(port), { code: 'IO', message: /not published/ });
    await until('the port to close', async () => !(await accepts(port)));

    const stats = vm.networkStats();
    assert.strictEqual(stats.down, false);
    assert.strictEqual(stats.deniedTotal, 0);
    assert.strictEqual(typeof stats.dns.queries, 'number');
    const before = stats.tcpFlowsTotal;
    const socket = await vm.connectTcp(80);
    assert.ok(socket instanceof net.Socket);
    await until('the flow', () => vm.networkStats().tcpFlowsTotal === before + 1);
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the stream did not end')), 20000);
      socket.on('data', () => reject(new Error('data from a guest that does not listen')));
      socket.on('end', () => { clearTimeout(timer); resolve(); });
      socket.on('error', (e) => { clearTimeout(timer); e.code === 'ECONNRESET' ? resolve() : reject(e); });
    });
    socket.destroy();
    await until('the flow to close', () => vm.networkStats().tcpFlowsOpen === 0);

    vm.setNetworkPolicy({ allow: ['127.0.0.1/32'], allowDomains: ['example.org'] });
    vm.setNetworkPolicy({ allow: ['127.0.0.1 tcp/8000-8999'], deny: ['10.0.0.0/8 udp/53'] });
    assert.throws(() => vm.setNetworkPolicy({ allow: ['127.0.0.1 tcp/99999'] }),
      (e) => e instanceof InvalidArgumentError && /tcp\/99999/.test(e.message));
    vm.setNetworkPolicy({ denyAll: true });
    assert.throws(() => vm.setNetworkPolicy({ allow: ['10.0.0.0/33'] }),
      (e) => e instanceof InvalidArgumentError && /10\.0\.0\.0\/33/.test(e.message));

    // Fork: one child with a network of its own, one with the parent's policy.
    const children = await vm.fork([{ network: { denyAll: true, loopbackOnly: true } }, null]);
    for (const child of children) {
      assert.strictEqual(child.networkStats().tcpFlowsTotal, 0);
      const published = child.publish(80);
      assert.strictEqual(await accepts(published.port), true);
      await child.close();
    }
  } finally {
    await vm.close();
  }
});

test('bad network options and a VM without a network get coded errors', async () => {
  await assert.rejects(async () => VM.build({ kernel: guest, memoryMib: 32, network: { allow: ['not a cidr'] } }),
    { code: 'INVALID_ARGUMENT', message: /not a cidr/ });
  await assert.rejects(async () => VM.build({ kernel: guest, memoryMib: 32, network: { allowDomains: ['*.example.com'] } }),
    { code: 'INVALID_ARGUMENT', message: /domain/ });
  await assert.rejects(async () => VM.build({ kernel: guest, memoryMib: 32, network: { publish: { 'localhost:80': 80 } } }),
    { code: 'INVALID_ARGUMENT', message: /ADDR:PORT/ });
  await assert.rejects(async () => VM.build({ kernel: guest, memoryMib: 32, network: { hosts: { db: ['10.0.2'] } } }),
    { code: 'INVALID_ARGUMENT', message: /not an IP address/ });

  const vm = await VM.build({ kernel: guest, memoryMib: 32, cmdline: 'mode=spin' });
  try {
    await assert.rejects(vm.connectTcp(80), (e) => e instanceof NoDeviceError && /no network/.test(e.message));
    assert.throws(() => vm.networkStats(), { code: 'NO_DEVICE' });
    assert.throws(() => vm.publish(80), { code: 'NO_DEVICE' });
    assert.throws(() => vm.publish(80, 'localhost'), { code: 'INVALID_ARGUMENT' });
    assert.strictEqual(vm.devices.filter((d) => d.deviceType === 1).length, 0);
  } finally {
    await vm.close();
  }
});

test('a published port that is taken fails the build with IO', async () => {
  const server = net.createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const taken = server.address().port;
  try {
    await assert.rejects(async () => VM.build({ kernel: guest, memoryMib: 32, network: { publish: { [taken]: 80 } } }),
      { code: 'IO', message: new RegExp(`127\\.0\\.0\\.1:${taken}`) });
  } finally {
    server.close();
  }
});
