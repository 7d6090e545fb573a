"""`pos-proxy run` loads only what the proxy needs: not the demo, its driver or the cluster manager."""

from __future__ import annotations

import subprocess
import sys

_DEMO_ONLY = ("asyncpg", "proxy.demo", "proxy.localpg")


def test_importing_the_cli_loads_neither_the_demo_nor_its_driver() -> None:
    probe = (
        "import sys, proxy.cli\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {_DEMO_ONLY!r} "
        f"or m in {_DEMO_ONLY!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=60
    ).stdout.split()
    assert loaded == []
    # The check can fail: the demo module itself does bring them in.
    demo = subprocess.run(
        [sys.executable, "-c", probe.replace("import sys, proxy.cli", "import sys, proxy.demo")],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert {"asyncpg", "proxy.demo", "proxy.localpg"} <= set(demo)
