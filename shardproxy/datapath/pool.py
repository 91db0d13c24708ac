"""Server connection pools, one per (database, user, node), as PgBouncer keeps them, and the registry of them.

A connection is on one list at a time: `idle` (ready for the next client), linked to a client (active), or
being opened. Clients that find no idle connection queue in `waiting` and are handed one directly on release
(the hand-over is compiled: PoolCore in _core.pyx). Timeouts are enforced by `tick()`, which the proxy's janitor
calls, not by timers per connection.

`Pools` owns every pool and what the pools of a shard share: PAUSE (the admin console writes it, routing and the
pools read it, as PgBouncer keeps `db_paused` on its database), the choice of node for a statement, and the
parameters a new client is told at login. A pool gets its collaborators from it, not the whole proxy.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from shardproxy.cluster.topology import Change, NodeState, Topology
from shardproxy.config import Config, PoolSettings
from shardproxy.counters import PoolStats, Tally
from shardproxy.datapath._core import PoolCore
from shardproxy.datapath.pending import HIDDEN_QUERY
from shardproxy.datapath.server import ServerConnection
from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg
from shardproxy.wire.auth import ProvenKey
from shardproxy.wire.dial import Dialer

if TYPE_CHECKING:
    from shardproxy.datapath._core import ClientCore

log = logging.getLogger("shardproxy.pool")

# A user's credentials towards servers: its configured password (None: none), and the key a client of the user
# proved at login (SCRAM pass-through for users configured with a verifier), if any.
Credentials = Callable[[str], tuple[str | None, ProvenKey | None]]


# What a node answers when it cannot serve anyone now or will not take the proxy (an unreachable server, a
# pg_hba.conf without a line for the proxy, TLS required, a role missing there, a full or starting server):
# another node may.
_NODE_REFUSALS = frozenset({pg.CONNECTION_FAILURE, pg.CONNECTION_EXCEPTION, pg.INVALID_AUTHORIZATION,
                            pg.TOO_MANY_CONNECTIONS, pg.CANNOT_CONNECT_NOW})


class PoolKey(NamedTuple):  # a tuple: made and hashed for every routed transaction
    database: str
    user: str
    node: str  # host:port


class Pool(PoolCore):
    def __init__(self, key: PoolKey, node: NodeState, stats: PoolStats, credentials: Credentials,
                 on_connect_failure: Callable[[str], None], paused: bool):
        """on_connect_failure(address): a node refused a connection (health checks look at it at once)."""
        self.key = key
        self.node = node
        self.node_label = node.address
        self.load = node.load
        self.stats = stats
        self.credentials = credentials
        self.on_connect_failure = on_connect_failure
        self.idle: list[ServerConnection] = []
        self.servers: set[ServerConnection] = set()
        self.waiting: deque[ClientCore] = deque()
        self.opening = 0
        self.defaults: dict[str, str] | None = None  # the server's reported parameters on a fresh session
        self._defaults_lock = asyncio.Lock()
        self.paused = paused  # PAUSE: hold new transactions (see Pools.pause)
        self.draining = False  # its node left the config: paused for good (see drain)
        self.settings = PoolSettings()
        self.dialer = Dialer("disable", None)

    def configure(self, settings: PoolSettings, slow_queries: float, dialer: Dialer) -> None:
        """The settings of the last (re)load; those that each transaction reads are copied into typed fields."""
        self.settings = settings
        self.dialer = dialer
        self.size = settings.size
        self.server_lifetime = settings.server_lifetime
        self.slow_queries = slow_queries

    # -- handing out and taking back: acquire, release, unlink are PoolCore's (_core.pyx) ----------------
    def reset_and_release(self, server: ServerConnection) -> None:
        """Session pooling: wipe the session (DISCARD ALL) before the next client gets it."""
        self.unlink(server)
        server.pending.append(HIDDEN_QUERY)
        server.write(pg.query("DISCARD ALL"))
        server.on_ready = self._after_reset

    def _after_reset(self, server: ServerConnection) -> None:
        if server.cancels:
            return
        server.prepared.clear()
        server.param_sql.clear()
        self.release(server)

    def discard(self, server: ServerConnection) -> None:
        """Close a connection that cannot be reused (broken, mid-transaction, expired)."""
        if not server.closed:
            server.write(pg.TERMINATE)
            server.close()
        self.lost(server)

    def lost(self, server: ServerConnection) -> None:
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        client = server.client
        self.unlink(server)
        if client is not None:
            client.server_lost(server)
        self._grow()

    def cancel_waiting(self, client: ClientCore) -> None:
        try:
            self.waiting.remove(client)
        except ValueError:
            pass

    # -- opening connections --------------------------------------------------------------------------
    def _grow(self) -> None:
        """Open connections while clients wait and the pool has room."""
        while not self.paused and len(self.waiting) > self.opening and \
                len(self.servers) + self.opening < self.size:
            self.opening += 1
            spawn(self._open_for_waiters())

    async def _open_for_waiters(self) -> None:
        try:
            server = await self.open()
        except pg.PostgresError as exc:
            self._fail_waiters(exc)
            return
        finally:
            self.opening -= 1
        self.release(server)

    async def open(self) -> ServerConnection:
        """A new logged-in connection; raises PostgresError (the server's own, or the proxy's: 08006, 28000) when
        it fails, whatever the server sent, having closed the connection."""
        password, proven = self.credentials(self.key.user)
        server = ServerConnection(self)
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout):
                policy = await self.dialer.connect(server, self.node.host, self.node.port)
                await server.login(self.key.user, password, self.key.database, proven, policy)
        except (TimeoutError, OSError) as exc:
            server.close()
            self.on_connect_failure(self.node_label)
            log.warning("cannot connect to server %s: %s", self.node_label, exc or "timeout")
            raise pg.PostgresError(pg.CONNECTION_FAILURE,
                                   f"shardproxy: cannot connect to server {self.node_label}") from None
        except pg.PostgresError as exc:
            server.close()
            if exc.code == pg.INVALID_AUTHORIZATION:
                log.warning("cannot log in to server %s as %s: %s", self.node_label, self.key.user, exc.message)
            raise
        except (pg.ProtocolError, struct.error, ValueError, IndexError) as exc:  # answers no PostgreSQL sends
            server.close()
            log.warning("server %s broke the protocol at login: %r", self.node_label, exc)
            raise pg.PostgresError(pg.CONNECTION_FAILURE, f"shardproxy: server {self.node_label} sent an invalid "
                                                          "answer at login") from None
        except BaseException:
            server.close()
            raise
        server.max_message_size = 1 << 40  # servers are trusted to frame correctly
        self.servers.add(server)
        if self.defaults is None:
            self.defaults = dict(server.params)
        return server

    async def fetch_defaults(self) -> dict[str, str]:
        """The parameters a client is told at login; the first client of a pool opens a connection to learn them."""
        async with self._defaults_lock:
            if self.defaults is None:
                self.release(await self.open())
        assert self.defaults is not None
        return self.defaults

    def _fail_waiters(self, exc: BaseException) -> None:
        """Without any connection to this server, waiting is pointless: every waiter gets the error."""
        if self.servers:
            return
        error = exc if isinstance(exc, pg.PostgresError) else pg.PostgresError(pg.CONNECTION_FAILURE, str(exc))
        while self.waiting:
            self.waiting.popleft().fail(error)

    # -- the janitor's round ------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        settings = self.settings
        while self.waiting and now - self.waiting[0].wait_started > settings.query_wait_timeout:
            self.waiting.popleft().fail(pg.PostgresError(pg.CONNECTION_EXCEPTION, "query_wait_timeout"))
        surplus = len(self.servers) - settings.min_size
        for server in list(self.idle):
            expired = now - server.created > settings.server_lifetime
            if surplus > 0 and (expired or now - server.last_used > settings.server_idle_timeout):
                self.discard(server)
                surplus -= 1
        if not self.paused and len(self.servers) + self.opening < settings.min_size:
            self.opening += 1
            spawn(self._open_for_waiters())

    def close(self) -> None:
        for server in list(self.servers):
            self.discard(server)

    def pause(self) -> None:
        """Hold new transactions: idle connections close now, busy ones as their transactions end."""
        self.paused = True
        for server in list(self.idle):
            self.discard(server)

    def resume(self) -> None:
        self.paused = self.draining
        self._grow()  # connections for the clients held meanwhile

    def drain(self) -> None:
        """Its node left the config (a reload): paused for good, so connections close as transactions end,
        and clients waiting here are routed again (a write waits for its shard's primary, a read moves on)."""
        self.draining = True
        self.pause()
        error = pg.PostgresError(pg.CONNECTION_FAILURE, f"shardproxy: {self.node_label} left the configuration")
        while self.waiting:
            self.waiting.popleft().fail(error)

    # -- for SHOW POOLS ---------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return sum(1 for s in self.servers if s.client is not None)


class Pools:
    """Every pool of the proxy, and what pools of a shard share: PAUSE, and which node serves a statement."""

    def __init__(self, config: Config, topology: Topology, dialer: Dialer, credentials: Credentials,
                 on_connect_failure: Callable[[str], None], tally_of: Callable[[str, str], Tally]):
        """tally_of(shard, role): the metrics' Tally of that shard and node role."""
        self.config = config
        self.topology = topology
        self.dialer = dialer
        self.credentials = credentials
        self.on_connect_failure = on_connect_failure
        self.tally_of = tally_of
        self.paused: set[str] = set()  # shard names: PAUSE holds their new transactions
        self.followed = _followed(config)
        self._pools: dict[PoolKey, Pool] = {}
        topology.on_change(self._fence)

    def __iter__(self) -> Iterator[Pool]:
        return iter(list(self._pools.values()))

    def __len__(self) -> int:
        return len(self._pools)

    def pool_for(self, database: str, user: str, node: NodeState) -> Pool:
        pool = self._pools.get((database, user, node.address))  # a plain tuple finds its PoolKey: none made per call
        if pool is None or pool.draining:  # a node back in the config after a reload: a fresh pool
            key = PoolKey(database, user, node.address)
            pool = self._pools[key] = Pool(key, node, PoolStats(self.tally_of, node.shard, node), self.credentials,
                                           self.on_connect_failure, node.shard in self.paused)
            pool.configure(self.config.pool, self.config.log.slow_queries, self.dialer)
        return pool

    def node_pool(self, database: str, user: str, shard: int, write: bool, force_primary: bool = False,
                  min_lsn: int | None = None, avoid: set[str] | frozenset[str] = frozenset()) -> Pool | None:
        """The pool for a statement on a shard: its primary for writes, else the best node to read from (one
        that has replayed `min_lsn`, the client's last commit there, under read-your-writes); none in `avoid`
        (nodes that just refused this transaction a connection). None while the shard has no primary to write
        to, or it is avoided."""
        name = self.config.shards[shard].name
        consistency = self.config.routing.consistency
        if write or force_primary or consistency == "strong":
            node = self.topology.primary(name)
            if node is not None and node.address in avoid:
                return None
        else:
            node = self.topology.read_node(name, min_lsn if consistency == "read_your_writes" else None, avoid)
        return None if node is None else self.pool_for(database, user, node)


    def is_primary(self, node: NodeState) -> bool:
        primary = self.topology.primary(node.shard)
        return primary is not None and primary.address == node.address

    def first_node(self) -> NodeState:
        """The first shard's primary if known, else its first node: where an unrouted proxy sends everything."""
        shard = self.config.shards[0].name
        return self.topology.primary(shard) or self.topology.nodes(shard)[0]

    async def login(self, database: str, user: str) -> tuple[Pool, dict[str, str]]:
        """The pool a new client's server parameters come from, and those parameters. Any node of any shard can
        tell them, so a client logs in while some shards cannot be reached (a failover, an outage) or refuse the
        proxy: see _login_order. A server's refusal of the client itself (its password, an unknown database) is
        the client's answer as it is; if no node answers, the first refusal by a server says the most."""
        error: pg.PostgresError | None = None
        for node in self._login_order():
            pool = self.pool_for(database, user, node)
            try:
                defaults = await pool.fetch_defaults()
            except pg.PostgresError as exc:
                if exc.code not in _NODE_REFUSALS:
                    raise
                if error is None or error.code == pg.CONNECTION_FAILURE:
                    error = exc
                continue
            if defaults.get("in_hot_standby") == "on":  # a replica's: clients see the proxy, which takes writes
                defaults = {**defaults, "in_hot_standby": "off"}
            return pool, defaults
        assert error is not None
        raise error

    def _login_order(self) -> list[NodeState]:
        """Every node, each once: the first shard's primary, then each shard's readable replicas and primary,
        then the rest; nodes that health checks see up before the others."""
        shards = [shard.name for shard in self.config.shards]
        nodes = [self.first_node(), *(node for shard in shards for node in self.topology.read_candidates(shard)),
                 *(node for shard in shards for node in self.topology.nodes(shard))]
        return sorted(dict.fromkeys(nodes), key=lambda node: node.state != "up")  # stable: the order above stays

    # -- PAUSE ----------------------------------------------------------------------------------------
    def pause(self, shards: set[str]) -> list[Pool]:
        """Hold the shards' new transactions; returns their pools, whose running transactions still end."""
        self.paused |= shards
        pools = self.of_shards(shards)
        for pool in pools:
            pool.pause()
        return pools

    def resume(self, shards: set[str]) -> None:
        self.paused -= shards
        for pool in self.of_shards(shards):
            pool.resume()

    def of_shards(self, shards: set[str]) -> list[Pool]:
        return [pool for pool in self._pools.values() if pool.node.shard in shards]

    # -- reload, janitor, shutdown ------------------------------------------------------------------------
    def configure(self, config: Config, dialer: Dialer) -> None:
        """A reload: pools to nodes the config no longer has (or has in another shard) drain (idle connections
        close now, busy ones as their transactions end, and new transactions get pools of their own); the
        others take the new settings."""
        self.config, self.dialer = config, dialer
        self.followed = _followed(config)
        kept = {(node.address, shard.name) for shard in config.shards for node in shard.nodes}
        for pool in self._pools.values():
            if (pool.node.address, pool.node.shard) not in kept and not pool.draining:
                pool.drain()
                log.info("pool %s/%s to %s drains: the node left the config", pool.key.database, pool.key.user,
                         pool.node_label)
            pool.configure(config.pool, config.log.slow_queries, dialer)

    def tick(self, now: float) -> None:
        for key, pool in list(self._pools.items()):
            pool.tick(now)
            if pool.draining and not pool.servers and self._pools.get(key) is pool:
                del self._pools[key]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

    def _fence(self, change: Change) -> None:
        """A primary that a newer one replaced while it still runs (split brain) gets nothing more: the
        transactions still open on it end unacknowledged (their clients get 08006), rather than commit
        where the shard no longer reads or writes, and clients waiting for it are routed again."""
        node = self.topology.node(change.old) if change.kind == "primary" and change.old else None
        if node is None or not node.fenced:
            return
        for pool in [pool for pool in self._pools.values() if pool.node is node]:
            waiting = list(pool.waiting)
            pool.waiting.clear()
            pool.close()
            for client in waiting:
                client.fail(pg.PostgresError(pg.CONNECTION_FAILURE, f"shardproxy: {node.address} is fenced"))
        log.warning("%s fenced: its connections are closed", node.address)


def _followed(config: Config) -> tuple[bool, ...]:
    """Per shard: whether commits there must be followed for read-your-writes (it has replicas to read)."""
    return tuple(config.routing.consistency == "read_your_writes" and len(shard.nodes) > 1 for shard in config.shards)
