"""RESHARD from two shards to three under write load: how fast rows move, how long a write waits at the cut-over,
and whether the rows moved are the share of the key space that changed owner.

Run: python bench/bench_reshard.py [--users N] [--rows-per-user N] [--writers N]

A sandbox of three primary-only servers and one proxy on the first two. The table `events (user_id, id, payload)`
gets users x rows-per-user rows through the proxy's shards; writers (autocommit inserts and updates of random
users, through the proxy) run from before RESHARD until after it ends. Reported: the job's elapsed time and rows
copied per second, the longest acknowledged write while the job ran (the cut-over pause: at most 1 s is the aim),
the rows on the new shard as a share of all rows beside the ring's moved share, and write errors (none expected).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from typing import Any

import psycopg

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox
from shardproxy.ops.admin.socket import request
from shardproxy.routing.ring import Ring, fraction_moved

TABLE = "events"


class Writer(threading.Thread):
    def __init__(self, proxy: ProxyProcess, users: int, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.proxy, self.users, self.stop = proxy, users, stop
        self.random = random.Random(seed)
        self.seed = seed
        self.latencies: list[tuple[float, float]] = []  # (when it was acknowledged, seconds it took)
        self.errors = 0
        self.error = ""  # the last one

    def run(self) -> None:
        with psycopg.connect(self.proxy.dsn(), autocommit=True) as conn:
            ident = 0
            while not self.stop.is_set():
                user = self.random.randrange(1, self.users + 1)
                ident += 1
                began = time.monotonic()
                try:
                    if ident % 2:
                        conn.execute(f"INSERT INTO {TABLE} (user_id, id, payload) VALUES (%s, %s, 'w')",
                                     (user, -(self.seed * 10**9 + ident)))
                    else:
                        conn.execute(f"UPDATE {TABLE} SET payload = payload || '.' WHERE user_id = %s AND id = 1",
                                     (user,))
                except psycopg.Error as exc:
                    self.errors += 1
                    self.error = str(exc)
                    continue
                now = time.monotonic()
                self.latencies.append((now, now - began))


def admin(proxy: ProxyProcess, command: str) -> dict[str, Any]:
    reply = json.loads(request(proxy.admin_socket, command, timeout=30))
    assert reply["ok"], reply
    return dict(zip(reply["columns"], reply["rows"][0])) if reply["rows"] else {}


def watch(proxy: ProxyProcess) -> dict[str, float]:
    """When each phase of the job was first seen, until it ends."""
    seen: dict[str, float] = {}
    while True:
        phase = admin(proxy, "SHOW RESHARD")["phase"]
        seen.setdefault(phase, time.monotonic())
        if phase in ("done", "failed"):
            return seen
        time.sleep(0.02)


def load(clusters: list[Cluster], ring: Ring, users: int, rows: int) -> None:
    for cluster in clusters:
        cluster.primary.sql(f"CREATE TABLE {TABLE} (user_id bigint, id bigint, payload text, "
                            f"PRIMARY KEY (user_id, id)); GRANT ALL ON {TABLE} TO app")
    for cluster in clusters[:2]:
        keys = [user for user in range(1, users + 1) if ring.owner(user) == cluster.name]
        cluster.primary.sql(f"INSERT INTO {TABLE} SELECT k, i, repeat('x', 100) FROM unnest(ARRAY{keys}::bigint[]) k, "
                            f"generate_series(1, {rows}) i")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rows-per-user", type=int, default=10)
    parser.add_argument("--writers", type=int, default=4)
    args = parser.parse_args()
    with Sandbox() as sandbox:
        clusters = [sandbox.cluster(f"bench{i}") for i in range(3)]
        for cluster in clusters:
            cluster.primary.sql("CREATE ROLE resharder LOGIN SUPERUSER PASSWORD 'reshardpw'")
        old = Ring([(c.name, 1) for c in clusters[:2]], 256)
        new = Ring([(c.name, 1) for c in clusters], 256)
        load(clusters, old, args.users, args.rows_per_user)
        proxy = sandbox.proxy("bench", clusters[:2], start=False)
        resharder = {"name": "resharder", "password": "reshardpw", "auth": "scram-sha-256"}
        proxy.write_config({**proxy.config, "users": [*proxy.config["users"], resharder],
                            "reshard": {"user": "resharder"}})
        proxy.start()
        stop = threading.Event()
        writers = [Writer(proxy, args.users, seed, stop) for seed in range(1, args.writers + 1)]
        for writer in writers:
            writer.start()
        time.sleep(2)
        shards = [{"name": c.name, "nodes": [{"host": c.primary.host, "port": c.primary.port}]} for c in clusters]
        proxy.write_config({**proxy.config, "shards": shards})
        began = time.monotonic()
        admin(proxy, "RESHARD")
        phases = watch(proxy)
        ended = time.monotonic()
        time.sleep(1)
        stop.set()
        for writer in writers:
            writer.join()
        report = admin(proxy, "SHOW RESHARD")
        during = [took for writer in writers for at, took in writer.latencies if began <= at <= ended + 1]
        counts = {c.name: c.primary.sql(f"SELECT count(*) FROM {TABLE}")[0][0] for c in clusters}
        proxy.stop()
    total = sum(counts.values())
    print(f"rows: {total} over {args.users} users; writers: {args.writers}")
    print(f"job: {report['phase']} in {report['elapsed']:.2f}s; copied {report['rows_copied']} "
          f"({report['rows_copied'] / report['elapsed']:.0f} rows/s over the whole job), "
          f"streamed {report['rows_streamed']}; error: {report['error']}")
    marks = sorted(phases.items(), key=lambda item: item[1])
    spans = [f"{name} {later - at:.2f}s" for (name, at), (_, later) in zip(marks, marks[1:])]
    print("phases: " + ", ".join(spans))
    print(f"writes during the job: {len(during)}, longest {max(during):.3f}s, "
          f"errors {sum(writer.errors for writer in writers)} {[w.error for w in writers if w.error][:1] or ''}")
    print(f"new shard holds {counts[clusters[2].name] / total:.4f} of the rows; the ring moved "
          f"{fraction_moved(old, new):.4f} of the key space; per shard: {counts}")


if __name__ == "__main__":
    main()
