// Type check of index.d.ts / native.d.ts (compiled, never run): test.sh runs `tsc --noEmit --strict` on it.
import { VM, ConsoleBuffer, NotRunningError, ForkvmError, Process, type Exit, type ExecResult, type ExitInfo, type ProcessEvent, type RateLimit, type SeccompDenials, setSeccompPolicy, seccompPolicy, seccompDenials } from '..';
async function main(): Promise<void> {
  const console_ = new ConsoleBuffer();
  const vm: VM = await VM.build({ kernel: 'k', memoryMib: 32, console: console_, disks: [{ path: 'x', readOnly: true }] });
  await vm.start();
  const kids: VM[] = await vm.fork(3);
  const kids2 = await vm.fork([null, 'stdout', (b: Buffer) => void b, { console: console_ }]);
  const exit: Exit = await vm.stop();
  const r: ExecResult = await vm.exec(['ls'], { timeoutMs: 5 });
  const uptimeMs: number = await vm.ping();
  const streamed: ExitInfo = await vm.execStreaming(['ls'], (stream: 'stdout' | 'stderr', data: Buffer) => void [stream, data], { cwd: '/' });
  const p: Process = await vm.spawn(['cat'], { stdin: 'x' });
  await p.writeStdin(Buffer.from('y'));
  await p.closeStdin();
  const event: ProcessEvent | null = await p.read(100);
  const chunk: Buffer | undefined = event?.data;
  await p.signal(15);
  await p.kill();
  const waited: ExecResult = await p.wait();
  await p.close();
  void [uptimeMs, streamed, event, chunk, waited, p.pid];
  const pty = await vm.pty(['sh'], 24, 80);
  await pty.write('x');
  const m: Buffer = vm.readMemory(0, 8);
  const e = new NotRunningError('x');
  const ok: boolean = e instanceof ForkvmError && vm.isPaused;
  const netVm: VM = await VM.build({ kernel: 'k', network: { publish: { 8080: 80 }, allow: ['127.0.0.1/32'], denyAll: true, hosts: { db: ['10.0.2.2'] } } });
  const sock: import('net').Socket = await netVm.connectTcp(80);
  const bound: { host: string; port: number } = netVm.publish(80, '127.0.0.1', 0);
  netVm.unpublish(bound.port);
  netVm.setNetworkPolicy({ allowDomains: ['example.com'] });
  const flows: number = netVm.networkStats().tcpFlowsOpen;
  const kids3 = await vm.fork([{ network: { denyAll: true } }]);
  void [sock, flows, kids3];
  const limit: RateLimit = { bytes: { size: 65536, refillTimeMs: 1000 }, ops: { size: 10, refillTimeMs: 100, oneTimeBurst: 5 } };
  const limited: VM = await VM.build({
    kernel: 'k', disks: [{ path: 'x', rateLimit: limit }], vsockCid: 3, vsockRateLimit: limit, vsockRxRateLimit: limit,
    network: { rateLimit: limit, rxRateLimit: limit },
    seccomp: 'killProcess', kickSignalOffset: 5, replaceSignalHandler: true,
  });
  limited.setRateLimit(0, limit);
  limited.setRateLimit(0, null);
  const shown: RateLimit = limited.devices[0].rateLimit;
  limited.setRxRateLimit(0, limit);
  const rxShown: RateLimit | undefined | null = limited.devices[0].rxRateLimit;
  void rxShown;
  const restored: VM = await VM.restore('dir', null, { verifyData: true, copyMemory: false });
  setSeccompPolicy('off');
  const policy: 'deny' | 'killThread' | 'killProcess' | 'off' = seccompPolicy();
  const denials: SeccompDenials = seccompDenials();
  const last: number | null | undefined = denials.lastSyscall;
  void [shown, restored, policy, denials.eventLoop, last];
  void [kids, kids2, exit, r, m, ok, vm.identity.generation, console_.text()];
}
void main;
