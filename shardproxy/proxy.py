"""The daemon: the listening socket, the registry of clients, the janitor, reload and shutdown, and the parts it
ties together (topology and health checks, router, pools, recovery, admin console and socket, metrics)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from contextlib import suppress

from shardproxy.cluster.health import HealthChecker, health_login
from shardproxy.cluster.topology import NodeState, Topology
from shardproxy.config import Config, ConfigError, UserSettings, load_config
from shardproxy.datapath._core import ProxyCore
from shardproxy.datapath.client import ClientConnection, FailedLogins, LoginSlots
from shardproxy.datapath.deadlocks import Deadlocks
from shardproxy.datapath.fanout.copy import Columns
from shardproxy.datapath.fanout.recovery import Recovery
from shardproxy.datapath.fanout.twophase import signing_key
from shardproxy.datapath.pool import Pool, Pools
from shardproxy.datapath.statements import Registry
from shardproxy.ops.admin.commands import Admin
from shardproxy.ops.admin.console import Console
from shardproxy.ops.admin.replies import AdminError, Table
from shardproxy.ops.admin.socket import AdminSocket, ask
from shardproxy.ops.metrics import Metrics
from shardproxy.ops.reshard import Resharding
from shardproxy.routing.ring import Ring, fraction_moved
from shardproxy.routing.router import Decision, Route, Router
from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg
from shardproxy.wire.auth import ProvenKey, ScramSecret
from shardproxy.wire.dial import Dialer
from shardproxy.wire.tls import client_context, server_context
from shardproxy.worker import Worker

log = logging.getLogger("shardproxy")

JANITOR_INTERVAL = 0.5


class Proxy:
    def __init__(self, config: Config, worker: Worker | None = None):
        self.config = config
        self.worker = worker  # None when this process is the only one (workers: 1)
        self.client_ssl = client_context(config)  # None unless tls.mode allows TLS; built once, as loading is slow
        self.core = ProxyCore()  # what the compiled data path reads of the proxy
        self.core.sharded = _needs_routing(config)
        self.core.statements = Registry(config.pool.statement_cache_size, config.pool.statement_cache_bytes)
        self.core.statement_mark = self.core.statements.mark
        self.core.prepared_per_server = config.pool.prepared_statements_per_server
        self.core.two_phase_key = signing_key(config)
        self.topology = Topology(config)
        self.router = Router(config)
        self.copy_columns = Columns()
        self.any_decision = Decision(Route("any", "utility"), None, "")  # for batches that name no statement
        self.health = HealthChecker(self.topology, config, *health_login(config))
        self.metrics = Metrics(self)
        self.pools = Pools(config, self.topology, _dialer(config), self._credentials, self.health.check_now,
                           self.metrics.tally)
        self.clients: dict[int, ClientConnection] = {}  # by the BackendKeyData pid the proxy issued
        self.connected = 0  # clients authenticated (admitted), within max_client_conn
        self.login_slots = LoginSlots(config.pool.max_login_conn)
        self.failed_logins = FailedLogins(config.pool.auth_failure_delay)
        self._mock_key = secrets.token_bytes(32)  # unknown users' SCRAM secrets derive from it
        self.ring_moved = 0.0  # the share of the key space the last reload gave to another shard
        self._client_ids = 0
        self._scram: dict[str, tuple[str, ScramSecret]] = {}
        self.proven_keys: dict[str, ProvenKey] = {}  # users configured with a verifier: their clients' proven key
        self._server: asyncio.AbstractServer | None = None
        self._janitor: asyncio.Task[None] | None = None
        self.recovery = Recovery(self)  # of two-phase commits left in doubt
        self.deadlocks = Deadlocks(self)  # wait cycles across shards
        self._stopped = asyncio.Event()
        self.reshard = Resharding(self)  # RESHARD's job, and the hold of moving keys at its cut-over
        self.admin = Admin(self)
        self.console = Console(self.execute_for_all)
        self._admin_socket: AdminSocket | None = None

    # -- start and stop ---------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        worker = self.worker
        # First: a proxy already running there keeps its socket and its port. A worker's socket is internal:
        # the supervisor answers the configured one for all workers, and serves their metrics.
        if worker is None:
            self._admin_socket = AdminSocket(self.config.admin.socket, self.admin.execute)
        else:
            self._admin_socket = AdminSocket(worker.admin_socket, self.admin.execute, internal=True)
        await self._admin_socket.start()
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
        return int(self._server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_shutdown)
        loop.add_signal_handler(signal.SIGINT, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        await self._stopped.wait()

    def request_shutdown(self) -> None:
        if not self.core.shutting_down:
            spawn(self.shutdown())

    async def shutdown(self) -> None:
        """Stop accepting; clients between transactions leave now, the others when theirs ends or at the timeout."""
        self.core.shutting_down = True
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
        self.deadlocks.close()
        await self.health.stop()
        self.pools.close()
        if self._admin_socket is not None:
            self._admin_socket.close()
        self.metrics.close()
        if self.worker is not None:
            self.worker.close()
        self._stopped.set()

    def reload(self, force: bool = False) -> Config:
        """Re-read the config file and switch to it; raises ConfigError, keeping the running config, if invalid,
        or if it gives keys another owner and `force` is not set (RESHARD moves the rows first)."""
        if self.config.path is None:
            raise ConfigError(["the running config was not read from a file"])
        try:
            config = load_config(self.config.path, region=self.config.region, workers=self.config.workers)
            client_ssl, dialer = client_context(config), _dialer(config)  # certificates may have changed
            if not force:
                _refuse_new_owners(self.router.ring, config)
        except ConfigError as exc:
            log.error("reload rejected: %s", "; ".join(exc.problems))
            raise
        self.config = config
        self.client_ssl = client_ssl
        self.core.statements.resize(config.pool.statement_cache_size, config.pool.statement_cache_bytes)
        self.login_slots.resize(config.pool.max_login_conn)
        self.failed_logins.delay = config.pool.auth_failure_delay
        self.core.prepared_per_server = config.pool.prepared_statements_per_server
        self.core.two_phase_key = signing_key(config)
        self.core.sharded = _needs_routing(config)  # clients follow between their transactions
        old_ring, self.router = self.router.ring, Router(config)
        self.ring_moved = fraction_moved(old_ring, self.router.ring)
        # The topology changes with the ring, so that no transaction routed by the new ring finds a shard
        # without its nodes; health checks of added nodes start in the task.
        self.topology.apply_config(config)
        self.pools.configure(config, dialer)
        for client in self.clients.values():
            client.home %= len(config.shards)
        spawn(self.health.apply_config(config))
        self._scram.clear()
        log.info("reloaded %s: %.2f%% of the key space moved to another shard", config.path, self.ring_moved * 100,
                 extra={"event": "reload"})
        return config

    def _reload_on_signal(self) -> None:
        with suppress(ConfigError):  # reload() logged why
            self.reload()

    # -- clients ------------------------------------------------------------------------------------------
    def next_client_id(self) -> int:
        self._client_ids += 1
        return self._client_ids if self.worker is None else self.worker.tag(self._client_ids)

    @property
    def logging_in(self) -> int:
        """Connections at the login: authenticating, or authenticated and not yet told the session is theirs."""
        return self.login_slots.taken + self.connected - len(self.clients)

    def admit(self, client: ClientConnection) -> bool:
        """A client that has authenticated takes a place within max_client_conn, if there is one."""
        if self.core.shutting_down or self.connected >= self.config.pool.max_client_conn:
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
        elif client.interrupt is not None:  # a read on every shard, streamed
            client.interrupt()
        else:  # another statement on several shards: it runs on a leg of each
            for leg in client.fanout_legs:
                if leg.server is not None and (leg.server.pending or leg.server.status != pg.IDLE):
                    leg.server.cancel_running()

    def auth_failed(self, client: ClientConnection) -> None:  # counted in errors_total{kind="auth"} (metrics.py)
        self.failed_logins.failed(client.host)
        log.warning("client %d %s: authentication failed for user %s", client.id, client.address, client.user,
                    extra={"event": "auth_failure", "client": client.id, "user": client.user})

    def client_error(self, error: pg.PostgresError) -> None:
        self.metrics.client_error(error)

    def scram_secret(self, user: UserSettings) -> ScramSecret:
        """Derived once per password: the key derivation is deliberately slow."""
        cached = self._scram.get(user.name)
        if cached is None or cached[0] != user.password:
            cached = (user.password or "", ScramSecret.from_password(user.password or ""))
            self._scram[user.name] = cached
        return cached[1]

    def mock_scram_secret(self, user: str) -> ScramSecret:
        return ScramSecret.mock(user, self._mock_key)

    def _credentials(self, user: str) -> tuple[str | None, ProvenKey | None]:
        """A user's password towards servers, and the key its clients proved (SCRAM pass-through)."""
        settings = self.config.user(user)
        return (settings.password if settings else None), self.proven_keys.get(user)

    async def login(self, database: str, user: str) -> tuple[Pool, dict[str, str]]:
        return await self.pools.login(database, user)

    async def wait_for_primary(self, shard: str, timeout: float) -> NodeState | None:
        return await self.health.wait_for_primary(shard, timeout)

    def transaction_ended(self, two_phase: bool) -> None:
        """A transaction on several shards ended (those on one are counted by the data path)."""
        self.metrics.cross_shard["two_phase" if two_phase else "multi"] += 1

    def two_phase_took(self, seconds: float) -> None:
        self.metrics.two_phase_commits.observe(seconds)

    def rows_copied(self, shard: str, rows: int) -> None:
        self.metrics.copy_rows.labels(shard).inc(rows)

    def in_doubt_resolved(self, decision: str) -> None:
        self.metrics.in_doubt_resolved.labels(decision).inc()

    async def exposition(self) -> bytes:
        return await self.metrics.exposition()

    # -- resharding -------------------------------------------------------------------------------------------
    async def cutover_passed(self) -> None:
        await self.reshard.passed()

    def reshard_rows(self, phase: str, count: int) -> None:
        self.metrics.reshard_rows.labels(phase).inc(count)

    # -- the admin console --------------------------------------------------------------------------------
    def open_admin_session(self, client: ClientConnection) -> None:
        """Serve a logged-in client of the admin database; raises PostgresError for users not allowed."""
        if client.user not in self.config.admin_users:
            raise pg.PostgresError(pg.INVALID_AUTHORIZATION,
                                   f'shardproxy: user "{client.user}" may not use the admin database')
        client.pid, client.secret = self.register(client)
        self.console.open_session(client)

    async def execute_for_all(self, line: str) -> Table:
        """The admin database answers for all workers: with several, the supervisor merges their replies."""
        if self.worker is None:
            return await self.admin.execute(line)
        try:
            return await ask(self.worker.supervisor_socket, line)
        except OSError as exc:
            raise AdminError(f"cannot reach the supervisor's admin socket: {exc.strerror or exc}") from None

    # -- the janitor ----------------------------------------------------------------------------------------
    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            self.pools.tick(now)
            self._expire_idle_transactions(now)
            self.recovery.tick(now)
            self.deadlocks.tick(now)

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


def _refuse_new_owners(ring: Ring, config: Config) -> None:
    """A reload must not give rows another owner: they would stay where they are, out of the router's sight."""
    moved = fraction_moved(ring, Ring.from_config(config))
    if moved:
        raise ConfigError([f"the new shards give {moved:.2%} of the key space another owner: RESHARD moves "
                           f"the rows and then switches, RELOAD FORCE switches without moving them"])


def _needs_routing(config: Config) -> bool:
    """One shard with one node needs no routing: every statement goes there."""
    return len(config.shards) > 1 or len(config.shards[0].nodes) > 1


def _dialer(config: Config) -> Dialer:
    """How servers are reached; raises ConfigError when a CA cannot be loaded."""
    auth = config.server_auth
    return Dialer(config.server_tls.mode, server_context(config), frozenset(auth.methods),
                  not auth.cleartext_needs_verified_tls)


