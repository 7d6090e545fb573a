"""Black holes on loopback: nftables rules that silently drop one TCP connection's packets, as a
dead WAN link or a vanished till does (this machine's kernel has no netem).

Every rule lives in a table of the test's own, matches only loopback and only the two ports of the
connection it cuts, and goes when the table is deleted at teardown.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

import pytest

from tests.conftest import running_in_ci

_NFT = shutil.which("nft")
_tables = count()
_PREFIX = "pos_proxy_test_"


def require_nftables() -> str:
    """The nft binary, or a skip (a failure under CI) saying why the black holes cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("black-holing a link takes nftables rules, which need root")
    if _NFT is None:
        message = "nft is not installed (scripts/setup-test-env.sh installs nftables)"
        if running_in_ci():
            pytest.fail(f"{message}; CI is set: a missing nft is an error here, not a skip")
        pytest.skip(message)
    return _NFT


class BlackHoles:
    """One nftables table whose input chain drops the packets of the connections cut so far."""

    def __init__(self, nft: str) -> None:
        self._nft = nft
        self.table = f"{_PREFIX}{os.getpid()}_{next(_tables)}"

    def _run(self, script: str) -> None:
        subprocess.run([self._nft, "-f", "-"], input=script, text=True, check=True, timeout=10)

    def create(self) -> None:
        self._delete_tables_of_dead_runs()
        # Dropped on the way in, so the sender's stack sees a plain loss and retransmits, as over a
        # dead link (a drop on the way out would be reported to the sender as a local error).
        self._run(
            f"table inet {self.table} {{\n"
            "  chain input { type filter hook input priority -150; policy accept; }\n"
            "}\n"
        )

    def _delete_tables_of_dead_runs(self) -> None:
        """A run killed before its teardown leaves its table behind: its pid names it."""
        listed = subprocess.run(
            [self._nft, "list", "tables"], check=True, capture_output=True, text=True, timeout=10
        ).stdout
        for match in re.finditer(rf"^table inet ({_PREFIX}(\d+)_\d+)$", listed, re.MULTILINE):
            if not Path(f"/proc/{match.group(2)}").exists():
                subprocess.run(
                    [self._nft, "delete", "table", "inet", match.group(1)], check=False, timeout=10
                )

    def cut(self, port_a: int, port_b: int) -> None:
        """Drop every packet between local ports ``port_a`` and ``port_b``, both ways."""
        self._run(
            f"add rule inet {self.table} input iifname lo tcp sport {port_a} tcp dport {port_b} drop\n"
            f"add rule inet {self.table} input iifname lo tcp sport {port_b} tcp dport {port_a} drop\n"
        )

    def mend(self) -> None:
        """Remove every cut: the link works again."""
        self._run(f"flush chain inet {self.table} input\n")

    def delete(self) -> None:
        subprocess.run(
            [self._nft, "delete", "table", "inet", self.table], check=False, capture_output=True, timeout=10
        )


@contextmanager
def black_holes() -> Iterator[BlackHoles]:
    holes = BlackHoles(require_nftables())
    holes.create()
    try:
        yield holes
    finally:
        holes.delete()
