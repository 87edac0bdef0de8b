'use strict';
// The guest agent end to end on forkvm's Linux image: commands, streamed output, spawned
// processes, files, a PTY, a fork and the network (inbound only: its policy denies all egress
// but the host's 127.0.0.1), on one VM. Slow (the image boots in ~20 s here), so it
// runs only when FORKVM_LINUX_KERNEL and FORKVM_LINUX_IMAGE name the built kernel and root
// image (scripts/test.sh sets them from guest/kernel/build.sh and guest/rootfs/build.sh).
const { describe, it, before, after } = require('node:test');
const assert = require('node:assert');
const net = require('node:net');
const { signals } = require('node:os').constants;
const { VM, IMAGE_CMDLINE, Process } = require('..');

const kernel = process.env.FORKVM_LINUX_KERNEL;
const image = process.env.FORKVM_LINUX_IMAGE;
const skip = kernel && image ? false : 'set FORKVM_LINUX_KERNEL and FORKVM_LINUX_IMAGE to run it (scripts/test.sh does)';

describe('the agent of the Linux image', { skip, timeout: 300000 }, () => {
  let vm;
  before(async () => {
    if (skip) return;
    vm = await VM.build({
      kernel, cmdline: IMAGE_CMDLINE, memoryMib: 256, disks: [{ path: image, readOnly: true }], vsockCid: 3,
      network: { denyAll: true, allow: ['127.0.0.1/32'], loopbackOnly: true },
    });
    await vm.start();
    await vm.agentReady(180000);
  }, { timeout: 240000 });
  after(async () => {
    if (vm) await vm.close();
  });

  it('connectTcp and a published port reach a server in the guest', { timeout: 120000 }, async () => {
    const server = 'import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n' +
      "s.bind(('0.0.0.0', 7001))\ns.listen()\nwhile True:\n    c, _ = s.accept()\n    c.sendall(c.recv(100).upper())\n    c.close()\n";
    await vm.writeFile('/tmp/echo.py', server);
    const proc = await vm.spawn(['python3', '/tmp/echo.py']);
    // What the server answers to 'ping' on a new socket, retried while it does not listen yet.
    const ask = async (connect) => {
      for (const end = Date.now() + 60000; Date.now() < end;) {
        const answer = await new Promise((resolve) => {
          let got = '';
          Promise.resolve(connect()).then((socket) => {
            socket.on('data', (d) => { got += d; });
            socket.on('close', () => resolve(got));
            socket.on('error', () => resolve(got));
            socket.write('ping');
          }, () => resolve(''));
        });
        if (answer) return answer;
        await new Promise((r) => setTimeout(r, 200));
      }
      return '';
    };
    try {
      assert.strictEqual(await ask(() => vm.connectTcp(7001)), 'PING');
      const { host, port } = vm.publish(7001);
      assert.strictEqual(await ask(() => net.connect({ host, port })), 'PING');
      vm.unpublish(port);
      assert.ok(vm.networkStats().tcpFlowsTotal >= 2);
    } finally {
      await proc.close();
    }
  });

  it('exec, files, PTY and a fork', { timeout: 120000 }, async () => {
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
  });

  it('ping resolves with the uptime', async () => {
    const uptime = await vm.ping();
    assert.strictEqual(typeof uptime, 'number');
    assert.ok(uptime > 0, `uptime ${uptime}`);
  });

  it('execStreaming delivers every chunk in order while the command runs', { timeout: 60000 }, async () => {
    const events = [];
    let firstAt;
    const script = 'for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; sleep 0.2; done; exit 7';
    const exit = await vm.execStreaming(['sh', '-c', script], (stream, data) => {
      assert.ok(Buffer.isBuffer(data));
      firstAt ??= Date.now();
      events.push([stream, data.toString()]);
    });
    const endedAt = Date.now();
    const text = (name) => events.filter(([s]) => s === name).map(([, d]) => d).join('');
    assert.strictEqual(text('stdout'), 'out1\nout2\nout3\nout4\nout5\n');
    assert.strictEqual(text('stderr'), 'err1\nerr2\nerr3\nerr4\nerr5\n');
    assert.ok(events.filter(([s]) => s === 'stdout').length >= 2, `several chunks: ${JSON.stringify(events)}`);
    assert.deepStrictEqual([exit.exitCode, exit.timedOut], [7, false]);
    // The first chunk came while the command still ran (it sleeps 1 s in all).
    assert.ok(endedAt - firstAt >= 400, `first chunk ${endedAt - firstAt} ms before the end`);

    // exec's options, stdin included; a callback that throws rejects the promise at the end.
    const chunks = [];
    const cat = await vm.execStreaming(['cat'], (_, data) => chunks.push(data), { stdin: 'fed', env: { X: '1' } });
    assert.deepStrictEqual([Buffer.concat(chunks).toString(), cat.exitCode], ['fed', 0]);
    let calls = 0;
    await assert.rejects(vm.execStreaming(['sh', '-c', 'echo a; sleep 0.2; echo b'], () => {
      calls++;
      throw new Error('boom');
    }), /boom/);
    assert.strictEqual(calls, 1);
    await assert.rejects(vm.execStreaming(['/no/such/command'], () => {}), { code: 'COMMAND_NOT_FOUND' });
  });

  it('spawn: cat gives back exactly what was written to it', { timeout: 60000 }, async () => {
    const cat = await vm.spawn(['cat']);
    assert.ok(cat instanceof Process);
    assert.ok(cat.pid > 0);
    // A read waiting before any input does not hold the input up.
    const pending = cat.read(20000);
    await cat.writeStdin('hello\n');
    const hello = await pending;
    assert.deepStrictEqual([hello.stream, hello.data.toString(), hello.exit], ['stdout', 'hello\n', undefined]);
    const input = Buffer.concat([Buffer.from('line two\n'), Buffer.alloc(200000, 'x'), Buffer.from([0, 255, 10])]);
    await cat.writeStdin(input.subarray(0, 5));
    await cat.writeStdin(input.subarray(5));
    await cat.closeStdin();
    const chunks = [];
    let exit;
    while (!exit) {
      const event = await cat.read(20000);
      assert.ok(event, 'an event within 20 s');
      if (event.exit) {
        exit = event.exit;
      } else {
        assert.strictEqual(event.stream, 'stdout');
        chunks.push(event.data);
      }
    }
    assert.ok(Buffer.concat(chunks).equals(input), `got ${Buffer.concat(chunks).length} bytes of ${input.length}`);
    assert.deepStrictEqual([exit.exitCode, exit.timedOut], [0, false]);
    // The end again, and wait() with no output left.
    assert.deepStrictEqual((await cat.read()).exit, exit);
    const result = await cat.wait();
    assert.deepStrictEqual([result.stdout.length, result.stderr.length, result.exitCode], [0, 0, 0]);
    await cat.close();
    await cat.close();
    await assert.rejects(cat.writeStdin('x'), { code: 'CLOSED', name: 'ClosedError' });
    await assert.rejects(cat.read(), { code: 'CLOSED' });
  });

  it('spawn: signals end a process, wait() reports them', { timeout: 60000 }, async () => {
    // wait() collects the output nobody read.
    const both = await vm.spawn(['sh', '-c', 'echo up; echo warn >&2; exit 2']);
    const done = await both.wait();
    assert.deepStrictEqual([done.stdout.toString(), done.stderr.toString(), done.exitCode], ['up\n', 'warn\n', 2]);
    await both.close();

    const sleeper = await vm.spawn(['sleep', '60']);
    const waited = sleeper.wait();
    await sleeper.kill();
    const result = await waited;
    assert.strictEqual(result.signal, signals.SIGKILL);
    assert.ok(result.exitCode == null);
    assert.strictEqual(result.timedOut, false);
    assert.strictEqual((await sleeper.read()).exit.signal, signals.SIGKILL);
    await sleeper.close();

    const term = await vm.spawn(['sleep', '60']);
    await term.signal(signals.SIGTERM);
    assert.strictEqual((await term.wait()).signal, signals.SIGTERM);
    await term.close();

    // close() kills a running process; a read in flight gets its end.
    const closed = await vm.spawn(['sleep', '60']);
    const reading = closed.read();
    await closed.close();
    assert.strictEqual((await reading).exit.signal, signals.SIGKILL);

    await assert.rejects(vm.spawn(['/no/such/command']), { code: 'COMMAND_NOT_FOUND', name: 'CommandNotFoundError' });
    const timed = await vm.spawn(['sleep', '10'], { timeoutMs: 300 });
    assert.strictEqual((await timed.wait()).timedOut, true);
    await timed.close();
  });
});
