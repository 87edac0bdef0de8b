// forkvm from Node: build a VM, start it, print its serial banner, fork it into two children,
// stop everything. README.md shows this file; forkvm-node/test.sh runs it.
//
//   npm install ./forkvm-node && node hello.js vmlinux
const { VM, ConsoleBuffer } = require('forkvm');

async function main(kernel, cmdline = 'mode=spin') {
  const console_ = new ConsoleBuffer();
  const vm = await VM.build({ kernel, cmdline, memoryMib: 32, console: console_ });
  await vm.start();

  // Wait for the guest's banner.
  while (!console_.text().endsWith('\n')) await new Promise((r) => setTimeout(r, 10));
  process.stdout.write(`guest says: ${console_.text()}`);

  // Two children continuing from this instant (their output discarded).
  const children = await vm.fork(2);
  for (const [i, child] of children.entries()) {
    console.log(`child ${i}: generation ${child.identity.generation}`);
    await child.close(); // stops it and frees its threads, memory and fds
  }

  const exit = await vm.stop();
  console.log(`parent: ${exit.description}`);
  await vm.close();
}

main(process.argv[2], process.argv[3]).catch((e) => {
  console.error(`${e.name} [${e.code}]: ${e.message}`);
  process.exit(1);
});
