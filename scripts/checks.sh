# shellcheck shell=bash
# Shared by the bindings' test scripts (sourced, from the repository root): named checks that are
# counted instead of stopping the script, the check that a README snippet is an example file
# verbatim, and the closing count.

passed=0 failed=0

# run NAME COMMAND...: runs COMMAND and counts it as NAME passed or failed.
run() {
    local name=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "ok: $name"
    else
        failed=$((failed + 1))
        echo "FAILED: $name" >&2
    fi
}

# readme_snippet FILE LANG: the README's code block (```LANG) that follows the marker
# `<!-- FILE -->` is FILE, verbatim (so the README's example cannot rot).
readme_snippet() {
    local file=$1 lang=$2
    awk -v marker="<!-- $file -->" -v fence="\`\`\`$lang" '
        $0 == marker { grab = 1; next }
        grab && $0 == fence { inside = 1; next }
        inside && $0 == "```" { exit }
        inside { print }' README.md | diff -u "$file" -
}

# finish NAME: prints the count and fails if any check failed.
finish() {
    echo "$1: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}
