"""The daemon: listening socket, the registry of clients and pools, the janitor, reload and shutdown."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time

from shardproxy import protocol as pg
from shardproxy.auth import ScramSecret
from shardproxy.client import ClientConnection
from shardproxy.config import Config, ConfigError, User, load_config
from shardproxy.pool import Pool, PoolKey
from shardproxy.statements import Registry

log = logging.getLogger("shardproxy")

JANITOR_INTERVAL = 0.5


class Proxy:
    def __init__(self, config: Config):
        self.config = config
        self.pools: dict[PoolKey, Pool] = {}
        self.statements = Registry()
        self.clients: dict[int, ClientConnection] = {}  # by the BackendKeyData pid the proxy issued
        self.connected = 0
        self.auth_failures = 0
        self.shutting_down = False
        self._client_ids = 0
        self._scram: dict[str, tuple[str, ScramSecret]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._janitor: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    # -- start and stop ---------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self._server = await loop.create_server(lambda: ClientConnection(self), listen.host, listen.port,
                                                reuse_port=self.config.workers > 1, backlog=4096)
        self._janitor = loop.create_task(self._janitor_loop())
        log.info("listening on %s:%d", listen.host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown)
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self._stopped.wait()

    def request_shutdown(self) -> None:
        if not self.shutting_down:
            loop = asyncio.get_running_loop()
            loop.create_task(self.shutdown())

    async def shutdown(self) -> None:
        """Stop accepting; clients between transactions leave now, the others when theirs ends or at the timeout."""
        self.shutting_down = True
        log.info("shutting down")
        if self._server is not None:
            self._server.close()
        for client in list(self.clients.values()):
            if client.server is None:
                client.fail(pg.PostgresError(pg.ADMIN_SHUTDOWN, "shardproxy is shutting down"))
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients.values()):
            client.fail(pg.PostgresError(pg.ADMIN_SHUTDOWN, "shardproxy is shutting down"))
        if self._janitor is not None:
            self._janitor.cancel()
        for pool in self.pools.values():
            pool.close()
        self._stopped.set()

    def reload(self) -> None:
        """Re-read the config file; an invalid one is rejected and the running config stays."""
        if self.config.path is None:
            return
        try:
            config = load_config(self.config.path, region=self.config.region, workers=self.config.workers)
        except ConfigError as exc:
            log.error("reload rejected: %s", "; ".join(exc.problems))
            return
        self.config = config
        self._scram.clear()
        log.info("reloaded %s", config.path)

    # -- clients ------------------------------------------------------------------------------------------
    def next_client_id(self) -> int:
        self._client_ids += 1
        return self._client_ids

    def admit(self, client: ClientConnection) -> bool:
        if self.shutting_down or self.connected >= self.config.pool.max_client_conn:
            return False
        client.admitted = True
        self.connected += 1
        return True

    def register(self, client: ClientConnection) -> tuple[int, int]:
        """Issue the client's cancel key."""
        while True:
            pid = secrets.randbits(31) or 1
            if pid not in self.clients:
                self.clients[pid] = client
                return pid, secrets.randbits(32)

    def forget(self, client: ClientConnection) -> None:
        if client.admitted:
            self.connected -= 1
            client.admitted = False
        if self.clients.get(client.pid) is client:
            del self.clients[client.pid]

    def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest: cancel what that client runs now, on the server connection it holds now."""
        client = self.clients.get(pid)
        if client is None or not secrets.compare_digest(client.secret.to_bytes(4, "big"), secret.to_bytes(4, "big")):
            return
        server = client.server
        if server is not None and (server.pending or server.status != pg.IDLE):
            server.cancel_running()

    def auth_failed(self, client: ClientConnection) -> None:
        self.auth_failures += 1
        log.warning("client %d %s: authentication failed for user %s", client.id, client.address, client.user)

    def scram_secret(self, user: User) -> ScramSecret:
        """Derived once per password: the key derivation is deliberately slow."""
        cached = self._scram.get(user.name)
        if cached is None or cached[0] != user.password:
            cached = (user.password or "", ScramSecret.from_password(user.password or ""))
            self._scram[user.name] = cached
        return cached[1]

    # -- pools --------------------------------------------------------------------------------------------
    def pool_for(self, database: str, user: str) -> Pool:
        # Until routing lands every session goes to the first node of the first shard.
        node = self.config.shards[0].nodes[0]
        key = PoolKey(database, user, node.address)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, key, node)
        return pool

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                pool.tick(now)
            self._expire_idle_transactions(now)

    def _expire_idle_transactions(self, now: float) -> None:
        limit = self.config.pool.idle_transaction_timeout
        if not limit:
            return
        for client in list(self.clients.values()):
            server = client.server
            # Session pooling links the server between transactions too: only an open transaction counts.
            if server is not None and not server.pending and server.status != pg.IDLE \
                    and now - server.last_used > limit:
                client.fail(pg.PostgresError(pg.IDLE_IN_TRANSACTION_TIMEOUT, "idle_transaction_timeout"))
