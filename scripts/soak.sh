#!/usr/bin/env bash
# The long soak (issue 15): 10,000 create -> run -> stop cycles (with failed builds between), then
# 10,000 fork -> stop cycles of one running VM with every virtio device, in one process; prints
# the cycles' time and the open fds, threads and resident memory before and after (and fails if
# fds or threads grew, or RSS by more than 3 MiB). `scripts/soak.sh N` runs N cycles of each.
# The test guest must be built (tests/guest/build.sh; scripts/test.sh does it).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/guest/build.sh >/dev/null
FORKVM_SOAK_CYCLES=${1:-10000} cargo test --release -p forkvm-tests --test lifecycle -- --nocapture 2>&1 |
    grep -E 'cycles in|test result|panicked'
