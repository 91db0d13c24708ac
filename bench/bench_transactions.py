"""What a transaction across shards costs, on demand:

    python bench/bench_transactions.py [--seconds 10] [--clients 16] [--accounts 1000]

Starts two shards and one unsharded server (sandbox) and a proxy over the shards, with the same accounts on both
sides. Prints:
- commit latency at one client: two UPDATEs and a COMMIT (psycopg's default mode) with both rows on one shard
  (a plain commit) and with one row on each shard (two-phase), through the proxy, and the same two UPDATEs
  against the unsharded server; the target: two shards at most 2.5x one shard. Measured twice, with the
  processes placed on CPUs two ways: the proxy on a CPU of its own, the servers and the client on the others (as
  deployed: the rounds of a commit wait on the servers, on the shards in parallel); and every process on one
  CPU (what a transaction costs in CPU, every process's work one after another);
- transfers per second with `--clients` clients, between random accounts (half of them across shards through
  the proxy), each transfer two UPDATEs in key order and a COMMIT, beside the same transfers against the unsharded
  server; and the deadlocks (40P01) and other errors seen.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time

import psycopg

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox
from shardproxy.devtools.workload import keys_by_shard

DB = "benchtx"
TRANSFER = "UPDATE accounts SET balance = balance + %s WHERE user_id = %s"


def setup(clusters: list[Cluster]) -> None:
    for cluster in clusters:
        cluster.primary.sql(f"CREATE DATABASE {DB} OWNER app")
        cluster.primary.sql("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance bigint NOT NULL)", dbname=DB)
        cluster.primary.sql("ALTER TABLE accounts OWNER TO app", dbname=DB)


def fill(dsn: str, keys: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.executemany("INSERT INTO accounts (user_id, balance) VALUES (%s, 1000)", [(key,) for key in keys])


def commit_latency(dsn: str, pairs: list[tuple[int, int]], rounds: int) -> float:
    """Median ms of one transaction of two UPDATEs and a COMMIT, over `rounds` of them cycling through pairs."""
    times = []
    with psycopg.connect(dsn) as conn:
        for i in range(rounds):
            a, b = pairs[i % len(pairs)]
            started = time.perf_counter()
            conn.execute(TRANSFER, (-1, a))
            conn.execute(TRANSFER, (1, b))
            conn.commit()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def transfers(dsn: str, keys: list[int], clients: int, seconds: float) -> tuple[float, int, int]:
    """Transfers per second with `clients` threads for `seconds`, and the deadlocks and other errors seen."""
    done = [0] * clients
    deadlocks = [0] * clients
    errors = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        with psycopg.connect(dsn) as conn:
            while time.monotonic() < stop:
                a, b = sorted(rng.sample(keys, 2))  # in key order, as an application avoids deadlocks
                try:
                    conn.execute(TRANSFER, (-1, a))
                    conn.execute(TRANSFER, (1, b))
                    conn.commit()
                    done[i] += 1
                except psycopg.errors.DeadlockDetected:
                    conn.rollback()
                    deadlocks[i] += 1
                except psycopg.Error:
                    conn.rollback()
                    errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started), sum(deadlocks), sum(errors)


def pin(proxy: ProxyProcess, clusters: list[Cluster], proxy_cpus: set[int], other_cpus: set[int]) -> None:
    """Pin the proxy to proxy_cpus, and the servers and this process (the client) to other_cpus."""
    for pid in [pid for cluster in clusters for node in cluster.nodes for pid in node.pids()]:
        os.sched_setaffinity(pid, other_cpus)
    os.sched_setaffinity(proxy.process.pid, proxy_cpus)
    os.sched_setaffinity(0, other_cpus)


def placements(cpus: set[int]) -> list[tuple[str, set[int], set[int]]]:
    """How commit latency is measured: (what it says, the proxy's CPUs, the others')."""
    last = max(cpus)
    own = [(f"the proxy on CPU {last}, the servers and the client on the others", {last}, cpus - {last})]
    return (own if len(cpus) > 1 else []) + [(f"every process on CPU {last}", {last}, {last})]


def total(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2000, help="transactions per latency measurement")
    args = parser.parse_args()
    with Sandbox() as sandbox:
        shards = [sandbox.cluster(f"benchtx{i}") for i in range(2)]
        single = sandbox.cluster("benchtx-single")
        setup([*shards, single])
        proxy: ProxyProcess = sandbox.proxy("benchtx", shards, pool={"size": args.clients},
                                            log={"level": "warning"})
        through, direct = proxy.dsn(dbname=DB), single.primary.dsn("app", "secret", DB)
        owned = keys_by_shard(proxy, args.accounts // 2)
        first, second = (owned[cluster.name] for cluster in shards)
        keys = first + second
        fill(through, keys)
        fill(direct, keys)
        one_shard = list(zip(first[::2], first[1::2]))
        two_shards = list(zip(first, second))
        for dsn in (through, direct):  # warm-up: connections, plans
            commit_latency(dsn, two_shards, 200)
        print(f"commit latency, 1 client, median of {args.rounds} transactions (2 UPDATEs + COMMIT):")
        cpus = os.sched_getaffinity(0)
        for placement, proxy_cpus, other_cpus in placements(cpus):
            pin(proxy, [*shards, single], proxy_cpus, other_cpus)
            print(f" {placement}:")
            one = commit_latency(through, one_shard, args.rounds)
            two = commit_latency(through, two_shards, args.rounds)
            plain = commit_latency(direct, two_shards, args.rounds)
            print(f"  unsharded server direct       {plain:7.3f} ms")
            print(f"  proxy, both rows on one shard {one:7.3f} ms")
            print(f"  proxy, one row on each shard  {two:7.3f} ms  ({two / one:.2f}x one shard; target <= 2.5x)")
        pin(proxy, [*shards, single], cpus, cpus)
        before = total(through), total(direct)
        tps_proxy, deadlocks_proxy, errors_proxy = transfers(through, keys, args.clients, args.seconds)
        tps_direct, deadlocks_direct, errors_direct = transfers(direct, keys, args.clients, args.seconds)
        print(f"transfers between random accounts, {args.clients} clients, {args.seconds:g}s each:")
        print(f"  unsharded server direct {tps_direct:8.0f}/s  deadlocks {deadlocks_direct}, errors {errors_direct}")
        print(f"  proxy over 2 shards     {tps_proxy:8.0f}/s  deadlocks {deadlocks_proxy}, errors {errors_proxy}"
              f"  ({tps_proxy / tps_direct:.2f}x direct)")
        after = total(through), total(direct)
        print(f"  balances unchanged: proxy {before[0] == after[0]}, direct {before[1] == after[1]}")
        proxy.stop()


if __name__ == "__main__":
    main()
