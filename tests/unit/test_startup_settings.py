"""Startup settings a client may give (the startup packet's own and libpq's options string),
read as the server reads them, and refused when the proxy cannot carry them."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.oplog import configure_logging
from proxy.protocols.postgres import messages as m
from proxy.protocols.postgres.parameters import (
    SESSION_PARAMETERS,
    SessionParameters,
    StartupParameterError,
    startup_options,
)
from tests.sockless import add_server, open_session, proxy_without_listener, terminal_certificate


@pytest.mark.parametrize(
    ("options", "settings"),
    [
        ("", []),
        ("   ", []),
        ("-c jit=off", [("jit", "off")]),
        ("-cjit=off", [("jit", "off")]),
        ("--jit=off", [("jit", "off")]),
        ("--client-min-messages=warning", [("client_min_messages", "warning")]),
        ("-c work_mem=64MB\t-c  statement_timeout=5s", [("work_mem", "64MB"), ("statement_timeout", "5s")]),
        (r"-c search_path=a,\ b", [("search_path", "a, b")]),
        (r"-c application_name=till\\7", [("application_name", "till\\7")]),
        ("-c application_name=a=b", [("application_name", "a=b")]),
    ],
)
def test_options_are_split_as_the_server_splits_them(options: str, settings: list[tuple[str, str]]) -> None:
    assert startup_options(options) == settings


@pytest.mark.parametrize(
    "options",
    ["-c", "-c jit", "--jit", "--", "-e", "-B 10", "-D /tmp", "-f s", "jit=off", "-c jit=off -d 5"],
)
def test_switches_other_than_settings_are_refused(options: str) -> None:
    with pytest.raises(StartupParameterError):
        startup_options(options)


def test_startup_settings_drivers_send_are_carried() -> None:
    wanted = SessionParameters.from_startup(
        {
            "user": "till-01",
            "database": "pos",
            "client_encoding": "utf-8",
            "options": "-c jit=off --work-mem=64MB -c client_min_messages=notice",
            "client_min_messages": "warning",  # the packet's own wins over options, as on the server
            "plan_cache_mode": "force_custom_plan",
        }
    ).wanted
    assert wanted == {
        "client_encoding": "UTF8",
        "jit": "off",
        "work_mem": "64MB",
        "client_min_messages": "warning",
        "plan_cache_mode": "force_custom_plan",
    }


@pytest.mark.parametrize(
    "parameters",
    [
        {"role": "postgres"},
        {"session_authorization": "postgres"},
        {"replication": "database"},
        {"idle_session_timeout": "1"},
        {"tcp_keepalives_idle": "1"},
        {"exit_on_error": "on"},
        {"options": "-c role=postgres"},
        {"options": "-c session_authorization=postgres"},
        {"options": "--exit-on-error=on"},
        {"standard_conforming_strings": "off"},
        {"options": "-c standard_conforming_strings=off"},
        {"client_encoding": "SJIS"},
        {"options": "-c client_encoding=SJIS"},
    ],
)
def test_settings_outside_the_allow_set_are_refused(parameters: dict[str, str]) -> None:
    with pytest.raises(StartupParameterError):
        SessionParameters.from_startup({"user": "till-01", "database": "pos", **parameters})


def test_no_carried_setting_acts_on_an_idle_connection_or_changes_who_the_session_is() -> None:
    # A carried setting stays on a pooled connection until the next client takes it.
    forbidden = {
        "role",
        "session_authorization",
        "idle_session_timeout",
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
        "tcp_user_timeout",
        "exit_on_error",
        "row_security",
        "session_replication_role",
        "temp_buffers",
        "backslash_quote",
    }
    assert not forbidden & set(SESSION_PARAMETERS)


# --- what the client is told at startup, without a server connection when the proxy can ---


async def test_a_client_is_told_startup_settings_in_the_servers_spelling_without_a_server(
    tmp_path: Path,
) -> None:
    configure_logging(json=False, level="error")
    proxy = proxy_without_listener(tmp_path)
    route = proxy.routes["pos"]
    add_server(route, {"server_version": "15.0", "client_encoding": "UTF8", "DateStyle": "ISO, MDY"})
    certificate = terminal_certificate(tmp_path)
    # The canonical client_encoding needs no server to be told.
    _session, transport = open_session(proxy, certificate, 40001, client_encoding="iso-8859-1")
    assert m.build_parameter_status("client_encoding", "LATIN1") in b"".join(transport.written)
    # A spelling the proxy learned from the server is told as the server spells it.
    route.spellings[("DateStyle", "iso")] = "ISO, MDY"
    _session, transport = open_session(proxy, certificate, 40002, DateStyle="iso")
    assert m.build_parameter_status("DateStyle", "ISO, MDY") in b"".join(transport.written)
    # One it has not learned yet waits for a server connection to report it (the integration test
    # tests/integration/test_driver_settings.py::test_startup_settings_are_reported_in_the_servers_spelling).
