'use strict';
// `npm install`'s build of the addon from source: `cargo build --release -p forkvm-node`, its
// cdylib copied to forkvm.node. Needs only cargo (no npm dependencies), so installing the
// package by path from any project works. `npm run build` does the same through @napi-rs/cli
// and also regenerates native.d.ts (a dev step; the file is checked in).
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const out = execFileSync(
  'cargo',
  ['build', '--release', '-p', 'forkvm-node', '--message-format=json-render-diagnostics'],
  { cwd: __dirname, stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8', maxBuffer: 1 << 28 },
);
let library;
for (const line of out.split('\n')) {
  if (!line.startsWith('{')) continue;
  const message = JSON.parse(line);
  if (message.reason === 'compiler-artifact' && message.target.name === 'forkvm_node') {
    library = message.filenames.find((f) => f.endsWith('.so'));
  }
}
if (!library) throw new Error('cargo built no libforkvm_node.so');
const target = path.join(__dirname, 'forkvm.node');
fs.copyFileSync(library, `${target}.tmp`);
fs.renameSync(`${target}.tmp`, target);
console.log(`forkvm: built ${target}`);
