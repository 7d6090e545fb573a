#!/usr/bin/env bash
# Set up the environment, lint, type-check and run the test suite.
# Extra arguments go to pytest, e.g.  scripts/run-tests.sh -k localpg -x
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-test-env.sh

failed=()
step() {
    local name=$1
    shift
    printf '\n==> %s\n' "$*"
    if "$@"; then
        return 0
    else
        local rc=$?
        failed+=("$name (exit $rc)")
        return 0
    fi
}

step "ruff check" .venv/bin/ruff check proxy tests
step "ruff format" .venv/bin/ruff format --check proxy tests
step "mypy" .venv/bin/mypy --strict proxy

printf '\n==> .venv/bin/python -m pytest -q -ra %s\n' "$*"
rc=0
.venv/bin/python -m pytest -q -ra "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests (exit 5): the suite always has tests, so this is a failure" >&2
    failed+=("pytest (no tests collected)")
elif [ "$rc" -ne 0 ]; then
    failed+=("pytest (exit $rc)")
fi

# The mypyc-compiled data path (setup.py, docs/performance.md), the build bench/run.py measures
# as proxy-mypyc: built into a throwaway tree (scripts/compiled-tree.sh) and tested there, the
# unit, integration and security tests (the e2e tests run the installed CLI, which is the pure build).
# POS_PROXY_TEST_COMPILED=0 skips it; POS_PROXY_COMPILED_TESTS picks other tests.
if [ "${POS_PROXY_TEST_COMPILED:-1}" != 0 ]; then
    compiled_tree="$(mktemp -d)"
    trap 'rm -rf "$compiled_tree"' EXIT
    printf '\n==> mypyc-compiled build in %s\n' "$compiled_tree"
    venv_python="$PWD/.venv/bin/python"
    if PYTHON="$venv_python" bash scripts/compiled-tree.sh "$compiled_tree"; then
        read -r -a compiled_tests <<<"${POS_PROXY_COMPILED_TESTS:-tests/unit tests/integration tests/security}"
        printf '\n==> (compiled) .venv/bin/python -m pytest -q -ra %s\n' "${compiled_tests[*]}"
        rc=0
        (cd "$compiled_tree" && POS_PROXY_EXPECT_COMPILED=1 "$venv_python" -m pytest -q -ra \
            -p no:cacheprovider "${compiled_tests[@]}") || rc=$?
        [ "$rc" -eq 0 ] || failed+=("pytest, compiled build (exit $rc)")
    else
        failed+=("mypyc-compiled build")
    fi
    rm -rf "$compiled_tree"
fi

if [ "${#failed[@]}" -gt 0 ]; then
    printf '\nFAILED:\n' >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
printf '\nAll checks passed.\n'
