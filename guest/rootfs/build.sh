#!/usr/bin/env bash
# Builds the forkvm guest root file system, an ext4 image, and prints its absolute path.
#
#   rootfs=$(guest/rootfs/build.sh)
#
# Debian bookworm, `debootstrap --variant=minbase` plus the packages in $packages (python3), with
# forkvm's agent (guest/forkvm-agent/build.sh) at /sbin/forkvm-agent and /sbin/init pointing to it. Apt
# lists and caches, documentation, man pages, translations and glibc's iconv modules are removed.
# The tree goes into an ext4 image with `mkfs.ext4 -d` (no mount, no loop device), sized to the
# tree plus slack and without a journal: the guest attaches it read-only (root=/dev/vda ro) and
# the agent, as PID 1, puts an overlay with a tmpfs upper layer on top, so every write lives in
# guest memory (see guest/README.md).
#
# Two cache levels under ${FORKVM_CACHE:-$HOME/.cache/forkvm}:
#   rootfs-base-<key>.tar  the trimmed debootstrap tree; <key> hashes the suite, the mirror, the
#                          package list and the recipe ($debootstrap_args, $trim)
#   rootfs-<key>/rootfs.ext4  the image; <key> hashes the base key, the agent binary and this
#                          script
# and the downloaded .debs stay in debootstrap-debs/. A new agent therefore costs only the image
# (seconds), a new recipe a debootstrap without downloads (~1 min), a first build ~1.5 min.
# Only the path goes to stdout; progress goes to stderr. debootstrap needs root (sudo is used
# when not root) and the network (deb.debian.org, or $FORKVM_DEBIAN_MIRROR).
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=bookworm
mirror=${FORKVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=(python3)
debootstrap_args=(--variant=minbase "--include=$(IFS=,; printf '%s' "${packages[*]}")")
# Run in the tree ($1) after debootstrap: what the guest never needs at run time.
# shellcheck disable=SC2016 # expanded by the bash that runs it
trim='
cd "$1"
rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/log/* \
    usr/share/doc/* usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/lintian \
    usr/share/bash-completion usr/share/common-licenses usr/lib/x86_64-linux-gnu/gconv
'

log() { printf 'guest/rootfs: %s\n' "$*" >&2; }

# shellcheck source=../packages.sh
source "$here/../packages.sh"
ensure_packages debootstrap e2fsprogs

sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)

agent=$("$here/../forkvm-agent/build.sh")

hash() { sha256sum | cut -c1-16; }
base_key=$(printf '%s\n' "$suite" "$mirror" "${packages[*]}" "${debootstrap_args[*]}" "$trim" | hash)
key=$(
    {
        printf '%s\n' "$base_key"
        sha256sum < "$agent"
        cat "${BASH_SOURCE[0]}"
    } | hash
)
cache=${FORKVM_CACHE:-$HOME/.cache/forkvm}
image=$cache/rootfs-$key/rootfs.ext4

if [[ -f $image ]]; then
    printf '%s\n' "$(realpath "$image")"
    exit 0
fi

mkdir -p "$cache"
cache=$(realpath "$cache")
out=$cache/rootfs-$key
image=$out/rootfs.ext4
base=$cache/rootfs-base-$base_key.tar
# One build per key at a time; a second caller waits and then reuses it.
exec {lock}>"$out.lock"
flock "$lock"
if [[ -f $image ]]; then
    printf '%s\n' "$image"
    exit 0
fi

start=$SECONDS
work=$out.build
root=$work/root
"${sudo[@]}" rm -rf "$work"
mkdir -p "$work"
trap '"${sudo[@]}" rm -rf "$work"' EXIT
# GNU tar keeps owners, modes, hard links, device nodes and (asked) extended attributes.
tar_args=(--numeric-owner --xattrs --xattrs-include='*')

exec {base_lock}>"$base.lock"
flock "$base_lock"
if [[ ! -f $base ]]; then
    debs=$cache/debootstrap-debs
    mkdir -p "$debs"
    log "debootstrap $suite ${debootstrap_args[*]} from $mirror (.debs cached in $debs)"
    "${sudo[@]}" debootstrap "${debootstrap_args[@]}" --cache-dir="$debs" \
        "$suite" "$root" "$mirror" >&2
    log "debootstrap done in $((SECONDS - start)) s; trimming"
    "${sudo[@]}" bash -euo pipefail -c "$trim" trim "$root" >&2
    "${sudo[@]}" tar "${tar_args[@]}" -C "$root" -cf "$base.tmp" .
    "${sudo[@]}" chown "$(id -u):$(id -g)" "$base.tmp"
    mv -f "$base.tmp" "$base"
    log "base tree cached in $base ($(du -h "$base" | cut -f1))"
else
    log "base tree from $base"
    mkdir -p "$root"
    "${sudo[@]}" tar "${tar_args[@]}" -C "$root" -xpf "$base"
fi
flock -u "$base_lock"

log "installing the agent"
"${sudo[@]}" bash -euo pipefail -s "$root" "$agent" >&2 <<'SETUP'
root=$1
agent=$2
# /sbin is usr/sbin in a merged-/usr bookworm; install through the path either way.
install -m 0755 "$agent" "$root/sbin/forkvm-agent"
ln -sfn forkvm-agent "$root/sbin/init"
printf 'forkvm\n' > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tforkvm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$root/etc/hosts"
printf '# The root is mounted by the kernel (read-only) and overlaid by forkvm-agent.\n' \
    > "$root/etc/fstab"
# The name server of the DHCP lease the kernel took at boot (ip=dhcp; see guest/kernel).
ln -sfn ../proc/net/pnp "$root/etc/resolv.conf"
# The mount points the agent uses must exist in the read-only lower layer (/run also holds the
# overlay's tmpfs).
mkdir -p "$root"/proc "$root"/sys "$root"/dev "$root"/run "$root"/tmp
chmod 1777 "$root/tmp"
SETUP

# Size: the tree plus a quarter and 16 MiB of slack; inodes: the tree's plus 4096.
tree_kib=$("${sudo[@]}" du -s --block-size=1K "$root" | cut -f1)
files=$("${sudo[@]}" find "$root" -xdev | wc -l)
size_mib=$(((tree_kib * 5 / 4) / 1024 + 16))
log "tree: $((tree_kib / 1024)) MiB, $files files; image: $size_mib MiB"
stage=$work/rootfs.ext4
truncate -s "${size_mib}M" "$stage"
"${sudo[@]}" mkfs.ext4 -q -F -L forkvm-root -O ^has_journal -m 0 -N $((files + 4096)) \
    -d "$root" "$stage" >&2
"${sudo[@]}" chown "$(id -u):$(id -g)" "$stage"
chmod 0644 "$stage"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
mv -f "$stage" "$out.tmp/rootfs.ext4"
rm -rf "$out"
mv -T "$out.tmp" "$out"
log "built $image in $((SECONDS - start)) s ($(du -h --apparent-size "$image" | cut -f1), $(du -h "$image" | cut -f1) allocated)"
printf '%s\n' "$image"
