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

if [ "${#failed[@]}" -gt 0 ]; then
    printf '\nFAILED:\n' >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
printf '\nAll checks passed.\n'
