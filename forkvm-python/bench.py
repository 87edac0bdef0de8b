"""Per-call overhead of the Python binding, on the test guest, as forkvm-ffi/src/bench.rs measures
the Rust API and the C binding: a no-op call (`is_paused`) and `fork(1)` of a running 32 MiB
guest. Compare with that benchmark's Rust figures (README, "From C"); run with the package
installed: `target/python-venv/bin/python forkvm-python/bench.py "$(tests/guest/build.sh)"`."""

import statistics
import sys
import time

import forkvm


def main() -> None:
    vm = forkvm.VM(kernel=sys.argv[1], memory_mib=32, cmdline="mode=spin", console=None)
    vm.start()

    calls = 1_000_000
    t0 = time.perf_counter()
    for _ in range(calls):
        pass
    loop = (time.perf_counter() - t0) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        _ = vm.is_paused
    noop = (time.perf_counter() - t0) / calls
    t0 = time.perf_counter()
    identity = vm.identity  # a call that builds a result object
    for _ in range(calls // 10):
        identity = vm.identity
    ident = (time.perf_counter() - t0) / (calls // 10)
    del identity

    forks = []
    for _ in range(30):
        t0 = time.perf_counter()
        (child,) = vm.fork(1)
        forks.append(time.perf_counter() - t0)
        child.close()
    vm.close()
    print(f"no-op (vm.is_paused): {noop * 1e9:.0f} ns per call (an empty loop: {loop * 1e9:.0f} ns)")
    print(f"vm.identity (allocates the result): {ident * 1e9:.0f} ns per call")
    print(f"fork(1), median of {len(forks)}: {statistics.median(forks) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
