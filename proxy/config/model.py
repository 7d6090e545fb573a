"""The proxy's settings: the frozen dataclasses and enums that proxy.config.load fills from the YAML file."""

from __future__ import annotations

import enum
import ipaddress
import re
import ssl
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from proxy.audit import AuditSettings, OnWriteFailure
from proxy.limits import LimitSettings, Rate, SharedLimitFallback
from proxy.policy.model import RolePolicy
from proxy.yamlreader import Secret


class PoolMode(enum.Enum):
    SESSION = "session"
    TRANSACTION = "transaction"


class SessionStateAction(enum.Enum):
    """What transaction pooling does with a statement that leaves state in the server session."""

    PIN = "pin"
    REFUSE = "refuse"


class WireProtocol(enum.Enum):
    """The wire protocol a route's terminals and database server speak."""

    POSTGRES = "postgres"


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


ROLE_NAME: Final = r"[a-z][a-z0-9_]{0,62}"

# Matches the certificates that `pos-proxy certs` issues.
_DEFAULT_IDENTITY_SOURCES: Final = (
    IdentitySource(
        "san_uri",
        re.compile(
            r"^urn:pos-db-proxy:terminal:(?P<store>[A-Za-z0-9_-]{1,64}):(?P<terminal>[A-Za-z0-9_-]{1,64})$"
        ),
    ),
    IdentitySource("subject.OU", re.compile(rf"^(?P<role>{ROLE_NAME})$")),
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


DEFAULT_UPSTREAM_PORT: Final = 5432
DEFAULT_SSLMODE: Final = SSLMode.VERIFY_FULL


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
    protocol: WireProtocol = WireProtocol.POSTGRES
    host: str
    port: int = DEFAULT_UPSTREAM_PORT
    dbname: str
    user: str
    password: Secret | None = None
    sslmode: SSLMode = DEFAULT_SSLMODE
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
