"""One worker's slice of the configuration when N worker processes share the listening port.

Each worker has its own pools and its own connection counters, so the settings that add up across
workers are divided: a route's ``pool.size`` and ``pool.min_idle``, and the per-store and per-role
connection caps, go ``total // N`` to every worker with the remainder to the first ones (at least 1
where the setting is a cap). The per-terminal connection cap and the statement rates stay whole in
every worker: the kernel spreads one terminal's connections over the workers by address hash, so a
divided per-terminal cap would refuse a till that is within its limit. Each worker writes its own
audit hash chain (``audit.log`` -> ``audit-w1.log``): two processes cannot extend one chain.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.config.model import AuditConfig, Config, RouteConfig
from proxy.limits import LimitSettings


def share(total: int, index: int, count: int) -> int:
    """Worker ``index``'s (1-based, of ``count``) part of ``total``: the remainder goes to the first ones."""
    base, remainder = divmod(total, count)
    return base + (1 if index <= remainder else 0)


def worker_audit_file(path: Path, index: int) -> Path:
    """``/var/log/pos-proxy/audit.log`` -> ``/var/log/pos-proxy/audit-w2.log`` for worker 2."""
    return path.with_name(f"{path.stem}-w{index}{path.suffix}")


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Who a worker process is: its number, how many there are, and how the supervisor reaches it."""

    index: int  # 1-based
    count: int
    runtime_dir: Path  # the supervisor's private (0700) directory
    supervisor_pid: int

    @property
    def admin_socket(self) -> Path:
        return self.runtime_dir / f"worker-{self.index}.sock"

    def cap(self, total: int | None) -> int | None:
        """This worker's part of a connection cap; never 0, which would refuse everyone."""
        return None if total is None else max(1, share(total, self.index, self.count))

    def shape(self, config: Config) -> Config:
        """The configuration this worker runs: its pool and connection-cap slices, its own audit file."""
        return dataclasses.replace(
            config,
            routes=types.MappingProxyType(
                {name: self._route(route) for name, route in config.routes.items()}
            ),
            roles=types.MappingProxyType(
                {
                    name: dataclasses.replace(role, limits=self._limits(role.limits))
                    for name, role in config.roles.items()
                }
            ),
            limits=dataclasses.replace(
                config.limits,
                stores=self._each_limits(config.limits.stores),
                terminals=self._each_limits(config.limits.terminals),
            ),
            audit=self._audit(config.audit),
        )

    def _route(self, route: RouteConfig) -> RouteConfig:
        pool = route.pool
        return dataclasses.replace(
            route,
            pool=dataclasses.replace(
                pool,
                size=max(1, share(pool.size, self.index, self.count)),
                min_idle=share(pool.min_idle, self.index, self.count),
            ),
        )

    def _limits(self, limits: LimitSettings) -> LimitSettings:
        return dataclasses.replace(
            limits,
            connections_per_store=self.cap(limits.connections_per_store),
            connections_per_role=self.cap(limits.connections_per_role),
        )

    def _each_limits(self, overrides: Mapping[str, LimitSettings]) -> Mapping[str, LimitSettings]:
        return types.MappingProxyType({name: self._limits(limits) for name, limits in overrides.items()})

    def _audit(self, audit: AuditConfig | None) -> AuditConfig | None:
        if audit is None or audit.settings.file is None:
            return audit
        witness = audit.settings.witness_file
        settings = dataclasses.replace(
            audit.settings,
            file=worker_audit_file(audit.settings.file, self.index),
            witness_file=None if witness is None else worker_audit_file(witness, self.index),
        )
        return dataclasses.replace(audit, settings=settings)
