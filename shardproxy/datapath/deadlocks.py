"""Distributed deadlocks: wait cycles between transactions that span shards, which no single server can see.

Transaction A holds a row on shard 0 and waits for one on shard 1, which B holds while it waits for A's row on
shard 0: each server sees one plain lock wait, so PostgreSQL's own deadlock detector never fires. The legs of a
transaction on several shards hold a shared advisory lock whose key is the transaction's tag (transaction.py:
taken with a leg's first statement once the transaction spans shards, or as the client moves off a leg), so the
servers themselves say which backends of different shards are one transaction, whichever proxy process (a
worker, another proxy of the fleet) runs it. Once a leg of such a transaction of this process has waited half of
routing.deadlock_timeout for its statement, a pass asks every shard's primary for its lock waits (who waits
for whom: pg_blocking_pids) and its tagged backends, and looks for a cycle through this process's waiting
transactions in the graph "transaction waits for transaction" (a backend without a tag stands for itself). A
cycle is checked a second time (an edge seen on one server may be gone by the time another was asked); if it
still holds, its youngest transaction (the highest tag) is the victim, cancelled by the process that runs it,
which every process finds alike: its waiting statement fails with 40P01, which aborts it; its locks on the other
shards go at the client's ROLLBACK, which drivers send at once on such an error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, NamedTuple, Protocol

from shardproxy.cluster.health import CHECK_ERRORS, HealthChecker
from shardproxy.cluster.topology import NodeState, Topology
from shardproxy.config import Config
from shardproxy.datapath.transaction import TAG_KEY
from shardproxy.wire import protocol as pg

if TYPE_CHECKING:
    from shardproxy.datapath.client import ClientConnection
    from shardproxy.datapath.server import ServerConnection

log = logging.getLogger("shardproxy.deadlocks")

DEADLOCK_DETECTED = "40P01"
_LOCKS_SQL = f"""
SELECT a.pid, t.objid::int8, CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(a.pid) END
FROM pg_stat_activity a LEFT JOIN pg_locks t
  ON t.pid = a.pid AND t.locktype = 'advisory' AND t.classid = {TAG_KEY} AND t.objsubid = 2 AND t.granted
WHERE a.wait_event_type = 'Lock' OR t.pid IS NOT NULL"""
Vertex = tuple  # ("t", tag): a transaction on several shards; ("p", node address, pid): another backend


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
        if any(now - w.since >= patience for w in waits):
            self.task = asyncio.get_running_loop().create_task(self._pass(waits))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def _waits(self) -> list[Wait]:
        """The waiting legs of this process's transactions on several shards (those that hold a tag): a cycle
        across shards has such a member, which holds a leg on one shard and waits on another."""
        waits = []
        for client in self.proxy.clients.values():
            server = client.server
            if server is not None and client.tx.tag and server.pending and not server.cancels:
                waits.append(Wait(client, server, server.last_used))
        return waits

    async def _pass(self, waits: list[Wait]) -> None:
        try:
            mine = {("t", wait.client.tx.tag): wait for wait in waits}
            edges = await self._graph()
            cycles = [cycle for start in mine if (cycle := _cycle_through(edges, start)) and _victim(cycle) in mine]
            if not cycles:
                return
            again = await self._graph()
            for cycle in cycles:
                wait = mine[_victim(cycle)]
                if _holds(cycle, again) and wait.server.last_used == wait.since and wait.client.server is wait.server:
                    self._break(cycle, wait, mine)
                    return  # (the others may have gone with it: the next pass looks again)
        except Exception:  # a bug: say so, and look again at the next tick
            log.exception("distributed deadlock detection failed")

    async def _graph(self) -> dict[Vertex, set[Vertex]]:
        """Who waits for whom on every shard's primary; a tagged backend stands for its transaction."""
        topology = self.proxy.topology
        nodes = [node for shard in self.proxy.config.shards if (node := topology.primary(shard.name)) is not None]
        answers = await asyncio.gather(*(self._locks(node) for node in nodes))
        edges: dict[Vertex, set[Vertex]] = {}
        for node, rows in zip(nodes, answers):
            tags = {pid: tag for pid, tag, _ in rows if tag is not None}
            for pid, _, blockers in rows:
                if blockers:
                    waiter = _vertex(node.address, pid, tags)
                    edges.setdefault(waiter, set()).update(
                        held for b in blockers if (held := _vertex(node.address, b, tags)) != waiter)
        return edges

    async def _locks(self, node: NodeState) -> list[tuple[int, int | None, list[int] | None]]:
        """The node's backends that wait for a lock or hold a tag: (pid, tag or None, blocking pids or None)."""
        timeout = self.proxy.health.timeout
        try:
            conn = await self.proxy.health.connect(node, "shardproxy deadlock detection", timeout)
            try:
                rows = await conn.fetch(_LOCKS_SQL, timeout=timeout)
            finally:
                conn.terminate()
        except CHECK_ERRORS as exc:
            log.debug("deadlock detection: cannot ask %s: %s", node.address, exc)
            return []
        return [(row[0], row[1], row[2]) for row in rows]

    def _break(self, cycle: list[Vertex], wait: Wait, mine: dict[Vertex, Wait]) -> None:
        """Cancel the waiting statement of the cycle's youngest transaction, this process's, with 40P01."""
        victim = wait.client
        names = victim.proxy.config.shards
        shard = next(s for s, leg in victim.tx.legs.items() if leg is wait.server)
        local = [mine[vertex].client.id for vertex in cycle if vertex in mine]
        elsewhere = len(cycle) - len(local)
        members = ", ".join(map(str, local)) + (f" and {elsewhere} transaction(s) of other proxy processes or "
                                                 "sessions" if elsewhere else "")
        log.warning("distributed deadlock between clients %s: client %d's statement on shard %s cancelled",
                    members, victim.id, names[shard].name,
                    extra={"event": "deadlock", "clients": local, "victim": victim.id})
        wait.server.cancel_running(pg.PostgresError(DEADLOCK_DETECTED, "deadlock detected", fields={
            "S": "ERROR", "V": "ERROR", "C": DEADLOCK_DETECTED, "M": "deadlock detected",
            "D": f"shardproxy: this transaction waited on shard {names[shard].name} for another transaction, which "
                 "waited on another shard for this one.",
            "H": "The transaction is rolled back on every shard; retry it."}))


def _vertex(address: str, pid: int, tags: dict[int, int]) -> Vertex:
    tag = tags.get(pid)
    return ("p", address, pid) if tag is None else ("t", tag)


def _cycle_through(edges: dict[Vertex, set[Vertex]], start: Vertex) -> list[Vertex]:
    """A cycle in the wait-for graph from start back to it (start first), by depth-first search; [] if none. A
    vertex explored without reaching start cannot reach it later: each is entered once."""
    path, seen = [start], {start}
    stack = [iter(edges.get(start, ()))]
    while stack:
        following = next(stack[-1], None)
        if following is None:
            stack.pop()
            path.pop()
        elif following == start:
            return path
        elif following not in seen:
            seen.add(following)
            path.append(following)
            stack.append(iter(edges.get(following, ())))
    return []


def _victim(cycle: list[Vertex]) -> Vertex | None:
    """The cycle's youngest transaction on several shards (tags grow with time), which every process picks alike."""
    return max((vertex for vertex in cycle if vertex[0] == "t"), key=lambda vertex: vertex[1], default=None)


def _holds(cycle: list[Vertex], edges: dict[Vertex, set[Vertex]]) -> bool:
    """Whether every wait of the cycle is in the graph."""
    return all(cycle[(i + 1) % len(cycle)] in edges.get(vertex, ()) for i, vertex in enumerate(cycle))
