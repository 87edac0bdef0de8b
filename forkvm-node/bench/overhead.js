// Per-call cost of the Node binding: a no-op call (`vm.isPaused`) and `await vm.fork(1)` of a
// running test guest. Compare with the Rust API's figures (`cargo test -p forkvm-ffi --release
// --lib -- --ignored --nocapture overhead` prints both). Usage: node bench/overhead.js [KERNEL]
'use strict';
const { execFileSync } = require('node:child_process');
const path = require('node:path');
const { VM } = require('..');

async function main() {
  const kernel = process.argv[2] || process.env.FORKVM_TEST_GUEST ||
    execFileSync(path.join(__dirname, '../../tests/guest/build.sh'), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  const vm = await VM.build({ kernel, memoryMib: 32, cmdline: 'mode=spin', console: null });
  await vm.start();

  const calls = 1_000_000;
  let paused = 0;
  for (let i = 0; i < calls; i++) paused += vm.isPaused ? 1 : 0; // warm-up
  let t = process.hrtime.bigint();
  for (let i = 0; i < calls; i++) paused += vm.isPaused ? 1 : 0;
  const noop = Number(process.hrtime.bigint() - t) / calls;

  const forks = 30;
  const times = [];
  for (let i = 0; i < forks + 3; i++) {
    t = process.hrtime.bigint();
    const [child] = await vm.fork(1);
    times.push(Number(process.hrtime.bigint() - t));
    await child.close();
  }
  times.splice(0, 3);
  times.sort((a, b) => a - b);
  const median = times[times.length >> 1];
  console.log(`no-op call (vm.isPaused): ${noop.toFixed(0)} ns/call${paused ? ' (paused?)' : ''}`);
  console.log(`fork(1): median ${(median / 1e6).toFixed(2)} ms over ${forks}`);
  await vm.close();
}
main();
