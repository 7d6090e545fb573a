"""Tests for proxy.config: parsing, defaults, every kind of problem, and secret handling."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import pickle
import re
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from proxy import certs
from proxy.audit import AuditSettings, OnWriteFailure
from proxy.config.load import load_config, parse_config
from proxy.config.model import (
    AdminConfig,
    AuditConfig,
    Config,
    ExpiredCRLAction,
    IdentityConfig,
    IdentitySource,
    LimitsConfig,
    ListenConfig,
    PolicySettings,
    PoolConfig,
    PoolMode,
    ProxyProtocolConfig,
    RoleConfig,
    RouteConfig,
    SharedLimitsConfig,
    SSLMode,
    TCPKeepalive,
    TLSConfig,
    TLSVersionName,
    UserNameRule,
    WireProtocol,
)
from proxy.limits import LimitSettings, SharedLimitFallback
from proxy.policy.model import PolicyMode
from proxy.yamlreader import ConfigError, ConfigProblem, Secret, parse_duration, parse_size

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "pos-proxy.example.yaml"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A config directory holding the files that minimal() refers to."""
    for name in ("proxy.crt", "proxy.key", "terminal-ca.crt", "db-ca.crt"):
        (tmp_path / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    return tmp_path


def minimal() -> dict[str, Any]:
    return {
        "tls": {"cert": "proxy.crt", "key": "proxy.key", "client_ca": "terminal-ca.crt"},
        "roles": {"cashier": None},
        "routes": {"pos": {"host": "db.example.internal", "user": "pos_proxy", "sslrootcert": "db-ca.crt"}},
    }


def parse(data: object, base: Path, environ: dict[str, str] | None = None) -> Config:
    return parse_config(data, base_dir=base, environ=environ or {})


def problems(data: object, base: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data, base, environ)
    return [str(problem) for problem in caught.value.problems]


def with_route(**route: object) -> dict[str, Any]:
    data = minimal()
    data["routes"]["pos"].update(route)
    return data


# --- durations and sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        (0, 0.0),
        ("30", 30.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "abc", "5 minutes", "1d", "-1s", "1.s", -1, float("nan"), float("inf"), True, None, [5]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1024, 1024),
        ("100B", 100),
        ("512KiB", 512 * 1024),
        ("16MiB", 16 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5KiB", 1536),
        ("1kB", 1000),
        ("1MB", 10**6),
        ("3GB", 3 * 10**9),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "MiB", "16mb", "16 MiBs", "-1KiB", -1, True, None, "0.5B", 1.5])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"expected a (size|whole number of bytes)"):
        parse_size(value)


# --- defaults and successful parses -----------------------------------------------------------------------


def test_minimal_config_gets_defaults(base: Path) -> None:
    config = parse(minimal(), base)

    assert config.listen == ListenConfig(
        host="127.0.0.1", port=6432, handshake_timeout=10.0, startup_timeout=15.0, max_message_size=16 * 2**20
    )
    assert config.tls == TLSConfig(
        cert=base / "proxy.crt",
        key=base / "proxy.key",
        client_ca=base / "terminal-ca.crt",
        crl=None,
        min_version=TLSVersionName.TLS1_2,
    )
    assert config.identity == IdentityConfig()
    assert config.identity.user_name is UserNameRule.IGNORE
    assert config.roles == {"cashier": RoleConfig("cashier", "")}
    assert config.routes == {
        "pos": RouteConfig(
            database="pos",
            host="db.example.internal",
            port=5432,
            dbname="pos",
            user="pos_proxy",
            password=None,
            sslmode=SSLMode.VERIFY_FULL,
            sslrootcert=base / "db-ca.crt",
            pool=PoolConfig(),
        )
    }
    assert config.source is None


def test_default_identity_sources_match_issued_certificates(base: Path) -> None:
    uri, ou = parse(minimal(), base).identity.sources
    assert uri.field == "san_uri"
    match = uri.pattern.fullmatch("urn:pos-db-proxy:terminal:store-0042:till_03")
    assert match is not None
    assert match.groupdict() == {"store": "store-0042", "terminal": "till_03"}
    assert ou.field == "subject.OU"
    role = ou.pattern.fullmatch("cashier")
    assert role is not None
    assert role["role"] == "cashier"
    assert ou.pattern.fullmatch("Cashier") is None


def test_pool_defaults_built_in() -> None:
    assert PoolConfig() == PoolConfig(
        mode=PoolMode.SESSION,
        size=20,
        min_idle=0,
        max_client_wait=30.0,
        server_idle_timeout=600.0,
        server_lifetime=3600.0,
        connect_timeout=5.0,
    )


def test_durations_and_sizes_in_config(base: Path) -> None:
    data = minimal()
    data["listen"] = {"handshake_timeout": "250ms", "startup_timeout": 20, "max_message_size": "1MB"}
    data["pool"] = {"server_idle_timeout": "5m", "server_lifetime": "1h", "max_client_wait": 2.5}
    config = parse(data, base)
    assert (config.listen.handshake_timeout, config.listen.startup_timeout) == (0.25, 20.0)
    assert config.listen.max_message_size == 1_000_000
    pool = config.routes["pos"].pool
    assert (pool.server_idle_timeout, pool.server_lifetime, pool.max_client_wait) == (300.0, 3600.0, 2.5)


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    for name in ("proxy.crt", "proxy.key", "ca.crt", "db-ca.crt"):
        (etc / "tls" / name).write_text("x")
    (etc / "pos-proxy.yaml").write_text(
        "tls: {cert: tls/proxy.crt, key: ./tls/proxy.key, client_ca: ../etc/tls/ca.crt}\n"
        "roles: {cashier: null}\n"
        f"routes: {{pos: {{host: db, user: u, sslrootcert: {etc / 'tls' / 'db-ca.crt'}}}}}\n"
    )
    config = load_config(etc / "pos-proxy.yaml", environ={})
    assert config.tls.cert == etc / "tls" / "proxy.crt"
    assert config.tls.key == etc / "tls" / "proxy.key"
    assert config.tls.client_ca == etc / "tls" / "ca.crt"
    assert config.routes["pos"].sslrootcert == etc / "tls" / "db-ca.crt"
    assert config.source == etc / "pos-proxy.yaml"


def test_tls_options(base: Path) -> None:
    (base / "ca.crl").write_text("x")
    data = minimal()
    data["tls"].update(crl="ca.crl", min_version="1.3")
    tls = parse(data, base).tls
    assert tls.crl == base / "ca.crl"
    assert tls.min_version is TLSVersionName.TLS1_3
    assert tls.min_version.ssl_version is ssl.TLSVersion.TLSv1_3
    assert TLSVersionName.TLS1_2.ssl_version is ssl.TLSVersion.TLSv1_2


def test_unquoted_tls_version_is_accepted(base: Path) -> None:
    data = minimal()
    data["tls"]["min_version"] = 1.3  # what YAML makes of `min_version: 1.3`
    assert parse(data, base).tls.min_version is TLSVersionName.TLS1_3


def test_roles_may_be_null_or_described(base: Path) -> None:
    data = minimal()
    data["roles"] = {"cashier": None, "manager": {"description": "Refunds and reports"}}
    assert parse(data, base).roles == {
        "cashier": RoleConfig("cashier"),
        "manager": RoleConfig("manager", "Refunds and reports"),
    }


def test_route_settings(base: Path) -> None:
    data = with_route(port=6543, dbname="pos_prod", sslmode="verify-ca")
    route = parse(data, base).routes["pos"]
    assert (route.port, route.dbname, route.sslmode) == (6543, "pos_prod", SSLMode.VERIFY_CA)


def test_a_route_speaks_postgres_unless_it_names_its_protocol_and_postgres_is_the_only_one_yet(
    base: Path,
) -> None:
    assert parse(minimal(), base).routes["pos"].protocol is WireProtocol.POSTGRES
    assert parse(with_route(protocol="postgres"), base).routes["pos"].protocol is WireProtocol.POSTGRES
    assert problems(with_route(protocol="mysql"), base) == [
        "routes.pos.protocol: only postgres is supported yet, got 'mysql'"
    ]


def test_pool_section_gives_defaults_that_routes_override_key_by_key(base: Path) -> None:
    data = minimal()
    data["pool"] = {"mode": "transaction", "size": 10, "min_idle": 2, "connect_timeout": "2s"}
    data["routes"]["reports"] = {
        "host": "db",
        "user": "reports",
        "sslmode": "disable",
        "pool": {"mode": "session", "size": 3},
    }
    routes = parse(data, base).routes
    shared = PoolConfig(mode=PoolMode.TRANSACTION, size=10, min_idle=2, connect_timeout=2.0)
    assert routes["pos"].pool == shared
    assert routes["reports"].pool == dataclasses.replace(shared, mode=PoolMode.SESSION, size=3)


def test_keepalives_and_connect_retries_have_defaults_and_routes_inherit_them_key_by_key(base: Path) -> None:
    data = minimal()
    data["listen"] = {"tcp_keepalive": {"idle": "2m"}}
    data["pool"] = {"tcp_keepalive": {"idle": "30s", "count": 3}, "connect_retry_max_delay": "20s"}
    data["routes"]["reports"] = {
        "host": "db",
        "user": "reports",
        "sslmode": "disable",
        "pool": {"tcp_keepalive": {"interval": 5}, "connect_retry_delay": "1s"},
    }
    config = parse(data, base)
    assert config.listen.tcp_keepalive == TCPKeepalive(idle=120, interval=10, count=6)
    assert config.routes["pos"].pool.tcp_keepalive == TCPKeepalive(idle=30, interval=10, count=3)
    assert config.routes["reports"].pool.tcp_keepalive == TCPKeepalive(idle=30, interval=5, count=3)
    assert (
        config.routes["reports"].pool.connect_retry_delay,
        config.routes["reports"].pool.connect_retry_max_delay,
    ) == (
        1.0,
        20.0,
    )
    assert config.tls.expired_crl is ExpiredCRLAction.KEEP_LAST


def test_bad_keepalive_retry_and_expired_crl_settings_name_their_keys(base: Path) -> None:
    data = with_route(
        pool={
            "tcp_keepalive": {"idle": "0.2s", "count": 500, "intervall": 3},
            "connect_retry_delay": "10s",
            "connect_retry_max_delay": "1s",
        }
    )
    data["tls"]["expired_crl"] = "ignore"
    assert problems(data, base) == [
        "tls.expired_crl: expected one of: keep-last, refuse; got 'ignore'",
        "routes.pos.pool.tcp_keepalive.intervall: unknown key (expected one of: idle, interval, count)",
        "routes.pos.pool.tcp_keepalive.idle: "
        "expected a duration in whole seconds between 1 and 32767, got '0.2s'",
        "routes.pos.pool.tcp_keepalive.count: expected an integer between 1 and 127, got 500",
        "routes.pos.pool.connect_retry_delay: "
        "connect_retry_delay (10s) cannot exceed connect_retry_max_delay (1s)",
    ]


def test_tcp_user_timeouts_have_defaults_on_both_sides_and_routes_inherit_them(base: Path) -> None:
    assert (parse(minimal(), base).listen.tcp_user_timeout, PoolConfig().tcp_user_timeout) == (60.0, 30.0)
    data = minimal()
    data["listen"] = {"tcp_user_timeout": "off"}
    data["pool"] = {"tcp_user_timeout": "20s"}
    data["routes"]["reports"] = {
        "host": "db",
        "user": "reports",
        "sslmode": "disable",
        "pool": {"tcp_user_timeout": "1500ms"},
    }
    config = parse(data, base)
    assert config.listen.tcp_user_timeout is None
    assert config.routes["pos"].pool.tcp_user_timeout == 20.0
    assert config.routes["reports"].pool.tcp_user_timeout == 1.5


def test_bad_tcp_user_timeouts_name_their_keys(base: Path) -> None:
    data = with_route(pool={"tcp_user_timeout": "10ms"})
    data["listen"] = {"tcp_user_timeout": "25h"}
    assert problems(data, base) == [
        "listen.tcp_user_timeout: expected a duration from 100ms to 24h, or off; got '25h'",
        "routes.pos.pool.tcp_user_timeout: expected a duration from 100ms to 24h, or off; got '10ms'",
    ]


@pytest.mark.parametrize("sslmode", ["require", "disable"])
def test_sslrootcert_optional_without_verification(base: Path, sslmode: str) -> None:
    data = with_route(sslmode=sslmode)
    del data["routes"]["pos"]["sslrootcert"]
    assert parse(data, base).routes["pos"].sslrootcert is None


def test_config_is_immutable(base: Path) -> None:
    config = parse(minimal(), base)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.routes["other"] = config.routes["pos"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.roles["other"] = RoleConfig("other")  # type: ignore[index]


# --- problems ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key(base: Path) -> None:
    data = minimal()
    data["lissen"] = {}
    assert problems(data, base) == [
        "lissen: unknown key (expected one of: "
        "listen, tls, identity, roles, pool, routes, policy, admin, limits, audit)"
    ]


def test_unknown_nested_key_names_its_full_path(base: Path) -> None:
    data = with_route(pool={"sise": 5})
    assert problems(data, base) == [
        "routes.pos.pool.sise: unknown key (expected one of: mode, size, min_idle, max_client_wait, "
        "server_idle_timeout, server_lifetime, connect_timeout, connect_retry_delay, "
        "connect_retry_max_delay, tcp_keepalive, tcp_user_timeout, session_state, max_prepared_statements, "
        "idle_transaction_timeout, max_client_prepared_statements, max_client_prepared_bytes)"
    ]


def test_missing_required_settings(base: Path) -> None:
    assert problems({}, base) == [
        "tls.cert: required",
        "tls.key: required",
        "tls.client_ca: required",
        "roles: at least one role is required",
        "routes: at least one route is required",
    ]
    assert problems({**minimal(), "routes": {"pos": None}}, base) == [
        "routes.pos.host: required",
        "routes.pos.user: required",
        "routes.pos.sslrootcert: required when sslmode is verify-full",
    ]


def test_top_level_must_be_a_mapping(base: Path) -> None:
    assert problems(["listen"], base) == [
        "expected a mapping, got a list",
        "tls.cert: required",
        "tls.key: required",
        "tls.client_ca: required",
        "roles: at least one role is required",
        "routes: at least one route is required",
    ]


def test_all_problems_are_collected(base: Path) -> None:
    data = minimal()
    data["listen"] = {"port": 0, "max_message_size": "512B", "startup_timeout": "soon"}
    data["tls"]["crl"] = "missing.crl"
    data["pool"] = {"mode": "batch", "size": 0}
    data["routes"]["pos"].update(port="5432x", password="hunter2")
    assert problems(data, base) == [
        "listen.port: expected a port number between 1 and 65535, got 0",
        "listen.startup_timeout: expected a duration such as 30, 2.5, '250ms', '5m' or '1h', got 'soon'",
        "listen.max_message_size: expected a size in bytes between 1024 and 2147483647, got '512B'",
        f"tls.crl: file not found: {base / 'missing.crl'}",
        "pool.mode: expected one of: session, transaction; got 'batch'",
        "pool.size: expected an integer of at least 1, got 0",
        "routes.pos.port: expected an integer, got '5432x'",
        "routes.pos.password: put secrets in {env: NAME}, {file: PATH} or {credential: NAME}, "
        "not in the config file",
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("listen", "host", "", "listen.host: expected a non-empty string, got ''"),
        ("listen", "port", True, "listen.port: expected an integer, got True"),
        ("listen", "port", 65536, "listen.port: expected a port number between 1 and 65535, got 65536"),
        ("listen", "handshake_timeout", 0, "listen.handshake_timeout: expected a duration above zero, got 0"),
        ("listen", "max_message_size", "4GiB", "listen.max_message_size: expected a size in bytes between"),
        ("listen", "listen", {}, "listen.listen: unknown key"),
        ("tls", "min_version", "1.1", "tls.min_version: expected one of: 1.2, 1.3; got '1.1'"),
        ("tls", "cert", ["a"], "tls.cert: expected a non-empty string, got a list"),
        ("pool", "min_idle", -1, "pool.min_idle: expected an integer of at least 0, got -1"),
        ("pool", "server_lifetime", "1 week", "pool.server_lifetime: expected a duration"),
        (
            "identity",
            "user_name",
            "match-store",
            "identity.user_name: expected one of: ignore, match-terminal,",
        ),
    ],
)
def test_bad_values_name_key_and_expectation(
    base: Path, section: str, key: str, value: object, expected: str
) -> None:
    data = minimal()
    data.setdefault(section, {})[key] = value
    [problem] = problems(data, base)
    assert problem.startswith(expected)


def test_section_must_be_a_mapping(base: Path) -> None:
    assert problems({**minimal(), "listen": "0.0.0.0:6432"}, base) == [
        "listen: expected a mapping, got '0.0.0.0:6432'"
    ]


def test_unreadable_tls_files(base: Path) -> None:
    (base / "dir.crt").mkdir()
    data = minimal()
    data["tls"].update(cert="dir.crt", crl=str(base / "nope.crl"))
    assert problems(data, base) == [
        f"tls.cert: not a regular file: {base / 'dir.crt'}",
        f"tls.crl: file not found: {base / 'nope.crl'}",
    ]


def test_yaml_non_string_keys_are_reported(base: Path) -> None:
    data = minimal()
    data["roles"] = {"cashier": None, False: None}  # YAML 1.1 reads `no:` as False
    assert problems(data, base) == ["roles: key False is not a string (quote it)"]


def test_role_names(base: Path) -> None:
    data = minimal()
    data["roles"] = {"Cashier": None, "shift-lead": {"description": 5}, "ok": {"descripton": "x"}}
    assert problems(data, base) == [
        "roles.Cashier: expected a name matching ^[a-z][a-z0-9_]{0,62}$, got 'Cashier'",
        "roles.shift-lead: expected a name matching ^[a-z][a-z0-9_]{0,62}$, got 'shift-lead'",
        "roles.ok.descripton: unknown key (expected one of: description, policy, limits, statement_timeout)",
    ]
    assert problems({**minimal(), "roles": {}}, base) == ["roles: at least one role is required"]


def test_min_idle_cannot_exceed_size(base: Path) -> None:
    data = minimal()
    data["pool"] = {"size": 5, "min_idle": 6}
    assert problems(data, base) == ["pool.min_idle: min_idle (6) cannot exceed size (5)"]
    data = with_route(pool={"size": 2})
    data["pool"] = {"min_idle": 4}
    assert problems(data, base) == ["routes.pos.pool.size: min_idle (4) cannot exceed size (2)"]


@pytest.mark.parametrize("sslmode", ["verify-ca", "verify-full"])
def test_verifying_sslmode_requires_sslrootcert(base: Path, sslmode: str) -> None:
    data = with_route(sslmode=sslmode)
    del data["routes"]["pos"]["sslrootcert"]
    assert problems(data, base) == [f"routes.pos.sslrootcert: required when sslmode is {sslmode}"]


def test_missing_sslrootcert_file_is_reported_once(base: Path) -> None:
    assert problems(with_route(sslrootcert="gone.crt"), base) == [
        f"routes.pos.sslrootcert: file not found: {base / 'gone.crt'}"
    ]


# --- the route's client certificate (libpq's sslcert, sslkey, sslpassword) ---------------------------------


@pytest.fixture
def client_pairs(base: Path) -> tuple[certs.IssuedCert, certs.IssuedCert]:
    """Two client certificates with their keys, under base/db-client."""
    pki = base / "db-client"
    certs.init_ca(pki, common_name="test database client CA")
    return tuple(  # type: ignore[return-value]
        certs.issue_terminal(pki, store="db", terminal=name, role="pos_proxy") for name in ("one", "two")
    )


def _encrypt_key(source: Path, target: Path, passphrase: str) -> Path:
    key = serialization.load_pem_private_key(source.read_bytes(), password=None)
    target.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase.encode()),
        )
    )
    return target


def test_route_presents_the_named_client_certificate(
    base: Path, client_pairs: tuple[certs.IssuedCert, certs.IssuedCert]
) -> None:
    pair = client_pairs[0]
    route = parse(with_route(sslcert=str(pair.cert_path), sslkey=str(pair.key_path)), base).routes["pos"]
    client = route.client_certificate
    assert client is not None
    assert (client.cert, client.key, client.password) == (pair.cert_path, pair.key_path, None)


def test_client_key_passphrase_is_a_secret_reference(
    base: Path, client_pairs: tuple[certs.IssuedCert, certs.IssuedCert]
) -> None:
    pair = client_pairs[0]
    key = _encrypt_key(pair.key_path, base / "encrypted.key", PASSWORD)
    (base / "key-passphrase").write_text(PASSWORD + "\n")
    data = with_route(sslcert=str(pair.cert_path), sslkey=str(key), sslpassword={"file": "key-passphrase"})
    client = parse(data, base).routes["pos"].client_certificate
    assert client is not None and client.password == Secret(PASSWORD)
    # Inline, like a password: refused without echoing it.
    data["routes"]["pos"]["sslpassword"] = PASSWORD
    found = problems(data, base)
    assert found == [
        "routes.pos.sslpassword: put secrets in {env: NAME}, {file: PATH} or {credential: NAME}, "
        "not in the config file"
    ]


def test_client_certificate_problems_name_the_route_key(
    base: Path, client_pairs: tuple[certs.IssuedCert, certs.IssuedCert]
) -> None:
    one, two = client_pairs
    cert, key = str(one.cert_path), str(one.key_path)
    encrypted = _encrypt_key(one.key_path, base / "encrypted.key", PASSWORD)
    (base / "wrong-passphrase").write_text("not it")
    cases: list[tuple[dict[str, object], str]] = [
        ({"sslcert": cert}, "routes.pos.sslkey: required when sslcert is set"),
        ({"sslkey": key}, "routes.pos.sslcert: required when sslkey is set"),
        ({"sslcert": "gone.crt", "sslkey": key}, f"routes.pos.sslcert: file not found: {base / 'gone.crt'}"),
        ({"sslcert": cert, "sslkey": "gone.key"}, f"routes.pos.sslkey: file not found: {base / 'gone.key'}"),
        (
            {"sslcert": cert, "sslkey": str(two.key_path)},
            f"routes.pos.sslkey: {two.key_path} is not the key of {one.cert_path}",
        ),
        ({"sslcert": key, "sslkey": key}, f"routes.pos.sslcert: {one.key_path} holds no PEM certificate"),
        (
            {"sslcert": cert, "sslkey": cert},
            f"routes.pos.sslkey: {one.cert_path} holds no PEM private key, "
            "or one encrypted with a passphrase (set sslpassword)",
        ),
        (
            {"sslcert": cert, "sslkey": str(encrypted)},
            f"routes.pos.sslkey: {encrypted} holds no PEM private key, "
            "or one encrypted with a passphrase (set sslpassword)",
        ),
        (
            {"sslcert": cert, "sslkey": str(encrypted), "sslpassword": {"file": "wrong-passphrase"}},
            f"routes.pos.sslkey: {encrypted} holds no PEM private key that sslpassword opens",
        ),
        (
            {"sslcert": cert, "sslkey": key, "sslmode": "disable"},
            "routes.pos.sslcert: needs TLS, but sslmode is disable",
        ),
    ]
    for keys, expected in cases:
        assert problems(with_route(**keys), base) == [expected], keys


def test_client_certificate_rotated_in_place_is_a_changed_route(
    base: Path, client_pairs: tuple[certs.IssuedCert, certs.IssuedCert]
) -> None:
    one, two = client_pairs
    cert, key = base / "client.crt", base / "client.key"
    shutil.copyfile(one.cert_path, cert)
    shutil.copyfile(one.key_path, key)
    data = with_route(sslcert="client.crt", sslkey="client.key")
    before = parse(data, base).routes["pos"]
    assert parse(data, base).routes["pos"] == before
    shutil.copyfile(two.cert_path, cert)
    shutil.copyfile(two.key_path, key)
    after = parse(data, base).routes["pos"]
    assert after != before
    assert after == dataclasses.replace(before, client_certificate=after.client_certificate)


# --- identity ---------------------------------------------------------------------------------------------


def identity_problems(base: Path, sources: object) -> list[str]:
    return problems({**minimal(), "identity": {"sources": sources}}, base)


def test_custom_identity_sources(base: Path) -> None:
    data = minimal()
    data["identity"] = {
        "user_name": "match-terminal",
        "sources": [
            {"field": "subject.O", "pattern": r"(?P<store>\d+)"},
            {"field": "subject.CN", "pattern": r"till-(?P<terminal>\d+)\.(?P<role>[a-z]+)"},
        ],
    }
    identity = parse(data, base).identity
    assert identity.user_name is UserNameRule.MATCH_TERMINAL
    assert [source.field for source in identity.sources] == ["subject.O", "subject.CN"]
    assert identity.sources[1].pattern == re.compile(r"till-(?P<terminal>\d+)\.(?P<role>[a-z]+)")


def test_identity_section_without_sources_keeps_default_sources(base: Path) -> None:
    data = {**minimal(), "identity": {"user_name": "match-role"}}
    assert parse(data, base).identity == IdentityConfig(user_name=UserNameRule.MATCH_ROLE)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            {"field": "subject.CN", "pattern": "(?P<store>"},
            "identity.sources[0].pattern: not a valid regular",
        ),
        ({"field": "subject.CN", "pattern": "(.*)"}, "identity.sources[0].pattern: needs at least one named"),
        (
            {"field": "subject.CN", "pattern": "(?P<store>.*)-(?P<till>.*)"},
            "identity.sources[0].pattern: unknown named group(s) till; only store, terminal and role",
        ),
        (
            {"field": "subject.cn", "pattern": "(?P<store>.*)"},
            "identity.sources[0].field: expected one of: san_uri",
        ),
        ({"pattern": "(?P<store>.*)"}, "identity.sources[0].field: required"),
        ({"field": "san_dns", "regex": "x"}, "identity.sources[0].regex: unknown key"),
        ("san_uri", "identity.sources[0]: expected a mapping, got 'san_uri'"),
    ],
)
def test_identity_source_problems(base: Path, source: object, expected: str) -> None:
    found = identity_problems(base, [source])
    assert found[0].startswith(expected)
    # A broken source never also triggers the coverage complaint.
    assert not any(problem.startswith("identity.sources: missing") for problem in found)


def test_identity_sources_must_cover_store_terminal_and_role(base: Path) -> None:
    assert identity_problems(base, [{"field": "subject.CN", "pattern": "(?P<terminal>.*)"}]) == [
        "identity.sources: missing named group(s) store, role: "
        "together the patterns must capture store, terminal and role"
    ]


def test_identity_sources_must_be_a_non_empty_list(base: Path) -> None:
    assert identity_problems(base, []) == ["identity.sources: expected a non-empty list, got an empty list"]
    assert identity_problems(base, {"field": "san_uri"}) == [
        "identity.sources: expected a non-empty list, got a mapping"
    ]


# --- secrets ----------------------------------------------------------------------------------------------


def test_password_from_environment(base: Path) -> None:
    config = parse(with_route(password={"env": "POS_DB_PASSWORD"}), base, {"POS_DB_PASSWORD": PASSWORD})
    password = config.routes["pos"].password
    assert password is not None
    assert password.reveal() == PASSWORD


def test_password_from_file_strips_one_newline(base: Path) -> None:
    (base / "secrets").mkdir()
    (base / "secrets" / "db").write_text(PASSWORD + "\n\n")
    password = parse(with_route(password={"file": "secrets/db"}), base).routes["pos"].password
    assert password == Secret(PASSWORD + "\n")


def test_password_from_systemd_credential(base: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    credentials = tmp_path_factory.mktemp("credentials")
    (credentials / "pos-db-password").write_text(PASSWORD + "\n")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    password = (
        parse(with_route(password={"credential": "pos-db-password"}), base, environ).routes["pos"].password
    )
    assert password == Secret(PASSWORD)


@pytest.mark.parametrize(
    ("password", "environ", "expected"),
    [
        ({"env": "NOPE"}, {}, "environment variable NOPE is not set"),
        ({"env": "EMPTY"}, {"EMPTY": ""}, "the secret from env EMPTY is empty"),
        ({"file": "nope"}, {}, "file not found: {base}/nope"),
        (
            {"credential": "db"},
            {},
            "credential db needs CREDENTIALS_DIRECTORY, which systemd sets for LoadCredential=; "
            "it is not set",
        ),
        ({"credential": "db"}, {"CREDENTIALS_DIRECTORY": "{base}"}, "file not found: {base}/db"),
        (
            {"credential": "../db"},
            {"CREDENTIALS_DIRECTORY": "{base}"},
            "credential name '../db' must be a plain file name",
        ),
        (
            {"env": "A", "file": "b"},
            {},
            "expected exactly one of {env: NAME}, {file: PATH} or {credential: NAME}",
        ),
        ({"vault": "db"}, {}, "expected exactly one of {env: NAME}, {file: PATH} or {credential: NAME}"),
        ({"env": 5}, {}, "expected exactly one of {env: NAME}, {file: PATH} or {credential: NAME}"),
        (
            PASSWORD,
            {},
            "put secrets in {env: NAME}, {file: PATH} or {credential: NAME}, not in the config file",
        ),
        (12345, {}, "put secrets in {env: NAME}, {file: PATH} or {credential: NAME}, not in the config file"),
    ],
)
def test_password_problems(base: Path, password: object, environ: dict[str, str], expected: str) -> None:
    environ = {name: value.replace("{base}", str(base)) for name, value in environ.items()}
    assert problems(with_route(password=password), base, environ) == [
        f"routes.pos.password: {expected.replace('{base}', str(base))}"
    ]


def test_secret_file_must_be_utf8_and_error_does_not_quote_it(base: Path) -> None:
    (base / "db").write_bytes(b"\xffsecret")
    [problem] = problems(with_route(password={"file": "db"}), base)
    assert problem == f"routes.pos.password: {base / 'db'} is not valid UTF-8"


def test_secret_is_never_shown(base: Path) -> None:
    config = parse(with_route(password={"env": "PW"}), base, {"PW": PASSWORD})
    secret = config.routes["pos"].password
    assert secret is not None
    for text in (
        repr(config),
        str(config),
        repr(dataclasses.asdict(config.routes["pos"])),
        f"{secret}",
        str(secret),
    ):
        assert PASSWORD not in text
    assert repr(secret) == str(secret) == "Secret(***)"


def test_secret_values_in_a_broken_config_stay_out_of_the_error(base: Path) -> None:
    data = with_route(password=PASSWORD, passwd=PASSWORD)
    data["routes"]["other"] = {"host": "h", "user": "u", "sslmode": "require", "password": {"env": "PW"}}
    with pytest.raises(ConfigError) as caught:
        parse(data, base, {"PW": PASSWORD})
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)
    assert PASSWORD not in repr(caught.value.problems)


def test_secret_behaviour() -> None:
    secret = Secret(PASSWORD)
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD)
    assert secret != Secret("other")
    assert hash(secret) == hash(Secret(PASSWORD))
    assert copy.deepcopy(secret) == secret
    assert pickle.loads(pickle.dumps(secret)) == secret
    with pytest.raises(AttributeError):
        secret._value = "changed"
    assert not hasattr(secret, "__dict__")


# --- loading files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert caught.value.problems == (ConfigProblem("", f"file not found: {tmp_path / 'absent.yaml'}"),)
    assert str(caught.value) == f"file not found: {tmp_path / 'absent.yaml'}"


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "pos-proxy.yaml"
    path.write_text("listen:\n  port: 6432\n  host: [0.0.0.0\nroles: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.path == ""
    assert re.fullmatch(rf"{re.escape(str(path))}:4:6: invalid YAML: .+", problem.message)


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "pos-proxy.yaml"
    path.write_text("roles:\n  cashier:\n  manager:\n  cashier:\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:4:3: invalid YAML: duplicate key 'cashier'"


def test_yaml_merge_keys_may_override(base: Path) -> None:
    path = base / "pos-proxy.yaml"
    path.write_text(
        "tls: {cert: proxy.crt, key: proxy.key, client_ca: terminal-ca.crt}\n"
        "roles: {cashier: null}\n"
        "x-route: &route {host: db, user: u, sslrootcert: db-ca.crt, port: 5432}\n"
        "routes:\n"
        "  pos: {<<: *route, port: 6000}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    # The anchor holder is an unknown key, but the merge itself was accepted.
    assert [str(problem) for problem in caught.value.problems] == [
        "x-route: unknown key (expected one of: "
        "listen, tls, identity, roles, pool, routes, policy, admin, limits, audit)"
    ]


def test_empty_file_reports_what_is_required(tmp_path: Path) -> None:
    path = tmp_path / "pos-proxy.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "tls.cert: required" in str(caught.value).splitlines()


def test_config_problem_str() -> None:
    assert str(ConfigProblem("listen.port", "bad")) == "listen.port: bad"
    assert str(ConfigProblem("", "file not found: /x")) == "file not found: /x"
    error = ConfigError([ConfigProblem("a", "one"), ConfigProblem("b.c", "two")])
    assert str(error) == "a: one\nb.c: two"


# --- the shipped example ----------------------------------------------------------------------------------


def test_example_config_loads(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("proxy.crt", "proxy.key", "terminal-ca.crt", "terminal-ca.crl", "db-ca.crt"):
        (tls / name).write_text("x")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "pos-db-password").write_text("pos-password\n")
    (credentials / "reports-db-password").write_text("reports-password\n")
    (credentials / "admin-token").write_text("admin-token-value\n")
    key = tmp_path / "audit.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    for directory in ("log", "lib"):
        (tmp_path / directory).mkdir()
    path = tmp_path / "pos-proxy.yaml"
    path.write_text(
        EXAMPLE.read_text()
        .replace("/etc/pos-proxy/tls/", f"{tls}/")
        .replace("/etc/pos-proxy/audit.key", str(key))
        .replace("/var/log/pos-proxy/", f"{tmp_path}/log/")
        .replace("/var/lib/pos-proxy/", f"{tmp_path}/lib/")
    )
    shutil.copytree(EXAMPLE.parent / "policies", tmp_path / "policies")

    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    cashier = config.roles["cashier"].policy
    assert cashier is not None and cashier.mode is PolicyMode.ENFORCE
    assert "public.sales" in cashier.write_tables

    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 6432)
    assert config.tls.cert == tls / "proxy.crt"
    assert config.tls.crl == tls / "terminal-ca.crl"
    assert set(config.roles) == {"cashier", "manager"}
    assert config.identity == IdentityConfig()
    pos = config.routes["pos"]
    assert (pos.host, pos.sslmode, pos.sslrootcert) == (
        "db.example.internal",
        SSLMode.VERIFY_FULL,
        tls / "db-ca.crt",
    )
    assert pos.password == Secret("pos-password")
    assert (pos.pool.mode, pos.pool.size, pos.pool.min_idle) == (PoolMode.TRANSACTION, 40, 2)
    reports = config.routes["reports"]
    assert (reports.pool.mode, reports.pool.size, reports.pool.min_idle) == (PoolMode.SESSION, 5, 0)
    assert reports.pool.connect_timeout == 5.0
    # The service keeps an audit log, in the unit's log directory, its witness in the state one.
    assert config.audit is not None
    assert config.audit.settings.file == tmp_path / "log" / "audit.log"
    assert config.audit.settings.witness_file == tmp_path / "lib" / "audit.witness"
    assert config.audit.settings.key_file == key


@pytest.mark.parametrize(
    ("schema", "not_keys"),
    [
        (ListenConfig, ()),
        (ProxyProtocolConfig, ()),
        (TLSConfig, ()),
        (IdentityConfig, ()),
        (IdentitySource, ()),
        (RoleConfig, ("name", "policy_file")),
        (PoolConfig, ()),
        (RouteConfig, ("database", "client_certificate")),
        (PolicySettings, ()),
        (AdminConfig, ()),
        (LimitsConfig, ()),
        (SharedLimitsConfig, ()),
        (LimitSettings, ()),
        (AuditConfig, ("settings",)),
        (AuditSettings, ()),
    ],
)
def test_example_config_shows_every_key(schema: type, not_keys: tuple[str, ...]) -> None:
    text = EXAMPLE.read_text()
    for field in dataclasses.fields(schema):
        if field.name not in not_keys:
            # Optional sections the example leaves commented out (limits.shared) count as shown.
            assert re.search(rf"^\s*(#\s*)?(- )?{field.name}:", text, re.MULTILINE), field.name


def test_example_config_shows_the_route_client_certificate_keys() -> None:
    text = EXAMPLE.read_text()
    for key in ("sslcert", "sslkey", "sslpassword"):
        assert re.search(rf"^\s*# {key}:", text, re.MULTILINE), key


def test_example_shared_limits_section_parses_once_uncommented(base: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("  # shared:")
    end = next(index for index in range(start, len(lines)) if not lines[index].startswith("  #"))
    section = "\n".join("  " + line[4:] for line in lines[start:end])
    credentials = base / "credentials"
    credentials.mkdir()
    (credentials / "redis-password").write_text("redis-password\n")
    data = minimal()
    data["limits"] = yaml.safe_load(section)
    shared = parse(data, base, {"CREDENTIALS_DIRECTORY": str(credentials)}).limits.shared
    assert shared is not None
    assert shared.redis_url == "redis://redis.example.internal:6379/0"
    assert shared.password == Secret("redis-password")


def test_impossible_yaml_scalar_is_a_file_problem(tmp_path: Path) -> None:
    path = tmp_path / "pos-proxy.yaml"
    path.write_text("roles: {cashier: {description: 2024-13-01}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: invalid YAML: ")


def test_config_file_must_be_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pos-proxy.yaml"
    path.write_bytes(b"roles: {caf\xe9: null}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: not valid UTF-8"


# --- listen.proxy_protocol ----------------------------------------------------------------------------------


def test_proxy_protocol_is_off_unless_enabled(base: Path) -> None:
    config = parse(minimal(), base)
    assert config.listen.proxy_protocol == ProxyProtocolConfig()
    assert not config.listen.proxy_protocol.trusts("127.0.0.1")


def test_proxy_protocol_trusts_only_the_listed_networks(base: Path) -> None:
    data = minimal()
    data["listen"] = {
        "proxy_protocol": {
            "enabled": True,
            "trusted_sources": ["10.0.1.0/24", "192.0.2.9", "2001:db8::/32"],
            "header_timeout": "1500ms",
        }
    }
    settings = parse(data, base).listen.proxy_protocol
    assert settings.header_timeout == 1.5
    assert [settings.trusts(host) for host in ("10.0.1.77", "192.0.2.9", "2001:db8::5")] == [True] * 3
    assert [settings.trusts(host) for host in ("10.0.2.1", "192.0.2.10", "2001:db9::5")] == [False] * 3
    # How a dual-stack listener reports an IPv4 peer.
    assert settings.trusts("::ffff:10.0.1.77")


@pytest.mark.parametrize(
    ("proxy_protocol", "expected"),
    [
        ({"enabled": True}, "listen.proxy_protocol.trusted_sources: at least one network is required"),
        (
            {"enabled": True, "trusted_sources": []},
            "listen.proxy_protocol.trusted_sources: at least one network is required",
        ),
        (
            {"enabled": True, "trusted_sources": ["10.0.1.1/24"]},
            "listen.proxy_protocol.trusted_sources: item 0: expected an address or CIDR network such as "
            "10.0.0.0/8: 10.0.1.1/24 has host bits set",
        ),
        (
            {"trusted_sources": ["10.0.0.0/8", "balancer.internal"]},
            "listen.proxy_protocol.trusted_sources: item 1: expected an address or CIDR network",
        ),
        ({"enabled": "yes"}, "listen.proxy_protocol.enabled: expected true or false, got 'yes'"),
        (
            {"header_timeout": 0},
            "listen.proxy_protocol.header_timeout: expected a duration above zero, got 0",
        ),
        ({"trusted": ["10.0.0.0/8"]}, "listen.proxy_protocol.trusted: unknown key"),
    ],
)
def test_bad_proxy_protocol_settings_name_the_key(base: Path, proxy_protocol: object, expected: str) -> None:
    data = minimal()
    data["listen"] = {"proxy_protocol": proxy_protocol}
    [problem] = problems(data, base)
    assert problem.startswith(expected)


# --- limits.shared ----------------------------------------------------------------------------------------


def with_shared(**shared: object) -> dict[str, Any]:
    data = minimal()
    data["limits"] = {"shared": {"redis_url": "redis://127.0.0.1:6379/0", **shared}}
    return data


def test_shared_limits_defaults(base: Path) -> None:
    shared = parse(with_shared(), base).limits.shared
    assert shared == SharedLimitsConfig(redis_url="redis://127.0.0.1:6379/0")
    assert shared.on_unavailable is SharedLimitFallback.FAIL_OPEN
    assert parse(minimal(), base).limits.shared is None


def test_shared_limits_every_key(base: Path) -> None:
    (base / "redis-password").write_text("s3cret\n")
    shared = parse(
        with_shared(
            password={"file": "redis-password"},
            key_prefix="fleet-eu",
            on_unavailable="fail_closed",
            lease_size=25,
            timeout="200ms",
            instance_ttl="3s",
        ),
        base,
    ).limits.shared
    assert shared is not None
    assert shared.password == Secret("s3cret")
    assert (shared.key_prefix, shared.on_unavailable, shared.lease_size) == (
        "fleet-eu",
        SharedLimitFallback.FAIL_CLOSED,
        25,
    )
    assert (shared.timeout, shared.instance_ttl) == (0.2, 3.0)


def test_shared_limits_problems_name_their_keys(base: Path) -> None:
    found = problems(
        with_shared(
            redis_url="rediss://redis:6380/0",
            password="plain",
            key_prefix="has space",
            on_unavailable="ignore",
            lease_size=0,
            timeout="2s",
            instance_ttl="3s",
            port=6379,
        ),
        base,
    )
    assert found[0] == (
        "limits.shared.port: unknown key (expected one of: redis_url, password, key_prefix, "
        "on_unavailable, lease_size, timeout, instance_ttl)"
    )
    assert [problem.split(":", 1)[0] for problem in found[1:]] == [
        "limits.shared.redis_url",
        "limits.shared.password",
        "limits.shared.key_prefix",
        "limits.shared.on_unavailable",
        "limits.shared.lease_size",
        "limits.shared.instance_ttl",
    ]
    assert "TLS to Redis is not supported" in found[1]
    assert "not in the config file" in found[2]
    assert "at least 3 times timeout (2 s)" in found[6]


def test_shared_limits_refuse_a_password_in_the_url_without_echoing_it(base: Path) -> None:
    found = problems(with_shared(redis_url="redis://proxy:hunter2@127.0.0.1:6379/0"), base)
    assert len(found) == 1
    assert found[0].startswith("limits.shared.redis_url: put the password in limits.shared.password")
    assert "hunter2" not in found[0]


def test_shared_limits_need_a_redis_url(base: Path) -> None:
    data = minimal()
    data["limits"] = {"shared": {"lease_size": 5}}
    assert problems(data, base) == ["limits.shared.redis_url: required"]


def test_shared_limits_without_the_redis_package_is_a_config_error(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates an install without the [redis] extra: the import system reports no such module.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real_find_spec(name, *a)
    )
    assert problems(with_shared(), base) == [
        "limits.shared: needs the Python package redis: pip install 'pos-db-proxy[redis]'"
    ]


def test_starvation_settings_parse_with_secure_defaults(base: Path) -> None:
    defaults = parse(minimal(), base)
    assert (defaults.listen.max_pending_handshakes, defaults.listen.max_pending_handshakes_per_source) == (
        1024,
        64,
    )
    assert defaults.routes["pos"].pool.idle_transaction_timeout == 60.0
    data = with_route(pool={"idle_transaction_timeout": 0})
    data["listen"] = {"max_pending_handshakes": 200, "max_pending_handshakes_per_source": 8}
    data["roles"] = {
        "cashier": {"statement_timeout": "30s", "limits": {"max_server_connections_per_terminal": 2}}
    }
    config = parse(data, base)
    assert (config.listen.max_pending_handshakes, config.listen.max_pending_handshakes_per_source) == (200, 8)
    assert config.routes["pos"].pool.idle_transaction_timeout is None
    assert config.roles["cashier"].statement_timeout == 30.0
    assert config.roles["cashier"].limits.max_server_connections_per_terminal == 2


def test_starvation_settings_are_checked(base: Path) -> None:
    data = with_route(pool={"idle_transaction_timeout": "-1s"})
    data["listen"] = {"max_pending_handshakes": 0}
    data["roles"] = {
        "cashier": {"statement_timeout": 0, "limits": {"max_server_connections_per_terminal": 0}}
    }
    assert problems(data, base) == [
        "listen.max_pending_handshakes: expected an integer of at least 1, got 0",
        "roles.cashier.limits.max_server_connections_per_terminal: expected an integer of at least 1, got 0",
        "roles.cashier.statement_timeout: expected a duration above zero, got 0",
        "routes.pos.pool.idle_transaction_timeout: expected a duration such as 30, 2.5, '250ms', "
        "'5m' or '1h', got '-1s'",
    ]


def test_audit_on_write_failure_defaults_to_refuse_and_takes_continue(base: Path) -> None:
    key = base / "audit.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    section = {"file": str(base / "audit.log"), "key_file": str(key)}
    config = parse({**minimal(), "audit": section}, base)
    assert config.audit is not None
    assert config.audit.on_write_failure is OnWriteFailure.REFUSE
    assert config.audit.settings.max_held_records == 100_000
    chosen = {**section, "on_write_failure": "continue", "max_held_records": 0}
    config = parse({**minimal(), "audit": chosen}, base)
    assert config.audit is not None
    assert config.audit.on_write_failure is OnWriteFailure.CONTINUE
    assert config.audit.settings.max_held_records == 0
    wrong = {**section, "on_write_failure": "ignore", "max_held_records": -1}
    assert problems({**minimal(), "audit": wrong}, base) == [
        "audit.max_held_records: expected an integer of at least 0, got -1",
        "audit.on_write_failure: expected one of: refuse, continue; got 'ignore'",
    ]
