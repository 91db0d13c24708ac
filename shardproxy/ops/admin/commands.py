"""The admin commands: SHOW, ROUTE, RELOAD, RESHARD, PAUSE/RESUME, BAN/UNBAN, KILL, SHUTDOWN, as the admin socket
(socket.py) and the admin database (console.py) take them.

Commands read the live state (pools, clients, the topology) on the event loop, so they see it consistent; each
runs to completion at once, except PAUSE, which waits for running transactions to end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from shardproxy import __version__
from shardproxy.cluster.topology import Topology
from shardproxy.config import Config, ConfigError
from shardproxy.datapath.client import ClientConnection
from shardproxy.datapath.pool import Pools
from shardproxy.ops.admin.replies import SYNTAX_ERROR, AdminError, Table, Value
from shardproxy.ops.reshard import Resharding
from shardproxy.ops.views import client_state, node_views, role_of, shard_of
from shardproxy.routing.keys import parse_key
from shardproxy.routing.ring import Ring
from shardproxy.wire import protocol as pg

log = logging.getLogger("shardproxy.admin")

HELP_HINT = "type HELP for the list of commands"
PAUSE_POLL = 0.05


class AdminHost(Protocol):
    """What the commands read and drive of the proxy."""

    config: Config
    topology: Topology
    pools: Pools
    clients: dict[int, ClientConnection]  # by the cancel key's pid
    ring_moved: float
    reshard: Resharding

    def reload(self, force: bool = False) -> Config: ...
    def request_shutdown(self) -> None: ...
    async def exposition(self) -> bytes: ...


@dataclass(frozen=True)
class Command:
    usage: str  # the name, then <required> and [optional] arguments
    description: str
    run: Callable[[list[str]], Awaitable[Table]]

    @property
    def name(self) -> str:
        return " ".join(word for word in self.usage.split() if word[0] not in "<[")


class Admin:
    def __init__(self, proxy: AdminHost):
        self.proxy = proxy
        self._ring: tuple[Config, Ring] | None = None
        commands = [
            Command("SHOW POOLS", "server connection pools and their clients", self._show_pools),
            Command("SHOW NODES", "nodes: role, state and lag as health checks see them", self._show_nodes),
            Command("SHOW SHARDS", "shards: weight, share of the ring, primary and replicas", self._show_shards),
            Command("SHOW CLIENTS", "client connections", self._show_clients),
            Command("SHOW SERVERS", "server connections", self._show_servers),
            Command("SHOW STATS", "per pool: hand-outs, transactions, time in transactions and waiting (us)",
                    self._show_stats),
            Command("SHOW CONFIG", "the running configuration, passwords hidden", self._show_config),
            Command("SHOW VERSION", "the proxy's version", self._show_version),
            Command("HELP", "this list", self._help),
            Command("ROUTE <key>", "the shard, read node and write node a key goes to now", self._route),
            Command("RELOAD [FORCE]", "re-read the config file; live clients keep working; FORCE: even if keys "
                    "change owner (no row moves)", self._reload),
            Command("RESHARD [step] [ring]", "move the rows whose owner the config file's ring changes, then switch "
                    "every proxy of the fleet to it (the steps are the job's own)", self._reshard),
            Command("SHOW RESHARD", "the RESHARD job: phase, rows copied and streamed, lag, error", self._show_reshard),
            Command("PAUSE [shard]", "hold new transactions; returns once running ones have ended", self._pause),
            Command("RESUME [shard]", "let held and new transactions run", self._resume),
            Command("BAN <host:port>", "take a node out of rotation", self._ban),
            Command("UNBAN <host:port>", "put a banned node back into rotation", self._unban),
            Command("KILL <id>", "close a client connection (id as in SHOW CLIENTS)", self._kill),
            Command("SHUTDOWN", "stop gracefully: running transactions end first", self._shutdown),
            Command("METRICS", "the Prometheus exposition text of /metrics, in one row", self._metrics),
        ]
        self.commands = {command.name: command for command in commands}

    async def execute(self, line: str) -> Table:
        """Run one command; raises AdminError with the reason it failed."""
        words = line.strip().rstrip(";").split()
        if not words:
            raise AdminError(f"empty command; {HELP_HINT}", SYNTAX_ERROR)
        size = 2 if words[0].upper() == "SHOW" else 1
        command = self.commands.get(" ".join(words[:size]).upper())
        if command is None:
            raise AdminError(f"unknown command {' '.join(words[:size])!r}; {HELP_HINT}", SYNTAX_ERROR)
        args = words[size:]
        required, optional = command.usage.count("<"), command.usage.count("[")
        if not required <= len(args) <= required + optional:
            raise AdminError(f"usage: {command.usage}", SYNTAX_ERROR)
        try:
            return await command.run(args)
        except AdminError:
            raise
        except Exception as exc:  # a bug must cost one reply, not the admin connection
            log.exception("admin command %r failed", line)
            raise AdminError(f"internal error: {exc}", pg.INTERNAL_ERROR) from exc

    def _current_ring(self) -> Ring:
        config = self.proxy.config
        if self._ring is None or self._ring[0] is not config:
            self._ring = (config, Ring.from_config(config))
        return self._ring[1]

    async def _show_pools(self, args: list[str]) -> Table:
        linked: dict[int, int] = {}  # id(pool) -> clients in a transaction there, or idle and last served there
        for client in self.proxy.clients.values():
            pool = client.server.pool if client.server is not None else client.pool
            if pool is not None and not client.wait_started:
                linked[id(pool)] = linked.get(id(pool), 0) + 1
        shards = shard_of(self.proxy.config)
        now = time.monotonic()
        rows: list[list[Value]] = []
        for pool in self.proxy.pools:
            node = pool.node
            waiting = [client for client in pool.waiting if not client.closed]
            maxwait = now - waiting[0].wait_started if waiting else 0.0
            # sv_used is always 0: idle connections are reused without a check query, so none awaits one.
            rows.append([pool.key.database, pool.key.user, shards.get(node.address), node.address,
                         role_of(self.proxy.topology, node.address), node.region, linked.get(id(pool), 0), len(waiting),
                         pool.active, len(pool.idle), 0, pool.opening, round(maxwait, 3)])
        return Table(["database", "user", "shard", "node", "role", "region", "cl_active", "cl_waiting", "sv_active",
                      "sv_idle", "sv_used", "sv_login", "maxwait"], rows)

    async def _show_nodes(self, args: list[str]) -> Table:
        rows: list[list[Value]] = [
            [n.shard, n.host, n.port, n.region, n.role, n.state, n.lag_bytes, n.lag_seconds, _iso(n.last_check),
             n.last_error] for n in node_views(self.proxy.topology)]
        return Table(["shard", "host", "port", "region", "role", "state", "lag_bytes", "lag_seconds", "last_check",
                      "last_error"], rows)

    async def _show_shards(self, args: list[str]) -> Table:
        ring = self._current_ring()
        rows: list[list[Value]] = []
        for shard in self.proxy.config.shards:
            primary, replicas = self._members(shard.name)
            rows.append([shard.name, shard.weight, round(ring.share(shard.name), 6), primary, ",".join(replicas)])
        return Table(["name", "weight", "ring_share", "primary", "replicas"], rows)

    def _members(self, shard: str) -> tuple[str | None, list[str]]:
        """The shard's primary and replicas."""
        topology = self.proxy.topology
        primary = topology.primary(shard)
        replicas = [node.address for node in topology.nodes(shard) if node.role == "replica"]
        return (primary.address if primary is not None else None), replicas

    async def _show_clients(self, args: list[str]) -> Table:
        rows: list[list[Value]] = []
        for client in self.proxy.clients.values():
            server = client.server
            rows.append([client.id, client.user, client.database, client.address, client_state(client),
                         _iso(client.connected_at), server.pool.node.address if server is not None else None])
        return Table(["id", "user", "database", "address", "state", "connected_at", "server"], rows)

    async def _show_servers(self, args: list[str]) -> Table:
        rows: list[list[Value]] = []
        for pool in self.proxy.pools:
            for server in pool.servers:
                client = server.client
                rows.append([pool.node.address, pool.key.user, pool.key.database,
                             "active" if client is not None else "idle", server.pid,
                             client.id if client is not None else None,
                             _iso(_wall(server.created)), _iso(_wall(server.last_used))])
        return Table(["node", "user", "database", "state", "pid", "client", "created", "last_used"], rows)

    async def _show_stats(self, args: list[str]) -> Table:
        shards = shard_of(self.proxy.config)
        rows: list[list[Value]] = []
        for pool in self.proxy.pools:
            stats = pool.stats
            rows.append([pool.key.database, pool.key.user, shards.get(pool.node.address), pool.node.address,
                         stats.assignments, stats.transactions, round(stats.transaction_time * 1e6),
                         round(stats.wait_time * 1e6)])
        return Table(["database", "user", "shard", "node", "total_server_assignment_count", "total_xact_count",
                      "total_xact_time", "total_wait_time"], rows)

    async def _show_config(self, args: list[str]) -> Table:
        return Table(["key", "value"], [[key, value] for key, value in _flatten(self.proxy.config.redacted(), "")])

    async def _show_version(self, args: list[str]) -> Table:
        return Table(["version"], [[f"shardproxy {__version__}"]])

    async def _help(self, args: list[str]) -> Table:
        return Table(["command", "description"], [[c.usage, c.description] for c in self.commands.values()])

    async def _route(self, args: list[str]) -> Table:
        shard = self._current_ring().owner(parse_key(args[0]))
        topology = self.proxy.topology
        candidates = topology.read_candidates(shard)
        primary = topology.primary(shard)
        read = candidates[0].address if candidates else None
        write = primary.address if primary is not None else None
        return Table(["key", "shard", "read_node", "write_node"], [[args[0], shard, read, write]])

    async def _reload(self, args: list[str]) -> Table:
        if args and args[0].upper() != "FORCE":
            raise AdminError("usage: RELOAD [FORCE]", SYNTAX_ERROR)
        try:
            new = self.proxy.reload(force=bool(args))
        except ConfigError as exc:
            raise AdminError("reload rejected, the running config stays: " + "; ".join(exc.problems)) from None
        # The share of the key space whose shard changed: transactions that start from now on use the new ring.
        return Table(["config", "fraction_moved"], [[new.path, round(self.proxy.ring_moved, 6)]])

    async def _reshard(self, args: list[str]) -> Table:
        return await self.proxy.reshard.command(args)

    async def _show_reshard(self, args: list[str]) -> Table:
        return self.proxy.reshard.show()

    async def _pause(self, args: list[str]) -> Table:
        pools = self.proxy.pools.pause(self._shards(args))
        # Like PgBouncer's PAUSE: answer once the running transactions have given their connections back.
        while any(pool.paused and pool.servers for pool in pools):
            await asyncio.sleep(PAUSE_POLL)
        return Table([])

    async def _resume(self, args: list[str]) -> Table:
        shards = self._shards(args)
        if not shards & self.proxy.pools.paused:
            raise AdminError("not paused")
        self.proxy.pools.resume(shards)
        return Table([])

    def _shards(self, args: list[str]) -> set[str]:
        names = {shard.name for shard in self.proxy.config.shards}
        if args and args[0] not in names:
            raise AdminError(f"unknown shard {args[0]!r} (shards: {', '.join(sorted(names))})")
        return set(args) if args else names

    async def _ban(self, args: list[str]) -> Table:
        return self._set_banned(args[0], True)

    async def _unban(self, args: list[str]) -> Table:
        return self._set_banned(args[0], False)

    def _set_banned(self, address: str, banned: bool) -> Table:
        topology = self.proxy.topology
        if not (topology.ban(address) if banned else topology.unban(address)):
            raise AdminError(f"unknown node {address!r}; see SHOW NODES")
        return Table([])

    async def _kill(self, args: list[str]) -> Table:
        client = next((c for c in self.proxy.clients.values() if str(c.id) == args[0]), None)
        if client is None:
            raise AdminError(f"no client with id {args[0]!r}; see SHOW CLIENTS")
        if client.wait_started and client.pool is not None:
            client.pool.cancel_waiting(client)
        client.reason = "killed by admin (KILL)"
        client.fail(pg.PostgresError(pg.ADMIN_SHUTDOWN, "terminating connection due to administrator command"))
        return Table([])

    async def _shutdown(self, args: list[str]) -> Table:
        self.proxy.request_shutdown()
        return Table([])

    async def _metrics(self, args: list[str]) -> Table:
        return Table(["text"], [[(await self.proxy.exposition()).decode()]])


def _flatten(data: Any, prefix: str) -> list[tuple[str, Value]]:
    """Nested config data as (key.path[0].name, value) pairs; an empty list or mapping shows as itself."""
    if isinstance(data, dict) and data:
        return [pair for key, value in data.items() for pair in _flatten(value, f"{prefix}.{key}" if prefix else key)]
    if isinstance(data, list) and data:
        return [pair for i, value in enumerate(data) for pair in _flatten(value, f"{prefix}[{i}]")]
    if isinstance(data, (dict, list)):
        return [(prefix, json.dumps(data))]
    return [(prefix, data)]


def _wall(monotonic: float) -> float:
    return time.time() - (time.monotonic() - monotonic)


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
