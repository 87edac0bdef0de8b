#!/usr/bin/env bash
# Builds forkvm's Linux image — the kernel (guest/kernel/build.sh) and the Debian root file
# system with the agent (guest/rootfs/build.sh), each cached — and prints the path of a directory
# holding both under the names `forkvm exec --image DIR` expects:
#
#   DIR/vmlinux      the kernel (PVH entry)
#   DIR/rootfs.ext4  the root image, attached read-only; the agent overlays it in memory
#
#   forkvm exec --image "$(guest/image.sh)" -- python3 -c 'print(6*7)'
#
# The directory is ${FORKVM_CACHE:-$HOME/.cache/forkvm}/image, its links re-pointed at every run;
# a first run takes a few minutes (the kernel build), later ones a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kernel=$("$here/kernel/build.sh")
rootfs=$("$here/rootfs/build.sh")
dir=${FORKVM_CACHE:-$HOME/.cache/forkvm}/image
mkdir -p "$dir"
ln -sfn "$kernel" "$dir/vmlinux"
ln -sfn "$rootfs" "$dir/rootfs.ext4"
printf '%s\n' "$dir"
