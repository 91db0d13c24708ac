"""Prometheus metrics at http://metrics.host:metrics.port/metrics (port 0: off).

State (connections, node health, replica lag) is read from the proxy when Prometheus scrapes, by a
Collector: the data path pays nothing for it. The data path's events (transactions, pool waits) are plain
numbers in one Tally per (shard, node role), compiled (shardproxy/counters.pyx), bumped without locks or label
lookups and turned into counters and histograms at scrape time; rare events (errors, failovers) are
prometheus-client counters. /metrics is served by the event loop itself, so a scrape reads a consistent state. With
several workers each worker answers the admin command METRICS with its exposition instead, and the supervisor
serves their sum (supervisor.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from itertools import accumulate
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Counter as CounterMetric
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shardproxy.cluster.topology import Change, Topology
from shardproxy.config import Config
from shardproxy.counters import DURATION_BUCKETS, Spread, Tally
from shardproxy.datapath._core import ProxyCore
from shardproxy.datapath.pool import Pools
from shardproxy.ops.views import Linked, NodeView, client_state, node_views
from shardproxy.wire import protocol as pg

log = logging.getLogger("shardproxy.metrics")
disable_created_metrics()  # the *_created series would double what every scrape carries, for nothing we use

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
    pg.INVALID_NAME: "protocol",  # a startup parameter that is not a name
    pg.CONNECTION_FAILURE: "server_connect",
    pg.ADMIN_SHUTDOWN: "shutdown",
    pg.FEATURE_NOT_SUPPORTED: "unsupported",
}
_SERVER_ERROR = "server"  # any other SQLSTATE: the server's own error, passed on at login


class MetricsHost(Protocol):
    """What a scrape reads of the proxy."""

    config: Config
    topology: Topology
    clients: dict[int, Linked]
    logging_in: int  # connections at the login, not yet among `clients`
    pools: Pools
    core: ProxyCore  # the data path's counters of the proxy


def error_kind(error: pg.PostgresError) -> str:
    return _ERROR_BY_MESSAGE.get(error.message) or _ERROR_BY_CODE.get(error.code, _SERVER_ERROR)


class Metrics:
    def __init__(self, proxy: MetricsHost):
        self.proxy = proxy
        self.registry = CollectorRegistry()
        self.errors = CounterMetric("shardproxy_errors_total", "Errors the proxy sent to clients", ["kind"],
                              registry=self.registry)
        self.failovers = CounterMetric("shardproxy_failovers_total", "Changes of a shard's primary to another node",
                                 ["shard"], registry=self.registry)
        self.in_doubt_resolved = CounterMetric("shardproxy_in_doubt_resolved_total", "Prepared transactions left "
                                               "in doubt, finished by recovery", ["decision"], registry=self.registry)
        self.copy_rows = CounterMetric("shardproxy_copy_rows_total", "Rows a COPY across shards moved to or from "
                                       "each shard, once it succeeded", ["shard"], registry=self.registry)
        self.reshard_rows = CounterMetric("shardproxy_reshard_rows", "Rows RESHARD wrote or deleted, by phase",
                                          ["phase"], registry=self.registry)
        for phase in ("copy", "stream", "cleanup"):
            self.reshard_rows.labels(phase)
        for decision in ("commit", "rollback"):
            self.in_doubt_resolved.labels(decision)
        for kind in {*_ERROR_BY_MESSAGE.values(), *_ERROR_BY_CODE.values(), _SERVER_ERROR}:
            self.errors.labels(kind)  # every kind is exported from the start, at zero
        self._tallies: dict[tuple[str, str], Tally] = {}
        self.two_phase_commits = Spread()  # seconds each two-phase commit took
        self.cross_shard = {"multi": 0, "two_phase": 0}  # transactions on several shards, as they ended
        self.registry.register(_StateCollector(proxy))
        self.registry.register(_EventCollector(self._tallies))
        self.registry.register(_TransactionCollector(proxy, self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._primaries: dict[str, str] = {}  # the last primary seen per shard, to tell failovers apart
        # Subscribed before health checks start, so that the first election is seen: the first failover
        # after it is then a change of primary like any other.
        proxy.topology.on_change(self._topology_changed)
        self._server: asyncio.AbstractServer | None = None

    def tally(self, shard: str, role: str) -> Tally:
        tally = self._tallies.get((shard, role))
        if tally is None:
            tally = self._tallies[shard, role] = Tally()
        return tally

    def client_error(self, error: pg.PostgresError) -> None:
        self.errors.labels(error_kind(error)).inc()

    # -- serving --------------------------------------------------------------------------------------------
    async def start(self, serve: bool = True) -> None:
        """Bind the counters to the topology; unless `serve` is off (a worker: its supervisor serves), serve."""
        for shard in self.proxy.config.shards:
            self.failovers.labels(shard.name)
            self.copy_rows.labels(shard.name)
        settings = self.proxy.config.metrics
        if settings.port and serve:
            self._server = await serve_metrics(settings.host, settings.port, self.exposition)

    async def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _topology_changed(self, change: Change) -> None:
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


class _EventCollector(Collector):
    """The tallies of the data path, as Prometheus counters and histograms."""

    def __init__(self, tallies: dict[tuple[str, str], Tally]):
        self.tallies = tallies

    def collect(self) -> Iterator[Metric]:
        queries = CounterMetricFamily("shardproxy_queries", "Statements by shard, node role and kind: a shard's "
                                      "part of a statement on every shard as scatter, ddl or write, any other "
                                      "as read on a replica, else write", labels=["shard", "role", "kind"])
        duration = HistogramMetricFamily("shardproxy_query_duration_seconds",
                                         "Time a client held a server connection, per transaction",
                                         labels=["shard", "role"])
        wait = HistogramMetricFamily("shardproxy_pool_wait_seconds", "Time clients queued for a server connection",
                                     labels=["shard", "role"])
        for (shard, role), tally in list(self.tallies.items()):
            for kind, count in tally.queries.items():
                queries.add_metric([shard, role, kind], count)
            for family, spread in ((duration, tally.duration), (wait, tally.wait)):
                family.add_metric([shard, role], _cumulative(spread.counts), spread.sum)
        yield from (queries, duration, wait)


class _TransactionCollector(Collector):
    """Client transactions by the shards they touched, and how long two-phase commits took."""

    def __init__(self, proxy: MetricsHost, metrics: Metrics):
        self.proxy = proxy
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("shardproxy_transactions", "Client transactions by the shards they touched: "
                                     "single (one server connection), multi (several, committed plainly or rolled "
                                     "back), two_phase (committed in two phases)", labels=["shards"])
        family.add_metric(["single"], self.proxy.core.transactions)
        for label, count in self.metrics.cross_shard.items():
            family.add_metric([label], count)
        spread = self.metrics.two_phase_commits
        seconds = HistogramMetricFamily("shardproxy_two_phase_commit_seconds", "Time from the commit's first "
                                        "question to the shards until every shard committed, per two-phase commit")
        seconds.add_metric([], _cumulative(spread.counts), spread.sum)
        yield from (family, seconds)


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus buckets: each bound with the observations at or below it."""
    bounds = [*map(floatToGoString, DURATION_BUCKETS), "+Inf"]
    return list(zip(bounds, accumulate(counts)))


class _StateCollector(Collector):
    """Gauges computed from the proxy's state at scrape time."""

    def __init__(self, proxy: MetricsHost):
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        yield self._clients()
        nodes = node_views(self.proxy.topology)
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
        states = Counter(client_state(client) for client in list(self.proxy.clients.values()))
        states["login"] = self.proxy.logging_in
        family = GaugeMetricFamily("shardproxy_client_connections", "Client connections by state", labels=["state"])
        for state in CLIENT_STATES:
            family.add_metric([state], states[state])
        return family

    def _servers(self, nodes: list[NodeView]) -> Metric:
        counts: dict[str, Counter[str]] = {node.address: Counter() for node in nodes}
        for pool in self.proxy.pools:
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


async def serve_metrics(host: str, port: int, exposition: Callable[[], Awaitable[bytes]]) -> asyncio.AbstractServer:
    """Just enough HTTP for Prometheus: GET /metrics, one request per connection, answered with exposition()."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = request.split(b" ", 2)
            if len(parts) == 3 and parts[1].split(b"?")[0] == b"/metrics":
                status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, await exposition()
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"try /metrics\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, host, port)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
