"""Distributed deadlocks: wait cycles between transactions that span shards, which no single server can see.

Transaction A holds a row on shard 0 and waits for one on shard 1, which B holds while it waits for A's row on
shard 0: each server sees one plain lock wait, so PostgreSQL's own deadlock detector never fires. The proxy knows
both halves: which client owns each server connection (a leg) of its transactions. Once a leg of a transaction on
several shards has waited half of routing.deadlock_timeout for its statement, a pass asks the servers whom each
waiting leg waits for (pg_blocking_pids), maps the blocking backends back to the clients that own them, and looks
for a cycle in the graph "client waits for client" (members may be transactions on one shard so far). A cycle is
checked a second time (an edge seen on one server may be gone by the time another was asked); if it still holds,
its youngest transaction is the victim: its waiting statement is cancelled with 40P01, which aborts it; its locks
on the other shards go at the client's ROLLBACK, which drivers send at once on such an error. Only this proxy
process's transactions are seen: a cycle through another proxy's (or worker's) transactions is ended only by the
servers' lock_timeout or statement_timeout, if set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from shardproxy.cluster.health import CHECK_ERRORS, HealthChecker
from shardproxy.cluster.topology import Topology
from shardproxy.config import Config
from shardproxy.wire import protocol as pg

if TYPE_CHECKING:
    from shardproxy.datapath.client import ClientConnection
    from shardproxy.datapath.server import ServerConnection

log = logging.getLogger("shardproxy.deadlocks")

DEADLOCK_DETECTED = "40P01"
_BLOCKERS_SQL = "SELECT waiter, pg_blocking_pids(waiter) FROM unnest($1::int[]) AS waiter"


class DeadlockHost(Protocol):
    """What deadlock detection needs of the proxy."""

    config: Config
    health: HealthChecker
    topology: Topology
    clients: dict[int, ClientConnection]


class Wait(NamedTuple):
    """A leg whose statement waits: its client, and when the statement was sent (to tell the same wait)."""

    client: ClientConnection
    server: ServerConnection
    since: float


class Deadlocks:
    """Runs a pass from the proxy's janitor whenever a leg of a transaction on several shards waits."""

    def __init__(self, proxy: DeadlockHost):
        self.proxy = proxy
        self.task: asyncio.Task | None = None

    def tick(self, now: float) -> None:
        if self.task is not None and not self.task.done():
            return
        patience = self.proxy.config.routing.deadlock_timeout / 2
        waits = self._waits()
        # A cycle across shards has a member that holds a leg on one shard and waits on another.
        if any(len(w.client.tx.legs) > 1 and now - w.since >= patience for w in waits):
            self.task = asyncio.get_running_loop().create_task(self._pass(waits))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _waits(self) -> list[Wait]:
        """The legs of client transactions whose statement waits for an answer."""
        waits = []
        for client in self.proxy.clients.values():
            server = client.server
            if server is not None and client.tx.legs and server.pending and not server.cancels:
                waits.append(Wait(client, server, server.last_used))
        return waits

    async def _pass(self, waits: list[Wait]) -> None:
        try:
            cycle = await self._cycle(waits)
            if cycle and (confirmed := await self._cycle([wait for wait in waits if wait.client in cycle])):
                self._break(confirmed, [wait for wait in waits if wait.client in confirmed])
        except Exception:  # a bug: say so, and look again at the next tick
            log.exception("distributed deadlock detection failed")

    async def _cycle(self, waits: list[Wait]) -> list[ClientConnection]:
        """A cycle of clients each waiting for the next (the last for the first), or [] if there is none."""
        owners = _owners(self.proxy.clients.values())
        by_node: dict[str, list[Wait]] = {}
        for wait in waits:
            by_node.setdefault(wait.server.pool.node_label, []).append(wait)
        answers = await asyncio.gather(*(self._blockers(node, [w.server.pid for w in ws])
                                         for node, ws in by_node.items()))
        edges: dict[ClientConnection, set[ClientConnection]] = {}
        for (node, node_waits), blockers in zip(by_node.items(), answers):
            for wait in node_waits:
                if wait.server.last_used != wait.since or wait.client.server is not wait.server:
                    continue  # it moved on meanwhile
                held_by = {owners[(node, pid)] for pid in blockers.get(wait.server.pid, ()) if (node, pid) in owners}
                edges.setdefault(wait.client, set()).update(held_by - {wait.client})
        return _find_cycle(edges)

    async def _blockers(self, address: str, pids: list[int]) -> dict[int, list[int]]:
        """For each waiting backend pid on the node, the pids that block it."""
        node = self.proxy.topology.node(address)
        if node is None:
            return {}
        timeout = self.proxy.health.timeout
        try:
            conn = await self.proxy.health.connect(node, "shardproxy deadlock detection", timeout)
            try:
                rows = await conn.fetch(_BLOCKERS_SQL, pids, timeout=timeout)
            finally:
                conn.terminate()
        except CHECK_ERRORS as exc:
            log.debug("deadlock detection: cannot ask %s: %s", address, exc)
            return {}
        return {row[0]: list(row[1]) for row in rows}

    def _break(self, cycle: list[ClientConnection], waits: list[Wait]) -> None:
        """Cancel the waiting statement of the cycle's youngest transaction with 40P01."""
        victim = max(cycle, key=lambda client: client.tx.started)
        wait = next(w for w in waits if w.client is victim)
        names = victim.proxy.config.shards
        shard = next(s for s, leg in victim.tx.legs.items() if leg is wait.server)
        log.warning("distributed deadlock between clients %s: client %d's statement on shard %s cancelled",
                    ", ".join(str(client.id) for client in cycle), victim.id, names[shard].name,
                    extra={"event": "deadlock", "clients": [client.id for client in cycle], "victim": victim.id})
        others = " and ".join(str(client.id) for client in cycle if client is not victim)
        wait.server.cancel_running(pg.PostgresError(DEADLOCK_DETECTED, "deadlock detected", fields={
            "S": "ERROR", "V": "ERROR", "C": DEADLOCK_DETECTED, "M": "deadlock detected",
            "D": f"shardproxy: this transaction waited on shard {names[shard].name} for a transaction of client "
                 f"{others}, which waited on another shard for this one.",
            "H": "The transaction is rolled back on every shard; retry it."}))


def _owners(clients: Iterable[ClientConnection]) -> dict[tuple[str, int], ClientConnection]:
    """The client of each leg of a client transaction, by node and backend pid."""
    return {(leg.pool.node_label, leg.pid): client for client in clients for leg in client.tx.legs.values()}


def _find_cycle(edges: dict[ClientConnection, set[ClientConnection]]) -> list[ClientConnection]:
    """A cycle in the wait-for graph, by depth-first search; [] if there is none."""
    done: set[ClientConnection] = set()
    for start in edges:
        if start in done:
            continue
        path, on_path = [start], {start}
        stack = [(start, iter(edges.get(start, ())))]
        while stack:
            node, successors = stack[-1]
            following = next(successors, None)
            if following is None:
                stack.pop()
                done.add(path.pop())
                on_path.discard(node)
            elif following in on_path:
                return path[path.index(following):]
            elif following not in done:
                stack.append((following, iter(edges.get(following, ()))))
                path.append(following)
                on_path.add(following)
    return []
