#!/usr/bin/env bash
# The full test command (README): installs what the tests need on a fresh machine, runs the lints,
# the tests that need no KVM and bounded fuzzing, then builds the guests (kernel, initramfs, Debian
# root image) and runs every other test, including the Linux boot tests on this host's KVM.
# Without a usable /dev/kvm it still runs all that needs none (the Rust tests that need KVM show
# as ignored, "needs /dev/kvm": see forkvm/build.rs), says what it skipped and fails, unless
# FORKVM_ALLOW_NO_KVM=1.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# One closing line for the whole run, over every `cargo test` below (the last cargo line is a
# crate's empty doc-test run).
summary() {
    awk '/^test result:/ { passed += $4; failed += $6 } END { printf "summary: %d passed, %d failed\n", passed, failed }' "$log"
}

step "host prerequisites"
missing=()
command -v gcc >/dev/null || missing+=(gcc)
command -v valgrind >/dev/null || missing+=(valgrind)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v python3 >/dev/null || missing+=(python3)
command -v python3 >/dev/null && python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

step "lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
python3 scripts/module-cycles.py forkvm/src forkvm-devices/src forkvm-net/src forkvm-agent-client/src \
    guest/forkvm-agent/src

# The crates whose tests need no KVM at all (the others' tests run below, after the guests;
# without KVM, those of them that need it show as ignored).
step "tests without KVM (devices, network, agent protocol, agent)"
cargo test -p forkvm-devices -p forkvm-net -p forkvm-agent-protocol -p forkvm-agent 2>&1 | tee "$log"

step "fuzzing (bounded)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
for target in mmio_transport block_requests block_ring console_queues balloon_queues vsock_packets net_frames legacy_ports \
    snapshot_state agent_frames; do
    # From the checked-in seeds, where the target has them (fuzz/README.md).
    seeds=()
    [ -d "fuzz/seeds/$target" ] && seeds=("seeds/$target")
    (cd fuzz && mkdir -p "corpus/$target" && cargo fuzz run "$target" --sanitizer none "corpus/$target" ${seeds[@]+"${seeds[@]}"} \
        -- -max_total_time="${FORKVM_FUZZ_SECONDS:-30}" 2>&1 | tail -n 1)
done

# The build script's test (forkvm/build.rs, which tests and forkvm-cli share): /dev/kvm opens read-write.
if python3 -c 'import os; os.close(os.open("/dev/kvm", os.O_RDWR))' 2>/dev/null; then
    kvm=1
else
    kvm=0
fi

if [ "$kvm" = 1 ]; then
    step "guests"
    tests/guest/build.sh >/dev/null
    start=$(date +%s)
    kernel=$(guest/kernel/build.sh)
    initramfs=$(guest/initramfs/build.sh)
    # Debian root image with the agent (debootstrap: needs deb.debian.org; ~1.5 min, then cached).
    rootfs=$(guest/rootfs/build.sh)
    echo "Linux guest ready in $(( $(date +%s) - start )) s: $kernel, $initramfs, $rootfs" >&2
    step "tests"
else
    step "tests (no usable /dev/kvm: those that need it show as ignored)"
fi
cargo test --workspace --exclude forkvm-devices --exclude forkvm-net --exclude forkvm-agent-protocol \
    --exclude forkvm-agent 2>&1 |
    tee -a "$log"
kvm_tests=$(grep -c '^test .* ignored, needs /dev/kvm$' "$log" || true)

if [ "$kvm" = 0 ]; then
    cat >&2 <<END

SKIPPED: this host has no usable /dev/kvm (missing, or not readable and writable by $(id -un)),
so these did not run:
  - $kvm_tests Rust tests that need KVM (above: "ignored, needs /dev/kvm")
  - guests: tests/guest, guest/kernel, guest/initramfs and guest/rootfs builds
  - C binding (forkvm-ffi/test.sh: gcc, ASan+UBSan, valgrind)
  - Python binding (forkvm-python/test.sh)
  - Node binding (forkvm-node/test.sh)
Only the lints, the tests without KVM and the fuzzing ran. FORKVM_ALLOW_NO_KVM=1 makes this
an exit status of 0.
END
    summary
    [ "${FORKVM_ALLOW_NO_KVM:-0}" = 1 ] && exit 0
    exit 1
fi
if [ "$kvm_tests" -gt 0 ]; then
    echo "error: $kvm_tests tests were built as if this host had no KVM (cfg(no_kvm), left from" \
        "a build without it): touch forkvm/build.rs and run again" >&2
    exit 1
fi

step "C binding (gcc, ASan+UBSan, valgrind)"
FORKVM_LINUX_KERNEL=$kernel FORKVM_LINUX_IMAGE=$rootfs forkvm-ffi/test.sh

step "Python binding (maturin wheel, pytest, stubtest)"
forkvm-python/test.sh

step "Node binding (npm install, node --test, README example)"
FORKVM_LINUX_KERNEL=$kernel FORKVM_LINUX_IMAGE=$rootfs forkvm-node/test.sh

summary
