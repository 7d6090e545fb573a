"""Load the proxy's one YAML configuration file into validated, frozen settings objects."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import importlib.util
import ipaddress
import os
import re
import ssl
import stat
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final, NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml
from cryptography import x509

from proxy.audit import AuditSettings, OnWriteFailure
from proxy.limits import LimitSettings, Rate, SharedLimitFallback
from proxy.policy.model import (
    DENYLIST_NAMES,
    STATEMENT_KINDS,
    ApprovedStatement,
    PolicyMode,
    RolePolicy,
)

__all__ = [
    "AdminConfig",
    "AuditConfig",
    "ClientCertificate",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "IdentityConfig",
    "IdentitySource",
    "LimitsConfig",
    "ListenConfig",
    "PolicySettings",
    "PoolConfig",
    "PoolMode",
    "ProxyProtocolConfig",
    "RoleConfig",
    "RouteConfig",
    "SSLMode",
    "Secret",
    "SessionStateAction",
    "SharedLimitsConfig",
    "TLSConfig",
    "TLSVersionName",
    "UserNameRule",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


# --- Errors -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with the configuration; ``path`` is the dotted key, "" for the file itself."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The configuration is unusable. Carries every problem found, so one edit can fix them all."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


# --- Values -----------------------------------------------------------------------------------------------


class Secret:
    """A resolved credential that keeps itself out of reprs, logs and tracebacks."""

    # Deliberately not a dataclass: dataclasses.asdict() would recurse into it and expose the value.
    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    # copy, deepcopy and pickle would otherwise rebuild the object through the blocked __setattr__.
    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


class PoolMode(enum.Enum):
    SESSION = "session"
    TRANSACTION = "transaction"


class SessionStateAction(enum.Enum):
    """What transaction pooling does with a statement that leaves state in the server session."""

    PIN = "pin"
    REFUSE = "refuse"


class SSLMode(enum.Enum):
    """Upstream TLS, with libpq's meanings."""

    DISABLE = "disable"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class UserNameRule(enum.Enum):
    """What the user name in a terminal's startup packet must equal, given its certificate identity."""

    IGNORE = "ignore"
    MATCH_TERMINAL = "match-terminal"
    MATCH_ROLE = "match-role"


class TLSVersionName(enum.Enum):
    TLS1_2 = "1.2"
    TLS1_3 = "1.3"

    @property
    def ssl_version(self) -> ssl.TLSVersion:
        return _SSL_VERSIONS[self]


_SSL_VERSIONS: Final = {
    TLSVersionName.TLS1_2: ssl.TLSVersion.TLSv1_2,
    TLSVersionName.TLS1_3: ssl.TLSVersion.TLSv1_3,
}


# --- Settings ---------------------------------------------------------------------------------------------


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyProtocolConfig:
    """PROXY protocol headers from load balancers: who may send one, and how long they get."""

    enabled: bool = False
    # Peers inside these networks must start with a header; nobody else may send one.
    trusted_sources: tuple[IPNetwork, ...] = ()
    header_timeout: float = 5.0

    def trusts(self, host: str) -> bool:
        """Whether a connection from ``host`` (a socket peer address) must start with a PROXY header."""
        if not self.enabled:
            return False
        address = ipaddress.ip_address(host)
        # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_sources)


class ExpiredCRLAction(enum.Enum):
    """What the proxy does while the loaded CRL is past its nextUpdate and no fresh one has arrived."""

    # Keep enforcing the last CRL's revocations (the proxy checks serials itself) and alert: a fleet's
    # tills keep selling when the CRL job fails at 3 a.m.
    KEEP_LAST = "keep-last"
    # Fail closed like OpenSSL (X509_V_ERR_CRL_HAS_EXPIRED): every terminal is refused until a fresh CRL.
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class TCPKeepalive:
    """Keepalive probes on a TCP connection: a WAN link or NAT that drops idle flows silently is noticed
    after about idle + interval * count instead of the kernel's two hours."""

    idle: int = 60
    interval: int = 10
    count: int = 6


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 6432
    # The pre-authentication phase, from accept: the TLS handshake (with SSLRequest and PROXY header)
    # must end within handshake_timeout, and the startup packet must be in within startup_timeout.
    handshake_timeout: float = 10.0
    startup_timeout: float = 15.0
    # Connections not through that phase yet: beyond these caps the oldest are dropped first, so a
    # flood of half-open connections cannot use up the descriptors legitimate terminals need.
    max_pending_handshakes: int = 1024
    max_pending_handshakes_per_source: int = 64
    # Pre-authentication log and audit records (refusals, failed handshakes) per event and second;
    # the rest are counted and reported once a second as preauth_records_suppressed.
    preauth_records_per_second: int = 20
    max_message_size: int = 16 * 2**20
    # On SIGTERM, how long transactions in flight may take to finish before sessions are cut.
    drain_timeout: float = 30.0
    tcp_keepalive: TCPKeepalive = TCPKeepalive()
    # How long data sent to a terminal may stay unacknowledged (TCP_USER_TIMEOUT) before the
    # connection is dropped; None: the kernel's retransmission limit (about 15 minutes).
    tcp_user_timeout: float | None = 60.0
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    # Worker processes sharing the port (SO_REUSEPORT) under a supervisor; 1: one plain process.
    workers: int = 1


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path
    crl: Path | None = None
    min_version: TLSVersionName = TLSVersionName.TLS1_2
    expired_crl: ExpiredCRLAction = ExpiredCRLAction.KEEP_LAST


@dataclass(frozen=True, slots=True)
class IdentitySource:
    """A certificate field and the pattern whose named groups (store/terminal/role) it yields."""

    field: str
    pattern: re.Pattern[str]


_ROLE_NAME: Final = r"[a-z][a-z0-9_]{0,62}"
# Store and terminal ids, as `pos-proxy certs` issues them.
_ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"

# Matches the certificates that `pos-proxy certs` issues.
_DEFAULT_IDENTITY_SOURCES: Final = (
    IdentitySource(
        "san_uri",
        re.compile(
            r"^urn:pos-db-proxy:terminal:(?P<store>[A-Za-z0-9_-]{1,64}):(?P<terminal>[A-Za-z0-9_-]{1,64})$"
        ),
    ),
    IdentitySource("subject.OU", re.compile(rf"^(?P<role>{_ROLE_NAME})$")),
)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    sources: tuple[IdentitySource, ...] = _DEFAULT_IDENTITY_SOURCES
    user_name: UserNameRule = UserNameRule.IGNORE


@dataclass(frozen=True, slots=True)
class RoleConfig:
    name: str
    description: str = ""
    limits: LimitSettings = field(default_factory=LimitSettings)
    # Applied to the role's server sessions (seconds); a client may lower it, never raise it.
    statement_timeout: float | None = None
    # No policy file: the role's statements are not filtered (logged at startup).
    policy: RolePolicy | None = None
    policy_file: Path | None = None


@dataclass(frozen=True, slots=True)
class SharedLimitsConfig:
    """Per-store and per-role limits counted together by several proxies in one Redis (proxy.sharedlimits)."""

    redis_url: str
    password: Secret | None = None
    key_prefix: str = "pos-proxy"
    on_unavailable: SharedLimitFallback = SharedLimitFallback.FAIL_OPEN
    # Tokens a proxy takes from a shared statement bucket at a time (see TokenLease).
    lease_size: int = 10
    # Bound on every Redis call.
    timeout: float = 0.5
    # A proxy that stops heartbeating stops counting after this long (it heartbeats every third of it).
    instance_ttl: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Overrides of the roles' limits per store and per terminal, and the pre-TLS source limit."""

    source_connections: Rate | None = None  # new connections per second per source address
    stores: Mapping[str, LimitSettings] = field(default_factory=lambda: types.MappingProxyType({}))
    terminals: Mapping[str, LimitSettings] = field(default_factory=lambda: types.MappingProxyType({}))
    shared: SharedLimitsConfig | None = None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The tamper-evident audit log (see proxy.audit)."""

    settings: AuditSettings
    # Share of allowed statements written as statement events, per role (1.0: all, 0: none).
    # Refused statements, connection, limit, cancel, reload and admin events are always written.
    allowed_statements: float = 1.0
    allowed_statements_by_role: Mapping[str, float] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    # While the log file takes no records: refuse statements (fail closed, the default: a payment
    # system must not run what it cannot audit, PCI DSS 10.2) or run on and alert. Follows a reload.
    on_write_failure: OnWriteFailure = OnWriteFailure.REFUSE

    def statement_share(self, role: str) -> float:
        return self.allowed_statements_by_role.get(role, self.allowed_statements)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP listener (metrics, health, pools, clients, disconnect, reload)."""

    host: str = "127.0.0.1"
    port: int = 9187
    token: Secret | None = None
    # pos_proxy_statements_running_long counts statements running for longer than this.
    long_statement_after: float = 30.0


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Settings shared by all role policies."""

    review_file: Path | None = None
    cache_size: int = 10_000
    # Bytes the decision cache and the audit's statement summaries may each hold.
    cache_bytes: int = 32 * 2**20
    # Longer statements from a role with a policy are refused unparsed (54000): far above what a
    # POS application sends, and within what a worker analyses in the time budget.
    max_statement_bytes: int = 64 * 2**10
    # Longer statements are analysed in a worker process, not on the event loop: the worst shapes
    # measured take ~25 ms to analyse at 1 KiB (a POS statement is rarely longer).
    analyze_in_worker_above: int = 2**10
    analysis_timeout: float = 1.0
    analysis_workers: int = 2


@dataclass(frozen=True, slots=True)
class PoolConfig:
    mode: PoolMode = PoolMode.SESSION
    size: int = 20
    min_idle: int = 0
    max_client_wait: float = 30.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    connect_timeout: float = 5.0
    # Backoff between connect attempts while the server is unreachable (doubling, with jitter).
    connect_retry_delay: float = 0.25
    connect_retry_max_delay: float = 5.0
    tcp_keepalive: TCPKeepalive = TCPKeepalive()
    # How long a statement or any data sent to the server may stay unacknowledged (TCP_USER_TIMEOUT)
    # before the connection is dropped; None: the kernel's retransmission limit (about 15 minutes).
    # Keepalive probes cannot help there: the kernel sends them only while nothing is in flight.
    tcp_user_timeout: float | None = 30.0
    session_state: SessionStateAction = SessionStateAction.PIN
    max_prepared_statements: int = 250
    # A client idle inside a transaction this long is cut off (FATAL 25P03) and its server connection
    # closed, as PgBouncer's idle_transaction_timeout; None: never.
    idle_transaction_timeout: float | None = 60.0
    # Named prepared statements one client may hold, in number and in bytes of their Parse messages.
    max_client_prepared_statements: int = 1000
    max_client_prepared_bytes: int = 2 * 2**20


_DEFAULT_UPSTREAM_PORT: Final = 5432
_DEFAULT_SSLMODE: Final = SSLMode.VERIFY_FULL


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The certificate and key a route presents to its database server (libpq's sslcert, sslkey and
    sslpassword), for servers whose pg_hba.conf says clientcert=verify-full or cert."""

    cert: Path
    key: Path
    password: Secret | None
    files_sha256: str
    """Both files as this load read them: a pair rotated in place under the same paths compares unequal,
    so a reload notices it."""


# kw_only: dbname and user have no default but follow port in the documented order.
@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    database: str
    """The database name terminals send in their startup packet (the key under ``routes``)."""
    host: str
    port: int = _DEFAULT_UPSTREAM_PORT
    dbname: str
    user: str
    password: Secret | None = None
    sslmode: SSLMode = _DEFAULT_SSLMODE
    sslrootcert: Path | None = None
    client_certificate: ClientCertificate | None = None
    """From the route's sslcert, sslkey and sslpassword keys."""
    pool: PoolConfig = PoolConfig()


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig
    tls: TLSConfig
    identity: IdentityConfig
    roles: Mapping[str, RoleConfig]
    routes: Mapping[str, RouteConfig]
    policy: PolicySettings = PolicySettings()
    admin: AdminConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    audit: AuditConfig | None = None
    source: Path | None = None


# --- Public parsers ---------------------------------------------------------------------------------------


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path``; raises ConfigError listing every problem."""
    path = Path(os.path.abspath(path))
    try:
        data = load_yaml(path)
    except ValueError as exc:
        raise _file_error(str(exc)) from None
    return parse_config(data, base_dir=path.parent, environ=environ, source=path)


def load_yaml(path: Path) -> object:
    """The YAML document at ``path`` (duplicate keys refused); ValueError says file, line and column."""
    try:
        text = _read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML: {exc.problem}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a scalar like the date 2024-13-01
        raise ValueError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


def _file_error(message: str) -> ConfigError:
    return ConfigError([ConfigProblem("", message)])


_SECTIONS: Final = (
    "listen",
    "tls",
    "identity",
    "roles",
    "pool",
    "routes",
    "policy",
    "admin",
    "limits",
    "audit",
)
_AUDIT_KEYS: Final = (
    "file",
    "key_file",
    "stdout",
    "rotate_bytes",
    "rotate_interval",
    "flush_interval",
    "allowed_statements",
    "allowed_statements_by_role",
    "witness_file",
    "on_write_failure",
    "max_held_records",
)


def parse_config(
    data: object,
    *,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Config:
    """Validate already-loaded YAML data; relative paths resolve against ``base_dir``."""
    ctx = _Context(Path(os.path.abspath(base_dir)), os.environ if environ is None else environ)
    root = ctx.section(data, "", _SECTIONS)
    listen = _parse_listen(root.child("listen", _keys(ListenConfig)))
    tls = _parse_tls(root.child("tls", _keys(TLSConfig)))
    identity = _parse_identity(root.child("identity", _keys(IdentityConfig)))
    roles = {
        name: _parse_role(name, section)
        for name, section in root.named(
            "roles", "role", _matching(_ROLE_NAME), ("description", "policy", "limits", "statement_timeout")
        )
    }
    policy_section = root.child("policy", _keys(PolicySettings))
    policy = _parse_policy_settings(policy_section, ctx)
    pool_defaults = _parse_pool(root.child("pool", _keys(PoolConfig)), PoolConfig())
    routes = {
        database: _parse_route(database, section, pool_defaults)
        for database, section in root.named("routes", "route", _string(), _ROUTE_KEYS)
    }
    limits = _parse_limits(root.child("limits", _keys(LimitsConfig)))
    audit = _parse_audit(root.child("audit", _AUDIT_KEYS)) if root.data.get("audit") is not None else None
    admin = None
    if root.data.get("admin") is not None:
        admin_section = root.child("admin", _keys(AdminConfig))
        admin = AdminConfig(
            host=admin_section.read("host", _string(), AdminConfig().host),
            port=admin_section.read("port", _ADMIN_PORT, AdminConfig().port),
            token=admin_section.read("token", ctx.secret, None),
            long_statement_after=admin_section.read(
                "long_statement_after", _positive_duration, AdminConfig().long_statement_after
            ),
        )
        if admin.token is None and "token" not in admin_section.data and not _is_loopback(admin.host):
            # Pools, clients, terminal cut-off and reload must not be open to a whole network.
            admin_section.report(
                "token", f"required when admin.host is not a loopback address (host is {admin.host!r})"
            )
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return Config(
        listen=listen,
        tls=tls,
        identity=identity,
        roles=types.MappingProxyType(roles),
        routes=types.MappingProxyType(routes),
        policy=policy,
        admin=admin,
        limits=limits,
        audit=audit,
        source=source,
    )


def _is_loopback(host: str) -> bool:
    """Whether a listener on ``host`` is reachable from this machine only ("localhost" or 127/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name may resolve to any address


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like "250ms", "30s", "5m", "1h"; ValueError if bad."""
    return float(_parse_quantity(value, _DURATION_UNITS, "a duration such as 30, 2.5, '250ms', '5m' or '1h'"))


def parse_size(value: object) -> int:
    """Bytes from a number or a string like "512KiB", "16MiB", "1MB", "2GiB"; ValueError if bad."""
    size = _parse_quantity(value, _SIZE_UNITS, "a size such as 1024, '512KiB', '16MiB' or '1MB'")
    if size != size.to_integral_value():
        raise ValueError(f"expected a whole number of bytes, got {_describe(value)}")
    return int(size)


_DURATION_UNITS: Final = {
    "": Decimal(1),
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_SIZE_UNITS: Final = {
    "": Decimal(1),
    "B": Decimal(1),
    "kB": Decimal(10**3),
    "KB": Decimal(10**3),
    "MB": Decimal(10**6),
    "GB": Decimal(10**9),
    "KiB": Decimal(2**10),
    "MiB": Decimal(2**20),
    "GiB": Decimal(2**30),
}
_QUANTITY: Final = re.compile(r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*")


def _parse_quantity(value: object, units: Mapping[str, Decimal], expected: str) -> Decimal:
    """A non-negative number, optionally carrying one of ``units``; Decimal so "1.5MiB" stays exact."""
    problem = ValueError(f"expected {expected}, got {_describe(value)}")
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value)
        if match is None or match["unit"] not in units:
            raise problem
        quantity = Decimal(match["number"]) * units[match["unit"]]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        quantity = Decimal(value)
    else:
        raise problem
    if not quantity.is_finite() or quantity < 0:
        raise problem
    return quantity


# --- Reading machinery ------------------------------------------------------------------------------------
#
# Readers record problems and carry on with a fallback value, so one pass finds every problem.
# parse_config raises before building a Config whenever a problem was recorded, so fallbacks
# (including the placeholders given to _Section.require) never reach the caller.


@dataclass(slots=True)
class _Context:
    """What one parse shares: where relative paths start, where secrets come from, what went wrong."""

    base_dir: Path
    environ: Mapping[str, str]
    problems: list[ConfigProblem] = field(default_factory=list)

    def report(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message))

    def convert(self, value: object, path: str, convert: Callable[[object], T], fallback: T) -> T:
        try:
            return convert(value)
        except ValueError as exc:
            self.report(path, str(exc))
            return fallback

    def mapping(self, value: object, path: str) -> dict[str, object]:
        """The string-keyed entries of a mapping node; absent or null counts as empty."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.report(path, f"expected a mapping, got {_describe(value)}")
            return {}
        entries: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str):
                entries[key] = item
            else:
                # Typically YAML 1.1 turning `no:` or `1.0:` into a bool or number.
                self.report(path, f"key {key!r} is not a string (quote it)")
        return entries

    def section(self, value: object, path: str, allowed: tuple[str, ...]) -> _Section:
        entries = self.mapping(value, path)
        known: dict[str, object] = {}
        for key, item in entries.items():
            if key in allowed:
                known[key] = item
            else:
                # The value is never echoed: an unknown key may well hold a misplaced password.
                self.report(_join(path, key), f"unknown key (expected one of: {', '.join(allowed)})")
        return _Section(self, path, known)

    def path(self, value: object) -> Path:
        text = _string()(value)
        return Path(os.path.abspath(self.base_dir / text))

    def readable_file(self, value: object) -> Path:
        path = self.path(value)
        _read_file(path)
        return path

    def secret(self, value: object) -> Secret:
        """Resolve a {env: NAME}, {file: PATH} or {credential: NAME} reference. Never echoes a value."""
        if not isinstance(value, Mapping):
            raise ValueError(
                "put secrets in {env: NAME}, {file: PATH} or {credential: NAME}, not in the config file"
            )
        if len(value) != 1:
            raise ValueError("expected exactly one of {env: NAME}, {file: PATH} or {credential: NAME}")
        ((kind, name),) = value.items()
        if kind not in ("env", "file", "credential") or not isinstance(name, str) or not name:
            raise ValueError("expected exactly one of {env: NAME}, {file: PATH} or {credential: NAME}")
        if kind == "env":
            if name not in self.environ:
                raise ValueError(f"environment variable {name} is not set")
            text = self.environ[name]
        elif kind == "file":
            text = _read_secret_file(self.path(name))
        else:
            text = _read_secret_file(self._credential_path(name))
        if not text:
            raise ValueError(f"the secret from {kind} {name} is empty")
        return Secret(text)

    def _credential_path(self, name: str) -> Path:
        """Where systemd's LoadCredential= put credential ``name``."""
        directory = self.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError(
                f"credential {name} needs CREDENTIALS_DIRECTORY, which systemd sets for LoadCredential=; "
                "it is not set"
            )
        if "/" in name or name in (".", ".."):
            raise ValueError(f"credential name {name!r} must be a plain file name")
        return Path(directory) / name


@dataclass(frozen=True, slots=True)
class _Section:
    """A mapping node whose unknown keys were already reported, plus where it sits in the file."""

    ctx: _Context
    path: str
    data: Mapping[str, object]

    def key_path(self, key: str) -> str:
        return _join(self.path, key)

    def report(self, key: str, message: str) -> None:
        self.ctx.report(self.key_path(key), message)

    def read(self, key: str, convert: Callable[[object], T], default: T) -> T:
        """The converted value at ``key``; ``default`` when absent or null (YAML's `key:` with no value)."""
        value = self.data.get(key)
        if value is None:
            return default
        return self.ctx.convert(value, self.key_path(key), convert, default)

    def require(self, key: str, convert: Callable[[object], T], placeholder: T) -> T:
        if self.data.get(key) is None:
            self.report(key, "required")
        return self.read(key, convert, placeholder)

    def child(self, key: str, allowed: tuple[str, ...]) -> _Section:
        return self.ctx.section(self.data.get(key), self.key_path(key), allowed)

    def named(
        self, key: str, what: str, name: Callable[[object], str], allowed: tuple[str, ...]
    ) -> list[tuple[str, _Section]]:
        """The (name, section) entries of a mapping like `routes:`; at least one is required."""
        path = self.key_path(key)
        raw = self.data.get(key)
        entries = self.ctx.mapping(raw, path)
        if raw is None or (isinstance(raw, Mapping) and not raw):
            self.report(key, f"at least one {what} is required")
        sections: list[tuple[str, _Section]] = []
        for entry, value in entries.items():
            entry_path = _join(path, entry)
            if self.ctx.convert(entry, entry_path, name, None) is not None:
                sections.append((entry, self.ctx.section(value, entry_path, allowed)))
        return sections

    def items(self, key: str) -> list[tuple[str, object]]:
        """(path, item) for each element of the non-empty list at ``key``; [] after reporting otherwise."""
        value = self.data.get(key)
        if not isinstance(value, list) or not value:
            self.report(key, f"expected a non-empty list, got {_describe(value)}")
            return []
        return [(f"{self.key_path(key)}[{index}]", item) for index, item in enumerate(value)]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _keys(schema: type, *not_keys: str) -> tuple[str, ...]:
    """The YAML keys of a section: its dataclass's fields, minus those filled from elsewhere."""
    return tuple(f.name for f in dataclasses.fields(schema) if f.name not in not_keys)


def _describe(value: object) -> str:
    """Name a bad value without dumping a whole subtree into the message."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _read_file(path: Path) -> bytes:
    """The file's bytes, or ValueError naming the path and the reason it cannot be used."""
    try:
        # Checked first: opening a FIFO or device would block or never end.
        if not stat.S_ISREG(path.stat().st_mode):
            raise ValueError(f"not a regular file: {path}")
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def _read_secret_file(path: Path) -> str:
    try:
        text = _read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        # The codec's own message quotes bytes of the secret.
        raise ValueError(f"{path} is not valid UTF-8") from None
    # `echo secret > file` and most editors add one newline that is not part of the secret.
    return text.removesuffix("\n")


# --- Value converters: object -> T, raising ValueError with what was expected ---------------------------


def _string(*, allow_empty: bool = False) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or not (allow_empty or value.strip()):
            raise ValueError(
                f"expected {'a' if allow_empty else 'a non-empty'} string, got {_describe(value)}"
            )
        return value

    return convert


def _matching(pattern: str) -> Callable[[object], str]:
    compiled = re.compile(pattern)

    def convert(value: object) -> str:
        if not isinstance(value, str) or compiled.fullmatch(value) is None:
            raise ValueError(f"expected a name matching ^{pattern}$, got {_describe(value)}")
        return value

    return convert


def _whole_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    return value


def _in_range(
    parse: Callable[[object], int], what: str, *, minimum: int, maximum: int | None = None
) -> Callable[[object], int]:
    bounds = f"between {minimum} and {maximum}" if maximum is not None else f"of at least {minimum}"

    def convert(value: object) -> int:
        number = parse(value)
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(f"expected {what} {bounds}, got {_describe(value)}")
        return number

    return convert


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {_describe(value)}")
    return seconds


def _duration_or_off(value: object) -> float | None:
    """A positive duration, or 0 / "off": never."""
    if value in (0, "off"):
        return None
    return _positive_duration(value)


def _one_of(choices: Mapping[str, T]) -> Callable[[object], T]:
    expected = ", ".join(choices)

    def convert(value: object) -> T:
        # YAML reads `min_version: 1.2` as a float; take the number the user meant.
        key = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        if not isinstance(key, str) or key not in choices:
            raise ValueError(f"expected one of: {expected}; got {_describe(value)}")
        return choices[key]

    return convert


def _enum(kind: type[E]) -> Callable[[object], E]:
    return _one_of({member.value: member for member in kind})


MAX_WORKERS: Final = 64


def parse_workers(value: object) -> int:
    """A worker count: a whole number from 1 to MAX_WORKERS, or "auto" for the cores this process may use."""
    if value == "auto":
        # The affinity mask, not cpu_count(): systemd's CPUAffinity= and containers narrow it.
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    number = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_WORKERS:
        raise ValueError(f'expected a worker count from 1 to {MAX_WORKERS} or "auto", got {_describe(value)}')
    return number


_PORT: Final = _in_range(_whole_number, "a port number", minimum=1, maximum=65535)
# 0 lets the system pick a free port (tests, the demo); the chosen one is logged.
_ADMIN_PORT: Final = _in_range(_whole_number, "a port number", minimum=0, maximum=65535)

_IDENTITY_FIELDS: Final = (
    "san_uri",
    "san_dns",
    "subject.CN",
    "subject.O",
    "subject.OU",
    "subject.L",
    "subject.ST",
    "subject.C",
    "subject.serialNumber",
)
_IDENTITY_FIELD: Final = _one_of({name: name for name in _IDENTITY_FIELDS})
_IDENTITY_GROUPS: Final = ("store", "terminal", "role")
_NEVER_MATCHES: Final = re.compile(r"(?!)")


def _identity_pattern(value: object) -> re.Pattern[str]:
    try:
        pattern = re.compile(_string()(value))
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    groups = set(pattern.groupindex)
    unexpected = sorted(groups - set(_IDENTITY_GROUPS))
    if unexpected:
        raise ValueError(
            f"unknown named group(s) {', '.join(unexpected)}; only store, terminal and role are allowed"
        )
    if not groups:
        raise ValueError("needs at least one named group: (?P<store>...), (?P<terminal>...) or (?P<role>...)")
    return pattern


# --- Section parsers --------------------------------------------------------------------------------------


_COUNT: Final = _in_range(_whole_number, "an integer", minimum=1)


def _parse_policy_settings(section: _Section, ctx: _Context) -> PolicySettings:
    default = PolicySettings()
    read, size = section.read, _in_range(parse_size, "a size in bytes", minimum=1024, maximum=2**31 - 1)
    return PolicySettings(
        review_file=read("review_file", ctx.path, None),
        cache_size=read("cache_size", _in_range(_whole_number, "an integer", minimum=1), default.cache_size),
        cache_bytes=read("cache_bytes", size, default.cache_bytes),
        max_statement_bytes=read("max_statement_bytes", size, default.max_statement_bytes),
        analyze_in_worker_above=read(
            "analyze_in_worker_above",
            _in_range(parse_size, "a size in bytes", minimum=0, maximum=2**31 - 1),
            default.analyze_in_worker_above,
        ),
        analysis_timeout=read("analysis_timeout", _positive_duration, default.analysis_timeout),
        analysis_workers=read(
            "analysis_workers",
            _in_range(_whole_number, "an integer", minimum=1, maximum=64),
            default.analysis_workers,
        ),
    )


def _parse_listen(section: _Section) -> ListenConfig:
    default = ListenConfig()
    return ListenConfig(
        host=section.read("host", _string(), default.host),
        port=section.read("port", _PORT, default.port),
        handshake_timeout=section.read("handshake_timeout", _positive_duration, default.handshake_timeout),
        startup_timeout=section.read("startup_timeout", _positive_duration, default.startup_timeout),
        max_message_size=section.read(
            "max_message_size",
            # The wire format's length field is a signed 32-bit integer.
            _in_range(parse_size, "a size in bytes", minimum=1024, maximum=2**31 - 1),
            default.max_message_size,
        ),
        drain_timeout=section.read("drain_timeout", _positive_duration, default.drain_timeout),
        max_pending_handshakes=section.read("max_pending_handshakes", _COUNT, default.max_pending_handshakes),
        max_pending_handshakes_per_source=section.read(
            "max_pending_handshakes_per_source", _COUNT, default.max_pending_handshakes_per_source
        ),
        preauth_records_per_second=section.read(
            "preauth_records_per_second", _COUNT, default.preauth_records_per_second
        ),
        tcp_keepalive=_parse_keepalive(section.child("tcp_keepalive", _keys(TCPKeepalive)), TCPKeepalive()),
        tcp_user_timeout=section.read("tcp_user_timeout", _user_timeout, default.tcp_user_timeout),
        proxy_protocol=_parse_proxy_protocol(section.child("proxy_protocol", _keys(ProxyProtocolConfig))),
        workers=section.read("workers", parse_workers, default.workers),
    )


# Linux's limits for TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
_KEEPALIVE_SECONDS: Final = _in_range(
    lambda value: round(_positive_duration(value)), "a duration in whole seconds", minimum=1, maximum=32767
)


def _user_timeout(value: object) -> float | None:
    """TCP_USER_TIMEOUT: 0 / "off" for the kernel's default; else 100 ms (Linux counts milliseconds,
    and less would drop a healthy connection on one lost segment) to a day."""
    seconds = _duration_or_off(value)
    if seconds is not None and not 0.1 <= seconds <= 86400:
        raise ValueError(f"expected a duration from 100ms to 24h, or off; got {_describe(value)}")
    return seconds


def _parse_keepalive(section: _Section, inherited: TCPKeepalive) -> TCPKeepalive:
    return TCPKeepalive(
        idle=section.read("idle", _KEEPALIVE_SECONDS, inherited.idle),
        interval=section.read("interval", _KEEPALIVE_SECONDS, inherited.interval),
        count=section.read(
            "count", _in_range(_whole_number, "an integer", minimum=1, maximum=127), inherited.count
        ),
    )


def _parse_proxy_protocol(section: _Section) -> ProxyProtocolConfig:
    default = ProxyProtocolConfig()
    enabled = section.read("enabled", _boolean, default.enabled)
    trusted: list[IPNetwork] = section.read("trusted_sources", _list_of(_network), [])
    if enabled and section.data.get("trusted_sources") in (None, []):
        # There is no "trust everybody": that would let any terminal claim any address.
        section.report(
            "trusted_sources", "at least one network is required when enabled is true (the balancers)"
        )
    return ProxyProtocolConfig(
        enabled=enabled,
        trusted_sources=tuple(trusted),
        header_timeout=section.read("header_timeout", _positive_duration, default.header_timeout),
    )


def _network(value: object) -> IPNetwork:
    text = _string()(value)
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise ValueError(f"expected an address or CIDR network such as 10.0.0.0/8: {exc}") from None


def _parse_tls(section: _Section) -> TLSConfig:
    file = section.ctx.readable_file
    return TLSConfig(
        cert=section.require("cert", file, Path()),
        key=section.require("key", file, Path()),
        client_ca=section.require("client_ca", file, Path()),
        crl=section.read("crl", file, None),
        min_version=section.read("min_version", _enum(TLSVersionName), TLSVersionName.TLS1_2),
        expired_crl=section.read("expired_crl", _enum(ExpiredCRLAction), ExpiredCRLAction.KEEP_LAST),
    )


def _parse_identity(section: _Section) -> IdentityConfig:
    default = IdentityConfig()
    user_name = section.read("user_name", _enum(UserNameRule), default.user_name)
    if section.data.get("sources") is None:
        return IdentityConfig(default.sources, user_name)
    problems_before = len(section.ctx.problems)
    sources: list[IdentitySource] = []
    for path, item in section.items("sources"):
        source = section.ctx.section(item, path, _keys(IdentitySource))
        sources.append(
            IdentitySource(
                field=source.require("field", _IDENTITY_FIELD, ""),
                pattern=source.require("pattern", _identity_pattern, _NEVER_MATCHES),
            )
        )
    covered = {group for source in sources for group in source.pattern.groupindex}
    missing = [group for group in _IDENTITY_GROUPS if group not in covered]
    # A broken source has its own problem already; a coverage complaint on top would only be noise.
    if missing and len(section.ctx.problems) == problems_before:
        section.report(
            "sources",
            f"missing named group(s) {', '.join(missing)}: "
            "together the patterns must capture store, terminal and role",
        )
    return IdentityConfig(tuple(sources), user_name)


def _parse_role(name: str, section: _Section) -> RoleConfig:
    description = section.read("description", _string(allow_empty=True), "")
    limits = _parse_limit_settings(section.child("limits", _keys(LimitSettings)))
    statement_timeout = section.read("statement_timeout", _positive_duration, None)
    policy_file = section.read("policy", section.ctx.path, None)
    if policy_file is None:
        return RoleConfig(name, description, limits, statement_timeout=statement_timeout)
    try:
        data = load_yaml(policy_file)
    except ValueError as exc:
        section.report("policy", str(exc))
        return RoleConfig(name, description)
    policy_ctx = _Context(policy_file.parent, section.ctx.environ, section.ctx.problems)
    policy = _parse_policy(policy_ctx.section(data, section.key_path("policy"), _POLICY_KEYS))
    return RoleConfig(name, description, limits, statement_timeout, policy, policy_file)


def _parse_audit(section: _Section) -> AuditConfig:
    share = _in_range_float(0.0, 1.0)
    by_role = {
        role: value
        for role, raw in section.ctx.mapping(
            section.data.get("allowed_statements_by_role"), section.key_path("allowed_statements_by_role")
        ).items()
        if (
            value := section.ctx.convert(
                raw, _join(section.key_path("allowed_statements_by_role"), role), share, None
            )
        )
        is not None
    }
    default = AuditSettings(file=None, key_file=Path())
    key_file = section.require("key_file", section.ctx.readable_file, Path())
    settings = AuditSettings(
        file=section.read("file", section.ctx.path, None),
        key_file=key_file,
        stdout=section.read("stdout", _boolean, default.stdout),
        rotate_bytes=section.read("rotate_bytes", parse_size, default.rotate_bytes),
        rotate_interval=section.read("rotate_interval", _positive_duration, default.rotate_interval),
        flush_interval=section.read("flush_interval", _positive_duration, default.flush_interval),
        max_held_records=section.read(
            "max_held_records", _in_range(_whole_number, "an integer", minimum=0), default.max_held_records
        ),
    )
    if settings.file is not None and not settings.file.parent.is_dir():
        section.report("file", f"directory not found: {settings.file.parent}")
    witness = section.read("witness_file", section.ctx.path, None)
    if witness is not None:
        if settings.file is None:
            section.report("witness_file", "needs audit.file: it anchors the end of the log file")
        elif witness == settings.file:
            section.report("witness_file", "must be another path than audit.file")
        elif not witness.parent.is_dir():
            section.report("witness_file", f"directory not found: {witness.parent}")
        else:
            settings = dataclasses.replace(settings, witness_file=witness)
    return AuditConfig(
        settings=settings,
        allowed_statements=section.read("allowed_statements", share, 1.0),
        allowed_statements_by_role=types.MappingProxyType(by_role),
        on_write_failure=section.read("on_write_failure", _enum(OnWriteFailure), OnWriteFailure.REFUSE),
    )


def _in_range_float(low: float, high: float) -> Callable[[object], float]:
    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}, got {_describe(value)}")
        return float(value)

    return convert


def _parse_limits(section: _Section) -> LimitsConfig:
    overrides: dict[str, dict[str, LimitSettings]] = {"stores": {}, "terminals": {}}
    for key, pattern in (("stores", _ID_PATTERN), ("terminals", rf"{_ID_PATTERN}/{_ID_PATTERN}")):
        path = section.key_path(key)
        for name, value in section.ctx.mapping(section.data.get(key), path).items():
            entry_path = _join(path, name)
            if section.ctx.convert(name, entry_path, _matching(pattern), None) is not None:
                overrides[key][name] = _parse_limit_settings(
                    section.ctx.section(value, entry_path, _keys(LimitSettings))
                )
    shared = None
    if section.data.get("shared") is not None:
        shared = _parse_shared_limits(section.child("shared", _keys(SharedLimitsConfig)))
    return LimitsConfig(
        source_connections=_read_rate(section, "source_connections"),
        stores=types.MappingProxyType(overrides["stores"]),
        terminals=types.MappingProxyType(overrides["terminals"]),
        shared=shared,
    )


def _redis_url(value: object) -> str:
    url = _string()(value)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("redis", "unix"):
        raise ValueError(
            "expected redis://HOST:PORT/DB or unix:///PATH?db=DB (TLS to Redis is not supported: "
            "keep Redis on a private network or the local host)"
        )
    if parts.password is not None:
        # The URL is logged and shown in errors; the password belongs in a secret reference.
        raise ValueError(
            "put the password in limits.shared.password as {env: ...}, {file: ...} or {credential: ...}"
        )
    return url


_LEASE_SIZE: Final = _in_range(_whole_number, "an integer", minimum=1, maximum=10_000)


def _parse_shared_limits(section: _Section) -> SharedLimitsConfig:
    default = SharedLimitsConfig(redis_url="")
    if importlib.util.find_spec("redis") is None:
        section.ctx.report(section.path, "needs the Python package redis: pip install 'pos-db-proxy[redis]'")
    shared = SharedLimitsConfig(
        redis_url=section.require("redis_url", _redis_url, ""),
        password=section.read("password", section.ctx.secret, None),
        key_prefix=section.read("key_prefix", _matching(r"[A-Za-z0-9_.:-]{1,64}"), default.key_prefix),
        on_unavailable=section.read("on_unavailable", _enum(SharedLimitFallback), default.on_unavailable),
        lease_size=section.read("lease_size", _LEASE_SIZE, default.lease_size),
        timeout=section.read("timeout", _positive_duration, default.timeout),
        instance_ttl=section.read("instance_ttl", _positive_duration, default.instance_ttl),
    )
    # The heartbeat, every third of the TTL, must be able to time out and still come again in time.
    if shared.instance_ttl < 3 * shared.timeout:
        section.report(
            "instance_ttl",
            f"must be at least 3 times timeout ({shared.timeout:g} s), not {shared.instance_ttl:g} s",
        )
    return shared


def _parse_limit_settings(section: _Section) -> LimitSettings:
    count = _in_range(_whole_number, "an integer", minimum=1)
    return LimitSettings(
        statements=_read_rate(section, "statements"),
        role_statements=_read_rate(section, "role_statements"),
        store_statements=_read_rate(section, "store_statements"),
        connections_per_terminal=section.read("connections_per_terminal", count, None),
        connections_per_store=section.read("connections_per_store", count, None),
        connections_per_role=section.read("connections_per_role", count, None),
        max_server_connections_per_terminal=section.read("max_server_connections_per_terminal", count, None),
        max_rows_per_statement=section.read("max_rows_per_statement", count, None),
        max_bytes_per_statement=section.read("max_bytes_per_statement", parse_size, None),
        max_rows_per_minute=section.read("max_rows_per_minute", count, None),
        max_bytes_per_minute=section.read("max_bytes_per_minute", parse_size, None),
    )


def _read_rate(section: _Section, key: str) -> Rate | None:
    """A token bucket: {per_second: 20, burst: 40}."""
    if section.data.get(key) is None:
        return None
    rate = section.child(key, ("per_second", "burst"))
    per_second = rate.require("per_second", _positive_number, 1.0)
    burst = rate.require("burst", _in_range(_whole_number, "an integer", minimum=1), 1)
    return Rate(per_second, burst)


def _positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"expected a positive number, got {_describe(value)}")
    return float(value)


_POLICY_KEYS: Final = (
    "mode",
    "search_path",
    "stacked_queries",
    "function_call_message",
    "housekeeping",
    "max_violations",
    "allow",
    "fingerprints",
)
_POLICY_ALLOW_KEYS: Final = (
    "kinds",
    "read",
    "write",
    "update_without_where",
    "functions",
    "sequences",
    "denylist_exceptions",
)
_IDENTIFIER: Final = r"[A-Za-z_][A-Za-z0-9_$]*"
_TABLE_NAME: Final = rf"{_IDENTIFIER}(\.{_IDENTIFIER})?"


def _parse_policy(section: _Section) -> RolePolicy:
    """A role's policy file (see config/policies/ and docs/policies.md)."""
    default = RolePolicy()
    search_path = tuple(section.read("search_path", _policy_search_path, list(default.search_path)))
    allow = section.child("allow", _POLICY_ALLOW_KEYS)
    no_names: list[str] = []
    qualify = RolePolicy(search_path=search_path or default.search_path).qualify
    fingerprints: dict[str, ApprovedStatement] = {}
    raw = section.data.get("fingerprints")
    if raw is not None and raw != []:
        for path, item in section.items("fingerprints"):
            entry = section.ctx.section(item, path, ("fingerprint", "text"))
            fingerprint = entry.require("fingerprint", _matching(r"[0-9a-f]{16}"), "")
            fingerprints[fingerprint] = ApprovedStatement(fingerprint, entry.read("text", _string(), ""))
    return RolePolicy(
        mode=section.read("mode", _enum(PolicyMode), default.mode),
        search_path=search_path or default.search_path,
        kinds=frozenset(allow.read("kinds", _list_of(_one_of_names(STATEMENT_KINDS)), no_names)),
        read_tables=frozenset(map(qualify, allow.read("read", _list_of(_matching(_TABLE_NAME)), no_names))),
        write_tables=frozenset(map(qualify, allow.read("write", _list_of(_matching(_TABLE_NAME)), no_names))),
        update_without_where=allow.read("update_without_where", _boolean, False),
        stacked_queries=section.read("stacked_queries", _boolean, default.stacked_queries),
        function_call_message=section.read("function_call_message", _boolean, default.function_call_message),
        housekeeping=section.read("housekeeping", _boolean, default.housekeeping),
        denylist_exceptions=frozenset(allow.read("denylist_exceptions", _list_of(_denylist_entry), no_names)),
        functions=frozenset(allow.read("functions", _list_of(_matching(_TABLE_NAME)), no_names)),
        sequences=frozenset(
            map(qualify, allow.read("sequences", _list_of(_matching(_TABLE_NAME)), no_names))
        ),
        max_violations=section.read(
            "max_violations", _in_range(_whole_number, "an integer", minimum=1), default.max_violations
        ),
        fingerprints=types.MappingProxyType(fingerprints),
    )


def _policy_search_path(value: object) -> list[str]:
    schemas = _list_of(_matching(_IDENTIFIER))(value)
    if "pg_catalog" in schemas[1:]:
        # Listed later, pg_catalog would let a same-named function in an earlier schema stand in
        # for a built-in the policy allows (see RolePolicy.allows_function).
        raise ValueError("pg_catalog may only be listed first")
    return schemas


def _denylist_entry(value: object) -> str:
    try:
        return _one_of_names(DENYLIST_NAMES)(value)
    except ValueError as exc:
        raise ValueError(f"{exc} (a function the role may call goes in allow.functions)") from None


def _list_of(item: Callable[[object], T]) -> Callable[[object], list[T]]:
    def convert(value: object) -> list[T]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {_describe(value)}")
        converted = []
        for index, element in enumerate(value):
            try:
                converted.append(item(element))
            except ValueError as exc:
                raise ValueError(f"item {index}: {exc}") from None
        return converted

    return convert


def _one_of_names(names: frozenset[str]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"expected one of: {', '.join(sorted(names))}; got {_describe(value)}")
        return value

    return convert


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _parse_pool(section: _Section, inherited: PoolConfig) -> PoolConfig:
    """A pool section; keys it leaves out come from ``inherited`` (the top-level `pool:` or built-ins)."""
    read, duration = section.read, _positive_duration
    pool = PoolConfig(
        mode=read("mode", _enum(PoolMode), inherited.mode),
        size=read("size", _in_range(_whole_number, "an integer", minimum=1), inherited.size),
        min_idle=read("min_idle", _in_range(_whole_number, "an integer", minimum=0), inherited.min_idle),
        max_client_wait=read("max_client_wait", duration, inherited.max_client_wait),
        server_idle_timeout=read("server_idle_timeout", duration, inherited.server_idle_timeout),
        server_lifetime=read("server_lifetime", duration, inherited.server_lifetime),
        connect_timeout=read("connect_timeout", duration, inherited.connect_timeout),
        connect_retry_delay=read("connect_retry_delay", duration, inherited.connect_retry_delay),
        connect_retry_max_delay=read("connect_retry_max_delay", duration, inherited.connect_retry_max_delay),
        tcp_keepalive=_parse_keepalive(
            section.child("tcp_keepalive", _keys(TCPKeepalive)), inherited.tcp_keepalive
        ),
        tcp_user_timeout=read("tcp_user_timeout", _user_timeout, inherited.tcp_user_timeout),
        session_state=read("session_state", _enum(SessionStateAction), inherited.session_state),
        max_prepared_statements=read(
            "max_prepared_statements",
            _in_range(_whole_number, "an integer", minimum=1),
            inherited.max_prepared_statements,
        ),
        idle_transaction_timeout=read(
            "idle_transaction_timeout", _duration_or_off, inherited.idle_transaction_timeout
        ),
        max_client_prepared_statements=read(
            "max_client_prepared_statements",
            _in_range(_whole_number, "an integer", minimum=1),
            inherited.max_client_prepared_statements,
        ),
        max_client_prepared_bytes=read(
            "max_client_prepared_bytes",
            _in_range(parse_size, "a size in bytes", minimum=1024, maximum=2**31 - 1),
            inherited.max_client_prepared_bytes,
        ),
    )
    if pool.connect_retry_delay > pool.connect_retry_max_delay and section.data.keys() & {
        "connect_retry_delay",
        "connect_retry_max_delay",
    }:
        section.report(
            "connect_retry_delay",
            f"connect_retry_delay ({pool.connect_retry_delay:g}s) cannot exceed "
            f"connect_retry_max_delay ({pool.connect_retry_max_delay:g}s)",
        )
    # Blame the section that set one of the pair; a clash purely inherited was reported where it was made.
    if pool.min_idle > pool.size and section.data.keys() & {"size", "min_idle"}:
        key = "min_idle" if "min_idle" in section.data else "size"
        section.report(key, f"min_idle ({pool.min_idle}) cannot exceed size ({pool.size})")
    return pool


_CLIENT_CERTIFICATE_KEYS: Final = ("sslcert", "sslkey", "sslpassword")
_ROUTE_KEYS: Final = (
    *_keys(RouteConfig, "database", "client_certificate", "pool"),
    *_CLIENT_CERTIFICATE_KEYS,
    "pool",
)


def _parse_route(database: str, section: _Section, pool_defaults: PoolConfig) -> RouteConfig:
    ctx = section.ctx
    host = section.require("host", _string(), "")
    port = section.read("port", _PORT, _DEFAULT_UPSTREAM_PORT)
    dbname = section.read("dbname", _string(), database)
    user = section.require("user", _string(), "")
    password = section.read("password", ctx.secret, None)
    sslmode = section.read("sslmode", _enum(SSLMode), _DEFAULT_SSLMODE)
    sslrootcert = section.read("sslrootcert", ctx.readable_file, None)
    # Never fall back to the system CA store silently: a verifying mode must name the CA it trusts.
    if sslmode in (SSLMode.VERIFY_CA, SSLMode.VERIFY_FULL) and section.data.get("sslrootcert") is None:
        section.report("sslrootcert", f"required when sslmode is {sslmode.value}")
    return RouteConfig(
        database=database,
        host=host,
        port=port,
        dbname=dbname,
        user=user,
        password=password,
        sslmode=sslmode,
        sslrootcert=sslrootcert,
        client_certificate=_parse_client_certificate(section, sslmode),
        pool=_parse_pool(section.child("pool", _keys(PoolConfig)), pool_defaults),
    )


def _parse_client_certificate(section: _Section, sslmode: SSLMode) -> ClientCertificate | None:
    """sslcert and sslkey name files, as in libpq; the key's passphrase is a secret like a password.

    Unlike libpq, which looks for ~/.postgresql/postgresql.crt and goes on without a certificate when
    there is none, nothing is implied: both files are named, or neither.
    """
    given = [key for key in _CLIENT_CERTIFICATE_KEYS if section.data.get(key) is not None]
    if not given:
        return None
    for needed in ("sslcert", "sslkey"):
        if needed not in given:
            section.report(needed, f"required when {given[0]} is set")
    if sslmode is SSLMode.DISABLE:
        section.report(given[0], "needs TLS, but sslmode is disable")
    ctx = section.ctx
    cert = section.read("sslcert", ctx.readable_file, None)
    key = section.read("sslkey", ctx.readable_file, None)
    password = section.read("sslpassword", ctx.secret, None)
    if cert is None or key is None or (password is None and "sslpassword" in given):
        return None  # already reported
    try:
        files_sha256 = _check_client_certificate(cert, key, password)
    except _ClientCertificateError as exc:
        section.report(exc.key, str(exc))
        return None
    return ClientCertificate(cert, key, password, files_sha256)


class _ClientCertificateError(ValueError):
    """A route's client certificate or key cannot be used; ``key`` is the route key to blame."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _check_client_certificate(cert: Path, key: Path, password: Secret | None) -> str:
    """The SHA-256 of the pair's files, once OpenSSL has loaded them as a pair: a PEM certificate (chain),
    a PEM private key that the passphrase opens, and the key of that certificate.

    The messages never quote file contents: a key file may hold anything.
    """
    try:
        cert_bytes = _read_file(cert)
    except ValueError as exc:
        raise _ClientCertificateError("sslcert", str(exc)) from None
    try:
        key_bytes = _read_file(key)
    except ValueError as exc:
        raise _ClientCertificateError("sslkey", str(exc)) from None
    try:
        x509.load_pem_x509_certificate(cert_bytes)
    except ValueError:
        raise _ClientCertificateError("sslcert", f"{cert} holds no PEM certificate") from None
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    secret = password.reveal() if password is not None else None
    try:
        # A callable, not the string: with none given, OpenSSL would prompt on the terminal for one.
        probe.load_cert_chain(cert, key, password=lambda: secret or "")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise _ClientCertificateError("sslkey", f"{key} is not the key of {cert}") from None
        if password is None:
            reason = "holds no PEM private key, or one encrypted with a passphrase (set sslpassword)"
        else:
            reason = "holds no PEM private key that sslpassword opens"
        raise _ClientCertificateError("sslkey", f"{key} {reason}") from None
    except OSError as exc:
        raise _ClientCertificateError("sslkey", f"cannot read {key}: {exc.strerror}") from None
    return hashlib.sha256(len(cert_bytes).to_bytes(8, "big") + cert_bytes + key_bytes).hexdigest()


# --- YAML -------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML loading silently resolves to the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        # `<<: *anchor` merges may legitimately repeat keys; only literal repeats are mistakes.
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
