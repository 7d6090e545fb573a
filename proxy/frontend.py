"""What the server needs from a wire protocol's front end, and nothing of any protocol itself.

The server (proxy.server) owns the listening sockets, the PROXY header, the pre-authentication caps
and the TLS handshake; each listener is bound to one front end (proxy.protocols.<name>.frontend),
which speaks the plaintext preamble before TLS, creates the session that runs on the TLS
connection, builds a route's pool and renders an error as its protocol's bytes.
"""

from __future__ import annotations

import enum
import socket
from typing import Protocol, TypeVar

from proxy.config.model import RouteConfig
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.preauth import PendingStartup
from proxy.tlsconfig import UpstreamTLS

RouteT_co = TypeVar("RouteT_co", covariant=True)
EnvironmentT_contra = TypeVar("EnvironmentT_contra", contravariant=True)
SessionT_co = TypeVar("SessionT_co", covariant=True)


class Encryption(enum.Enum):
    """How the preamble ended: no TLS (the connection is done with), or TLS asked for or begun."""

    NONE = "none"
    NEGOTIATED = "SSLRequest"
    DIRECT = "direct"


class Preauth(Protocol):
    """What the server lends a front end during the preamble, before anyone is authenticated."""

    @property
    def metrics(self) -> Metrics: ...

    def refuse_proxy_header(self, peer: str, reason: str, error: str) -> None:
        """A PROXY header where none may be: counted, logged and audited (throttled)."""

    def preauth_log(self, event: str, *, warning: bool = False, **fields: object) -> bool:
        """Log a pre-authentication event unless its kind is over the rate; True if logged."""


class Frontend(Protocol[RouteT_co, EnvironmentT_contra, SessionT_co]):
    """One wire protocol as seen from a listener (like the protocol class a uvicorn server runs)."""

    @property
    def default_port(self) -> int: ...

    async def preamble(self, sock: socket.socket, source: str, preauth: Preauth) -> Encryption:
        """The plaintext exchange from accept up to the TLS handshake (the protocol decides who
        speaks first); Encryption.NONE when the connection ends here (refused, cancel, EOF)."""

    def create_session(
        self, environment: EnvironmentT_contra, source: str, pending: PendingStartup, *, direct_tls: bool
    ) -> SessionT_co:
        """The session to run on the TLS connection once the handshake ends."""

    def build_route(self, route: RouteConfig, tls: UpstreamTLS, metrics: Metrics) -> RouteT_co:
        """A route with its pool: how to connect a server connection and reset it for reuse."""

    def render_error(self, error: ProxyError) -> bytes:
        """``error`` as the bytes that end a connection in this protocol."""
