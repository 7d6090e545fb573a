#!/usr/bin/env bash
# Build the mypyc-compiled data path (POS_PROXY_COMPILE=1, see setup.py) and lay out a tree in
# which the test suite and the benchmarks import it:
#
#     scripts/compiled-tree.sh DEST          # DEST is wiped and recreated
#     cd DEST && POS_PROXY_EXPECT_COMPILED=1 PYTHON -m pytest -q tests/unit
#
# DEST/proxy is the compiled wheel's package (each compiled module's .so next to its .py); the
# rest of the repository (tests, bench, config, ...) is copied beside it, never the source
# proxy/.  Run from DEST, `python -m pytest` and the proxies the tests start with
# `python -m proxy` find DEST first on sys.path, so a working tree's proxy/ cannot shadow the
# compiled modules and no .so is ever written next to the sources.  With
# POS_PROXY_EXPECT_COMPILED=1 tests/conftest.py refuses to run unless every module setup.py
# compiles was imported from its extension.
#
# PYTHON (default .venv/bin/python) builds the wheel (with build isolation: pip fetches mypy)
# and installs it with --no-deps: its dependencies must already be in that environment.
set -euo pipefail

dest=${1:?usage: scripts/compiled-tree.sh DEST}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
# Both relative to the caller's directory; not realpath for the interpreter (it would resolve a
# venv's python to the base interpreter and leave the venv).
[[ $dest = /* ]] || dest=$PWD/$dest
[[ $python = /* ]] || [[ $python != */* ]] || python=$PWD/$python
dest=$(realpath -m "$dest")
case "$dest/" in
"$repo"/*) echo "compiled-tree.sh: DEST must be outside the repository ($repo): it is wiped" >&2; exit 2 ;;
esac
cd "$repo"

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Built from a copy: setuptools would otherwise leave build/ and *.egg-info in the working tree.
mkdir "$wheels/src"
cp -r proxy setup.py pyproject.toml README.md "$wheels/src/"
find "$wheels/src" \( -name __pycache__ -o -name '*.so' \) -prune -exec rm -rf {} +
POS_PROXY_COMPILE=1 "$python" -m pip wheel -q --no-deps -w "$wheels" "$wheels/src" >"$wheels/log" 2>&1 ||
    { cat "$wheels/log" >&2; echo "compiled build failed" >&2; exit 1; }
wheel=$(ls "$wheels"/pos_db_proxy-*.whl)

rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip install -q --no-deps --no-compile --target "$dest" "$wheel"
rm -rf "$dest"/pos_db_proxy-*.dist-info "$dest/bin"
for entry in tests bench config systemd docs setup.py pyproject.toml README.md; do
    [ -e "$entry" ] && cp -r "$entry" "$dest/"
done
find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$dest/certs"

(cd "$dest" && POS_PROXY_EXPECT_COMPILED=1 "$python" -c 'import tests.compiled as c; c.check()')
echo "compiled tree ready: $dest"
