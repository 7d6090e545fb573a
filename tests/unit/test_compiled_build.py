"""What the mypyc-compiled build (setup.py, POS_PROXY_COMPILE=1) needs of the modules it compiles.

These run on the pure-Python sources, so a change that would only break the compiled build
fails in every test run, not just in the compiled one (scripts/run-tests.sh runs both).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from proxy.errors import UpstreamUnavailable, caused_by
from tests import compiled

ROOT = Path(__file__).resolve().parents[2]


def _compiled_sources() -> list[Path]:
    return [ROOT / (name.replace(".", "/") + ".py") for name in compiled.compiled_modules()]


def test_the_compiled_modules_exist() -> None:
    sources = _compiled_sources()
    assert sources
    for path in sources:
        assert path.is_file(), path


@pytest.mark.parametrize("path", _compiled_sources(), ids=lambda path: path.stem)
def test_raise_from_goes_through_caused_by(path: Path) -> None:
    # mypyc ignores `raise X from Y`: without caused_by the compiled build loses __cause__.
    wrong = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.cause is not None:
            call = node.exc
            chained = (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id == "caused_by"
                and len(call.args) == 2
                and ast.dump(call.args[1]) == ast.dump(node.cause)
            )
            if not chained:
                wrong.append(f"{path.name}:{node.lineno}")
    assert not wrong, "use `raise caused_by(X(...), exc) from exc` in a compiled module: " + ", ".join(wrong)


@pytest.mark.parametrize("path", _compiled_sources(), ids=lambda path: path.stem)
def test_no_nested_classes(path: Path) -> None:
    # mypyc: "Nested class definitions not supported".
    nested = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for inner in ast.walk(node):
                if inner is not node and isinstance(inner, ast.ClassDef):
                    nested.append(f"{path.name}:{inner.lineno} {inner.name}")
    assert not nested


def test_caused_by_sets_the_cause_without_a_from_clause() -> None:
    # What mypyc compiles `raise caused_by(X, exc) from exc` to: the raise without its `from`.
    cause = ConnectionRefusedError("refused")
    error = UpstreamUnavailable("could not connect")
    assert caused_by(error, cause) is error
    assert error.__cause__ is cause
    assert error.__suppress_context__
