"""In-doubt two-phase commits: prepared transactions a proxy left behind when it died, or lost a shard,
between PREPARE TRANSACTION and COMMIT PREPARED. They hold their locks until someone finishes them.

No log is needed (see twophase.py): the gid names the first participant (the decider) and the decider's xid, and
the decider's plain COMMIT, after the others prepared, is the decision. So PostgreSQL's record of the decider's xid
says whether it committed (commit everywhere), aborted (its COMMIT failed, or its connection closed before it: roll
back everywhere), or is in progress (its proxy is still deciding: left alone). Proxies before this one prepared
on the decider too, and committed it first: while the decider holds the gid prepared, nobody has committed (roll
back everywhere). While the decider cannot be reached, nothing is decided. Only transactions prepared more than
routing.in_doubt_after ago are looked at; passes by several proxies at once agree. A gid that is not signed with
the fleet's key (twophase.read_gid) is not ours, whatever it looks like: left alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, NamedTuple, Protocol

from shardproxy.cluster.health import CHECK_ERRORS, HealthChecker
from shardproxy.cluster.topology import Topology
from shardproxy.config import Config
from shardproxy.datapath._core import ProxyCore
from shardproxy.datapath.fanout.legs import Leg, first_error
from shardproxy.datapath.fanout.twophase import GID_PREFIX, read_gid, signing_key
from shardproxy.datapath.params import literal
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend

if TYPE_CHECKING:
    from shardproxy.datapath.pool import Pools

log = logging.getLogger("shardproxy.recovery")

PASS_INTERVAL = 30.0  # seconds between passes, or in_doubt_after if shorter


class RecoveryHost(Protocol):
    """What recovery needs of the proxy."""

    config: Config
    topology: Topology
    health: HealthChecker
    pools: Pools
    core: ProxyCore  # the data path's view of the proxy, which a leg's session reads

    def in_doubt_resolved(self, decision: str) -> None: ...


class Prepared(NamedTuple):
    database: str
    owner: str
    old: bool  # prepared longer than in_doubt_after ago


class Recovery:
    """Runs a pass shortly after start and then every PASS_INTERVAL, from the proxy's janitor."""

    def __init__(self, proxy: RecoveryHost):
        self.proxy = proxy
        self.started = -PASS_INTERVAL  # of the last pass; the first runs at the janitor's first round
        self.task: asyncio.Task | None = None

    def tick(self, now: float) -> None:
        interval = min(PASS_INTERVAL, self.proxy.config.routing.in_doubt_after)  # a reload applies at once
        if now - self.started < interval or (self.task is not None and not self.task.done()):
            return
        self.started = now
        self.task = asyncio.get_running_loop().create_task(self._pass())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _pass(self) -> None:
        try:
            async with asyncio.timeout(PASS_INTERVAL):
                await resolve_in_doubt(self.proxy)
        except TimeoutError:
            log.warning("in-doubt recovery pass took over %gs; the rest waits for the next pass", PASS_INTERVAL)
        except Exception:  # a bug: say so, and try again next time
            log.exception("in-doubt recovery pass failed")


async def resolve_in_doubt(proxy: RecoveryHost) -> None:
    """One pass over every shard primary that is up."""
    names = [shard.name for shard in proxy.config.shards]
    found = await asyncio.gather(*(_prepared_on(proxy, name) for name in names))
    held = {name: gids for name, gids in zip(names, found) if gids is not None}  # the shards that answered
    key = signing_key(proxy.config)
    in_doubt = sorted({gid for gids in held.values() for gid, xact in gids.items() if xact.old})
    for gid in in_doubt:
        signed = read_gid(gid, key)
        if signed is None or signed[0] not in held:  # not ours; or its decider is unreachable: not decided yet
            continue
        decider, xid = signed
        holders = {name: gids[gid] for name, gids in held.items() if gid in gids}
        if gid in held[decider]:
            await _finish(proxy, gid, False, holders, decider)
            continue
        status = await _xact_status(proxy, decider, xid)  # "in progress": its proxy is still deciding
        if status in ("committed", "aborted"):
            await _finish(proxy, gid, status == "committed", holders, decider)
        elif status is None:
            log.warning("in-doubt transaction %s: shard %s no longer knows whether xid %d committed; left for an "
                        "operator", gid, decider, xid)


async def _finish(proxy: RecoveryHost, gid: str, commit: bool, holders: dict[str, Prepared], decider: str) -> None:
    """COMMIT or ROLLBACK PREPARED on every shard holding it; a rollback reaches the decider last, so that
    a pass that stops half-way (or another proxy's pass) still finds the decision where it was."""
    sql = f"{'COMMIT' if commit else 'ROLLBACK'} PREPARED {literal(gid)}"
    others = [name for name in holders if name != decider]
    results = await asyncio.gather(*(_run(proxy, name, holders[name], sql) for name in others))
    done = [name for name, ok in zip(others, results) if ok]
    if decider in holders and len(done) == len(others) and await _run(proxy, decider, holders[decider], sql):
        done.append(decider)
    decision = "commit" if commit else "rollback"
    shards = ", ".join(done) or "no shard"
    if len(done) < len(holders):
        log.warning("in-doubt transaction %s: %s done on %s only; the rest waits for the next pass", gid,
                    decision, shards)
        return
    proxy.in_doubt_resolved(decision)
    log.info("in-doubt transaction %s resolved: %s on %s", gid, decision, shards,
             extra={"event": "in_doubt_resolved", "gid": gid, "decision": decision, "shards": done})


async def _prepared_on(proxy: RecoveryHost, shard: str) -> dict[str, Prepared] | None:
    """The proxy's prepared transactions on the shard's primary by gid; None if it cannot be asked.

    Asked on a connection of its own, as health checks are, not a pooled one: a pool would keep a
    connection open for this on every primary, in SHOW POOLS, and a paused pool would hold the question."""
    node = proxy.topology.primary(shard)
    if node is None:
        return None
    try:
        conn = await proxy.health.connect(node, "shardproxy recovery", proxy.health.timeout)
        try:
            rows = await conn.fetch(_PREPARED_SQL, GID_PREFIX, proxy.config.routing.in_doubt_after,
                                    timeout=proxy.health.timeout)
        finally:
            conn.terminate()
    except CHECK_ERRORS as exc:
        log.debug("in-doubt recovery: cannot ask shard %s: %s", shard, exc)
        return None
    return {row["gid"]: Prepared(row["database"], row["owner"], row["old"]) for row in rows}


async def _xact_status(proxy: RecoveryHost, shard: str, xid: int) -> str | None:
    """What the shard's primary records of its transaction xid: committed, aborted, in progress, or None (too
    old to know, or the primary cannot be asked)."""
    node = proxy.topology.primary(shard)
    if node is None:
        return None
    try:
        conn = await proxy.health.connect(node, "shardproxy recovery", proxy.health.timeout)
        try:
            status: str | None = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", str(xid),
                                                     timeout=proxy.health.timeout)
        finally:
            conn.terminate()
    except CHECK_ERRORS as exc:
        log.debug("in-doubt recovery: cannot ask shard %s: %s", shard, exc)
        return None
    return status


_PREPARED_SQL = ("SELECT gid, database, owner, prepared < now() - make_interval(secs => $2) AS old "
                 "FROM pg_prepared_xacts WHERE starts_with(gid, $1)")


async def _run(proxy: RecoveryHost, shard: str, xact: Prepared, sql: str) -> bool:
    """Run sql on the shard's primary, on a pooled connection in the transaction's database; whether it did."""
    node = proxy.topology.primary(shard)
    if node is None:
        return False
    # PostgreSQL lets only the transaction's owner (or a superuser) finish it. The proxy logs in only as
    # users it has passwords for: an owner it does not know is tried as its health-check user, which then
    # has to be a superuser.
    user = xact.owner if proxy.config.user(xact.owner) is not None else proxy.health.user
    leg = Leg.for_proxy(proxy.core, proxy.pools.pool_for(xact.database, user, node))
    try:
        answers = await leg.run(pg.query(sql))
    except pg.PostgresError as exc:
        log.debug("in-doubt recovery: %s on shard %s: %s", sql, shard, exc.message)
        return False
    finally:
        leg.release()
    if first_error([answers]) is not None:
        error = pg.PostgresError.from_body(next(body for t, body in answers if t == Backend.ERROR_RESPONSE))
        log.warning("in-doubt recovery: %s on shard %s failed: %s", sql, shard, error.message)
        return False
    return True
