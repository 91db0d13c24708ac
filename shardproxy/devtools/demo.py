"""`shardproxy demo`: real PostgreSQL shards with replicas in three regions, and a proxy per region."""

from __future__ import annotations

import signal
import threading

import psycopg

from shardproxy.config import load_config
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, demo_topology
from shardproxy.routing.ring import Ring

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")
PROXY_REGIONS = REGIONS[:2]
DATABASE = "demo"
SAMPLE_USERS = 1000
WHERE_READS_GO = "/* shard_key: {} */ SELECT inet_server_port(), pg_is_in_recovery()"


def run_demo() -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print("starting PostgreSQL servers...", flush=True)
    with Sandbox() as sandbox:
        clusters = demo_topology(sandbox, shards=2, regions=REGIONS)
        for cluster in clusters:
            cluster.primary.sql(f"CREATE DATABASE {DATABASE} OWNER app")
        regions = {name: {"primary": i == 0, "priority": i + 1, "health_check_interval": "1s"}
                   for i, name in enumerate(REGIONS)}
        proxies = [sandbox.proxy(region, clusters, region=region, regions=regions) for region in PROXY_REGIONS]
        _load_sample(proxies[0])
        _show(clusters, proxies)
        print(f"\ntry: psql {proxies[1].dsn(dbname=DATABASE)}\n\nCtrl-C stops everything.", flush=True)
        stop.wait()
        print("stopping...", flush=True)
    return 0


def _load_sample(proxy: ProxyProcess) -> None:
    """A users table, sharded by user_id, written through the proxy."""
    with psycopg.connect(proxy.dsn(dbname=DATABASE), autocommit=True) as conn:
        conn.execute("CREATE TABLE users (user_id bigint PRIMARY KEY, name text)")
        for user in range(1, SAMPLE_USERS + 1):
            conn.execute("INSERT INTO users (user_id, name) VALUES (%s, %s)", (user, f"user {user}"))


def _show(clusters: list[Cluster], proxies: list[ProxyProcess]) -> None:
    print("\nshards (each node: region, port):")
    for cluster in clusters:
        nodes = ", ".join(f"{n.name} {n.region} :{n.port}" for n in cluster.nodes)
        rows = cluster.primary.sql("SELECT count(*) FROM users", dbname=DATABASE)[0][0]
        print(f"  {cluster.name}: {rows} of the {SAMPLE_USERS} sample users; {nodes}")
    ports = {n.port: f"{n.name} ({n.region})" for cluster in clusters for n in cluster.nodes}
    print("\nproxies (user app, password secret):")
    for proxy in proxies:
        print(f"  {proxy.name}: DATABASE_URL={proxy.dsn(dbname=DATABASE)}")
        print(f"    admin socket {proxy.admin_socket}  (shardproxy admin -s {proxy.admin_socket} SHOW NODES)")
        ring = Ring.from_config(load_config(proxy.config_path))
        first_users = {ring.owner(user): user for user in range(SAMPLE_USERS, 0, -1)}  # one user per shard
        with psycopg.connect(proxy.dsn(dbname=DATABASE), autocommit=True) as conn:
            for user in sorted(first_users.values()):
                port, replica = conn.execute(WHERE_READS_GO.format(user)).fetchone()
                kind = "replica" if replica else "primary"
                print(f"    a read for user_id {user} is served by {ports.get(port, port)}, a {kind}")
