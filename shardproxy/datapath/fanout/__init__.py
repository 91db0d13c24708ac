"""Statements that run on several shards at once: scatter reads (scatter.py), and writes or DDL on every shard
(everywhere.py, committed in two phases by twophase.py), each shard served by a Leg (legs.py). Two-phase commits
left in doubt by a proxy that died are finished by recovery.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardproxy.datapath.fanout.everywhere import NotTransactional, run_alone_everywhere, run_everywhere
from shardproxy.datapath.fanout.legs import split_messages
from shardproxy.datapath.fanout.scatter import scatter, scatter_plan
from shardproxy.datapath.session import ClientSession
from shardproxy.routing.merge import Unmergeable
from shardproxy.routing.router import Decision
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Frontend

if TYPE_CHECKING:
    from shardproxy.datapath.pool import Pool


async def run(client: ClientSession, pools: list[Pool | None], decision: Decision, batch: bytes,
              status: int) -> bytes:
    """A statement for every shard (`pools`: one per shard, None for a shard without a primary to write to):
    writes and DDL all-or-nothing on the primaries, reads merged. The client's reply, ReadyForQuery `status`."""
    route = decision.route
    found = [pool for pool in pools if pool is not None]
    if len(found) < len(pools):
        raise pg.PostgresError(pg.CANNOT_CONNECT_NOW, "shardproxy: a shard has no primary")
    if batch[0] != Frontend.QUERY and sum(t == Frontend.BIND for t, _ in split_messages(batch)) > 1:
        # Each shard would run the batch's other statements too, and the reply is built for one statement.
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: a statement that runs on every shard "
                               "must be the only one in its batch (send a Sync before and after it)")
    if route.target == "all":
        kind = "ddl" if route.kind == "ddl" else "write"  # as shardproxy_queries_total counts it
        if decision.plan is not None and decision.plan.concurrently:
            return await run_alone_everywhere(client, found, batch, status, kind)
        try:
            return await run_everywhere(client, found, batch, status, kind)
        except NotTransactional:
            return await run_alone_everywhere(client, found, batch, status, kind)
    try:
        plan = scatter_plan(decision.sql)
    except Unmergeable as exc:
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    return await scatter(client, found, plan, batch, status)
