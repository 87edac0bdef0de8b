#!/usr/bin/env bash
# A long fuzzing campaign for one target: scripts/fuzz.sh TARGET MINUTES [JOBS]
# (scripts/test.sh runs every target for a bounded time instead). Starts from the target's
# checked-in seeds (fuzz/seeds/TARGET) and what earlier campaigns kept (fuzz/corpus/TARGET, not
# checked in), and keeps what it finds in the latter; crashes go to fuzz/artifacts/TARGET.
# Prints the run's last lines and the corpus size.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if [ $# -lt 2 ]; then
    echo "usage: scripts/fuzz.sh TARGET MINUTES [JOBS]" >&2
    echo "targets: $(ls fuzz_targets | sed 's/\.rs$//' | grep -v '^virtio_harness$' | tr '\n' ' ')" >&2
    exit 2
fi
target=$1
minutes=$2
jobs=${3:-1}
[ -f "fuzz_targets/$target.rs" ] || { echo "no fuzz target $target" >&2; exit 2; }
case $minutes in '' | *[!0-9]*) echo "MINUTES must be a whole number" >&2; exit 2 ;; esac

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
mkdir -p "corpus/$target"
seeds=()
[ -d "seeds/$target" ] && seeds=("seeds/$target")
start=$(date +%s)
cargo fuzz run "$target" --sanitizer none --jobs "$jobs" "corpus/$target" ${seeds[@]+"${seeds[@]}"} -- \
    -max_total_time=$((minutes * 60)) 2>&1 | tail -n 5
echo "$target: ran $(( ($(date +%s) - start) / 60 )) min with $jobs job(s); corpus $(ls "corpus/$target" | wc -l) inputs" >&2
