"""Optional mypyc compilation of the data path.

``pip install .`` builds the usual pure-Python package (everything else is in pyproject.toml).
``POS_PROXY_COMPILE=1 pip install .`` also compiles the modules below with mypyc into C
extensions that sit next to their .py files in the wheel (an extension module is imported in
preference to the .py of the same name).  Needs a C compiler and the Python headers; mypy is
fetched as a build requirement (or, with ``--no-build-isolation``, taken from the environment).
See docs/performance.md.  This is the pattern black and mypy use for their compiled wheels.
"""

from __future__ import annotations

import os
import tomllib

from setuptools import setup

# The per-transaction data path (bench/session_cost.py); each must compile under mypyc.
# Not sessionstate.py: its pglast Visitor finds its visit_* methods with inspect.ismethod, which
# is false for compiled methods, so a compiled classifier silently finds nothing.
MYPYC_MODULES = [
    "proxy/protocols/postgres/classifiercache.py",
    "proxy/protocols/postgres/messages.py",
    "proxy/protocols/postgres/parameters.py",
    "proxy/protocols/postgres/prepared.py",
    "proxy/protocols/postgres/session.py",
    "proxy/protocols/postgres/upstream.py",
    "proxy/pool.py",
]
# Pinned: mypyc's generated C changes between releases; this is the one the tests and the
# benchmark ran against (scripts/run-tests.sh, bench/run.py --configs proxy-mypyc).
MYPY_REQUIREMENT = "mypy==2.4.1"


def _compile_requested() -> bool:
    return os.environ.get("POS_PROXY_COMPILE", "").strip().lower() not in ("", "0", "false", "no")


def _build_requirements() -> list[str]:
    """mypy, and what it type-checks the compiled modules against: the runtime dependencies
    (pyproject.toml) and PyYAML's stubs.  Under build isolation a fresh environment has none of
    them yet (pip installs dependencies after building), and mypy fails on a missing import."""
    with open("pyproject.toml", "rb") as pyproject:
        dependencies: list[str] = tomllib.load(pyproject)["project"]["dependencies"]
    return [MYPY_REQUIREMENT, "types-PyYAML", *dependencies]


if _compile_requested():
    try:
        from mypyc.build import mypycify
    except ImportError:
        # Under PEP 517 build isolation setuptools turns setup_requires into build requirements
        # (get_requires_for_build_wheel): the frontend installs mypy and runs this file again.
        setup(setup_requires=_build_requirements())
        # Reached only when setup() built something (pip asking for the build requirements stops
        # inside it): without mypy, e.g. --no-build-isolation, that was a pure wheel.
        raise SystemExit("POS_PROXY_COMPILE is set but mypy (mypyc) is not installed: not compiled")
    else:
        opt_level = os.environ.get("MYPYC_OPT_LEVEL", "3")
        setup(
            setup_requires=_build_requirements(),
            ext_modules=mypycify(["--config-file", "pyproject.toml", *MYPYC_MODULES], opt_level=opt_level),
        )
else:
    setup()
