"""Load the proxy's one YAML configuration file into validated, frozen settings objects (proxy.config.model),
one parser per section."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import ipaddress
import os
import re
import ssl
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from cryptography import x509

from proxy.audit import AuditSettings, OnWriteFailure
from proxy.config.model import (
    DEFAULT_SSLMODE,
    DEFAULT_UPSTREAM_PORT,
    ROLE_NAME,
    AdminConfig,
    AuditConfig,
    ClientCertificate,
    Config,
    ExpiredCRLAction,
    IdentityConfig,
    IdentitySource,
    IPNetwork,
    LimitsConfig,
    ListenConfig,
    PolicySettings,
    PoolConfig,
    PoolMode,
    ProxyProtocolConfig,
    RoleConfig,
    RouteConfig,
    SessionStateAction,
    SharedLimitsConfig,
    SSLMode,
    TCPKeepalive,
    TLSConfig,
    TLSVersionName,
    UserNameRule,
    WireProtocol,
)
from proxy.limits import LimitSettings, Rate, SharedLimitFallback
from proxy.policy.files import read_policy_file
from proxy.yamlreader import (
    ConfigError,
    ConfigProblem,
    Context,
    Secret,
    Section,
    boolean,
    describe,
    duration_or_off,
    enum_member,
    in_range,
    in_range_float,
    join_path,
    list_of,
    load_yaml,
    matching,
    one_of,
    parse_size,
    positive_duration,
    positive_number,
    read_file,
    section_keys,
    string,
    whole_number,
)

# Store and terminal ids, as `pos-proxy certs` issues them.
_ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"


# --- Public parsers ---------------------------------------------------------------------------------------


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path``; raises ConfigError listing every problem."""
    path = Path(os.path.abspath(path))
    try:
        data = load_yaml(path)
    except ValueError as exc:
        raise _file_error(str(exc)) from None
    return parse_config(data, base_dir=path.parent, environ=environ, source=path)


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
    ctx = Context(Path(os.path.abspath(base_dir)), os.environ if environ is None else environ)
    root = ctx.section(data, "", _SECTIONS)
    listen = _parse_listen(root.child("listen", section_keys(ListenConfig)))
    tls = _parse_tls(root.child("tls", section_keys(TLSConfig)))
    identity = _parse_identity(root.child("identity", section_keys(IdentityConfig)))
    roles = {
        name: _parse_role(name, section)
        for name, section in root.named(
            "roles", "role", matching(ROLE_NAME), ("description", "policy", "limits", "statement_timeout")
        )
    }
    policy_section = root.child("policy", section_keys(PolicySettings))
    policy = _parse_policy_settings(policy_section, ctx)
    pool_defaults = _parse_pool(root.child("pool", section_keys(PoolConfig)), PoolConfig())
    routes = {
        database: _parse_route(database, section, pool_defaults)
        for database, section in root.named("routes", "route", string(), _ROUTE_KEYS)
    }
    limits = _parse_limits(root.child("limits", section_keys(LimitsConfig)))
    audit = _parse_audit(root.child("audit", _AUDIT_KEYS)) if root.data.get("audit") is not None else None
    admin = None
    if root.data.get("admin") is not None:
        admin_section = root.child("admin", section_keys(AdminConfig))
        admin = AdminConfig(
            host=admin_section.read("host", string(), AdminConfig().host),
            port=admin_section.read("port", _ADMIN_PORT, AdminConfig().port),
            token=admin_section.read("token", ctx.secret, None),
            long_statement_after=admin_section.read(
                "long_statement_after", positive_duration, AdminConfig().long_statement_after
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


MAX_WORKERS: Final = 64


def parse_workers(value: object) -> int:
    """A worker count: a whole number from 1 to MAX_WORKERS, or "auto" for the cores this process may use."""
    if value == "auto":
        # The affinity mask, not cpu_count(): systemd's CPUAffinity= and containers narrow it.
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    number = int(value) if isinstance(value, str) and value.isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_WORKERS:
        raise ValueError(f'expected a worker count from 1 to {MAX_WORKERS} or "auto", got {describe(value)}')
    return number


_PORT: Final = in_range(whole_number, "a port number", minimum=1, maximum=65535)
# 0 lets the system pick a free port (tests, the demo); the chosen one is logged.
_ADMIN_PORT: Final = in_range(whole_number, "a port number", minimum=0, maximum=65535)

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
_IDENTITY_FIELD: Final = one_of({name: name for name in _IDENTITY_FIELDS})
_IDENTITY_GROUPS: Final = ("store", "terminal", "role")
_NEVER_MATCHES: Final = re.compile(r"(?!)")


def _identity_pattern(value: object) -> re.Pattern[str]:
    try:
        pattern = re.compile(string()(value))
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


_COUNT: Final = in_range(whole_number, "an integer", minimum=1)


def _parse_policy_settings(section: Section, ctx: Context) -> PolicySettings:
    default = PolicySettings()
    read, size = section.read, in_range(parse_size, "a size in bytes", minimum=1024, maximum=2**31 - 1)
    return PolicySettings(
        review_file=read("review_file", ctx.path, None),
        cache_size=read("cache_size", in_range(whole_number, "an integer", minimum=1), default.cache_size),
        cache_bytes=read("cache_bytes", size, default.cache_bytes),
        max_statement_bytes=read("max_statement_bytes", size, default.max_statement_bytes),
        analyze_in_worker_above=read(
            "analyze_in_worker_above",
            in_range(parse_size, "a size in bytes", minimum=0, maximum=2**31 - 1),
            default.analyze_in_worker_above,
        ),
        analysis_timeout=read("analysis_timeout", positive_duration, default.analysis_timeout),
        analysis_workers=read(
            "analysis_workers",
            in_range(whole_number, "an integer", minimum=1, maximum=64),
            default.analysis_workers,
        ),
    )


def _parse_listen(section: Section) -> ListenConfig:
    default = ListenConfig()
    return ListenConfig(
        host=section.read("host", string(), default.host),
        port=section.read("port", _PORT, default.port),
        handshake_timeout=section.read("handshake_timeout", positive_duration, default.handshake_timeout),
        startup_timeout=section.read("startup_timeout", positive_duration, default.startup_timeout),
        max_message_size=section.read(
            "max_message_size",
            # The wire format's length field is a signed 32-bit integer.
            in_range(parse_size, "a size in bytes", minimum=1024, maximum=2**31 - 1),
            default.max_message_size,
        ),
        drain_timeout=section.read("drain_timeout", positive_duration, default.drain_timeout),
        max_pending_handshakes=section.read("max_pending_handshakes", _COUNT, default.max_pending_handshakes),
        max_pending_handshakes_per_source=section.read(
            "max_pending_handshakes_per_source", _COUNT, default.max_pending_handshakes_per_source
        ),
        preauth_records_per_second=section.read(
            "preauth_records_per_second", _COUNT, default.preauth_records_per_second
        ),
        tcp_keepalive=_parse_keepalive(
            section.child("tcp_keepalive", section_keys(TCPKeepalive)), TCPKeepalive()
        ),
        tcp_user_timeout=section.read("tcp_user_timeout", _user_timeout, default.tcp_user_timeout),
        proxy_protocol=_parse_proxy_protocol(
            section.child("proxy_protocol", section_keys(ProxyProtocolConfig))
        ),
        workers=section.read("workers", parse_workers, default.workers),
    )


# Linux's limits for TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
_KEEPALIVE_SECONDS: Final = in_range(
    lambda value: round(positive_duration(value)), "a duration in whole seconds", minimum=1, maximum=32767
)


def _user_timeout(value: object) -> float | None:
    """TCP_USER_TIMEOUT: 0 / "off" for the kernel's default; else 100 ms (Linux counts milliseconds,
    and less would drop a healthy connection on one lost segment) to a day."""
    seconds = duration_or_off(value)
    if seconds is not None and not 0.1 <= seconds <= 86400:
        raise ValueError(f"expected a duration from 100ms to 24h, or off; got {describe(value)}")
    return seconds


def _parse_keepalive(section: Section, inherited: TCPKeepalive) -> TCPKeepalive:
    return TCPKeepalive(
        idle=section.read("idle", _KEEPALIVE_SECONDS, inherited.idle),
        interval=section.read("interval", _KEEPALIVE_SECONDS, inherited.interval),
        count=section.read(
            "count", in_range(whole_number, "an integer", minimum=1, maximum=127), inherited.count
        ),
    )


def _parse_proxy_protocol(section: Section) -> ProxyProtocolConfig:
    default = ProxyProtocolConfig()
    enabled = section.read("enabled", boolean, default.enabled)
    trusted: list[IPNetwork] = section.read("trusted_sources", list_of(_network), [])
    if enabled and section.data.get("trusted_sources") in (None, []):
        # There is no "trust everybody": that would let any terminal claim any address.
        section.report(
            "trusted_sources", "at least one network is required when enabled is true (the balancers)"
        )
    return ProxyProtocolConfig(
        enabled=enabled,
        trusted_sources=tuple(trusted),
        header_timeout=section.read("header_timeout", positive_duration, default.header_timeout),
    )


def _network(value: object) -> IPNetwork:
    text = string()(value)
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise ValueError(f"expected an address or CIDR network such as 10.0.0.0/8: {exc}") from None


def _parse_tls(section: Section) -> TLSConfig:
    file = section.ctx.readable_file
    return TLSConfig(
        cert=section.require("cert", file, Path()),
        key=section.require("key", file, Path()),
        client_ca=section.require("client_ca", file, Path()),
        crl=section.read("crl", file, None),
        min_version=section.read("min_version", enum_member(TLSVersionName), TLSVersionName.TLS1_2),
        expired_crl=section.read("expired_crl", enum_member(ExpiredCRLAction), ExpiredCRLAction.KEEP_LAST),
    )


def _parse_identity(section: Section) -> IdentityConfig:
    default = IdentityConfig()
    user_name = section.read("user_name", enum_member(UserNameRule), default.user_name)
    if section.data.get("sources") is None:
        return IdentityConfig(default.sources, user_name)
    problems_before = len(section.ctx.problems)
    sources: list[IdentitySource] = []
    for path, item in section.items("sources"):
        source = section.ctx.section(item, path, section_keys(IdentitySource))
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


def _parse_role(name: str, section: Section) -> RoleConfig:
    description = section.read("description", string(allow_empty=True), "")
    limits = _parse_limit_settings(section.child("limits", section_keys(LimitSettings)))
    statement_timeout = section.read("statement_timeout", positive_duration, None)
    policy_file = section.read("policy", section.ctx.path, None)
    if policy_file is None:
        return RoleConfig(name, description, limits, statement_timeout=statement_timeout)
    policy = read_policy_file(policy_file, section, "policy")
    if policy is None:
        return RoleConfig(name, description)
    return RoleConfig(name, description, limits, statement_timeout, policy, policy_file)


def _parse_audit(section: Section) -> AuditConfig:
    share = in_range_float(0.0, 1.0)
    by_role = {
        role: value
        for role, raw in section.ctx.mapping(
            section.data.get("allowed_statements_by_role"), section.key_path("allowed_statements_by_role")
        ).items()
        if (
            value := section.ctx.convert(
                raw, join_path(section.key_path("allowed_statements_by_role"), role), share, None
            )
        )
        is not None
    }
    default = AuditSettings(file=None, key_file=Path())
    key_file = section.require("key_file", section.ctx.readable_file, Path())
    settings = AuditSettings(
        file=section.read("file", section.ctx.path, None),
        key_file=key_file,
        stdout=section.read("stdout", boolean, default.stdout),
        rotate_bytes=section.read("rotate_bytes", parse_size, default.rotate_bytes),
        rotate_interval=section.read("rotate_interval", positive_duration, default.rotate_interval),
        flush_interval=section.read("flush_interval", positive_duration, default.flush_interval),
        max_held_records=section.read(
            "max_held_records", in_range(whole_number, "an integer", minimum=0), default.max_held_records
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
        on_write_failure=section.read("on_write_failure", enum_member(OnWriteFailure), OnWriteFailure.REFUSE),
    )


def _parse_limits(section: Section) -> LimitsConfig:
    overrides: dict[str, dict[str, LimitSettings]] = {"stores": {}, "terminals": {}}
    for key, pattern in (("stores", _ID_PATTERN), ("terminals", rf"{_ID_PATTERN}/{_ID_PATTERN}")):
        path = section.key_path(key)
        for name, value in section.ctx.mapping(section.data.get(key), path).items():
            entry_path = join_path(path, name)
            if section.ctx.convert(name, entry_path, matching(pattern), None) is not None:
                overrides[key][name] = _parse_limit_settings(
                    section.ctx.section(value, entry_path, section_keys(LimitSettings))
                )
    shared = None
    if section.data.get("shared") is not None:
        shared = _parse_shared_limits(section.child("shared", section_keys(SharedLimitsConfig)))
    return LimitsConfig(
        source_connections=_read_rate(section, "source_connections"),
        stores=types.MappingProxyType(overrides["stores"]),
        terminals=types.MappingProxyType(overrides["terminals"]),
        shared=shared,
    )


def _redis_url(value: object) -> str:
    url = string()(value)
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


_LEASE_SIZE: Final = in_range(whole_number, "an integer", minimum=1, maximum=10_000)


def _parse_shared_limits(section: Section) -> SharedLimitsConfig:
    default = SharedLimitsConfig(redis_url="")
    if importlib.util.find_spec("redis") is None:
        section.ctx.report(section.path, "needs the Python package redis: pip install 'pos-db-proxy[redis]'")
    shared = SharedLimitsConfig(
        redis_url=section.require("redis_url", _redis_url, ""),
        password=section.read("password", section.ctx.secret, None),
        key_prefix=section.read("key_prefix", matching(r"[A-Za-z0-9_.:-]{1,64}"), default.key_prefix),
        on_unavailable=section.read(
            "on_unavailable", enum_member(SharedLimitFallback), default.on_unavailable
        ),
        lease_size=section.read("lease_size", _LEASE_SIZE, default.lease_size),
        timeout=section.read("timeout", positive_duration, default.timeout),
        instance_ttl=section.read("instance_ttl", positive_duration, default.instance_ttl),
    )
    # The heartbeat, every third of the TTL, must be able to time out and still come again in time.
    if shared.instance_ttl < 3 * shared.timeout:
        section.report(
            "instance_ttl",
            f"must be at least 3 times timeout ({shared.timeout:g} s), not {shared.instance_ttl:g} s",
        )
    return shared


def _parse_limit_settings(section: Section) -> LimitSettings:
    count = in_range(whole_number, "an integer", minimum=1)
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


def _read_rate(section: Section, key: str) -> Rate | None:
    """A token bucket: {per_second: 20, burst: 40}."""
    if section.data.get(key) is None:
        return None
    rate = section.child(key, ("per_second", "burst"))
    per_second = rate.require("per_second", positive_number, 1.0)
    burst = rate.require("burst", in_range(whole_number, "an integer", minimum=1), 1)
    return Rate(per_second, burst)


def _parse_pool(section: Section, inherited: PoolConfig) -> PoolConfig:
    """A pool section; keys it leaves out come from ``inherited`` (the top-level `pool:` or built-ins)."""
    read, duration = section.read, positive_duration
    pool = PoolConfig(
        mode=read("mode", enum_member(PoolMode), inherited.mode),
        size=read("size", in_range(whole_number, "an integer", minimum=1), inherited.size),
        min_idle=read("min_idle", in_range(whole_number, "an integer", minimum=0), inherited.min_idle),
        max_client_wait=read("max_client_wait", duration, inherited.max_client_wait),
        server_idle_timeout=read("server_idle_timeout", duration, inherited.server_idle_timeout),
        server_lifetime=read("server_lifetime", duration, inherited.server_lifetime),
        connect_timeout=read("connect_timeout", duration, inherited.connect_timeout),
        connect_retry_delay=read("connect_retry_delay", duration, inherited.connect_retry_delay),
        connect_retry_max_delay=read("connect_retry_max_delay", duration, inherited.connect_retry_max_delay),
        tcp_keepalive=_parse_keepalive(
            section.child("tcp_keepalive", section_keys(TCPKeepalive)), inherited.tcp_keepalive
        ),
        tcp_user_timeout=read("tcp_user_timeout", _user_timeout, inherited.tcp_user_timeout),
        session_state=read("session_state", enum_member(SessionStateAction), inherited.session_state),
        max_prepared_statements=read(
            "max_prepared_statements",
            in_range(whole_number, "an integer", minimum=1),
            inherited.max_prepared_statements,
        ),
        idle_transaction_timeout=read(
            "idle_transaction_timeout", duration_or_off, inherited.idle_transaction_timeout
        ),
        max_client_prepared_statements=read(
            "max_client_prepared_statements",
            in_range(whole_number, "an integer", minimum=1),
            inherited.max_client_prepared_statements,
        ),
        max_client_prepared_bytes=read(
            "max_client_prepared_bytes",
            in_range(parse_size, "a size in bytes", minimum=1024, maximum=2**31 - 1),
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
    *section_keys(RouteConfig, "database", "client_certificate", "pool"),
    *_CLIENT_CERTIFICATE_KEYS,
    "pool",
)


def _route_protocol(value: object) -> WireProtocol:
    # Named now so that routes written today still read right once a second protocol (MySQL) exists.
    if value != WireProtocol.POSTGRES.value:
        raise ValueError(f"only postgres is supported yet, got {describe(value)}")
    return WireProtocol.POSTGRES


def _parse_route(database: str, section: Section, pool_defaults: PoolConfig) -> RouteConfig:
    ctx = section.ctx
    protocol = section.read("protocol", _route_protocol, WireProtocol.POSTGRES)
    host = section.require("host", string(), "")
    port = section.read("port", _PORT, DEFAULT_UPSTREAM_PORT)
    dbname = section.read("dbname", string(), database)
    user = section.require("user", string(), "")
    password = section.read("password", ctx.secret, None)
    sslmode = section.read("sslmode", enum_member(SSLMode), DEFAULT_SSLMODE)
    sslrootcert = section.read("sslrootcert", ctx.readable_file, None)
    # Never fall back to the system CA store silently: a verifying mode must name the CA it trusts.
    if sslmode in (SSLMode.VERIFY_CA, SSLMode.VERIFY_FULL) and section.data.get("sslrootcert") is None:
        section.report("sslrootcert", f"required when sslmode is {sslmode.value}")
    return RouteConfig(
        database=database,
        protocol=protocol,
        host=host,
        port=port,
        dbname=dbname,
        user=user,
        password=password,
        sslmode=sslmode,
        sslrootcert=sslrootcert,
        client_certificate=_parse_client_certificate(section, sslmode),
        pool=_parse_pool(section.child("pool", section_keys(PoolConfig)), pool_defaults),
    )


def _parse_client_certificate(section: Section, sslmode: SSLMode) -> ClientCertificate | None:
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
        cert_bytes = read_file(cert)
    except ValueError as exc:
        raise _ClientCertificateError("sslcert", str(exc)) from None
    try:
        key_bytes = read_file(key)
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
