"""Client-visible failures: each error knows its SQLSTATE and whether it ends the session."""

from __future__ import annotations

from typing import TypeVar

_E = TypeVar("_E", bound=BaseException)


def caused_by(error: _E, cause: BaseException) -> _E:
    """``raise caused_by(X(...), exc) from exc``: sets ``__cause__`` even when compiled.

    mypyc ignores the ``from`` clause of a raise statement, and the session logs the cause of
    upstream failures (``exc.__cause__``).  The modules setup.py compiles chain their
    exceptions through this (tests/unit/test_compiled_build.py checks); the ``from`` stays for
    readers, linters and the pure-Python build.
    """
    error.__cause__ = cause
    return error


class ProxyError(Exception):
    """A failure the client is told about.

    ``message`` is what the client sees and never carries internals (addresses,
    credentials, file paths); the operator-facing reason goes to the log.
    """

    sqlstate = "XX000"
    fatal = True

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


class ProtocolViolation(ProxyError):
    sqlstate = "08P01"


class AuthenticationRefused(ProxyError):
    """The terminal could not be identified or is not let in (28000 invalid_authorization_specification)."""

    sqlstate = "28000"


class UnknownDatabase(ProxyError):
    sqlstate = "3D000"


class TooManyConnections(ProxyError):
    sqlstate = "53300"


class UpstreamUnavailable(ProxyError):
    """No server connection could be opened (08001 sqlclient_unable_to_establish_sqlconnection)."""

    sqlstate = "08001"


class UpstreamLost(ProxyError):
    """The server connection broke while serving the client (08006 connection_failure)."""

    sqlstate = "08006"


class AdminShutdown(ProxyError):
    sqlstate = "57P01"


class FeatureNotSupported(ProxyError):
    sqlstate = "0A000"


class InsufficientPrivilege(ProxyError):
    sqlstate = "42501"


class PolicyViolationLimit(InsufficientPrivilege):
    """The terminal kept sending refused statements: its session is ended."""


class IdleInTransactionTimeout(ProxyError):
    sqlstate = "25P03"
