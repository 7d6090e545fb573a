"""Admin HTTP API (aiohttp): metrics, health, pools, clients, terminal cut-off, idle server
connections closed, and reload."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web

log = structlog.get_logger("pos_proxy.admin")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Who asked the supervisor (an address, or SIGHUP), passed on to a worker's admin socket for its log.
ACTOR_HEADER = "X-Pos-Proxy-Actor"


class AdminControl(Protocol):
    """What the admin API needs from the running proxy: one process (proxy.server.ProxyServer)
    or the supervisor of several workers (proxy.supervisor.Supervisor)."""

    async def pools(self) -> list[dict[str, Any]]: ...

    async def clients(self) -> list[dict[str, Any]]: ...

    async def disconnect_terminal(self, store: str, terminal: str, actor: str) -> int: ...

    async def close_idle_server_connections(self, route: str, actor: str) -> int | None: ...

    async def request_reload(self, trigger: str) -> bool: ...

    async def readiness(self) -> tuple[bool, Mapping[str, Any]]: ...

    async def metrics_text(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class AdminListener:
    host: str
    port: int
    token: str | None  # bearer token every endpoint but /healthz requires, when set
    # A Unix socket instead of host:port: a worker's API, for its supervisor only.
    unix_path: Path | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminServer:
    """Serves the admin API on its own listener, on the proxy's event loop."""

    def __init__(self, control: AdminControl, listener: AdminListener) -> None:
        self._control = control
        self._listener = listener
        self._runner: web.AppRunner | None = None
        self.port = listener.port

    async def start(self) -> None:
        app = web.Application(middlewares=[self._authenticate])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/pools", self._pools)
        app.router.add_get("/v1/clients", self._clients)
        app.router.add_post("/v1/terminals/{store}/{terminal}/disconnect", self._disconnect)
        app.router.add_post("/v1/reload", self._reload)
        app.router.add_post("/v1/pools/{route}/close-idle", self._close_idle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        unix_path = self._listener.unix_path
        site: web.BaseSite = (
            web.TCPSite(self._runner, self._listener.host, self._listener.port)
            if unix_path is None
            else web.UnixSite(self._runner, str(unix_path))
        )
        await site.start()
        if unix_path is not None:
            log.info("admin_listening", socket=str(unix_path))
            return
        if self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        log.info("admin_listening", host=self._listener.host, port=self.port, auth=bool(self._listener.token))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self._listener.token
        if token is None or request.path == "/healthz":
            return await handler(request)
        offered = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(offered, token.encode()):
            log.warning(
                "admin_refused", path=request.path, remote=request.remote, reason="bad or missing token"
            )
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        ready, details = await self._control.readiness()
        return web.json_response({"ready": ready, **details}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=await self._control.metrics_text(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def _pools(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"pools": await self._control.pools()})

    async def _clients(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"clients": await self._control.clients()})

    async def _disconnect(self, request: web.Request) -> web.StreamResponse:
        store, terminal = request.match_info["store"], request.match_info["terminal"]
        count = await self._control.disconnect_terminal(store, terminal, actor=self._actor(request))
        return web.json_response({"store": store, "terminal": terminal, "disconnected": count})

    async def _close_idle(self, request: web.Request) -> web.StreamResponse:
        route = request.match_info["route"]
        closed = await self._control.close_idle_server_connections(route, actor=self._actor(request))
        if closed is None:
            return web.json_response({"error": f"no route {route!r}"}, status=404)
        return web.json_response({"route": route, "closed": closed})

    async def _reload(self, request: web.Request) -> web.StreamResponse:
        applied = await self._control.request_reload(self._actor(request))
        return web.json_response({"reloaded": applied}, status=200 if applied else 422)

    def _actor(self, request: web.Request) -> str:
        forwarded = request.headers.get(ACTOR_HEADER)
        if forwarded and self._listener.unix_path is not None:
            # Only the supervisor can reach a worker's socket (0700 directory): it says who asked.
            return forwarded
        return f"admin api from {request.remote}"
