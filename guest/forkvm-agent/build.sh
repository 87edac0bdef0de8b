#!/usr/bin/env bash
# Builds forkvm-agent as a static x86_64 Linux binary and prints its absolute path.
#
#   agent=$(guest/forkvm-agent/build.sh)
#
# Release profile, glibc linked statically (RUSTFLAGS="-C target-feature=+crt-static",
# --target x86_64-unknown-linux-gnu), symbols stripped. It builds in its own target directory,
# target/agent (or $FORKVM_AGENT_TARGET_DIR), so that the different RUSTFLAGS do not invalidate
# the workspace's usual build cache; cargo makes a rebuild of unchanged sources instant. The
# result is checked to be static (no ELF interpreter, no shared libraries needed) before its path
# goes to stdout; cargo's progress goes to stderr.
#
# The agent avoids glibc's NSS functions (getpwnam and friends), which a static glibc can only
# serve by loading shared modules at run time: users come from /etc/passwd, parsed by the agent.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=x86_64-unknown-linux-gnu
target_dir=${FORKVM_AGENT_TARGET_DIR:-$repo/target/agent}

log() { printf 'guest/forkvm-agent: %s\n' "$*" >&2; }

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    # Not a rustup toolchain, or the target is missing: cargo will say which.
    log "target $target not listed by rustup; trying anyway"
fi

RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --manifest-path "$repo/Cargo.toml" --release --locked \
    -p forkvm-agent --bin forkvm-agent \
    --target "$target" --target-dir "$target_dir" >&2

binary=$target_dir/$target/release/forkvm-agent
[[ -x $binary ]] || {
    log "no binary at $binary"
    exit 1
}

# Static: no PT_INTERP program header and no DT_NEEDED entry (a static-pie still has a dynamic
# section, for its own relocations).
if readelf -lW "$binary" | grep -q 'INTERP' || readelf -dW "$binary" | grep -q '(NEEDED)'; then
    log "$binary is dynamically linked:"
    readelf -dW "$binary" | grep '(NEEDED)' >&2 || true
    exit 1
fi
log "static, $(stat -c %s "$binary") bytes"
printf '%s\n' "$binary"
