#!/usr/bin/env bash
# The Node binding's tests: `npm install` in forkvm-node (its install script, build.js, builds
# the addon from source with cargo), `npm run build` (the same through @napi-rs/cli, which also
# regenerates native.d.ts) and a check that native.d.ts is the one checked in, `node --test`, checks that the README's Node snippet is examples/hello.js
# and runs it from a fresh project that installed forkvm with `npm install <path>`. The agent
# test (test/agent.test.js) boots the Linux image when FORKVM_LINUX_KERNEL and FORKVM_LINUX_IMAGE
# name it (scripts/test.sh sets them), and is skipped otherwise.
# Prints "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

(cd forkvm-node && npm install --no-audit --no-fund --loglevel=error && npm run --silent build >/dev/null)

export FORKVM_TEST_GUEST=${FORKVM_TEST_GUEST:-$(tests/guest/build.sh)}
# shellcheck source=scripts/checks.sh
source scripts/checks.sh

# `npm run build` regenerated native.d.ts from the Rust source: it must be the checked-in one.
run "native.d.ts is current" git diff --exit-code -- forkvm-node/native.d.ts

run "index.d.ts and native.d.ts type-check (tsc --strict)" \
    bash -c "cd forkvm-node && npx tsc --noEmit --strict --types node test/types.ts"

run "node --test" bash -c "cd forkvm-node && node --test test/*.test.js test/*.test.mjs"

run "README Node snippet is examples/hello.js" readme_snippet forkvm-node/examples/hello.js js

# A fresh project installing the package by path, as a user would: the package's install
# script builds forkvm.node again.
example() {
    local project=$root/target/forkvm-node/project
    rm -rf "$project" && mkdir -p "$project"
    rm -f forkvm-node/forkvm.node
    cp forkvm-node/examples/hello.js "$project/"
    (cd "$project" && echo '{"private": true}' >package.json &&
        npm install --no-audit --no-fund --loglevel=error "$root/forkvm-node" &&
        node hello.js "$FORKVM_TEST_GUEST" | tee hello.out && grep -q "child 1: generation 1" hello.out)
}
run "examples/hello.js in a project that ran npm install ./forkvm-node" example

finish forkvm-node
