"""`shardproxy demo`: real PostgreSQL shards with replicas in three regions, and a proxy per region."""

from __future__ import annotations

import signal
import threading

from shardproxy.sandbox import Sandbox, demo_topology

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")
PROXY_REGIONS = REGIONS[:2]
DATABASE = "demo"


def run_demo() -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print("starting PostgreSQL servers...", flush=True)
    with Sandbox() as sandbox:
        clusters = demo_topology(sandbox, shards=2, regions=REGIONS)
        for cluster in clusters:
            cluster.primary.sql(f"CREATE DATABASE {DATABASE} OWNER app")
        for cluster in clusters:
            roles = ", ".join(f"{n.name}@{n.region} :{n.port}" for n in cluster.nodes)
            print(f"  {cluster.name}: {roles}")
        proxies = [sandbox.proxy(region, clusters, region=region) for region in PROXY_REGIONS]
        print("\nproxies (user app, password secret):")
        for proxy in proxies:
            print(f"  {proxy.name}: DATABASE_URL={proxy.dsn(dbname=DATABASE)}")
            print(f"  {' ' * len(proxy.name)}  admin socket {proxy.admin_socket}, config {proxy.config_path}")
        print("\nnote: sharding and regional routing are not built yet: every query goes to shard0's primary.")
        print(f"try: psql {proxies[0].dsn(dbname=DATABASE)}\n\nCtrl-C stops everything.", flush=True)
        stop.wait()
        print("stopping...", flush=True)
    return 0
