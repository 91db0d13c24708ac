"""Server connection pools, one per (database, user, node), as PgBouncer keeps them.

A connection is on one list at a time: `idle` (ready for the next client), linked to a client (active), or
being opened. Clients that find no idle connection queue in `waiting` and are handed one directly on release.
Timeouts are enforced by `tick()`, which the proxy's janitor calls, not by timers per connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from shardproxy import protocol as pg
from shardproxy._wire import HIDDEN_QUERY, PoolCore
from shardproxy.server import ServerConnection
from shardproxy.tls import connect_server

if TYPE_CHECKING:
    from shardproxy.client import ClientConnection
    from shardproxy.config import Pool as PoolSettings
    from shardproxy.proxy import Proxy
    from shardproxy.topology import NodeState

log = logging.getLogger("shardproxy.pool")


class PoolKey(NamedTuple):  # a tuple: made and hashed for every routed transaction
    database: str
    user: str
    node: str  # host:port


class Pool(PoolCore):
    def __init__(self, proxy: Proxy, key: PoolKey, node: NodeState):
        self.proxy = proxy
        self.key = key
        self.node = node
        self.node_label = node.address
        self.load = node.load
        self.idle: list[ServerConnection] = []
        self.servers: set[ServerConnection] = set()
        self.waiting: deque[ClientConnection] = deque()
        self.opening = 0
        self.defaults: dict[str, str] | None = None  # the server's reported parameters on a fresh session
        self._defaults_lock = asyncio.Lock()
        self.paused = proxy.admin.is_paused(node.address)  # PAUSE: hold new transactions (see admin.py)
        self.draining = False  # its node left the config: paused for good (see drain)
        self.stats = proxy.metrics.pool_stats(node)
        self.configure()

    @property
    def settings(self) -> PoolSettings:
        return self.proxy.config.pool

    def configure(self) -> None:
        """Copy the settings that each transaction reads (the data path reads them typed, not through the config)."""
        config = self.proxy.config
        self.size = config.pool.size
        self.server_lifetime = config.pool.server_lifetime
        self.slow_queries = config.log.slow_queries

    # -- handing out and taking back: acquire, release, unlink are PoolCore's (_wire.pyx) ----------------
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

    def cancel_waiting(self, client: ClientConnection) -> None:
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
            asyncio.get_running_loop().create_task(self._open_for_waiters())

    async def _open_for_waiters(self) -> None:
        try:
            server = await self.open()
        except (OSError, asyncio.TimeoutError, pg.PostgresError) as exc:
            self.opening -= 1
            self._fail_waiters(exc)
            return
        self.opening -= 1
        self.release(server)

    async def open(self) -> ServerConnection:
        """A new logged-in connection; raises PostgresError (the server's own, or 08006) when it fails."""
        user = self.proxy.config.user(self.key.user)
        server = ServerConnection(self)
        try:
            async with asyncio.timeout(self.settings.server_connect_timeout):
                await connect_server(server, self.node.host, self.node.port, self.proxy.config.server_tls.mode,
                                     self.proxy.server_ssl)
                await server.login(self.key.user, user.password if user else None, self.key.database,
                                   self.proxy.proven_keys.get(self.key.user))
        except (OSError, asyncio.TimeoutError) as exc:
            server.close()
            self.proxy.health.check_now(self.node_label)
            log.warning("cannot connect to server %s: %s", self.node_label, exc or "timeout")
            raise pg.PostgresError(pg.CONNECTION_FAILURE, f"shardproxy: cannot connect to server {self.node_label}")
        except pg.PostgresError:
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
            asyncio.get_running_loop().create_task(self._open_for_waiters())

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
