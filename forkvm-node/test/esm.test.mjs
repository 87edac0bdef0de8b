// `import` gives the same classes as `require`.
import test from 'node:test';
import assert from 'node:assert';
import { createRequire } from 'node:module';
import forkvm, { VM, ConsoleBuffer, NotRunningError, ForkvmError } from 'forkvm';
import * as named from 'forkvm';

test('import and require give the same API', () => {
  const required = createRequire(import.meta.url)('forkvm');
  assert.strictEqual(VM, required.VM);
  assert.strictEqual(ConsoleBuffer, required.ConsoleBuffer);
  assert.strictEqual(forkvm.VM, VM);
  assert.ok(new NotRunningError('x') instanceof ForkvmError);
  assert.deepStrictEqual(Object.keys(forkvm).sort(), Object.keys(required).sort());
  // index.mjs names every export of index.js.
  for (const key of Object.keys(required)) assert.strictEqual(named[key], required[key], key);
});
