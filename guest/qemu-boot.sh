#!/usr/bin/env bash
# Boots the forkvm guest under QEMU's microvm machine with KVM, the way forkvm
# boots it (PVH entry of vmlinux, one vCPU, no ACPI, i8042 reset), and checks
# that /init printed FORKVM-LINUX-INIT-OK and the guest reset the machine.
#
#   guest/qemu-boot.sh [vmlinux [initramfs]]      # defaults: build both
#
# A reference and a debugging aid for the VMM: the console goes to stdout with
# wall-clock seconds since QEMU started. Exit status 0 when the marker was
# printed and QEMU exited on the guest's reset. QEMU_BOOT_APPEND adds kernel
# parameters (e.g. "loglevel=7 printk.time=1"), QEMU_BOOT_MEM sets MiB of RAM.
# Needs qemu-system-x86 (apt-get install qemu-system-x86) and /dev/kvm.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
vmlinux=${1:-$("$here"/kernel/build.sh)}
initrd=${2:-$("$here"/initramfs/build.sh)}

# The command line forkvm passes (see guest/README.md), minus its
# virtio_mmio.device= entries.
cmdline="console=ttyS0 reboot=k panic=-1 no_int3_selftest noxsave"
cmdline+=" clearcpuid=smap,popcnt,erms,fsrm no_timer_check tsc=reliable"
cmdline+=" mitigations=off quiet ${QEMU_BOOT_APPEND:-}"

# -cpu host,-cx16: the guest kernel must not see CMPXCHG16B (not emulated).
# -arch-capabilities: this host's KVM refuses QEMU's write of that MSR.
# -device i8042: microvm has no keyboard controller; reboot=k needs one.
# -no-reboot: QEMU exits when the guest resets.
# shellcheck disable=SC2054 # the commas belong to QEMU option values
qemu=(
    qemu-system-x86_64
    -M microvm,x-option-roms=off,rtc=off,isa-serial=on,pit=on,pic=on
    -enable-kvm -cpu host,-cx16,-arch-capabilities
    -m "${QEMU_BOOT_MEM:-128}" -smp 1
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot
    -device i8042
    -kernel "$vmlinux" -initrd "$initrd" -append "$cmdline"
)

start=$(date +%s.%N)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
timeout "${QEMU_BOOT_TIMEOUT:-120}" "${qemu[@]}" < /dev/null 2>&1 |
    START=$start perl -MTime::HiRes=time -ne \
        '$| = 1; printf("[%7.2f] %s", time - $ENV{START}, $_)' | tee "$log"
status=${PIPESTATUS[0]}
set -e
printf 'qemu exited with %s after %.2f s\n' "$status" \
    "$(echo "$(date +%s.%N) - $start" | bc)" >&2
if [[ $status -eq 0 ]] && grep -q 'FORKVM-LINUX-INIT-OK' "$log"; then
    echo 'boot OK' >&2
else
    echo 'boot FAILED' >&2
    exit 1
fi
