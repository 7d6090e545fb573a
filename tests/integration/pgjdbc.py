"""pgjdbc at test time: tests/integration/jdbc/PosTill.java compiled against Debian's
libpostgresql-jdbc-java, run with the properties files it reads (the proxy's or the database's)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import PgCluster, running_in_ci
from tests.integration.proxyproc import ProxyProcess, Terminal

JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java
SOURCE = Path(__file__).with_name("jdbc") / "PosTill.java"
RUN_TIMEOUT = 120.0
# pgjdbc's own socket timeouts: a statement the proxy never answers fails the program, not the run.
TIMEOUTS = {"connectTimeout": "10", "loginTimeout": "20", "socketTimeout": "60"}


def toolchain_missing() -> str | None:
    """Why PosTill cannot run here, or None."""
    missing = [tool for tool in ("java", "javac") if shutil.which(tool) is None]
    if not JAR.is_file():
        missing.append(f"{JAR} (Debian's libpostgresql-jdbc-java)")
    if not missing:
        return None
    return f"not installed: {', '.join(missing)} (scripts/setup-test-env.sh installs them)"


@dataclass(frozen=True, slots=True)
class PosTill:
    """The compiled program: ``command`` for a caller that runs it itself, ``run`` to run it here."""

    classes: Path

    def command(self, *properties: Path, temporary: bool = False) -> list[str]:
        java = shutil.which("java")
        assert java is not None
        return [
            java,
            "-Duser.timezone=UTC",  # the TimeZone pgjdbc sends at startup, the same on every machine
            "-XX:TieredStopAtLevel=1",  # a short run: starts faster
            "-cp",
            f"{self.classes}:{JAR}",
            "PosTill",
            *(["--temp"] if temporary else []),
            *(str(path) for path in properties),
        ]

    def run(self, *properties: Path) -> list[dict[str, Any]]:
        """Its JSON lines; fails the test with what it printed when it exits with an error."""
        result = subprocess.run(
            self.command(*properties), capture_output=True, timeout=RUN_TIMEOUT, check=False
        )
        output = f"{result.stdout.decode(errors='replace')}\n{result.stderr.decode(errors='replace')}"
        assert result.returncode == 0, f"PosTill exited with {result.returncode}:\n{output[-6000:]}"
        return [json.loads(line) for line in result.stdout.decode().splitlines()]


def compile_pos_till(directory: Path) -> PosTill:
    """javac into ``directory``; the test is skipped when Java or pgjdbc is missing (under CI, fails)."""
    if reason := toolchain_missing():
        if running_in_ci():
            pytest.fail(f"{reason}; CI is set: missing JDBC is an error here, not a skip")
        pytest.skip(reason)
    javac = shutil.which("javac")
    assert javac is not None
    result = subprocess.run(
        [javac, "-encoding", "UTF-8", "-d", str(directory), "-cp", str(JAR), str(SOURCE)],
        capture_output=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return PosTill(directory)


def write_properties(path: Path, url: str, settings: dict[str, str]) -> Path:
    """A java.util.Properties file (values escaped as Properties.load reads them); it may hold a
    password, so only its owner reads it."""
    escape = str.maketrans({"\\": "\\\\", "\n": "\\n"})
    lines = [f"{key}={value.translate(escape)}" for key, value in {"url": url, **settings}.items()]
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pkcs8_key(terminal: Terminal, directory: Path) -> Path:
    """The terminal's key as pgjdbc's default SSL factory reads ``sslkey``: PKCS#8, DER, unencrypted."""
    key = serialization.load_pem_private_key(terminal.key.read_bytes(), password=None)
    path = directory / f"{terminal.terminal}.pk8"
    path.touch(mode=0o600)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def proxy_properties(
    proxy: ProxyProcess, terminal: Terminal, ca: Path, directory: Path, **settings: str
) -> Path:
    """``terminal`` reaching route "pos" of ``proxy`` with its certificate (verify-full both ways)."""
    return write_properties(
        directory / f"{terminal.terminal}-proxy.properties",
        f"jdbc:postgresql://{proxy.host}:{proxy.port}/pos",
        {
            "user": terminal.terminal,
            "sslmode": "verify-full",
            "sslrootcert": str(ca),
            "sslcert": str(terminal.cert),
            "sslkey": str(pkcs8_key(terminal, directory)),
            **TIMEOUTS,
            **settings,
        },
    )


def direct_properties(cluster: PgCluster, user: str, password: str, directory: Path, **settings: str) -> Path:
    """``user`` logging in to database "pos" of ``cluster`` itself with a password."""
    return write_properties(
        directory / f"{user}-direct.properties",
        f"jdbc:postgresql://{cluster.host}:{cluster.port}/pos",
        {
            "user": user,
            "password": password,
            "sslmode": "verify-full",
            "sslrootcert": str(cluster.ca),
            **TIMEOUTS,
            **settings,
        },
    )
