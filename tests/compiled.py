"""Is the mypyc-compiled data path what this process imports?  (scripts/compiled-tree.sh)

With ``POS_PROXY_EXPECT_COMPILED=1`` tests/conftest.py calls :func:`check` before any test runs,
so a run meant for the compiled build cannot silently test the pure-Python modules instead.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
from pathlib import Path

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


def expected() -> bool:
    return os.environ.get("POS_PROXY_EXPECT_COMPILED", "").strip().lower() not in ("", "0", "false", "no")


def compiled_modules() -> list[str]:
    """The dotted names of the modules setup.py compiles (its MYPYC_MODULES list)."""
    tree = ast.parse(SETUP_PY.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "MYPYC_MODULES" for target in node.targets
        ):
            paths: list[str] = ast.literal_eval(node.value)
            return [path.removesuffix(".py").replace("/", ".") for path in paths]
    raise RuntimeError(f"no MYPYC_MODULES in {SETUP_PY}")


def not_compiled() -> list[str]:
    """The modules of compiled_modules() imported from something other than an extension."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    wrong = []
    for name in compiled_modules():
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if not path.endswith(suffixes):
            wrong.append(f"{name} from {path or '?'}")
    return wrong


def check() -> None:
    wrong = not_compiled()
    if wrong:
        raise SystemExit("POS_PROXY_EXPECT_COMPILED is set but these are not compiled: " + ", ".join(wrong))
    print(f"compiled: {len(compiled_modules())} modules")
