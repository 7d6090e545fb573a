"""Run the real proxy (``python -m proxy run``) as a subprocess and reach it with real clients."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from proxy import certs
from proxy.localpg import free_port
from proxy.protocols.postgres import messages as m
from tests import compiled
from tests.logcheck import assert_no_unhandled_errors


@dataclass(frozen=True, slots=True)
class Terminal:
    store: str
    terminal: str
    role: str
    cert: Path
    key: Path
    serial_hex: str


@dataclass(frozen=True, slots=True)
class TerminalPKI:
    """A terminal CA with the proxy's server certificate and terminals in every state a test needs."""

    directory: Path
    ca: Path
    cashier: Terminal
    manager: Terminal
    expired: Terminal
    not_yet_valid: Terminal
    revoked: Terminal
    unmapped_role: Terminal
    foreign: Terminal

    @classmethod
    def create(cls, directory: Path) -> TerminalPKI:
        certs.init_ca(directory)
        certs.issue_server(directory, dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"])
        now = datetime.now(UTC)
        issue = _issue_terminal
        revoked = issue(directory, "till-stolen", "cashier")
        certs.revoke(directory, int(revoked.serial_hex, 16))
        foreign_pki = directory / "foreign"
        certs.init_ca(foreign_pki, common_name="someone else's CA")
        return cls(
            directory=directory,
            ca=directory / "ca.pem",
            cashier=issue(directory, "till-01", "cashier"),
            manager=issue(directory, "office-01", "manager"),
            expired=issue(directory, "till-old", "cashier", not_before=now - timedelta(days=10), days=1),
            not_yet_valid=issue(directory, "till-future", "cashier", not_before=now + timedelta(days=5)),
            revoked=revoked,
            unmapped_role=issue(directory, "till-audit", "auditor"),
            foreign=issue(foreign_pki, "till-01", "cashier"),
        )

    def issue(self, terminal: str, role: str) -> Terminal:
        """One more terminal of this CA's store, valid now."""
        return _issue_terminal(self.directory, terminal, role)


def _issue_terminal(pki: Path, terminal: str, role: str, **kwargs: Any) -> Terminal:
    issued = certs.issue_terminal(pki, store="store-001", terminal=terminal, role=role, **kwargs)
    return Terminal("store-001", terminal, role, issued.cert_path, issued.key_path, issued.serial_hex)


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class ProxyProcess:
    """One proxy subprocess with its own config file and JSON log."""

    def __init__(
        self,
        directory: Path,
        config: Mapping[str, Any],
        arguments: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        command_prefix: Sequence[str] = (),
    ) -> None:
        """``host`` is the address it listens on; ``command_prefix`` runs it, for instance, in a
        network namespace (``ip netns exec NAME``), where that address lives."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.arguments = list(arguments)  # extra `pos-proxy run` options, e.g. --workers 2
        self.command_prefix = list(command_prefix)
        self.host = host
        self.port = free_port()
        self.config = deep_merge(dict(config), {"listen": {"host": host, "port": self.port}})
        self.config_path = directory / "pos-proxy.yaml"
        self.log_path = directory / "proxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                *self.command_prefix,
                sys.executable,
                "-m",
                "proxy",
                "run",
                "--config",
                str(self.config_path),
                "--log-level",
                "debug",
                *self.arguments,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self._process.returncode}:\n{self.log_text()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
                continue
            if compiled.expected():
                self._check_compiled_build(deadline)
            return self
        self.stop()
        raise RuntimeError(f"proxy did not listen within {timeout}s:\n{self.log_text()}")

    def _check_compiled_build(self, deadline: float) -> None:
        """In the compiled run (tests/compiled.py), this proxy must say it runs the mypyc build: it
        imports the compiled tree only from its working directory.  A proxy that exits without
        listening (a test of a failed start) has nothing to say."""
        assert self._process is not None
        while time.monotonic() < deadline + 10:
            events = list(self.log_events())
            builds = [r.get("build") for r in events if r.get("event") == "listening"]
            if builds:
                assert builds[0] == "mypyc", f"this proxy runs the {builds[0]} build"
                return
            if self._process.poll() is not None or any(r.get("event") == "start_failed" for r in events):
                return
            time.sleep(0.05)
        raise AssertionError(f"no listening event in the proxy log:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 15.0, *, check: bool = True) -> int | None:
        """SIGTERM and wait; with ``check``, fails if the proxy logged an unhandled error
        (tests/logcheck.py)."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        if check:
            self.check_log()
        return self._process.returncode

    def check_log(self) -> None:
        assert_no_unhandled_errors(self.log_text(), f"the proxy in {self.directory}")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def rss_kib(self) -> int:
        """The proxy's resident set size now (VmRSS in /proc/PID/status), in KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii")
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS in the status of process {self.pid}")

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit code of a proxy that was told to stop (a second signal would end it hard)."""
        assert self._process is not None
        return self._process.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> Iterator[dict[str, Any]]:
        text = self.log_text()
        # A running proxy may be half-way through writing its last line: only ended lines are whole.
        for line in text[: text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                yield json.loads(line)

    def wait_for_event(self, event: str, timeout: float = 10.0, **fields: object) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.log_events():
                if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                    return record
            time.sleep(0.05)
        raise AssertionError(f"no {event} {fields} in the proxy log:\n{self.log_text()[-4000:]}")

    # --- clients ---

    def conninfo(
        self, terminal: Terminal | None, ca: Path, *, dbname: str = "pos", **extra: str
    ) -> dict[str, Any]:
        """psycopg/libpq keyword arguments for this proxy as ``terminal``."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": dbname,
            "user": terminal.terminal if terminal else "nobody",
            "sslmode": "verify-full",
            "sslrootcert": str(ca),
            "connect_timeout": 10,
        }
        if terminal is not None:
            kwargs.update(sslcert=str(terminal.cert), sslkey=str(terminal.key))
        kwargs.update(extra)
        return kwargs

    def ssl_context(self, terminal: Terminal | None, ca: Path) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(ca))
        if terminal is not None:
            context.load_cert_chain(terminal.cert, terminal.key)
        return context

    def served_certificate(self, context: ssl.SSLContext) -> bytes:
        """The DER certificate the proxy presents now (SSLRequest, then a TLS handshake)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            raw.sendall(m.build_ssl_request())
            assert raw.recv(1) == b"S"
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                certificate = tls.getpeercert(binary_form=True)
        assert certificate is not None
        return certificate

    async def asyncpg_connect(self, terminal: Terminal, ca: Path, **settings: str) -> asyncpg.Connection:
        """An asyncpg connection of ``terminal`` to route "pos", ``settings`` in its startup packet."""
        return await asyncpg.connect(
            host=self.host,
            port=self.port,
            user=terminal.terminal,
            database="pos",
            ssl=self.ssl_context(terminal, ca),
            timeout=15,
            server_settings=settings,
        )


def stop_all(processes: Sequence[ProxyProcess]) -> None:
    """Stop every one before checking any log: a failed check must not leave the rest running."""
    for process in processes:
        process.stop(check=False)
    for process in processes:
        process.check_log()


def proxy_config(pki: TerminalPKI, cluster: Any, password_file: Path, **route: Any) -> dict[str, Any]:
    """A proxy config for the test cluster; ``route`` overrides keys of the ``pos`` route."""
    route_config: dict[str, Any] = {
        "host": "localhost",
        "port": cluster.port,
        "user": cluster.user,
        "password": {"file": str(password_file)},
        "sslmode": "verify-full",
        "sslrootcert": str(cluster.ca),
        "pool": {"size": 3, "max_client_wait": "5s", "connect_timeout": "3s"},
    }
    return {
        "listen": {"handshake_timeout": "3s", "startup_timeout": "3s", "max_message_size": "1MiB"},
        "tls": {
            "cert": str(pki.directory / "server.pem"),
            "key": str(pki.directory / "server.key"),
            "client_ca": str(pki.ca),
            "crl": str(pki.directory / "crl.pem"),
        },
        "roles": {"cashier": {"description": "tills"}, "manager": None},
        "routes": {"pos": deep_merge(route_config, route)},
    }


def receive_notifications(
    sock: socket.socket, until: str, timeout: float = 15.0
) -> list[tuple[int | None, str]]:
    """sd_notify datagrams on a test NOTIFY_SOCKET as (sender pid, text), until one contains ``until``.

    The pid is known when the socket has SO_PASSCRED set (the kernel then attaches SCM_CREDENTIALS).
    """
    seen: list[tuple[int | None, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        except TimeoutError:
            break
        pids = [
            struct.unpack("iII", payload)[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        seen.append((pids[0] if pids else None, data.decode()))
        if until in seen[-1][1]:
            return seen
    raise AssertionError(f"no {until!r} among {seen}")
