#!/usr/bin/env bash
# Runs the fork, restore and pause benchmarks, then `bench-report` (benches/report/): it rewrites
# the README's generated table (between <!-- bench-report:begin/end -->) and draws
# docs/plots/fork-latency.svg and docs/plots/fork1000.svg from the figures the benchmarks wrote.
#
#   scripts/bench-report.sh                 # fork, fork_scale, snapshot (restore), fork_tails: the table's sources
#   scripts/bench-report.sh fork snapshot   # a subset; the table keeps the other rows' lines
#   scripts/bench-report.sh --report-only   # no benchmark: redraw from what they wrote before
#   scripts/bench-report.sh fork_running    # also possible (not in the table; Linux cases slow)
#
# Environment: FORKVM_BENCH_SAMPLES (samples per case, default 1000; e.g. 100 for a quick run),
# FORKVM_BENCH_OUT (where the figures go, default target/bench-report; each benchmark appends to
# its <bench>.jsonl and the newest line of each figure counts), BENCH_REPORT_MACHINE (how the
# table names the machine), and each benchmark's own variables (FORK_SCALE_MAX, FORK_RUNNING_*).
set -euo pipefail
cd "$(dirname "$0")/.."

export FORKVM_BENCH_OUT="${FORKVM_BENCH_OUT:-$PWD/target/bench-report}"
machine="${BENCH_REPORT_MACHINE:-the 2-core development VM whose KVM emulates guest ring 0}"

run=1
benches=()
for arg in "$@"; do
    case "$arg" in
        --report-only) run=0 ;;
        fork | fork_scale | snapshot | fork_running | fork_tails) benches+=("$arg") ;;
        *) echo "usage: $0 [--report-only] [fork] [fork_scale] [snapshot] [fork_running] [fork_tails]" >&2; exit 2 ;;
    esac
done
[ ${#benches[@]} -gt 0 ] || benches=(fork fork_scale snapshot fork_tails)

if [ "$run" = 1 ]; then
    mkdir -p "$FORKVM_BENCH_OUT"
    for bench in "${benches[@]}"; do
        # Only the cases the report reads (fork_scale's lazy faults and snapshot's writes are not
        # fork, restore or pause figures).
        case "$bench" in
            fork_scale) filter=(fork_n) ;;
            snapshot) filter=(restore) ;;
            *) filter=() ;;
        esac
        printf '\n== cargo bench --bench %s %s\n' "$bench" "${filter[*]}" >&2
        start=$SECONDS
        cargo bench -p forkvm-benches --bench "$bench" -- "${filter[@]}" |
            tee "$FORKVM_BENCH_OUT/$bench.log"
        printf '== %s: %d s\n' "$bench" $((SECONDS - start)) >&2
    done
fi

cargo run -q --release -p forkvm-benches --bin bench-report -- \
    --dir "$FORKVM_BENCH_OUT" --readme README.md --plots docs/plots --machine "$machine"
