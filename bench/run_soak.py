"""The soak, on demand: mixed traffic over two shards for minutes while random faults strike.

    python bench/run_soak.py [--minutes 10] [--seed N] [--clients-per-shard 3] [--fault-every 5]

Starts its own PostgreSQL servers (sandbox), a fault relay in front of the first shard and a proxy. Traffic:
writers (transactions with inserts, reads of their own rows, prepared after five runs) on both shards and a
scatter reader. Faults, at random: the second shard's server killed (-m immediate) and restarted, the first
shard's server stalled, reset or slowed through the relay, a client killed mid-transaction. Then checked:
every acknowledged write present, no server connection idle in transaction, server connections on each
server equal to those SHOW POOLS reports, and memory flat (RSS growth past warm-up). Exit 1 if any fails.
The short form runs in the test suite (tests/test_faults.py::test_soak_short).
"""

from __future__ import annotations

import argparse
import sys
import time

from shardproxy.devtools.faults import Relay
from shardproxy.devtools.sandbox import Sandbox
from shardproxy.devtools.soak import rss_growth_kb, run_soak
from shardproxy.devtools.workload import create_table

DB = "soakdb"
RSS_GROWTH_LIMIT_KB = 20 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--clients-per-shard", type=int, default=3)
    parser.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults, on average")
    args = parser.parse_args()

    with Sandbox() as sandbox:
        clusters = {name: sandbox.cluster(name) for name in ("soak0", "soak1")}
        for cluster in clusters.values():
            cluster.primary.sql(f"CREATE DATABASE {DB} OWNER app")
        create_table(list(clusters.values()), DB)
        first = clusters["soak0"].primary
        with Relay(first.host, first.port) as relay:
            proxy = sandbox.proxy(
                "soak", list(clusters.values()), start=False, sharding={"key": "user_id"},
                pool={"size": 4, "server_connect_timeout": "1s", "query_wait_timeout": "5s"},
                routing={"failover_timeout": "2s"},
            )
            config = proxy.config
            config["shards"][0]["nodes"][0]["port"] = relay.port
            proxy.write_config(config)
            proxy.start()
            print(f"soak: {args.minutes} minutes, seed {args.seed}", flush=True)
            report = run_soak(proxy, relay, clusters, DB, args.minutes * 60, seed=args.seed,
                              per_shard=args.clients_per_shard, fault_every=args.fault_every,
                              log=lambda line: print(line, flush=True))
            alive = proxy.process.poll() is None
            proxy.stop()

    growth = rss_growth_kb(report.rss_kb)
    print(report.summary())
    problems = []
    if not alive:
        problems.append("the proxy died")
    if report.missing:
        problems.append(f"{len(report.missing)} acknowledged writes missing: {report.missing[:10]}")
    if report.idle_in_transaction:
        problems.append(f"{report.idle_in_transaction} server connections idle in transaction")
    problems += [f"{node}: {on_server} server connections, {in_pools} in SHOW POOLS"
                 for node, (on_server, in_pools) in report.leaks.items() if on_server != in_pools]
    if growth > RSS_GROWTH_LIMIT_KB:
        problems.append(f"RSS grew {growth} kB past warm-up")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    print("soak: ok" if not problems else "soak: failed", f"(RSS growth past warm-up {growth} kB)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
