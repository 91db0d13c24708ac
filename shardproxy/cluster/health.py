"""Health checks: one task per node polls it with asyncpg and writes the Topology.

Each check is one query on a kept-open connection. A node goes down after
``fall`` consecutive failed checks and comes back after ``rise`` successful
ones; its first successful check brings it up at once, so a starting proxy
does not wait several intervals for nodes that are fine.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

import asyncpg

from shardproxy.cluster.topology import NodeState, Probe, Topology, parse_lsn
from shardproxy.config import Config, RegionSettings
from shardproxy.wire.auth import is_md5_hash, is_scram_verifier
from shardproxy.wire.tls import server_context

log = logging.getLogger(__name__)

# pg_is_in_recovery() is read once (the CTE) so a promotion during the query
# cannot mix a replica's answers with a primary's.
#
# The timeline must change the moment a node is promoted, which rules out
# pg_control_checkpoint() on a primary: it shows the last checkpoint's
# timeline, and a promotion only requests that checkpoint. The WAL file name
# of the current insert position starts with the timeline being written
# (8 hex digits) from the first record on. On a replica, the walreceiver's
# received_tli is exact but only visible to pg_read_all_stats; without it the
# last restartpoint's timeline is the best a replica offers, and
# greatest() skips the NULL. Whether a replica streams is its walreceiver's
# status; without that role only the receiver's row shows, once it has
# connected upstream.
PROBE_SQL = """
WITH r AS (SELECT pg_is_in_recovery() AS in_recovery)
SELECT
  in_recovery,
  (CASE WHEN in_recovery THEN pg_last_wal_replay_lsn()
        ELSE pg_current_wal_lsn() END)::text AS lsn,
  CASE WHEN in_recovery
       THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
  END AS replay_age,
  CASE WHEN in_recovery
       THEN greatest((SELECT received_tli FROM pg_stat_wal_receiver),
                     (SELECT timeline_id FROM pg_control_checkpoint()))
       ELSE ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int
  END AS timeline,
  CASE WHEN in_recovery
       THEN EXISTS (SELECT FROM pg_stat_wal_receiver WHERE coalesce(status = 'streaming', true))
  END AS receiving,
  current_setting('max_prepared_transactions')::int AS prepared_transactions
FROM r
"""

NO_TWO_PHASE = ("max_prepared_transactions is 0: a transaction that writes on several shards cannot commit in "
                "two phases, and commits on each shard plainly (not all-or-nothing if a shard fails mid-commit)")

# What a failed check raises: the node is unreachable, refuses us, or is slow.
CHECK_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class HealthChecker:
    def __init__(
        self,
        topology: Topology,
        config: Config,
        user: str,
        password: str | None,
        database: str = "postgres",
        *,
        fall: int = 3,
        rise: int = 1,
        timeout: float = 2.0,
        fast_interval: float = 0.1,
        fast_period: float = 10.0,
    ) -> None:
        """``timeout`` caps each connect and query (also never above the interval).

        After ``check_now`` a node is polled every ``fast_interval`` for
        ``fast_period`` seconds, so a suspected failure is confirmed quickly.
        """
        self.topology = topology
        self.config = config
        self.user = user
        self.password = password
        self.database = database
        self.fall = fall
        self.rise = rise
        self.timeout = timeout
        self.fast_interval = fast_interval
        self.fast_period = fast_period
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._hurry_until: dict[str, float] = {}
        self._conns: dict[str, asyncpg.Connection] = {}
        self._warned: set[str] = set()  # primaries without prepared transactions, warned about once
        self._checked = asyncio.Condition()

    async def start(self) -> None:
        """Check every node once, then keep polling each in its own task."""
        nodes = self.topology.nodes()
        await asyncio.gather(*(self._check(node.address) for node in nodes))
        # A replica's lag is measured against the primary's LSN, which the
        # first round may have learned only after the replica answered.
        replicas = [node.address for node in nodes if node.role == "replica"]
        await asyncio.gather(*(self._check(address) for address in replicas))
        for node in nodes:
            self._spawn(node.address)

    async def survey(self) -> list[tuple[NodeState, Probe | str]]:
        """Check every node once, on a connection of its own: what it is, or why its check failed."""

        async def once(node: NodeState) -> tuple[NodeState, Probe | str]:
            try:
                return node, await self._probe(node)
            except CHECK_ERRORS as exc:
                return node, describe(exc)
            finally:
                self._drop(node.address)

        return list(await asyncio.gather(*(once(node) for node in self.topology.nodes())))

    async def stop(self) -> None:
        """Stop polling and close every connection."""
        for address in list(self._tasks):
            await self._retire(address)
        # Checks also run without a task: start()'s rounds, if it was cancelled.
        for address in list(self._conns):
            self._drop(address)

    async def apply_config(self, config: Config) -> None:
        """Follow a reload: poll added nodes, forget removed ones."""
        self.config = config
        self.topology.apply_config(config)
        wanted = {node.address for node in self.topology.nodes()}
        for address in set(self._tasks) - wanted:
            await self._retire(address)
        for node in self.topology.nodes():
            if node.address not in self._tasks:
                self._spawn(node.address)
                self.check_now(node.address)

    def check_now(self, address: str) -> None:
        """Check this node right away, then often for a while.

        For the data path, when a connection to the node has just failed.
        """
        self._hurry(address, self.fast_period)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some check; False at the timeout."""
        async with self._checked:
            try:
                async with asyncio.timeout(timeout):
                    await self._checked.wait_for(predicate)
            except TimeoutError:
                return False
        return True

    async def wait_for_primary(self, shard: str, timeout: float) -> NodeState | None:
        """The shard's primary once a check made after this call confirms it.

        Checks all the shard's nodes fast meanwhile. None at the timeout. A
        fresh check is required because the caller usually just saw the
        current primary fail, and the topology may not know yet.
        """
        since = time.monotonic()
        for node in self.topology.nodes(shard):
            self._hurry(node.address, max(timeout, self.fast_period))

        def confirmed() -> bool:
            primary = self.topology.primary(shard)
            return primary is not None and (primary.probed_at or 0) >= since

        await self.wait_for(confirmed, timeout)
        return self.topology.primary(shard) if confirmed() else None

    def _spawn(self, address: str) -> None:
        self._wake[address] = asyncio.Event()
        self._tasks[address] = asyncio.create_task(
            self._watch(address), name=f"health {address}"
        )

    async def _retire(self, address: str) -> None:
        task = self._tasks.pop(address)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._wake.pop(address, None)
        self._hurry_until.pop(address, None)
        self._drop(address)

    def _hurry(self, address: str, period: float) -> None:
        if address in self._wake:
            self._hurry_until[address] = time.monotonic() + period
            self._wake[address].set()

    async def _watch(self, address: str) -> None:
        wake = self._wake[address]
        while True:
            try:
                async with asyncio.timeout(self._interval(address)):
                    await wake.wait()
            except TimeoutError:
                pass
            # Cleared before the check, so a check_now during it is not lost.
            wake.clear()
            try:
                await self._check(address)
            except Exception:  # a bug: say so, but keep watching the node
                log.exception("health check of %s failed unexpectedly", address)

    def _interval(self, address: str) -> float:
        interval = self._region_interval(address)
        if time.monotonic() < self._hurry_until.get(address, 0.0):
            return min(interval, self.fast_interval)
        return interval

    def _region_interval(self, address: str) -> float:
        node = self.topology.node(address)
        region = self.config.regions.get(node.region) if node and node.region else None
        return (region or RegionSettings()).health_check_interval

    async def _check(self, address: str) -> None:
        node = self.topology.node(address)
        if node is None:
            return
        was_healthy = node.healthy
        try:
            probe = await self._probe(node)
        except CHECK_ERRORS as exc:
            self._drop(address)
            error = describe(exc)
            if error != node.last_error:  # once per node and cause: a node that stays down does not flood the log
                log.warning("health check of %s as user %s failed: %s", address, self.user, error,
                            extra={"event": "check_failed", "shard": node.shard, "node": address})
            self.topology.report_failure(address, time.time(), self.fall, error)
            if was_healthy and not node.healthy:
                log.warning(
                    "%s is down after %d failed checks: %s", address, node.failures, exc,
                    extra={"event": "node_down", "shard": node.shard, "node": address},
                )
        else:
            self.topology.report(address, probe, self.rise)
            if not probe.in_recovery and not probe.prepared_transactions and address not in self._warned:
                self._warned.add(address)  # once per node: the setting changes only with a restart
                log.warning("%s: %s", address, NO_TWO_PHASE,
                            extra={"event": "no_two_phase", "shard": node.shard, "node": address})
            if node.healthy and not was_healthy:
                log.info("%s is up as %s", address, node.role,
                         extra={"event": "node_up", "shard": node.shard, "node": address})
        async with self._checked:
            self._checked.notify_all()

    async def _probe(self, node: NodeState) -> Probe:
        timeout = min(self._region_interval(node.address), self.timeout)
        conn = self._conns.get(node.address)
        if conn is None or conn.is_closed():
            conn = self._conns[node.address] = await self.connect(node, "shardproxy health check", timeout)
        sent = time.monotonic()
        row = await conn.fetchrow(PROBE_SQL, timeout=timeout)
        return Probe(
            in_recovery=row["in_recovery"],
            lsn=parse_lsn(row["lsn"]),
            timeline=row["timeline"],
            replay_age=row["replay_age"],
            receiving=row["receiving"],
            prepared_transactions=row["prepared_transactions"],
            sent=sent,
            received=time.monotonic(),
            at=time.time(),
        )

    async def connect(self, node: NodeState, application_name: str, timeout: float) -> asyncpg.Connection:
        """A connection to the node as health checks log in (also for the proxy's other checks)."""
        return await asyncpg.connect(
            host=node.host,
            port=node.port,
            user=self.user,
            password=self.password,
            database=self.database,
            timeout=timeout,
            ssl=_ssl(self.config),
            server_settings={"application_name": application_name},
        )

    def _drop(self, address: str) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            conn.terminate()  # no goodbye: the server may be gone


def health_login(config: Config) -> tuple[str, str | None]:
    """Health checks log in as the first admin user with a plaintext password, else the first such user."""
    users = [config.user(name) for name in config.admin_users] + list(config.users)
    for user in users:
        if user is not None and user.password and not (is_scram_verifier(user.password) or is_md5_hash(user.password)):
            return user.name, user.password
    return config.users[0].name, config.users[0].password


def describe(exc: BaseException) -> str:
    """A failed check's cause in one line: the server's message and SQLSTATE, or the connection's error."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, TimeoutError):
        return "no answer within the check's timeout"
    return str(exc) or type(exc).__name__


def _ssl(config: Config) -> ssl.SSLContext | str | bool:
    """asyncpg's ssl argument for the configured server TLS mode, checked as the data path checks it (prefer,
    unchecked there too, is left to asyncpg so that a server without TLS is still reached)."""
    if config.server_tls.mode == "prefer":
        return "prefer"
    return server_context(config) or False  # None under disable
