'use strict';
// The guest agent end to end on forkvm's Linux image: commands, files, a PTY and a fork. Slow
// (the image boots in ~20 s here), so it runs only when FORKVM_LINUX_KERNEL and
// FORKVM_LINUX_IMAGE name the built kernel and root image (scripts/test.sh sets them from
// guest/kernel/build.sh and guest/rootfs/build.sh).
const test = require('node:test');
const assert = require('node:assert');
const { VM, IMAGE_CMDLINE } = require('..');

const kernel = process.env.FORKVM_LINUX_KERNEL;
const image = process.env.FORKVM_LINUX_IMAGE;
const skip = kernel && image ? false : 'set FORKVM_LINUX_KERNEL and FORKVM_LINUX_IMAGE to run it (scripts/test.sh does)';

test('exec, files, PTY and a fork through the agent of the Linux image', { skip, timeout: 240000 }, async () => {
  const vm = await VM.build({
    kernel, cmdline: IMAGE_CMDLINE, memoryMib: 256, disks: [{ path: image, readOnly: true }], vsockCid: 3,
  });
  try {
    await vm.start();
    await vm.agentReady(180000);

    const echo = await vm.exec(['echo', 'hello from node']);
    assert.strictEqual(echo.stdout.toString(), 'hello from node\n');
    assert.strictEqual(echo.exitCode, 0);
    const cat = await vm.exec(['sh', '-c', 'cat; echo oops >&2; exit 3'], { stdin: 'abc', env: { X: '1' } });
    assert.deepStrictEqual([cat.stdout.toString(), cat.stderr.toString(), cat.exitCode], ['abc', 'oops\n', 3]);
    await assert.rejects(vm.exec(['/no/such/command']), { code: 'COMMAND_NOT_FOUND', name: 'CommandNotFoundError' });
    const slow = await vm.exec(['sleep', '10'], { timeoutMs: 300 });
    assert.strictEqual(slow.timedOut, true);

    const data = Buffer.from('x'.repeat(100000));
    assert.strictEqual(await vm.writeFile('/tmp/node.txt', data), data.length);
    assert.deepStrictEqual(await vm.readFile('/tmp/node.txt'), data);
    assert.strictEqual((await vm.stat('/tmp/node.txt')).size, data.length);
    assert.ok((await vm.list('/tmp')).some((e) => e.name === 'node.txt' && e.fileType === 'file'));
    await assert.rejects(vm.readFile('/no/such/file'), { code: 'AGENT' });

    const pty = await vm.pty(['sh'], 24, 80);
    await pty.write('echo pty-$((6*7))\n');
    assert.match(await pty.readUntil('pty-42', 20000), /pty-42/);
    await pty.resize(40, 100);
    await pty.write('stty size\n');
    assert.match(await pty.readUntil('40 100', 20000), /40 100/);
    await pty.close();
    await assert.rejects(pty.write('x'), { code: 'CLOSED' });

    const [child] = await vm.fork(1);
    try {
      const out = await child.exec(['cat', '/tmp/node.txt']);
      assert.strictEqual(out.stdout.length, data.length);
      await child.writeFile('/tmp/child.txt', 'child');
      await assert.rejects(vm.readFile('/tmp/child.txt'), { code: 'AGENT' });
    } finally {
      await child.close();
    }
  } finally {
    await vm.close();
  }
});
