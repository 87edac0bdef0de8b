#!/usr/bin/env bash
# Builds the forkvm guest kernel and prints the absolute path of its vmlinux.
#
#   vmlinux=$(guest/kernel/build.sh)
#
# Source: Debian's linux-source-6.1 package (installed with apt-get if missing).
# Config: `make tinyconfig` + microvm.config, checked option by option.
# Patches: patches/*.patch, applied in name order.
#
# The result is cached in ${FORKVM_CACHE:-$HOME/.cache/forkvm}/kernel-<key>/,
# where <key> hashes the source package version, the config fragment, the
# patches and this script; a cached build is reused without any work. Only the
# path of vmlinux goes to stdout; progress goes to stderr. About 3 minutes on
# 2 cores (2.5 of them in make). The ~1.5 GB build tree is deleted afterwards
# unless FORKVM_KEEP_KERNEL_TREE=1; vmlinux, System.map and the final config
# stay in the cache directory.
#
# The kernel expects (see guest/README.md): PVH boot of vmlinux, one vCPU, and
#   console=ttyS0 reboot=k panic=-1 no_int3_selftest noxsave
#   clearcpuid=smap,popcnt,erms,fsrm no_timer_check tsc=reliable
#   mitigations=off quiet [virtio_mmio.device=...]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment=$here/microvm.config
source_pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz
build_pkgs=(bc bison flex libelf-dev libssl-dev build-essential xz-utils)

log() { printf 'guest/kernel: %s\n' "$*" >&2; }

# shellcheck source=../packages.sh
source "$here/../packages.sh"

ensure_packages "$source_pkg"
src_version=$(dpkg-query -W -f='${Version}' "$source_pkg")

shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob

key=$(
    {
        printf '%s %s\n' "$source_pkg" "$src_version"
        cat "$fragment" "${BASH_SOURCE[0]}"
        for p in "${patches[@]}"; do
            printf '%s\n' "${p##*/}"
            cat "$p"
        done
    } | sha256sum | cut -c1-16
)
cache=${FORKVM_CACHE:-$HOME/.cache/forkvm}
out=$cache/kernel-$key

if [[ -f $out/vmlinux ]]; then
    printf '%s\n' "$(realpath "$out/vmlinux")"
    exit 0
fi

mkdir -p "$cache"
cache=$(realpath "$cache")
out=$cache/kernel-$key
# One build per key at a time; a second caller waits and then reuses it.
exec {lock}>"$out.lock"
flock "$lock"
if [[ -f $out/vmlinux ]]; then
    printf '%s\n' "$out/vmlinux"
    exit 0
fi

ensure_packages "${build_pkgs[@]}"

work=$out.build
rm -rf "$work" "$out"
mkdir -p "$work"
log "extracting $source_pkg $src_version into $work"
tar -xf "$tarball" -C "$work"
tree=$work/linux-source-6.1

for p in "${patches[@]}"; do
    log "applying ${p##*/}"
    patch -d "$tree" -p1 --forward --quiet < "$p" >&2
done

kmake() {
    make -C "$tree" ARCH=x86_64 \
        KBUILD_BUILD_USER=forkvm KBUILD_BUILD_HOST=forkvm \
        KBUILD_BUILD_TIMESTAMP="$source_pkg $src_version" "$@" >&2
}

log "configuring: tinyconfig + ${fragment##*/}"
kmake -s tinyconfig
"$tree"/scripts/kconfig/merge_config.sh -m -O "$tree" "$tree/.config" "$fragment" >&2
kmake -s olddefconfig

# Kconfig drops a requested value without error when its dependencies are not
# met; refuse to build a kernel that lacks anything the fragment asks for.
bad=0
while IFS= read -r line; do
    case $line in
    CONFIG_*=*)
        grep -qxF -- "$line" "$tree/.config" || {
            log "not in the final .config: $line"
            bad=1
        }
        ;;
    "# CONFIG_"*" is not set")
        sym=${line#\# }
        sym=${sym%% *}
        if grep -q "^$sym=" "$tree/.config"; then
            log "requested off but set: $(grep "^$sym=" "$tree/.config")"
            bad=1
        fi
        ;;
    esac
done < "$fragment"
[[ $bad -eq 0 ]] || { log "config check failed"; exit 1; }

log "building vmlinux with $(nproc) jobs"
start=$SECONDS
kmake -j"$(nproc)" vmlinux
log "built in $((SECONDS - start)) s"

stage=$out.tmp
rm -rf "$stage"
mkdir -p "$stage"
cp "$tree/vmlinux" "$tree/System.map" "$stage/"
cp "$tree/.config" "$stage/config"
mv -T "$stage" "$out"
[[ ${FORKVM_KEEP_KERNEL_TREE:-0} == 1 ]] || rm -rf "$work"

printf '%s\n' "$out/vmlinux"
