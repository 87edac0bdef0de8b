#!/usr/bin/env bash
# The full test command (README): installs what the tests need on a fresh machine, builds the
# guests (kernel, initramfs, Debian root image), then runs lints and every test, including the
# Linux boot tests on this host's KVM.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "host prerequisites"
[ -e /dev/kvm ] || { echo "no /dev/kvm on this machine: forkvm's tests need KVM" >&2; exit 1; }
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

step "guests"
tests/guest/build.sh >/dev/null
start=$(date +%s)
kernel=$(guest/kernel/build.sh)
initramfs=$(guest/initramfs/build.sh)
# Debian root image with the agent (debootstrap: needs deb.debian.org; ~1.5 min, then cached).
rootfs=$(guest/rootfs/build.sh)
echo "Linux guest ready in $(( $(date +%s) - start )) s: $kernel, $initramfs, $rootfs" >&2

step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"

step "C binding (gcc, ASan+UBSan, valgrind)"
FORKVM_LINUX_KERNEL=$kernel FORKVM_LINUX_IMAGE=$rootfs ffi-c/test.sh

step "Python binding (maturin wheel, pytest, stubtest)"
bindings-python/test.sh

step "Node binding (npm install, node --test, README example)"
FORKVM_LINUX_KERNEL=$kernel FORKVM_LINUX_IMAGE=$rootfs bindings-node/test.sh

step "fuzzing (bounded)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
for target in mmio_transport block_requests block_ring console_queues vsock_packets legacy_ports; do
    (cd fuzz && cargo fuzz run "$target" --sanitizer none -- -max_total_time="${FORKVM_FUZZ_SECONDS:-30}" 2>&1 | tail -n 1)
done

# One closing line for the whole run (the last cargo line is a crate's empty doc-test run).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "summary: %d passed, %d failed\n", passed, failed }' "$log"
