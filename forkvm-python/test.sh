#!/usr/bin/env bash
# The Python binding's tests: a virtualenv in target/python-venv with maturin, pytest and mypy;
# the package installed twice — `pip install ./forkvm-python` and the wheel `maturin build`
# makes — then: the README's Python snippet is examples/hello.py and runs; the type stubs match
# the module (mypy's stubtest) and type-check the tests and example; pytest on the test guest,
# plus the Linux image test when the image is built (FORKVM_PY_IMAGE=0 skips it).
# ruff lints and checks the formatting of the Python code.
# Prints "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$PWD/target/python-venv
export PATH=$venv/bin:$PATH
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check 'maturin>=1.5,<2' pytest mypy ruff

guest=$(tests/guest/build.sh)
export FORKVM_TEST_GUEST=$guest
if [ "${FORKVM_PY_IMAGE:-1}" = 1 ] && kernel=$(guest/kernel/build.sh 2>/dev/null) &&
    rootfs=$(guest/rootfs/build.sh 2>/dev/null); then
    export FORKVM_IMAGE_KERNEL=$kernel FORKVM_IMAGE_ROOTFS=$rootfs
fi

# shellcheck source=scripts/checks.sh
source scripts/checks.sh

pip_install() {
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation \
        --force-reinstall --no-deps ./forkvm-python &&
        (cd /tmp && "$venv/bin/python" -c 'import forkvm; forkvm.ConsoleBuffer()')
}
run "pip install ./forkvm-python" pip_install

wheel() {
    local out=$PWD/target/python-wheels
    rm -rf "$out" &&
        (cd forkvm-python && "$venv/bin/maturin" build --quiet --release --out "$out") &&
        "$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps \
            "$out"/forkvm-*.whl &&
        (cd /tmp && "$venv/bin/python" -c 'import forkvm; forkvm.ConsoleBuffer()')
}
run "maturin build: the wheel installs" wheel

run "README Python snippet is examples/hello.py" readme_snippet forkvm-python/examples/hello.py python
hello() {
    "$venv/bin/python" forkvm-python/examples/hello.py "$guest" | tee target/python-hello.out &&
        grep -q "child 1: generation 1" target/python-hello.out
}
run "examples/hello.py" hello

stubs() {
    (cd /tmp && "$venv/bin/python" -m mypy.stubtest forkvm --ignore-disjoint-bases) &&
        "$venv/bin/python" -m mypy --strict --no-error-summary forkvm-python/examples/hello.py &&
        "$venv/bin/python" -m mypy --no-error-summary --check-untyped-defs forkvm-python/tests forkvm-python/bench.py
}
run "type stubs: stubtest and mypy" stubs
run "ruff check and format" bash -c "ruff check --quiet forkvm-python && ruff format --quiet --check forkvm-python"

run "pytest" "$venv/bin/python" -m pytest -q -rs forkvm-python/tests

finish forkvm-python
