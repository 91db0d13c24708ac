"""The daemon: listening socket, the registry of clients and pools, the janitor, reload and shutdown."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from contextlib import suppress

from shardproxy import protocol as pg
from shardproxy._wire import ProxyCore
from shardproxy.admin import Admin
from shardproxy.auth import ProvenKey, ScramSecret, is_md5_hash, is_scram_verifier
from shardproxy.client import ClientConnection
from shardproxy.config import Config, ConfigError, User, load_config
from shardproxy.health import HealthChecker
from shardproxy.metrics import Metrics
from shardproxy.pool import Pool, PoolKey
from shardproxy.recovery import Recovery
from shardproxy.ring import fraction_moved
from shardproxy.router import Route, Router
from shardproxy.routing import Decision
from shardproxy.statements import Registry
from shardproxy.tls import client_context, server_context
from shardproxy.topology import Change, NodeState, Topology
from shardproxy.workers import Worker

log = logging.getLogger("shardproxy")

JANITOR_INTERVAL = 0.5


class Proxy(ProxyCore):
    def __init__(self, config: Config, worker: Worker | None = None):
        self.config = config
        self.worker = worker  # None when this process is the only one (workers: 1)
        self.client_ssl = client_context(config)  # None unless tls.mode allows TLS; built once, as loading is slow
        self.server_ssl = server_context(config)  # None when server_tls.mode is disable
        self.pools: dict[PoolKey, Pool] = {}
        self.topology = Topology(config)
        self.topology.on_change(self._fence)
        self.router = Router(config)
        self.any_decision = Decision(Route("any", "utility"), None, "")  # for batches that name no statement
        self.health = HealthChecker(self.topology, config, *_health_login(config))
        self.statements = Registry(config.pool.statement_cache_size)
        self.sharded = _needs_routing(config)
        self.clients: dict[int, ClientConnection] = {}  # by the BackendKeyData pid the proxy issued
        self.connected = 0
        self.ring_moved = 0.0  # the share of the key space the last reload gave to another shard
        self.shutting_down = False
        self._client_ids = 0
        self._scram: dict[str, tuple[str, ScramSecret]] = {}
        self.proven_keys: dict[str, ProvenKey] = {}  # users configured with a verifier: their clients' proven key
        self._server: asyncio.AbstractServer | None = None
        self._janitor: asyncio.Task | None = None
        self.recovery = Recovery(self)  # of two-phase commits left in doubt
        self._stopped = asyncio.Event()
        self.admin = Admin(self)
        self.metrics = Metrics(self)

    # -- start and stop ---------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        worker = self.worker
        # First: a proxy already running there keeps its socket and its port. A worker's socket is internal:
        # the supervisor answers the configured one for all workers, and serves their metrics.
        if worker is None:
            await self.admin.start(self.config.admin.socket)
        else:
            await self.admin.start(worker.admin_socket, internal=True)
        await self.health.start()  # roles are discovered, never taken from the file
        listen = self.config.listen
        self._server = await loop.create_server(lambda: ClientConnection(self), listen.host, listen.port,
                                                backlog=4096, reuse_port=worker is not None)
        await self.metrics.start(serve=worker is None)
        self._janitor = loop.create_task(self._janitor_loop())
        if worker is not None:
            await worker.start(lambda: ClientConnection(self), self.request_shutdown)
        log.info("listening on %s:%d", listen.host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown)
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
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
        self.recovery.close()
        await self.health.stop()
        for pool in self.pools.values():
            pool.close()
        self.admin.close()
        self.metrics.close()
        if self.worker is not None:
            self.worker.close()
        self._stopped.set()

    def reload(self) -> Config:
        """Re-read the config file and switch to it; raises ConfigError, keeping the running config, if invalid."""
        if self.config.path is None:
            raise ConfigError(["the running config was not read from a file"])
        try:
            config = load_config(self.config.path, region=self.config.region, workers=self.config.workers)
            client_ssl, server_ssl = client_context(config), server_context(config)  # certificates may have changed
        except ConfigError as exc:
            log.error("reload rejected: %s", "; ".join(exc.problems))
            raise
        self.config = config
        self.client_ssl, self.server_ssl = client_ssl, server_ssl
        self.statements.limit = config.pool.statement_cache_size
        self.sharded = _needs_routing(config)  # clients follow between their transactions
        old_ring, self.router = self.router.ring, Router(config)
        self.ring_moved = fraction_moved(old_ring, self.router.ring)
        # The topology changes with the ring, so that no transaction routed by the new ring finds a shard
        # without its nodes; health checks of added nodes start in the task.
        self.topology.apply_config(config)
        self._drain_removed(config)
        for pool in self.pools.values():
            pool.configure()
        for client in self.clients.values():
            client.home %= len(config.shards)
        asyncio.get_running_loop().create_task(self.health.apply_config(config))
        self._scram.clear()
        log.info("reloaded %s: %.2f%% of the key space moved to another shard", config.path, self.ring_moved * 100,
                 extra={"event": "reload"})
        return config

    def _drain_removed(self, config: Config) -> None:
        """Pools to nodes the config no longer has (or has in another shard) drain: idle connections close
        now, busy ones as their transactions end, and new transactions get pools of their own."""
        kept = {(node.address, shard.name) for shard in config.shards for node in shard.nodes}
        for pool in list(self.pools.values()):
            if (pool.node.address, pool.node.shard) not in kept and not pool.draining:
                pool.drain()
                log.info("pool %s/%s to %s drains: the node left the config", pool.key.database, pool.key.user,
                         pool.node_label)

    def _reload_on_signal(self) -> None:
        with suppress(ConfigError):  # reload() logged why
            self.reload()

    # -- clients ------------------------------------------------------------------------------------------
    def next_client_id(self) -> int:
        self._client_ids += 1
        return self._client_ids if self.worker is None else self.worker.tag(self._client_ids)

    def admit(self, client: ClientConnection) -> bool:
        if self.shutting_down or self.connected >= self.config.pool.max_client_conn:
            return False
        client.admitted = True
        self.connected += 1
        return True

    def register(self, client: ClientConnection) -> tuple[int, int]:
        """Issue the client's cancel key."""
        while True:
            pid = secrets.randbits(31) if self.worker is None else self.worker.new_pid()
            if pid and pid not in self.clients:
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
        if self.worker is not None and not self.worker.owns(pid):  # the kernel gave it to the wrong worker
            self.worker.forward_cancel(pid, secret)
            return
        client = self.clients.get(pid)
        if client is None or not secrets.compare_digest(client.secret.to_bytes(4, "big"), secret.to_bytes(4, "big")):
            return
        server = client.server
        if server is not None and (server.pending or server.status != pg.IDLE):
            server.cancel_running()

    def auth_failed(self, client: ClientConnection) -> None:  # counted in errors_total{kind="auth"} (metrics.py)
        log.warning("client %d %s: authentication failed for user %s", client.id, client.address, client.user,
                    extra={"event": "auth_failure", "client": client.id, "user": client.user})

    def scram_secret(self, user: User) -> ScramSecret:
        """Derived once per password: the key derivation is deliberately slow."""
        cached = self._scram.get(user.name)
        if cached is None or cached[0] != user.password:
            cached = (user.password or "", ScramSecret.from_password(user.password or ""))
            self._scram[user.name] = cached
        return cached[1]

    # -- pools --------------------------------------------------------------------------------------------
    def pool_for(self, database: str, user: str, node: NodeState) -> Pool:
        pool = self.pools.get((database, user, node.address))  # a plain tuple finds its PoolKey: none made per call
        if pool is None or pool.draining:  # a node back in the config after a reload: a fresh pool
            key = PoolKey(database, user, node.address)
            pool = self.pools[key] = Pool(self, key, node)
        return pool


    def node_pool(self, client: ClientConnection, shard: int, write: bool, force_primary: bool = False) -> Pool | None:
        """The pool for a statement on a shard: its primary for writes, else the best node to read from;
        None while the shard has no primary to write to."""
        name = self.config.shards[shard].name
        consistency = self.config.routing.consistency
        if write or force_primary or consistency == "strong":
            node = self.topology.primary(name)
        else:
            min_lsn = client.min_lsn.get(shard) if consistency == "read_your_writes" else None
            node = self.topology.read_node(name, min_lsn, client.avoid)
        return None if node is None else self.pool_for(client.database, client.user, node)

    def tracks_writes(self, shard: int) -> bool:
        """Whether commits on this shard must be followed for read-your-writes: it has replicas to read."""
        return self.config.routing.consistency == "read_your_writes" and len(self.config.shards[shard].nodes) > 1

    def is_primary(self, node: NodeState) -> bool:
        primary = self.topology.primary(node.shard)
        return primary is not None and primary.address == node.address

    def login_node(self) -> NodeState:
        """Where a new client's server parameters come from: the first shard's primary if known."""
        shard = self.config.shards[0].name
        return self.topology.primary(shard) or self.topology.nodes(shard)[0]

    def _fence(self, change: Change) -> None:
        """A primary that a newer one replaced while it still runs (split brain) gets nothing more: the
        transactions still open on it end unacknowledged (their clients get 08006), rather than commit
        where the shard no longer reads or writes, and clients waiting for it are routed again."""
        node = self.topology.node(change.old) if change.kind == "primary" and change.old else None
        if node is None or not node.fenced:
            return
        for pool in [pool for pool in self.pools.values() if pool.node is node]:
            waiting = list(pool.waiting)
            pool.waiting.clear()
            pool.close()
            for client in waiting:
                client.fail(pg.PostgresError(pg.CONNECTION_FAILURE, f"shardproxy: {node.address} is fenced"))
        log.warning("%s fenced: its connections are closed", node.address)

    async def login(self, database: str, user: str) -> tuple[Pool, dict[str, str]]:
        """The pool a new client's server parameters come from, and those parameters: the first shard's
        primary's, or while it cannot be reached (a failover) those of the shard's next node that can, so
        clients still log in and read from replicas. A server's own refusal (password, unknown database)
        is the client's answer as it is."""
        shard = self.config.shards[0].name
        nodes = [self.login_node(), *self.topology.read_candidates(shard), *self.topology.nodes(shard)]
        error: pg.PostgresError | None = None
        for node in dict.fromkeys(nodes):  # in that order, each once
            pool = self.pool_for(database, user, node)
            try:
                defaults = await pool.fetch_defaults()
            except pg.PostgresError as exc:
                if exc.code != pg.CONNECTION_FAILURE:
                    raise
                error = exc
                continue
            if defaults.get("in_hot_standby") == "on":  # a replica's: clients see the proxy, which takes writes
                defaults = {**defaults, "in_hot_standby": "off"}
            return pool, defaults
        assert error is not None
        raise error

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            for key, pool in list(self.pools.items()):
                pool.tick(now)
                if pool.draining and not pool.servers and self.pools.get(key) is pool:
                    del self.pools[key]
            self._expire_idle_transactions(now)
            self.recovery.tick(now)

    def _expire_idle_transactions(self, now: float) -> None:
        """idle_transaction_timeout: the client is silent inside a transaction; query_timeout: the server is
        silent while the client waits for an answer (server.last_used is when it last sent anything)."""
        idle, silent = self.config.pool.idle_transaction_timeout, self.config.pool.query_timeout
        if not (idle or silent):
            return
        for client in list(self.clients.values()):
            server = client.server
            if server is None:
                continue
            # Session pooling links the server between transactions too: only an open transaction counts.
            if idle and not server.pending and server.status != pg.IDLE and now - server.last_used > idle:
                client.fail(pg.PostgresError(pg.IDLE_IN_TRANSACTION_TIMEOUT, "idle_transaction_timeout"))
            elif silent and server.pending and now - server.last_used > silent:
                self.health.check_now(server.pool.node_label)
                client.fail(pg.PostgresError(pg.QUERY_CANCELED, f"shardproxy: query_timeout: no answer from "
                                                                f"server {server.pool.node_label} for {silent:g}s"))


def _needs_routing(config: Config) -> bool:
    """One shard with one node needs no routing: every statement goes there."""
    return len(config.shards) > 1 or len(config.shards[0].nodes) > 1


def _health_login(config: Config) -> tuple[str, str | None]:
    """Health checks log in as the first admin user with a plaintext password, else the first such user."""
    users = [config.user(name) for name in config.admin_users] + list(config.users)
    for user in users:
        if user is not None and user.password and not (is_scram_verifier(user.password) or is_md5_hash(user.password)):
            return user.name, user.password
    return config.users[0].name, config.users[0].password
