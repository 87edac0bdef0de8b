'use strict';
// Shared by the tests: the test guest's path and a wait for console output.
const { execFileSync } = require('node:child_process');
const path = require('node:path');

const root = path.join(__dirname, '..', '..');
const guest = process.env.FORKVM_TEST_GUEST ||
  execFileSync(path.join(root, 'tests/guest/build.sh'), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();

/** Resolves with the buffer's text once `pred(text)` holds; rejects after `ms`. */
async function waitFor(buffer, pred, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const text = buffer.text();
    if (pred(text)) return text;
    if (Date.now() > end) throw new Error(`timed out waiting for console output; got: ${JSON.stringify(text)}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** The line `mode=generation` prints for an identity. */
function generationLine({ generation, id }) {
  const low = Buffer.from(id, 'hex').readBigUInt64LE(0);
  return `generation ${generation} id 0x${low.toString(16)}\n`;
}

// Counted once what closed VMs let go of is released on forkvm's threads.
const settle = () => require('..').waitForReleases(60000);
const threads = () => { settle(); return require('node:fs').readdirSync('/proc/self/task').length; };
const fds = () => { settle(); return require('node:fs').readdirSync('/proc/self/fd').length; };

module.exports = { root, guest, waitFor, generationLine, threads, fds };
