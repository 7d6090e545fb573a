"""A throwaway local PostgreSQL cluster for the demo and the test suite.

Uses Debian's server binaries (``/usr/lib/postgresql/<major>/bin``), which refuse to run as
root: when this process is root every server-side tool (initdb, pg_ctl, postgres, psql) runs
as the ``postgres`` OS user, with a cluster directory owned by that user.  When this process
is not root the tools simply run as the current user.

The cluster is tuned for speed, not durability (``fsync=off`` and friends): never point it at
data you care about.  Nothing is registered globally (no atexit hooks, no signal handlers):
whoever calls :meth:`LocalPostgres.start` must call :meth:`LocalPostgres.stop` (or use the
object as a context manager).

Authentication layout (``pg_hba.conf``):

* unix socket: ``trust`` (the tooling uses it as superuser ``postgres``);
* with TLS: ``hostssl`` on 127.0.0.1/::1 with ``scram-sha-256``, and plaintext ``host`` lines
  that ``reject`` -- so a client that does not negotiate TLS is refused;
* without TLS: ``host`` on 127.0.0.1/::1 with ``scram-sha-256`` (``trust`` when no superuser
  password was given).

Roles created with ``create_role(..., method="md5")`` store an MD5 password hash and are put in
the (NOLOGIN) group role :data:`MD5_AUTH_GROUP`; an ``md5`` hba line for members of that group
precedes the ``scram-sha-256`` lines, because a ``scram-sha-256`` hba line cannot
authenticate a role whose stored password is an MD5 hash.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

__all__ = [
    "BINDIR_ENV",
    "MD5_AUTH_GROUP",
    "SUPERUSER",
    "LocalPostgres",
    "LocalPostgresError",
    "LocalPostgresTLS",
    "find_pg_bindir",
    "free_port",
]

#: Environment variable that overrides the server binary directory.
BINDIR_ENV: Final = "POS_PROXY_PG_BINDIR"
#: Database superuser created by initdb.
SUPERUSER: Final = "postgres"
#: OS user the server runs as when this process is root.
OS_USER: Final = "postgres"
#: Group role whose members authenticate with ``md5`` over TCP (see module docstring).
MD5_AUTH_GROUP: Final = "localpg_md5_auth"

_BINDIR_HINT: Final = (
    "PostgreSQL server binaries not found: install Debian's postgresql-15 package "
    f"(apt-get install postgresql-15) or set {BINDIR_ENV}"
)
_PG_CTL_WAIT_SECONDS: Final = 30
_LOG_TAIL_LINES: Final = 40
# sun_path is 108 bytes including the NUL; the socket file is ".s.PGSQL.<port>".
_MAX_SOCKET_DIR_LEN: Final = 107 - len("/.s.PGSQL.65535") - 1
_PORT_RETRIES: Final = 3
_RESERVED_SETTINGS: Final = frozenset({"port", "listen_addresses", "unix_socket_directories"})
_SETTING_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_PASSWORD_METHODS: Final = frozenset({"scram-sha-256", "md5"})

StopMode = Literal["smart", "fast", "immediate"]


class LocalPostgresError(Exception):
    """The local cluster could not be found, created, started, stopped or queried."""


@dataclass(frozen=True, slots=True)
class LocalPostgresTLS:
    """Server certificate material.

    The cluster copies the files into its data directory (owned by the server's OS user, key
    mode 0600), so the originals may live anywhere this process can read.  ``ca`` becomes
    ``ssl_ca_file`` (the server then *requests*, but does not require, client certificates).
    ``require_client_certificate`` adds ``clientcert=verify-full`` to the ``hostssl`` lines: every TCP
    client must then present a certificate that ``ca`` signed, whose CN is its database user name.
    """

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True, slots=True)
class _OsUser:
    """Who the server-side tools run as; ``switch`` is true when we are root."""

    name: str
    uid: int
    gid: int
    switch: bool


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where one incarnation of the cluster lives on disk."""

    root: Path
    datadir: Path
    socket_dir: Path
    log_path: Path
    #: Directories this object created and removes in stop(), deepest first.
    owned_dirs: tuple[Path, ...]
    #: base_dir itself, when it did not exist before start(); removed in stop() if empty.
    created_base: Path | None


# --------------------------------------------------------------------------- helpers


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _has_server_tools(directory: Path) -> bool:
    return all(_is_executable_file(directory / tool) for tool in ("initdb", "pg_ctl", "postgres"))


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin -> numeric version, so 15 sorts above 9.6.
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) if parts else (-1,)


def find_pg_bindir() -> Path:
    """Locate the PostgreSQL server binaries (a directory holding ``initdb`` and ``pg_ctl``).

    Order: ``$POS_PROXY_PG_BINDIR``; the newest ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu);
    the directory of ``pg_ctl`` on ``PATH``.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        path = Path(override).expanduser()
        if not _has_server_tools(path):
            raise LocalPostgresError(
                f"{BINDIR_ENV}={override!r} does not contain executable initdb, pg_ctl and postgres"
            )
        return path

    debian = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_server_tools(p)),
        key=_version_key,
        reverse=True,
    )
    if debian:
        return debian[0]

    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        for candidate in (Path(pg_ctl).parent, Path(pg_ctl).resolve().parent):
            if _has_server_tools(candidate):
                return candidate

    raise LocalPostgresError(_BINDIR_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host`` (racy by nature; retry on clash)."""
    family, type_, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, type_, proto) as sock:
        sock.bind(address)
        port: int = sock.getsockname()[1]
        return port


def _quote_ident(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"invalid SQL identifier: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): backslashes are literal.
    if "\x00" in value:
        raise ValueError("SQL string literals cannot contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


def _quote_conf(value: str) -> str:
    # postgresql.conf string syntax: '' or \' for a quote, and backslash escapes are processed.
    if "\n" in value or "\r" in value or "\x00" in value:
        raise ValueError(f"configuration values cannot contain newlines or NUL: {value!r}")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    """Can (uid, gid) -- with no supplementary groups -- reach ``path``'s contents?"""
    if uid == 0:
        return True
    chains = {path.absolute(), path.resolve()}
    for chain_end in chains:
        for directory in (chain_end, *chain_end.parents):
            try:
                st = directory.stat()
            except OSError:
                return False
            if st.st_uid == uid:
                bit = stat.S_IXUSR
            elif st.st_gid == gid:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not st.st_mode & bit:
                return False
    return True


def _current_os_user() -> _OsUser:
    if os.geteuid() != 0:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return _OsUser(name=name, uid=uid, gid=os.getegid(), switch=False)
    try:
        entry = pwd.getpwnam(OS_USER)
    except KeyError:
        raise LocalPostgresError(
            f"running as root but there is no {OS_USER!r} OS user to run the server as: "
            "install Debian's postgresql-15 package (apt-get install postgresql-15) "
            "or run as a non-root user"
        ) from None
    return _OsUser(name=OS_USER, uid=entry.pw_uid, gid=entry.pw_gid, switch=True)


def _pick_locale() -> str:
    """C.UTF-8 when the C library has it (glibc >= 2.35 always does), else plain C."""
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "C"
    available = {line.strip().lower() for line in out.splitlines()}
    return "C.UTF-8" if available & {"c.utf8", "c.utf-8"} else "C"


def _pid_is_postgres(pid: int, uid: int) -> bool:
    """Is ``pid`` alive and (where /proc tells us) a postgres process owned by ``uid``?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else; /proc decides below
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").exists():
        return True  # no procfs: trust the pid file
    try:
        comm = (proc / "comm").read_text().strip()
        owner = proc.stat().st_uid
    except OSError:
        return False
    return comm.startswith(("postgres", "postmaster")) and owner == uid


def _cmdline_mentions(pid: int, needle: str) -> bool:
    """Does /proc/<pid>/cmdline contain ``needle`` (true when there is no procfs)?"""
    if not Path("/proc/self").exists():
        return True
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return needle in raw.decode("utf-8", "replace").replace("\x00", " ")


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# --------------------------------------------------------------------------- the cluster


class LocalPostgres:
    """A disposable PostgreSQL cluster under ``base_dir`` (or a private /tmp directory).

    ``start()`` runs initdb and starts the server; ``stop()`` stops it and deletes everything
    it created.  ``stop_server_only()``/``start_server_only()``/``restart()`` bounce the
    server while keeping the data directory (and the port).
    """

    superuser: Final = SUPERUSER

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        tls: LocalPostgresTLS | None = None,
        superuser_password: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        extra = dict(settings or {})
        for name, value in extra.items():
            if not _SETTING_NAME_RE.match(name):
                raise ValueError(f"invalid PostgreSQL setting name: {name!r}")
            if name.lower() in _RESERVED_SETTINGS:
                raise ValueError(f"set {name!r} through the LocalPostgres constructor, not settings")
            _quote_conf(value)  # validate early
        self.base_dir = Path(base_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.tls = tls
        self.superuser_password = superuser_password
        self.settings: Mapping[str, str] = extra
        self._port_is_fixed = port is not None
        self._layout: _Layout | None = None
        self._initialized = False
        self._pid: int | None = None
        self._bindir: Path | None = None
        self._os_user: _OsUser | None = None

    def __repr__(self) -> str:
        where = self._layout.datadir if self._layout else "not created"
        return f"<LocalPostgres {self.host}:{self.port} {where} running={self.is_running()}>"

    # ---------------------------------------------------------------- paths

    def _require_layout(self) -> _Layout:
        if self._layout is None:
            raise LocalPostgresError("the local PostgreSQL cluster has not been created: call start() first")
        return self._layout

    @property
    def datadir(self) -> Path:
        return self._require_layout().datadir

    @property
    def socket_dir(self) -> Path:
        return self._require_layout().socket_dir

    @property
    def log_path(self) -> Path:
        return self._require_layout().log_path

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    @property
    def os_user(self) -> str:
        """The OS account the server runs as."""
        return self._user().name

    def _user(self) -> _OsUser:
        if self._os_user is None:
            self._os_user = _current_os_user()
        return self._os_user

    def _tool(self, name: str) -> str:
        path = self.bindir / name
        if _is_executable_file(path):
            return str(path)
        found = shutil.which(name)
        if found is None:
            raise LocalPostgresError(f"{name} not found in {self.bindir} or on PATH")
        return found

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Create the cluster (first call) and start the server; no-op when already running."""
        if self._layout is not None and self._initialized:
            self.start_server_only()
            return
        self._user()
        self.bindir  # noqa: B018  -- fail early with the install hint
        self._validate_tls()
        self._layout = self._make_layout()
        try:
            self._initdb()
            self._install_tls()
            self._write_config()
            self._write_hba()
            self._initialized = True
            self._start_server(allow_port_change=not self._port_is_fixed)
        except BaseException:
            self._teardown()
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown, kill fallback) and delete what start() created.

        Safe to call any number of times, before or after start().
        """
        if self._layout is None:
            return
        try:
            self.stop_server_only()
        finally:
            self._teardown()

    def stop_server_only(self, *, mode: StopMode = "fast") -> None:
        """Stop the server, keeping the data directory; no-op when it is not running."""
        layout = self._layout
        if layout is None or not self.is_running():
            self._pid = None
            return
        pid = self._postmaster_pid()
        result = self._run(
            [
                self._tool("pg_ctl"),
                "stop",
                "-D",
                str(layout.datadir),
                "-m",
                mode,
                "-w",
                "-t",
                str(_PG_CTL_WAIT_SECONDS),
            ],
            timeout=_PG_CTL_WAIT_SECONDS + 15,
            check=False,
        )
        if result is None or self.is_running():
            self._kill(pid)
        self._pid = None

    def start_server_only(self) -> None:
        """Start the server of an existing cluster (after stop_server_only()); no-op if running."""
        if self._layout is None or not self._initialized:
            raise LocalPostgresError("the local PostgreSQL cluster has not been created: call start() first")
        if self.is_running():
            return
        self._start_server(allow_port_change=False)

    def kill_server_only(self) -> None:
        """SIGKILL the postmaster and every backend at once, as a crash or the OOM killer would;
        the data directory stays, and start_server_only() recovers from the WAL."""
        pid = self._postmaster_pid()
        if not self._is_our_postmaster(pid):
            self._pid = None
            return
        assert pid is not None
        uid = self._user().uid
        victims = [pid, *(c for c in _children_of(pid) if _pid_is_postgres(c, uid))]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        if not _wait_until(lambda: not any(_pid_is_postgres(v, uid) for v in victims), 10):
            raise LocalPostgresError(f"PostgreSQL server (pid {pid}) did not exit after SIGKILL")
        self._pid = None

    def restart(self) -> None:
        """Fast-stop and start the server, keeping data directory and port."""
        self.stop_server_only()
        self.start_server_only()

    def is_running(self) -> bool:
        if self._layout is None:
            return False
        return self._is_our_postmaster(self._postmaster_pid())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- SQL

    def psql(self, sql: str, *, dbname: str = "postgres") -> str:
        """Run ``sql`` through psql over the unix socket as superuser; return psql's stdout.

        Output is unaligned and tuples-only (``-A -t``), one row per line, columns joined by
        ``|``.  Statements run one at a time in autocommit mode (so ``CREATE DATABASE`` works);
        the first error aborts the script and raises :class:`LocalPostgresError`.
        """
        layout = self._require_layout()
        if not self.is_running():
            raise LocalPostgresError("the local PostgreSQL server is not running")
        env = {
            "PGHOST": str(layout.socket_dir),
            "PGPORT": str(self.port),
            "PGUSER": SUPERUSER,
            "PGDATABASE": dbname,  # an env var is never parsed as a conninfo string
            "PGCLIENTENCODING": "UTF8",
            "PGCONNECT_TIMEOUT": "10",
        }
        argv = [self._tool("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"]
        result = self._run(argv, input=sql, env=env, timeout=120, check=False)
        if result is None:
            raise LocalPostgresError("psql could not be run")
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise LocalPostgresError(
                f"psql failed on database {dbname!r} (exit {result.returncode}): {detail}"
            )
        return result.stdout

    def execute_script(self, sql: str, *, dbname: str = "postgres") -> None:
        """Run one or more SQL statements; raise LocalPostgresError on the first error."""
        self.psql(sql, dbname=dbname)

    def create_role(
        self,
        name: str,
        password: str,
        *,
        method: str = "scram-sha-256",
        superuser: bool = False,
        login: bool = True,
    ) -> None:
        """Create a role whose password is stored as a ``method`` hash (scram-sha-256 or md5).

        md5 roles also join :data:`MD5_AUTH_GROUP` so that TCP logins use md5 authentication.
        """
        if method not in _PASSWORD_METHODS:
            raise ValueError(f"method must be one of {sorted(_PASSWORD_METHODS)}, not {method!r}")
        role = _quote_ident(name)
        statements = [
            f"SET password_encryption = {_quote_literal(method)};",
            f"CREATE ROLE {role} WITH {'LOGIN' if login else 'NOLOGIN'} "
            f"{'SUPERUSER' if superuser else 'NOSUPERUSER'} PASSWORD {_quote_literal(password)};",
            "RESET password_encryption;",
        ]
        if method == "md5":
            group = _quote_ident(MD5_AUTH_GROUP)
            exists = f"SELECT FROM pg_catalog.pg_roles WHERE rolname = {_quote_literal(MD5_AUTH_GROUP)}"
            statements += [
                f"DO $localpg$ BEGIN IF NOT EXISTS ({exists}) THEN CREATE ROLE {group} NOLOGIN; END IF;"
                " END $localpg$;",
                f"GRANT {group} TO {role};",
            ]
        self.execute_script("\n".join(statements) + "\n")

    def create_database(self, name: str, owner: str) -> None:
        self.execute_script(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(owner)};\n")

    # ---------------------------------------------------------------- internals: processes

    def _base_env(self) -> dict[str, str]:
        # No inherited PG* variables (PGDATA, PGSSLMODE, ... would change tool behaviour).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.pop("LANGUAGE", None)
        if self._layout is not None and self._user().switch:
            env["HOME"] = str(self._layout.root)
        return env

    def _run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
        check: bool = True,
        what: str | None = None,
    ) -> subprocess.CompletedProcess[str] | None:
        """Run a PostgreSQL tool as the server's OS user.

        Returns None (check=False) or raises (check=True) when the tool cannot run at all or a
        non-zero exit status is returned with check=True.
        """
        user = self._user()
        full_env = self._base_env()
        if env:
            full_env.update(env)
        cwd = str(self._layout.root) if self._layout is not None else "/"
        label = what or Path(argv[0]).name
        try:
            result = subprocess.run(
                list(argv),
                input=input if input is not None else "",
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                env=full_env,
                cwd=cwd,
                timeout=timeout,
                check=False,
                user=user.uid if user.switch else None,
                group=user.gid if user.switch else None,
                extra_groups=[] if user.switch else None,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            if check:
                raise LocalPostgresError(f"{label} could not be run: {exc}") from exc
            return None
        if check and result.returncode != 0:
            output = "\n".join(s.strip() for s in (result.stdout, result.stderr) if s.strip())
            raise LocalPostgresError(f"{label} failed (exit {result.returncode}):\n{output}")
        return result

    def _log_tail(self, start_offset: int = 0) -> str:
        if self._layout is None:
            return ""
        try:
            with self._layout.log_path.open("rb") as fh:
                fh.seek(start_offset)
                data = fh.read()
        except OSError:
            return "(no server log)"
        lines = data.decode("utf-8", "replace").splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(server log is empty)"

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _postmaster_pid(self) -> int | None:
        if self._layout is None:
            return None
        try:
            first = (self._layout.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first.strip())
        except (OSError, ValueError):
            return None

    def _is_our_postmaster(self, pid: int | None) -> bool:
        """Is ``pid`` a live postgres process serving *this* data directory?"""
        if pid is None or self._layout is None:
            return False
        return _pid_is_postgres(pid, self._user().uid) and _cmdline_mentions(pid, str(self._layout.datadir))

    def _kill(self, pid: int | None) -> None:
        """Last resort: immediate-shutdown the postmaster, then SIGKILL it and its children."""
        uid = self._user().uid
        pid = pid if pid is not None else self._pid
        if pid is None or not self._is_our_postmaster(pid):
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            return
        if _wait_until(lambda: not _pid_is_postgres(pid, uid), 10):
            return
        victims = [pid, *(c for c in _children_of(pid) if _pid_is_postgres(c, uid))]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        if not _wait_until(lambda: not any(_pid_is_postgres(v, uid) for v in victims), 10):
            raise LocalPostgresError(f"PostgreSQL server (pid {pid}) did not exit after SIGKILL")

    def _start_server(self, *, allow_port_change: bool) -> None:
        layout = self._require_layout()
        attempts = _PORT_RETRIES if allow_port_change else 1
        for attempt in range(1, attempts + 1):
            offset = self._log_size()
            result = self._run(
                [
                    self._tool("pg_ctl"),
                    "start",
                    "-D",
                    str(layout.datadir),
                    "-l",
                    str(layout.log_path),
                    "-w",
                    "-t",
                    str(_PG_CTL_WAIT_SECONDS),
                ],
                timeout=_PG_CTL_WAIT_SECONDS + 30,
                check=False,
            )
            if result is not None and result.returncode == 0 and self.is_running():
                self._pid = self._postmaster_pid()
                return
            # pg_ctl may give up while the postmaster lingers: make sure nothing is left.
            self._kill(self._postmaster_pid())
            log = self._log_tail(offset)
            port_clash = "could not bind" in log or "Address already in use" in log
            if port_clash and attempt < attempts:
                self.port = free_port(self.host)
                self._write_config()
                continue
            pg_ctl_output = ""
            if result is None:
                pg_ctl_output = "pg_ctl could not be run"
            else:
                pg_ctl_output = "\n".join(s.strip() for s in (result.stdout, result.stderr) if s.strip())
            raise LocalPostgresError(
                f"PostgreSQL server failed to start on {self.host}:{self.port} "
                f"(datadir {layout.datadir}):\n{pg_ctl_output}\n"
                f"--- last lines of {layout.log_path} ---\n{log}"
            )

    # ---------------------------------------------------------------- internals: files

    def _chown(self, path: Path) -> None:
        user = self._user()
        if user.switch:
            os.chown(path, user.uid, user.gid)

    def _write_file(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text, encoding="utf-8")
        os.chmod(path, mode)
        self._chown(path)

    def _private_tmpdir(self, prefix: str) -> Path:
        user = self._user()
        for candidate in (tempfile.gettempdir(), "/tmp"):
            if Path(candidate).is_dir() and _traversable_by(Path(candidate), user.uid, user.gid):
                return Path(tempfile.mkdtemp(prefix=prefix, dir=candidate))
        raise LocalPostgresError(
            f"no temporary directory is accessible to the {user.name!r} OS user (tried $TMPDIR and /tmp)"
        )

    def _make_layout(self) -> _Layout:
        user = self._user()
        base = Path(os.path.abspath(self.base_dir))
        created_base = None if base.exists() else base
        base.mkdir(parents=True, exist_ok=True)
        owned: list[Path] = []
        try:
            if user.switch and not _traversable_by(base, user.uid, user.gid):
                # e.g. pytest's /tmp/pytest-of-root (0700) or anything under /root: do not
                # loosen the caller's directories, use a private directory in /tmp instead.
                root = self._private_tmpdir("pos-proxy-pg-")
            else:
                root = Path(tempfile.mkdtemp(prefix="localpg-", dir=base))
            owned.append(root)
            os.chmod(root, 0o700)
            self._chown(root)

            socket_dir = root / "socket"
            if len(str(socket_dir)) > _MAX_SOCKET_DIR_LEN:
                socket_dir = self._private_tmpdir("pos-proxy-pgsock-")
                owned.append(socket_dir)
            else:
                socket_dir.mkdir()
            os.chmod(socket_dir, 0o700)
            self._chown(socket_dir)
        except BaseException:
            for directory in owned:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return _Layout(
            root=root,
            datadir=root / "data",
            socket_dir=socket_dir,
            log_path=root / "postgresql.log",
            owned_dirs=tuple(reversed(owned)),
            created_base=created_base,
        )

    def _teardown(self) -> None:
        layout = self._layout
        self._layout = None
        self._initialized = False
        self._pid = None
        if layout is None:
            return
        for directory in layout.owned_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        if layout.created_base is not None:
            with contextlib.suppress(OSError):  # not empty (or gone): leave it to its owner
                layout.created_base.rmdir()

    def _validate_tls(self) -> None:
        if self.tls is None:
            return
        for label, path in (("cert", self.tls.cert), ("key", self.tls.key), ("ca", self.tls.ca)):
            if path is not None and not Path(path).is_file():
                raise LocalPostgresError(f"TLS {label} file not found: {path}")
        if self.tls.require_client_certificate and self.tls.ca is None:
            raise LocalPostgresError("require_client_certificate needs the ca that signs client certificates")

    def _initdb(self) -> None:
        layout = self._require_layout()
        password = self.superuser_password
        argv = [
            self._tool("initdb"),
            "-D",
            str(layout.datadir),
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            f"--locale={_pick_locale()}",
            "--auth-local=trust",
            f"--auth-host={'scram-sha-256' if password is not None else 'trust'}",
            "--no-sync",
        ]
        pwfile = layout.root / "pwfile"
        if password is not None:
            if "\n" in password or "\r" in password:
                raise LocalPostgresError("the superuser password cannot contain line breaks")
            self._write_file(pwfile, password + "\n")
            argv.append(f"--pwfile={pwfile}")
        try:
            self._run(argv, timeout=300, what="initdb")
        finally:
            pwfile.unlink(missing_ok=True)

    def _install_tls(self) -> None:
        tls = self.tls
        if tls is None:
            return
        datadir = self._require_layout().datadir
        for source, target, mode in (
            (tls.cert, "server.crt", 0o644),
            (tls.key, "server.key", 0o600),
            (tls.ca, "root.crt", 0o644),
        ):
            if source is None:
                continue
            dest = datadir / target
            shutil.copyfile(source, dest)
            os.chmod(dest, mode)
            self._chown(dest)

    def _config_values(self) -> dict[str, str]:
        layout = self._require_layout()
        values = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(layout.socket_dir),
            "password_encryption": "scram-sha-256",
            # Throwaway cluster: trade durability for speed.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            # pg_ctl -l sends stderr to log_path.
            "logging_collector": "off",
            "log_destination": "stderr",
            "lc_messages": "C",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        if self.tls is not None:
            values["ssl"] = "on"
            values["ssl_cert_file"] = str(layout.datadir / "server.crt")
            values["ssl_key_file"] = str(layout.datadir / "server.key")
            if self.tls.ca is not None:
                values["ssl_ca_file"] = str(layout.datadir / "root.crt")
        values.update(self.settings)
        return values

    def _write_config(self) -> None:
        datadir = self._require_layout().datadir
        lines = ["# Written by proxy.localpg: a throwaway cluster (fsync is off)."]
        lines += [f"{name} = {_quote_conf(value)}" for name, value in self._config_values().items()]
        self._write_file(datadir / "localpg.conf", "\n".join(lines) + "\n")
        main_conf = datadir / "postgresql.conf"
        include = "include = 'localpg.conf'"
        text = main_conf.read_text(encoding="utf-8")
        if include not in text:
            with main_conf.open("a", encoding="utf-8") as fh:
                fh.write(f"\n# proxy.localpg settings (last wins)\n{include}\n")

    def _write_hba(self) -> None:
        datadir = self._require_layout().datadir
        no_password = self.tls is None and self.superuser_password is None
        method = "trust" if no_password else "scram-sha-256"
        host_type = "hostssl" if self.tls is not None else "host"
        addresses = ("127.0.0.1/32", "::1/128")
        lines = [
            "# Written by proxy.localpg.",
            "# TYPE    DATABASE  USER  ADDRESS  METHOD",
            "local all all trust",
        ]
        verify_client = self.tls is not None and self.tls.require_client_certificate
        options = " clientcert=verify-full" if verify_client else ""
        if method != "trust":
            lines += [f"{host_type} all +{MD5_AUTH_GROUP} {addr} md5{options}" for addr in addresses]
        lines += [f"{host_type} all all {addr} {method}{options}" for addr in addresses]
        if self.tls is not None:
            lines += [f"host all all {addr} reject" for addr in addresses]
        self._write_file(datadir / "pg_hba.conf", "\n".join(lines) + "\n")
