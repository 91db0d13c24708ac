"""A checked workload for fault tests and the soak: clients that record every write the proxy acknowledged,
plus the checks run afterwards (acknowledged writes present, no leaked or stuck server connections).
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Self

import psycopg

from shardproxy.devtools.sandbox import Cluster, ProxyProcess
from shardproxy.routing.ring import Ring

TABLE = "fault_writes"
_runs = itertools.count(1)
HEALTH_CHECK_APP = "shardproxy health check"


def create_table(clusters: list[Cluster], dbname: str) -> None:
    for cluster in clusters:
        cluster.primary.sql(
            f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (user_id bigint, id bigint PRIMARY KEY, v text);"
            f" GRANT ALL ON {TABLE} TO app", dbname=dbname)


def keys_by_shard(proxy: ProxyProcess, count: int) -> dict[str, list[int]]:
    """`count` keys owned by each shard, under the proxy's own ring."""
    shards = proxy.config["shards"]
    ring = Ring([(shard["name"], shard.get("weight", 1)) for shard in shards],
                proxy.config.get("sharding", {}).get("virtual_nodes", 256))
    found: dict[str, list[int]] = {shard["name"]: [] for shard in shards}
    key = 0
    while any(len(keys) < count for keys in found.values()):
        key += 1
        owner = found[ring.owner(key)]
        if len(owner) < count:
            owner.append(key)
    return found


@dataclass
class Failure:
    started: float
    ended: float
    phase: str  # connect, insert, read, commit
    sqlstate: str | None
    text: str


@dataclass
class Writer:
    """One client: transactions that insert a row with a unique id under its key, and sometimes read it back."""

    dsn: str
    key: int
    shard: str
    base: int  # ids are base + 1, base + 2, ...
    reads: bool = False
    acked: list[int] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    conn: psycopg.Connection | None = None
    done: bool = False

    def run(self, stop: threading.Event) -> None:
        n = 0
        rng = random.Random(self.base)
        while not stop.is_set():
            started = time.monotonic()
            phase = "connect"
            try:
                if self.conn is None:
                    self.conn = psycopg.connect(self.dsn, connect_timeout=3)
                conn = self.conn
                n += 1
                row_id = self.base + n
                phase = "insert"
                conn.execute(f"INSERT INTO {TABLE} (user_id, id, v) VALUES (%s, %s, pg_sleep(0.005)::text)",
                             (self.key, row_id))
                if self.reads and rng.random() < 0.5:
                    phase = "read"
                    got = conn.execute(f"SELECT id FROM {TABLE} WHERE user_id = %s AND id = %s",
                                       (self.key, row_id)).fetchone()
                    assert got == (row_id,), got
                phase = "commit"
                conn.commit()
                self.acked.append(row_id)
                self.successes.append(time.monotonic())
            except psycopg.Error as exc:
                self.failures.append(Failure(started, time.monotonic(), phase, exc.sqlstate, str(exc)[:200]))
                self.drop()
                time.sleep(0.05)
        self.drop()
        self.done = True

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with suppress(psycopg.Error, OSError):
                conn.close()


class Workload:
    """Writers on every shard, each in its own thread."""

    def __init__(self, proxy: ProxyProcess, dbname: str, per_shard: int = 3, reads: bool = False) -> None:
        keys = keys_by_shard(proxy, per_shard)
        run = next(_runs)  # ids stay unique across the workloads of one process, hence one table
        pairs = [(shard, key) for shard, shard_keys in sorted(keys.items()) for key in shard_keys]
        self.writers = [Writer(proxy.dsn(dbname=dbname), key, shard, base=(run * 1000 + i) * 10_000_000, reads=reads)
                        for i, (shard, key) in enumerate(pairs)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=w.run, args=(self.stop,), daemon=True) for w in self.writers]

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self, timeout: float = 15) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        hung = [w.key for w, t in zip(self.writers, self.threads) if t.is_alive()]
        assert not hung, f"clients of keys {hung} hung"

    def of(self, shard: str) -> list[Writer]:
        return [w for w in self.writers if w.shard == shard]

    def successes_after(self, t: float, shard: str | None = None) -> int:
        return min(sum(s > t for s in w.successes) for w in self.writers if shard is None or w.shard == shard)

    def failures(self, shard: str | None = None) -> list[Failure]:
        return [f for w in self.writers if shard is None or w.shard == shard for f in w.failures]

    def acked(self) -> int:
        return sum(len(w.acked) for w in self.writers)

    def missing(self, clusters: dict[str, Cluster], dbname: str) -> list[int]:
        """Acknowledged ids that are not on the shard that owns their key."""
        lost = []
        for shard, cluster in clusters.items():
            present = {row[0] for row in cluster.primary.sql(f"SELECT id FROM {TABLE}", dbname=dbname)}
            lost += [row_id for w in self.of(shard) for row_id in w.acked if row_id not in present]
        return lost


def admin(proxy: ProxyProcess, command: str) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(proxy.admin_socket)
        sock.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    assert reply["ok"], reply
    return [dict(zip(reply["columns"], row)) for row in reply["rows"]]


def server_sessions(cluster: Cluster, where: str = "true") -> int:
    return cluster.primary.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'"
        f" AND application_name <> '{HEALTH_CHECK_APP}' AND pid <> pg_backend_pid() AND {where}")[0][0]


def pooled(proxy: ProxyProcess, node_port: int) -> int:
    """Server connections the proxy says it holds to that node (active + idle)."""
    return sum(row["sv_active"] + row["sv_idle"] for row in admin(proxy, "SHOW POOLS")
               if str(row["node"]).endswith(f":{node_port}"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
