"""Statements that run on several shards at once: scatter reads (scatter.py), and writes or DDL on every shard
(everywhere.py, committed in two phases by twophase.py; writes of each shard's own rows answer with the row
counts of all, combine.py), an INSERT's rows split by shard (split.py), each shard served by a Leg (legs.py),
a session on one server connection. Outside a transaction the legs are taken from the pools for the statement;
inside one they are the transaction's own (datapath/transaction.py), so the statement sees the transaction's
writes and its writes commit with the transaction. Two-phase commits left in doubt by a proxy that died are
finished by recovery.py.
"""

from __future__ import annotations

from shardproxy.datapath.fanout.combine import combined
from shardproxy.datapath.fanout.everywhere import (
    NotTransactional,
    first_stands,
    run_alone_everywhere,
    run_everywhere,
    run_in_transaction,
)
from shardproxy.datapath.fanout.legs import Leg, split_messages
from shardproxy.datapath.fanout.scatter import scatter, scatter_plan
from shardproxy.datapath.fanout.split import run_split
from shardproxy.datapath.session import ClientSession
from shardproxy.routing.merge import Unmergeable
from shardproxy.routing.router import Decision
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Frontend


def kind_of(decision: Decision) -> str:
    """What each shard's part counts as in shardproxy_queries_total."""
    route = decision.route
    if route.target == "copy":
        return "write" if route.write else "scatter"
    if route.target == "scatter":
        return "scatter"
    return "ddl" if route.kind == "ddl" else "write"


async def run(client: ClientSession, legs: list[Leg], decision: Decision, batch: bytes,
              in_transaction: bool) -> tuple[bytes, bool]:
    """A statement for several shards, one leg on each: writes and DDL all-or-nothing, reads merged. The client's
    reply, and whether it took a two-phase commit (outside a transaction, which then ends with the statement)."""
    route = decision.route
    if batch[0] != Frontend.QUERY:
        kinds = [t for t, _ in split_messages(batch)]
        if kinds.count(Frontend.BIND) > 1:
            # Each shard would run the batch's other statements too, and the reply is built for one statement.
            raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: a statement that runs on every shard "
                                   "must be the only one in its batch (send a Sync before and after it)")
        if Frontend.EXECUTE not in kinds:  # its portal would be executed later, on one shard's leg
            raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: a statement that runs on every shard "
                                   "must be executed in the batch that binds it: a portal kept for later "
                                   "Executes (a cursor) is not supported across shards")
    status = pg.IN_TRANSACTION if in_transaction else pg.IDLE
    if route.target == "split":
        return await run_split(client, legs, decision, batch, in_transaction)
    if route.target == "all" or route.target == "each":
        batches = [batch] * len(legs)
        answer = combined if route.target == "each" else first_stands
        if in_transaction:
            return await run_in_transaction(legs, batches, answer), False
        if decision.plan is not None and decision.plan.concurrently:
            return await run_alone_everywhere(client, legs, batch, status), False
        try:
            return await run_everywhere(client, legs, batches, answer)
        except NotTransactional:
            return await run_alone_everywhere(client, legs, batch, status), False
    try:
        plan = scatter_plan(decision.sql)
    except Unmergeable as exc:
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    return await scatter(client, legs, plan, batch, status), False
