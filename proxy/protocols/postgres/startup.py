"""Sans-IO startup and authentication of a server connection with the proxy-held credentials.

Covers 55.2.1 "Start-up" and 55.3 "SASL Authentication" (SCRAM-SHA-256 via scramp), plus md5
and cleartext for older servers. Bytes in, bytes out; the asyncio side only moves them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import scramp

from proxy.errors import ProtocolViolation
from proxy.policy.encodings import DEFAULT_ENCODING
from proxy.protocols.postgres import messages as m


class UpstreamRefused(Exception):
    """The server refused the proxy's startup or credentials; the text is for the operator's log."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        # The server's SQLSTATE when it answered with an ErrorResponse (28P01, 57P03, ...).
        self.sqlstate = sqlstate


class UpstreamHandshake:
    """State machine from StartupMessage to the first ReadyForQuery of a server connection."""

    def __init__(
        self, *, user: str, database: str, password: str | None, parameters: Mapping[str, str]
    ) -> None:
        self._user = user
        self._password = password
        self._startup = {"user": user, "database": database, **parameters}
        self._scram: scramp.ScramClient | None = None
        # Set once the server's SCRAM signature has verified: only then may AuthenticationOk end a SASL
        # exchange, or an impostor could skip SASLFinal and be trusted without proving the password.
        self._scram_verified = False
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self.done = False

    def startup_message(self) -> bytes:
        return m.build_startup_message(self._startup)

    def receive(self, kind: int, payload: bytes) -> bytes | None:
        """Take one backend message; return the reply to send, if any."""
        if kind == m.MSG_AUTHENTICATION:
            return self._authenticate(*m.parse_authentication(payload))
        if kind == m.MSG_PARAMETER_STATUS:
            name, value = m.parse_parameter_status(payload)
            self.parameters[name] = value
        elif kind == m.MSG_BACKEND_KEY_DATA:
            self.backend_key = m.parse_backend_key_data(payload)
        elif kind == m.MSG_READY_FOR_QUERY:
            server_encoding = self.parameters.get("server_encoding", DEFAULT_ENCODING)
            if server_encoding != DEFAULT_ENCODING:
                # The proxy reads statements as a UTF8 database does (PostgreSQL always reports its
                # encoding): a SQL_ASCII client's bytes are checked as UTF-8 only there, and a
                # single-byte database folds the case of non-ASCII identifiers by its locale, which
                # the proxy's parser never does.
                served = DEFAULT_ENCODING
                raise UpstreamRefused(
                    f"server_encoding is {server_encoding}: the proxy serves {served} databases only"
                )
            if self.parameters.get("standard_conforming_strings", "on") != "on":
                # Asked for at startup (server.py); the proxy's parser reads backslashes as literal.
                raise UpstreamRefused("standard_conforming_strings is off: the proxy needs it on")
            self.done = True
        elif kind == m.MSG_ERROR_RESPONSE:
            fields = m.parse_error_fields(payload)
            raise UpstreamRefused(
                f"server refused startup: {fields.get('C', '?')} {fields.get('M', '')}", fields.get("C")
            )
        elif kind != m.MSG_NOTICE_RESPONSE:
            raise UpstreamRefused(f"unexpected message {chr(kind)!r} during startup")
        return None

    def _authenticate(self, code: int, data: bytes) -> bytes | None:
        if code == m.AUTH_OK:
            if self._scram is not None and not self._scram_verified:
                raise UpstreamRefused("server skipped SCRAM final verification")
            return None
        password = self._require_password(code)
        if code == m.AUTH_SASL:
            mechanisms = m.parse_sasl_mechanisms(data)
            if "SCRAM-SHA-256" not in mechanisms:
                raise UpstreamRefused(f"server offers no supported SASL mechanism: {mechanisms}")
            # Channel binding is not needed: the TLS session to the server is verify-full already.
            self._scram = scramp.ScramClient(["SCRAM-SHA-256"], self._user, password)
            self._scram_verified = False
            first = self._scram.get_client_first().encode()
            return m.build_sasl_initial_response("SCRAM-SHA-256", first)
        if code == m.AUTH_SASL_CONTINUE:
            scram = self._require_scram()
            try:
                scram.set_server_first(data.decode())
            except UnicodeDecodeError as exc:
                raise UpstreamRefused("SCRAM server-first message is not valid UTF-8") from exc
            except scramp.ScramException as exc:
                raise UpstreamRefused(f"SCRAM server-first message rejected: {exc}") from exc
            return m.build_password_message(scram.get_client_final().encode())
        if code == m.AUTH_SASL_FINAL:
            scram = self._require_scram()
            try:
                scram.set_server_final(data.decode())
            except UnicodeDecodeError as exc:
                raise UpstreamRefused("SCRAM server-final message is not valid UTF-8") from exc
            except scramp.ScramException as exc:
                raise UpstreamRefused(f"server failed SCRAM verification: {exc}") from exc
            self._scram_verified = True
            return None
        if code == m.AUTH_MD5:
            if len(data) != 4:
                raise ProtocolViolation("malformed AuthenticationMD5Password")
            return m.build_password_message(md5_password(self._user, password, data) + b"\x00")
        if code == m.AUTH_CLEARTEXT:
            return m.build_password_message(password.encode() + b"\x00")
        raise UpstreamRefused(f"server asks for unsupported authentication method {code}")

    def _require_password(self, code: int) -> str:
        if self._password is None:
            raise UpstreamRefused(f"server asks for a password (method {code}) but the route has none")
        return self._password

    def _require_scram(self) -> scramp.ScramClient:
        if self._scram is None:
            raise UpstreamRefused("SASL continuation without a SASL start")
        return self._scram


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The md5 response of 55.3: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
