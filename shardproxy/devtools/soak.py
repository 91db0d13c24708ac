"""The soak: mixed traffic over two shards while random faults strike, then the books are checked.

Used by tests/test_faults.py (a short form) and bench/run_soak.py (on demand, for minutes).
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

import psycopg

from shardproxy.devtools.faults import Relay
from shardproxy.devtools.sandbox import Cluster, ProxyProcess
from shardproxy.devtools.workload import TABLE, Workload, pooled, rss_kb, server_sessions


@dataclass
class SoakReport:
    seconds: float
    faults: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    missing: list[int] = field(default_factory=list)
    failures: int = 0
    scatter_reads: int = 0
    rss_kb: list[int] = field(default_factory=list)
    leaks: dict[str, tuple[int, int]] = field(default_factory=dict)  # node: (on the server, in SHOW POOLS)
    idle_in_transaction: int = 0

    def summary(self) -> str:
        return (f"soak {self.seconds:.0f}s: faults {self.faults}, {self.acked} acknowledged writes, "
                f"{len(self.missing)} missing, {self.failures} client errors, {self.scatter_reads} scatter reads, "
                f"RSS {self.rss_kb[0] if self.rss_kb else 0}..{max(self.rss_kb, default=0)} kB, "
                f"server connections (server, pools) {self.leaks}, idle in transaction {self.idle_in_transaction}")


def _scatter_reader(dsn: str, stop: threading.Event, report: SoakReport) -> None:
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = psycopg.connect(dsn, autocommit=True, connect_timeout=3, prepare_threshold=0)
            conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
            report.scatter_reads += 1
            time.sleep(0.05)
        except psycopg.Error:
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.1)
    if conn is not None:
        conn.close()


def _client_killed_mid_transaction(dsn: str, key: int, row_id: int) -> None:
    """A client that dies holding an open transaction with an uncommitted write."""
    try:
        conn = psycopg.connect(dsn, connect_timeout=3)
        conn.execute(f"INSERT INTO {TABLE} (user_id, id, v) VALUES (%s, %s, 'never committed')", (key, row_id))
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset, with the transaction open
        conn.close()
    except psycopg.Error:
        pass


def run_soak(proxy: ProxyProcess, relay: Relay, clusters: dict[str, Cluster], dbname: str, seconds: float,
             seed: int = 1, per_shard: int = 3, fault_every: float = 4.0, log=print) -> SoakReport:
    """`clusters` by shard name; the first shard's node is reached through `relay`, the second directly."""
    rng = random.Random(seed)
    report = SoakReport(seconds)
    (relayed, _), (direct, direct_cluster) = clusters.items()
    stop = threading.Event()
    reader = threading.Thread(target=_scatter_reader, args=(proxy.dsn(dbname=dbname), stop, report), daemon=True)
    pid = proxy.process.pid
    doomed = -1
    with Workload(proxy, dbname, per_shard=per_shard, reads=True) as load:
        reader.start()
        started = time.monotonic()
        next_fault = started + fault_every
        while time.monotonic() - started < seconds:
            time.sleep(0.5)
            report.rss_kb.append(rss_kb(pid))
            if time.monotonic() < next_fault or time.monotonic() - started > seconds - 3:
                continue
            fault = rng.choice(["kill", "stall", "client-kill", "latency", "reset"])
            report.faults[fault] = report.faults.get(fault, 0) + 1
            log(f"  {time.monotonic() - started:5.1f}s fault: {fault}")
            if fault == "kill":
                direct_cluster.primary.stop("immediate")
                time.sleep(rng.uniform(0.2, 1.0))
                direct_cluster.primary.start()
            elif fault == "stall":
                relay.set_mode("stall")
                time.sleep(rng.uniform(0.5, 1.5))
                relay.set_mode("pass")
            elif fault == "reset":  # every connection to the relayed server dropped with an RST
                relay.set_mode("reset")
                time.sleep(rng.uniform(0.1, 0.5))
                relay.set_mode("pass")
            elif fault == "latency":
                relay.set_mode("latency", latency=0.02)
                time.sleep(1.0)
                relay.set_mode("pass")
            else:
                writer = rng.choice(load.writers)
                _client_killed_mid_transaction(proxy.dsn(dbname=dbname), writer.key, doomed)
                doomed -= 1
            next_fault = time.monotonic() + fault_every * rng.uniform(0.5, 1.5)
        stop.set()
    reader.join(10)
    assert not reader.is_alive(), "the scatter reader hung"
    report.acked = load.acked()
    report.failures = len(load.failures())
    report.missing = load.missing(clusters, dbname)
    report.idle_in_transaction = sum(
        server_sessions(c, "state LIKE 'idle in transaction%'") for c in clusters.values())
    ports = {relayed: relay.port, direct: direct_cluster.primary.port}
    deadline = time.monotonic() + 10
    while True:  # goodbyes and discards may take a moment to reach the servers
        report.leaks = {name: (server_sessions(clusters[name], f"datname = '{dbname}'"), pooled(proxy, port))
                        for name, port in ports.items()}
        if all(a == b for a, b in report.leaks.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return report


def rss_growth_kb(samples: list[int]) -> int:
    """Median of the last quarter of the samples minus the median of the second quarter (past warm-up)."""
    q = max(1, len(samples) // 4)
    return int(statistics.median(samples[-q:]) - statistics.median(samples[q:2 * q] or samples))
