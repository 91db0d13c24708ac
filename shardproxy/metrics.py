"""Prometheus metrics at http://metrics.host:metrics.port/metrics (port 0: off).

State (connections, node health, replica lag) is read from the proxy when Prometheus scrapes, by a
Collector: the data path pays nothing for it. Events (transactions, pool waits, errors, failovers) are
counters and histograms whose labelled children are bound once per (shard, role), so the data path pays one
inc()/observe() per transaction, never per message. /metrics is served by the event loop itself, so a scrape
reads a consistent state without locks.

Several workers (`workers > 1`, designed, built when the worker supervisor lands): the supervisor points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before it forks, so each worker's counters and histograms live
in files that prometheus-client's MultiProcessCollector sums; the state gauges move from the scrape-time
Collector to Gauges with multiprocess_mode="livesum" that each worker's janitor refreshes; the supervisor
alone serves /metrics and calls mark_process_dead() for every worker that exits.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector,
    disable_created_metrics, generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shardproxy import protocol as pg
from shardproxy.admin import NodeView, client_state, node_views, role_of, shard_of

if TYPE_CHECKING:
    from shardproxy.proxy import Proxy

log = logging.getLogger("shardproxy.metrics")
disable_created_metrics()  # the *_created series would double what every scrape carries, for nothing we use

DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
CLIENT_STATES = ("active", "waiting", "idle", "login")
SERVER_STATES = ("active", "idle", "login")
# errors_total{kind} of an error the proxy sent a client: by exact message first, else by SQLSTATE.
_ERROR_BY_MESSAGE = {
    "query_wait_timeout": "query_wait_timeout",
    "client_login_timeout": "login_timeout",
    "idle_transaction_timeout": "idle_transaction_timeout",
    "shardproxy: server connection lost": "server_lost",
}
_ERROR_BY_CODE = {
    pg.INVALID_PASSWORD: "auth",
    pg.INVALID_AUTHORIZATION: "auth",
    pg.TOO_MANY_CONNECTIONS: "too_many_clients",
    pg.PROTOCOL_VIOLATION: "protocol",
    pg.CONNECTION_FAILURE: "server_connect",
    pg.ADMIN_SHUTDOWN: "shutdown",
    pg.FEATURE_NOT_SUPPORTED: "unsupported",
}
_SERVER_ERROR = "server"  # any other SQLSTATE: the server's own error, passed on at login


def error_kind(error: pg.PostgresError) -> str:
    return _ERROR_BY_MESSAGE.get(error.message) or _ERROR_BY_CODE.get(error.code, _SERVER_ERROR)


class QueryMetrics:
    """The event metrics' children for one (shard, role): bound once, so counting is one inc() or observe()."""

    __slots__ = ("read", "write", "ddl", "scatter", "duration", "wait")

    def __init__(self, metrics: Metrics, shard: str, role: str):
        self.read = metrics.queries.labels(shard, role, "read")
        self.write = metrics.queries.labels(shard, role, "write")
        self.ddl = metrics.queries.labels(shard, role, "ddl")
        self.scatter = metrics.queries.labels(shard, role, "scatter")
        self.duration = metrics.query_duration.labels(shard, role)
        self.wait = metrics.pool_wait.labels(shard, role)


class PoolStats:
    """One pool's counters for SHOW STATS, and its way to the Prometheus children of its node's current role."""

    __slots__ = ("assignments", "transactions", "transaction_time", "wait_time", "_metrics", "_shard", "_address")

    def __init__(self, metrics: Metrics, shard: str, address: str):
        self.assignments = 0  # server connections handed to a client
        self.transactions = 0  # of those, given back at a transaction's end
        self.transaction_time = 0.0  # seconds, from hand-out to give-back
        self.wait_time = 0.0  # seconds clients waited for a hand-out
        self._metrics = metrics
        self._shard = shard
        self._address = address

    def assigned(self, waited: float) -> None:
        self.assignments += 1
        if waited:  # only clients that queued are observed: compare the count with hand-outs for the share
            self.wait_time += waited
            self.query_metrics().wait.observe(waited)

    def transaction(self, seconds: float) -> None:
        """A transaction ended. Until the router counts statements by kind, a transaction counts as one query:
        a read on a replica, else a write."""
        self.transactions += 1
        self.transaction_time += seconds
        role = role_of(self._metrics.proxy, self._address)
        children = self._metrics.children(self._shard, role)
        (children.read if role == "replica" else children.write).inc()
        children.duration.observe(seconds)

    def query_metrics(self) -> QueryMetrics:
        """Looked up per event, not bound per pool: a failover changes the node's role."""
        return self._metrics.children(self._shard, role_of(self._metrics.proxy, self._address))


class Metrics:
    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.registry = CollectorRegistry()
        self.queries = Counter("shardproxy_queries_total", "Queries by shard, node role and kind (today: transactions)",
                               ["shard", "role", "kind"], registry=self.registry)
        self.query_duration = Histogram(
            "shardproxy_query_duration_seconds", "Time a client held a server connection, per transaction",
            ["shard", "role"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.pool_wait = Histogram("shardproxy_pool_wait_seconds", "Time clients queued for a server connection",
                                   ["shard", "role"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.errors = Counter("shardproxy_errors_total", "Errors the proxy sent to clients", ["kind"],
                              registry=self.registry)
        self.failovers = Counter("shardproxy_failovers_total", "Changes of a shard's primary to another node",
                                 ["shard"], registry=self.registry)
        for kind in {*_ERROR_BY_MESSAGE.values(), *_ERROR_BY_CODE.values(), _SERVER_ERROR}:
            self.errors.labels(kind)  # every kind is exported from the start, at zero
        self.registry.register(_StateCollector(proxy))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._children: dict[tuple[str, str], QueryMetrics] = {}
        self._primaries: dict[str, str] = {}  # the last primary seen per shard, to tell failovers apart
        self._server: asyncio.AbstractServer | None = None

    def pool_stats(self, address: str) -> PoolStats:
        shard = shard_of(self.proxy.config).get(address, "")
        self.children(shard, role_of(self.proxy, address))  # the pool's series exist from its creation
        return PoolStats(self, shard, address)

    def children(self, shard: str, role: str) -> QueryMetrics:
        children = self._children.get((shard, role))
        if children is None:
            children = self._children[shard, role] = QueryMetrics(self, shard, role)
        return children

    def client_error(self, error: pg.PostgresError) -> None:
        self.errors.labels(error_kind(error)).inc()

    # -- serving --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        for shard in self.proxy.config.shards:
            self.failovers.labels(shard.name)
        topology = getattr(self.proxy, "topology", None)
        if topology is not None:
            topology.on_change(self._topology_changed)
        settings = self.proxy.config.metrics
        if settings.port:
            self._server = await asyncio.start_server(self._serve, settings.host, settings.port)
            log.info("metrics on http://%s:%d/metrics", settings.host, settings.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _topology_changed(self, change: Any) -> None:  # a topology.Change
        """A failover: a shard's primary is now another node than the last one (a first election is not)."""
        if change.kind != "primary":
            return
        if change.new is None:
            log.warning("shard %s has no primary (was %s): writes wait for one", change.shard, change.old,
                        extra={"event": "no_primary", "shard": change.shard, "node": change.old})
            return
        previous = self._primaries.get(change.shard)
        if previous is not None and previous != change.new:
            self.failovers.labels(change.shard).inc()
            log.warning("failover: shard %s primary %s -> %s", change.shard, previous, change.new,
                        extra={"event": "failover", "shard": change.shard, "node": change.new})
        self._primaries[change.shard] = change.new

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Just enough HTTP for Prometheus: GET /metrics, one request per connection."""
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = request.split(b" ", 2)
            if len(parts) == 3 and parts[1].split(b"?")[0] == b"/metrics":
                status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"try /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class _StateCollector(Collector):
    """Gauges computed from the proxy's state at scrape time."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        yield self._clients()
        nodes = node_views(self.proxy)
        yield self._servers(nodes)
        up = GaugeMetricFamily("shardproxy_node_up", "1 if the node is up (not down, not banned)",
                               labels=["shard", "node", "role", "region"])
        lag_seconds = GaugeMetricFamily("shardproxy_replica_lag_seconds", "Replica replay lag; NaN: unknown",
                                        labels=["shard", "node", "region"])
        lag_bytes = GaugeMetricFamily("shardproxy_replica_lag_bytes", "Replica WAL behind the primary; NaN: unknown",
                                      labels=["shard", "node", "region"])
        for node in nodes:
            region = node.region or ""
            up.add_metric([node.shard, node.address, node.role, region], 1.0 if node.state == "up" else 0.0)
            if node.role != "primary":  # a primary has no lag; a node of unknown role may be a replica
                labels = [node.shard, node.address, region]
                lag_seconds.add_metric(labels, math.nan if node.lag_seconds is None else node.lag_seconds)
                lag_bytes.add_metric(labels, math.nan if node.lag_bytes is None else float(node.lag_bytes))
        yield from (up, lag_seconds, lag_bytes)

    def _clients(self) -> Metric:
        states = Tally(client_state(client) for client in list(self.proxy.clients.values()))
        states["login"] = self.proxy.connected - len(self.proxy.clients)  # admitted, not yet logged in
        family = GaugeMetricFamily("shardproxy_client_connections", "Client connections by state", labels=["state"])
        for state in CLIENT_STATES:
            family.add_metric([state], states[state])
        return family

    def _servers(self, nodes: list[NodeView]) -> Metric:
        counts: dict[str, Tally[str]] = {node.address: Tally() for node in nodes}
        for pool in list(self.proxy.pools.values()):
            tally = counts.get(pool.node.address)
            if tally is not None:  # None: a node a reload removed, whose pool is draining
                tally["active"] += pool.active
                tally["idle"] += len(pool.idle)
                tally["login"] += pool.opening
        family = GaugeMetricFamily("shardproxy_server_connections", "Server connections by node and state",
                                   labels=["shard", "node", "role", "state"])
        for node in nodes:
            for state in SERVER_STATES:
                family.add_metric([node.shard, node.address, node.role, state], counts[node.address][state])
        return family
