"""What the RESHARD job and each proxy's side of it share: the proxy they drive, the job's progress as SHOW RESHARD
reports it, and the digest of a ring that the members of the fleet compare."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from shardproxy.config import Config
from shardproxy.datapath.pool import Pools
from shardproxy.ops.admin.replies import Table, Value
from shardproxy.routing.ring import Ring
from shardproxy.routing.router import Router

COLUMNS = ["phase", "tables", "rows_copied", "rows_streamed", "lag_bytes", "moved_share", "elapsed", "error"]


def ring_digest(ring: Ring) -> str:
    """What every member of the fleet compares before it holds: the same shards, weights and points."""
    return hashlib.sha256(repr((ring.names, ring.points)).encode()).hexdigest()[:16]


class ReshardHost(Protocol):
    """What resharding reads and drives of the proxy."""

    config: Config
    router: Router
    pools: Pools

    def reload(self, force: bool = False) -> Config: ...
    async def wait_for_primary(self, shard: str, timeout: float) -> Any: ...
    async def execute_for_all(self, line: str) -> Table: ...  # every worker of this proxy
    def reshard_rows(self, phase: str, count: int) -> None: ...  # shardproxy_reshard_rows_total


@dataclass
class Progress:
    phase: str = "schema"
    tables: int = 0
    rows_copied: int = 0
    rows_streamed: int = 0
    lag_bytes: int = 0
    moved_share: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    error: str | None = None

    def row(self) -> list[Value]:
        elapsed = (self.ended or time.monotonic()) - self.started
        return [self.phase, self.tables, self.rows_copied, self.rows_streamed, self.lag_bytes,
                round(self.moved_share, 6), round(elapsed, 3), self.error]
