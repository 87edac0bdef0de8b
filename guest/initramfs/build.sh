#!/usr/bin/env bash
# Builds the forkvm test initramfs and prints its absolute path.
#
#   initrd=$(guest/initramfs/build.sh)                                # initramfs.cpio
#   initrd=$(FORKVM_INITRAMFS_COMPRESS=gzip guest/initramfs/build.sh) # initramfs.cpio.gz
#
# A newc cpio archive holding Debian's static busybox (busybox-static,
# installed with apt-get if missing), /bin/sh, /dev/console, /etc/fstab and the
# init script next to this file. /init mounts proc, sysfs and devtmpfs, prints
# FORKVM-LINUX-INIT-OK and resets the VM (needs reboot=k on the kernel command
# line).
#
# Uncompressed by default: the guest kernel unpacks the archive in emulated
# ring-0 code, and inflating the gzip'd archive (1.0 MB -> 1.9 MB) took ~38 s
# there, against ~3 s to copy the plain one. The kernel reads both.
#
# The archive is written here, not by cpio(1): every entry is owned by root
# with mtime 0, so the output depends only on the inputs, no root is needed for
# the device node, and no cpio tool is needed. It is cached in
# ${FORKVM_CACHE:-$HOME/.cache/forkvm}/initramfs-<key>/, where <key> hashes the
# busybox package version, the init script and this script. Only the path goes
# to stdout.
#
# Entries are kept to a minimum (no applet links): every file costs the guest
# kernel time to unpack. busybox sh runs its applets without the links.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
init_script=$here/init
checks_script=$here/device-checks
vsock_source=$here/vsock-check.c
busybox_pkg="busybox-static"
busybox=/bin/busybox

log() { printf 'guest/initramfs: %s\n' "$*" >&2; }

# shellcheck source=../packages.sh
source "$here/../packages.sh"
ensure_packages "$busybox_pkg" gcc libc6-dev
busybox_version=$(dpkg-query -W -f='${Version}' "$busybox_pkg")

fstab='proc /proc proc nosuid,nodev,noexec 0 0
sysfs /sys sysfs nosuid,nodev,noexec 0 0
devtmpfs /dev devtmpfs nosuid 0 0
'

key=$(
    {
        printf '%s %s\n' "$busybox_pkg" "$busybox_version"
        gcc --version | head -n 1
        cat "$init_script" "$checks_script" "$vsock_source" "${BASH_SOURCE[0]}"
    } | sha256sum | cut -c1-16
)
cache=${FORKVM_CACHE:-$HOME/.cache/forkvm}
mkdir -p "$cache"
cache=$(realpath "$cache")
case ${FORKVM_INITRAMFS_COMPRESS:-none} in
none) name=initramfs.cpio compress=(cat) ;;
# -n: no name or timestamp in the gzip header.
gzip) name=initramfs.cpio.gz compress=(gzip -9 -n) ;;
*)
    log "FORKVM_INITRAMFS_COMPRESS must be none or gzip"
    exit 1
    ;;
esac
out=$cache/initramfs-$key/$name
if [[ -f $out ]]; then
    printf '%s\n' "$out"
    exit 0
fi

# --- newc writer ------------------------------------------------------------
# Each entry: "070701", 13 fields of 8 hex digits (ino, mode, uid, gid, nlink,
# mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check),
# the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes.
ino=0

pad4() { # bytes already written in this entry part
    local n=$(((4 - $1 % 4) % 4))
    ((n == 0)) || head -c "$n" /dev/zero
}

header() { # name mode size [rdevmajor rdevminor]
    local name=$1 mode=$2 size=$3 major=${4:-0} minor=${5:-0}
    local namesize=$((${#name} + 1))
    ino=$((ino + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 1 0 "$size" 0 0 "$major" "$minor" "$namesize" 0
    printf '%s\0' "$name"
    pad4 $((110 + namesize))
}

dir() { header "$1" $((8#040755)) 0; }

file() { # name mode source
    local size
    size=$(stat -c %s "$3")
    header "$1" "$2" "$size"
    cat "$3"
    pad4 "$size"
}

text() { # name mode contents
    header "$1" "$2" "${#3}"
    printf '%s' "$3"
    pad4 "${#3}"
}

symlink() { # name target
    header "$1" $((8#0120777)) "${#2}"
    printf '%s' "$2"
    pad4 "${#2}"
}

chardev() { # name mode major minor
    header "$1" $((8#020000 | $2)) 0 "$3" "$4"
}

archive() {
    dir bin
    file bin/busybox $((8#0100755)) "$busybox"
    symlink bin/sh busybox
    dir dev
    chardev dev/console 8#600 5 1
    dir etc
    text etc/fstab $((8#0100644)) "$fstab"
    file init $((8#0100755)) "$init_script"
    file bin/device-checks $((8#0100755)) "$checks_script"
    file bin/vsock-check $((8#0100755)) "$vsock_check"
    dir mnt
    dir proc
    dir sys
    header TRAILER!!! 0 0
}
# -----------------------------------------------------------------------------

log "writing $out"
mkdir -p "${out%/*}"
tmp=$(mktemp "$out.XXXXXX")
vsock_check=$(mktemp "$out.vsock-check.XXXXXX")
trap 'rm -f "$tmp" "$vsock_check"' EXIT
# Static: the archive has no shared libraries.
gcc -static -O2 -Wall -Werror -s -o "$vsock_check" "$vsock_source"
archive | "${compress[@]}" > "$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$out"
rm -f "$vsock_check"
trap - EXIT
printf '%s\n' "$out"
