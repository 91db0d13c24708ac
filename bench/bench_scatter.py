"""A big read on every shard, streamed: what it costs the proxy and what other clients see meanwhile.

    python bench/bench_scatter.py [--rows N] [--repeat R]

Starts its own servers (sandbox): two shards holding N rows between them (half each) behind a shardproxy, and one
server holding all N, read directly for comparison. For each query (a concatenation, and an ORDER BY that the
proxy merges k-way) a psycopg client streams every row (`cursor.stream`) while a second client runs keyed point
queries, one every 5 ms, through the same path. Reported per target, medians over the repetitions: rows/s of the
big read, the proxy's RSS growth over idle during it (sampled /proc/PID/status VmRSS), and the point queries'
p50/p99 latency.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import psycopg

from shardproxy.config import load_config
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox
from shardproxy.devtools.workload import rss_kb
from shardproxy.routing.ring import Ring

DB = "bench"
QUERIES = {
    "concatenation": "SELECT user_id, payload FROM big",
    "ORDER BY": "SELECT user_id, payload FROM big ORDER BY user_id",
}


def load(cluster: Cluster, rows: int, where: str) -> None:
    cluster.primary.sql(f"CREATE DATABASE {DB} OWNER app")
    cluster.primary.sql(f"CREATE TABLE big (user_id bigint NOT NULL, payload text);"
                        f"INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {rows}) g {where};"
                        "CREATE INDEX ON big (user_id); ANALYZE big; GRANT SELECT ON big TO app", dbname=DB)


class Sampler(threading.Thread):
    """The peak of a process's RSS while it runs."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_kb(pid) if pid else 0
        self.stop = threading.Event()

    def run(self) -> None:
        while self.pid and not self.stop.wait(0.05):
            self.peak = max(self.peak, rss_kb(self.pid))


def point_queries(dsn: str, keys: list[int], done: threading.Event) -> list[float]:
    """Latencies of keyed queries, one every 5 ms, until done."""
    latencies = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not done.is_set():
            key = keys[len(latencies) % len(keys)]
            started = time.perf_counter()
            conn.execute("SELECT payload FROM big WHERE user_id = %s", (key,)).fetchone()
            latencies.append(time.perf_counter() - started)
            time.sleep(0.005)
    return latencies


def measure(dsn: str, query: str, pid: int | None, keys: list[int]) -> dict[str, float]:
    done = threading.Event()
    result: list[list[float]] = []
    other = threading.Thread(target=lambda: result.append(point_queries(dsn, keys, done)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM big WHERE user_id < 10")
        idle = rss_kb(pid) if pid else 0
        sampler = Sampler(pid)
        sampler.start()
        other.start()
        started = time.perf_counter()
        rows = sum(1 for _ in conn.cursor().stream(query))
        seconds = time.perf_counter() - started
        done.set()
        sampler.stop.set()
    other.join()
    latencies = sorted(result[0])
    return {"rows/s": rows / seconds, "RSS growth MB": (sampler.peak - idle) / 1024 if pid else float("nan"),
            "p50 ms": statistics.median(latencies) * 1000, "p99 ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "points": len(latencies)}


def stored(keys: Callable[[int], bool], count: int = 2000) -> list[int]:
    return [key for key in range(1, 200_000) if keys(key)][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with Sandbox() as sandbox:
        shards = [sandbox.cluster(f"scatter{i}") for i in range(2)]
        for i, cluster in enumerate(shards):
            load(cluster, args.rows, f"WHERE g % 2 = {i}")
        single = sandbox.cluster("single")
        load(single, args.rows, "")
        proxy: ProxyProcess = sandbox.proxy("scatter", shards, pool={"size": 4})
        assert proxy.process is not None
        ring = Ring.from_config(load_config(proxy.config_path))  # point queries use keys their owner holds
        names = [cluster.name for cluster in shards]
        proxied_keys = stored(lambda key: ring.owner(key) == names[key % 2])
        targets = {"shardproxy (2 shards)": (proxy.dsn(dbname=DB), proxy.process.pid, proxied_keys),
                   "direct (1 server)": (single.primary.dsn(user="app", dbname=DB), None, stored(lambda _: True))}
        print(f"{args.rows} rows, {args.repeat} repetitions, medians")
        print(f"{'query':<14} {'target':<22} {'rows/s':>10} {'RSS growth MB':>14} {'p50 ms':>8} {'p99 ms':>8}")
        for label, query in QUERIES.items():
            for target, (dsn, pid, keys) in targets.items():
                runs = [measure(dsn, query, pid, keys) for _ in range(args.repeat)]
                med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
                print(f"{label:<14} {target:<22} {med['rows/s']:>10,.0f} {med['RSS growth MB']:>14.1f} "
                      f"{med['p50 ms']:>8.1f} {med['p99 ms']:>8.1f}")


if __name__ == "__main__":
    main()
