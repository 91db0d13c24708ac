"""`shardproxy demo`: real PostgreSQL shards with replicas in three regions, and a proxy per region.

What it prints is a newcomer's tour: each region's DATABASE_URL, where that proxy's reads go (and why), and the
two operator interfaces of each proxy: the admin database over psql and the Prometheus metrics address. A spare
shard waits outside the ring, with each proxy's config file with it written beside the running one, so that
RESHARD can be tried (the README walks through it): the proxies are each other's fleet.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading

import psycopg
import yaml

from shardproxy.config import AdminSettings, load_config
from shardproxy.devtools.sandbox import LOOPBACK, Cluster, ProxyProcess, Sandbox, User, demo_topology
from shardproxy.routing.ring import Ring

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")
DATABASE = "demo"
SAMPLE_USERS = 1000
SPARE = "shard2"  # started, in no proxy's ring until RESHARD
WITH_SPARE = ".with-shard2"  # the suffix of each proxy's config file with the spare shard added
WHERE_READS_GO = "/* shard_key: {} */ SELECT inet_server_port(), pg_is_in_recovery()"
READS = f"""
Reads stay in a proxy's region: on a replica there, else on the primary if it is there ({REGIONS[0]} holds the
primaries and no replica, so its proxy reads from them); only when its region has no node that can serve do they
go to the other regions by priority. Writes always go to the shard's primary."""


def run_demo() -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print("starting PostgreSQL servers...", flush=True)
    with Sandbox() as sandbox:
        clusters = demo_topology(sandbox, shards=2, regions=REGIONS)
        spare = sandbox.cluster(SPARE, regions=REGIONS[:1])
        for cluster in clusters:
            cluster.primary.sql(f"CREATE DATABASE {DATABASE} OWNER app")
        for cluster in [*clusters, spare]:  # RESHARD logs in as app, the tables' owner: it needs a slot on each
            cluster.primary.sql("ALTER ROLE app REPLICATION")
        regions = {name: {"primary": i == 0, "priority": i + 1, "health_check_interval": "1s"}
                   for i, name in enumerate(REGIONS)}
        proxies = [sandbox.proxy(region, clusters, start=False, region=region, regions=regions,
                                 metrics={"host": LOOPBACK, "port": sandbox.free_port()}, reshard={"user": "app"})
                   for region in REGIONS]
        admin = next(user for user in sandbox.users if user.name in proxies[0].config["admin_users"])
        for proxy in proxies:
            admin_dbs = [other.dsn(admin.name, admin.password, AdminSettings().database) for other in proxies]
            proxy.write_config({**proxy.config, "fleet": [dsn for other, dsn in zip(proxies, admin_dbs)
                                                          if other is not proxy]})
            _write_with_spare(proxy, spare)
            proxy.start()
        _load_sample(proxies[0])
        _show(clusters, proxies, admin)
        _show_spare(spare, proxies, admin)
        print(f"\ntry: psql {proxies[1].dsn(dbname=DATABASE)}\n\nCtrl-C stops everything.", flush=True)
        stop.wait()
        print("stopping...", flush=True)
    return 0


def _write_with_spare(proxy: ProxyProcess, spare: Cluster) -> None:
    node = spare.primary
    shard = {"name": spare.name, "nodes": [{"host": node.host, "port": node.port, "region": node.region}]}
    with open(proxy.config_path + WITH_SPARE, "w") as f:
        yaml.safe_dump({**proxy.config, "shards": [*proxy.config["shards"], shard]}, f, sort_keys=False)


def _show_spare(spare: Cluster, proxies: list[ProxyProcess], admin: User) -> None:
    node = spare.primary
    configs = shlex.quote(os.path.dirname(proxies[0].config_path))
    admin_db = proxies[0].dsn(admin.name, admin.password, AdminSettings().database)
    print(f"\nspare shard, in no ring yet: {spare.name} {node.region} :{node.port}; to move a third of the users "
          f"onto it while clients work:")
    print(f'    for f in {configs}/*.yaml{WITH_SPARE}; do cp "$f" "${{f%{WITH_SPARE}}}"; done')
    print(f"    psql {admin_db} -c RESHARD -c 'SHOW RESHARD'")


def _load_sample(proxy: ProxyProcess) -> None:
    """A users table, sharded by user_id, written through the proxy."""
    with psycopg.connect(proxy.dsn(dbname=DATABASE), autocommit=True) as conn:
        conn.execute("CREATE TABLE users (user_id bigint PRIMARY KEY, name text)")
        for user in range(1, SAMPLE_USERS + 1):
            conn.execute("INSERT INTO users (user_id, name) VALUES (%s, %s)", (user, f"user {user}"))


def _show(clusters: list[Cluster], proxies: list[ProxyProcess], admin: User) -> None:
    print("\nshards (each node: region, port):")
    for cluster in clusters:
        nodes = ", ".join(f"{n.name} {n.region} :{n.port}" for n in cluster.nodes)
        rows = cluster.primary.sql("SELECT count(*) FROM users", dbname=DATABASE)[0][0]
        print(f"  {cluster.name}: {rows} of the {SAMPLE_USERS} sample users; {nodes}")
    ports = {n.port: f"{n.name} ({n.region})" for cluster in clusters for n in cluster.nodes}
    print("\nproxies, one per region (user app, password secret):")
    for proxy in proxies:
        print(f"  {proxy.name}: DATABASE_URL={proxy.dsn(dbname=DATABASE)}")
        ring = Ring.from_config(load_config(proxy.config_path))
        first_users = {ring.owner(user): user for user in range(SAMPLE_USERS, 0, -1)}  # one user per shard
        with psycopg.connect(proxy.dsn(dbname=DATABASE), autocommit=True) as conn:
            for user in sorted(first_users.values()):
                port, replica = conn.execute(WHERE_READS_GO.format(user)).fetchone()
                kind = "replica" if replica else "primary"
                print(f"    a read for user_id {user} is served by {ports.get(port, port)}, a {kind}")
        admin_db = proxy.dsn(admin.name, admin.password, AdminSettings().database)
        print(f"    admin database: psql {admin_db} -c {shlex.quote('SHOW POOLS')}")
        print(f"    admin socket:   shardproxy admin -s {proxy.admin_socket} SHOW NODES")
        metrics = proxy.config["metrics"]
        print(f"    metrics:        http://{metrics['host']}:{metrics['port']}/metrics")
    print(READS)
