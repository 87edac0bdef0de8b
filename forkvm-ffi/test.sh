#!/usr/bin/env bash
# The C binding's tests: checks that include/forkvm.h is current, installs the library, header and
# pkg-config file into a prefix (target/forkvm-ffi/prefix) with forkvm-ffi/install.sh, checks that
# the README's C snippet is examples/hello.c, compiles the example through pkg-config and
# runs it, then compiles the C tests with gcc under AddressSanitizer and
# UndefinedBehaviorSanitizer (leak checking on) and runs them on this host's KVM, then once more
# under valgrind (all but the Linux image test, `tests/image.c`, which runs only when
# FORKVM_LINUX_KERNEL and FORKVM_LINUX_IMAGE name the image, as scripts/test.sh does).
# Prints "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test -p forkvm-ffi --quiet --test header

guest=$(tests/guest/build.sh)
prefix=$PWD/target/forkvm-ffi/prefix
rm -rf "$prefix"
forkvm-ffi/install.sh --debug "$prefix"
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
bin=$PWD/target/forkvm-ffi/bin
mkdir -p "$bin"

# shellcheck source=scripts/checks.sh
source scripts/checks.sh

run "README C snippet is examples/hello.c" readme_snippet forkvm-ffi/examples/hello.c c

cflags=(-std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -g)
asan=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1
export FORKVM_TEST_GUEST=$guest

hello() {
    # shellcheck disable=SC2046 # pkg-config prints several words
    gcc "${cflags[@]}" "${asan[@]}" forkvm-ffi/examples/hello.c $(pkg-config --cflags --libs forkvm) \
        -o "$bin/hello" &&
        "$bin/hello" "$guest" | tee "$bin/hello.out" && grep -q "child 1: generation 1" "$bin/hello.out"
}
run "examples/hello.c (pkg-config, dynamic, ASan+UBSan)" hello

static_hello() {
    gcc "${cflags[@]}" forkvm-ffi/examples/hello.c -I"$prefix/include" "$prefix/lib/libforkvm.a" \
        -lpthread -ldl -lm -o "$bin/hello-static" && "$bin/hello-static" "$guest" >/dev/null
}
run "examples/hello.c (static libforkvm.a)" static_hello

for test in forkvm-ffi/tests/*.c; do
    c_name=$(basename "$test" .c)
    c_test() {
        # shellcheck disable=SC2046
        gcc "${cflags[@]}" "${asan[@]}" "$test" $(pkg-config --cflags --libs forkvm) -lpthread \
            -o "$bin/$c_name" && "$bin/$c_name"
    }
    run "forkvm-ffi/tests/$c_name.c (ASan+UBSan)" c_test
done

# The same tests without sanitizers under valgrind (memcheck: invalid accesses, definite leaks;
# a few seconds here). scripts/test.sh installs valgrind; FORKVM_C_VALGRIND=0 skips it.
if [ "${FORKVM_C_VALGRIND:-1}" = 1 ]; then
    for test in forkvm-ffi/tests/*.c; do
        c_name=$(basename "$test" .c)
        # The Linux image test boots a guest: minutes under valgrind; ASan covers it.
        [ "$c_name" = image ] && continue
        valgrind_test() {
            # shellcheck disable=SC2046
            gcc "${cflags[@]}" "$test" $(pkg-config --cflags --libs forkvm) -lpthread \
                -o "$bin/$c_name-vg" &&
                valgrind -q --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=9 \
                    "$bin/$c_name-vg"
        }
        run "forkvm-ffi/tests/$c_name.c (valgrind)" valgrind_test
    done
fi

finish forkvm-ffi
