#!/usr/bin/env bash
# Builds the forkvm test guest (freestanding x86_64 ELF, PVH entry).
# Prints only the absolute path of the ELF on stdout; diagnostics go to stderr.
# Output directory: $FORKVM_GUEST_OUT (default <repo>/target/test-guest).
# Rebuilds only when the sources, this script or the compiler changed.
set -euo pipefail

src_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$src_dir/../.." && pwd)"
out_dir="${FORKVM_GUEST_OUT:-$repo_root/target/test-guest}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
elf="$out_dir/forkvm-test-guest.elf"
cc="${FORKVM_GUEST_CC:-gcc}"

# No SSE/x87 state (the VMM hides xsave), no red zone (interrupts in ring 0
# share the stack), no CET endbr64 (the ring-0 emulator may reject it).
cflags=(
    -std=gnu11 -O2 -g -Wall -Wextra
    -ffreestanding -fno-builtin -fno-pic -fno-pie
    -mno-red-zone -mgeneral-regs-only -mno-sse -mno-mmx -mno-80387
    -fno-stack-protector -fcf-protection=none -fno-asynchronous-unwind-tables
    -fno-tree-loop-distribute-patterns
)
ldflags=(
    -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-z,max-page-size=4096
    -Wl,-z,noexecstack -Wl,-T,guest.ld
)
sources=(entry.S kernel.c serial.c main.c console_mode.c virtio.c vsock.c)
inputs=("${sources[@]}" guest.h virtio.h vsock.h modes.h guest.ld build.sh)

# Serialise concurrent builds (e.g. parallel cargo tests).
exec 9>"$out_dir/.build.lock"
if command -v flock >/dev/null; then flock 9; fi

stamp="$out_dir/forkvm-test-guest.stamp"
hash="$(cd "$src_dir" && { cat "${inputs[@]}"; "$cc" --version; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$elf" && -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
    echo "$elf"
    exit 0
fi

echo "building test guest in $out_dir" >&2
obj_dir="$(mktemp -d "$out_dir/obj.XXXXXX")"
trap 'rm -rf "$obj_dir"' EXIT
objs=()
cd "$src_dir"    # relative source paths keep the debug info independent of cwd
for s in "${sources[@]}"; do
    o="$obj_dir/${s%.*}.o"
    "$cc" "${cflags[@]}" -c "$s" -o "$o" >&2
    objs+=("$o")
done
"$cc" "${ldflags[@]}" "${objs[@]}" -o "$obj_dir/guest.elf" >&2
mv -f "$obj_dir/guest.elf" "$elf"
echo "$hash" > "$stamp"
echo "$elf"
