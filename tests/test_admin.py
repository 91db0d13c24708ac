"""Operations: the admin socket, `shardproxy admin`, the admin database over psql, and /metrics.

Real proxy daemons: one in front of the session's single server carries the client traffic, another in front
of a primary and a replica shows nodes, roles and lag. Tests that change the config, or stop the daemon, run
their own proxy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardproxy.devtools.sandbox import LOOPBACK, Cluster, Node, ProxyProcess, Sandbox, SandboxError, wait_until
from tests.support.admin import admin, table
from tests.support.ring import owner

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "conf" / "grafana" / "shardproxy.json"
# Every metric of the contract, with the labels each of its series must carry.
CONTRACT_METRICS = {
    "shardproxy_client_connections": {"state"},
    "shardproxy_server_connections": {"shard", "node", "role", "state"},
    "shardproxy_queries_total": {"shard", "role", "kind"},
    "shardproxy_query_duration_seconds": {"shard", "role"},
    "shardproxy_pool_wait_seconds": set(),
    "shardproxy_errors_total": {"kind"},
    "shardproxy_node_up": {"shard", "node", "role", "region"},
    "shardproxy_replica_lag_seconds": {"shard", "node", "region"},
    "shardproxy_replica_lag_bytes": {"shard", "node", "region"},
    "shardproxy_failovers_total": {"shard"},
}


# -- helpers ------------------------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardproxy", "admin", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, check=False)


def psql(proxy: ProxyProcess, user: str, password: str, sql: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    command = ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", "shardproxy", "-c", sql]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=30, check=False)


def scrape(proxy: ProxyProcess) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{proxy.config['metrics']['port']}/metrics", timeout=10) as reply:
        return reply.read().decode()


def families(*texts: str) -> dict[str, list[Any]]:
    """Each metric family's samples, from one or more scrapes."""
    found: dict[str, list[Any]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            found.setdefault(family.name, []).extend(family.samples)
    return found


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry these labels."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def client_ids(proxy: ProxyProcess) -> set[int]:
    return {row["id"] for row in table(proxy, "SHOW CLIENTS")}


def address(node: Node) -> str:
    return f"{node.host}:{node.port}"


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proxy(sandbox: Sandbox, pg: Cluster) -> ProxyProcess:
    """This module's own proxy (not the shared one): metrics on, and a pool PAUSE may empty."""
    return sandbox.proxy("admin", [pg], pool={"size": 2, "query_wait_timeout": "10s"},
                         metrics={"host": LOOPBACK, "port": sandbox.free_port()})


@pytest.fixture(scope="module")
def replicas(sandbox: Sandbox) -> Cluster:
    """A primary and a replica in another region, so that nodes and lag have something to show."""
    return sandbox.cluster("adm", replicas=1, regions=["r1", "r2"])


@pytest.fixture(scope="module")
def replicated(sandbox: Sandbox, replicas: Cluster) -> ProxyProcess:
    return sandbox.proxy("replicated", [replicas], metrics={"host": LOOPBACK, "port": sandbox.free_port()})


# -- the admin socket ---------------------------------------------------------------------------------------
def test_the_socket_directory_is_made_private(sandbox: Sandbox, pg: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "run" / "shardproxy" / "admin.sock"
    proxy = sandbox.proxy("admin-private-dir", [pg], admin={"socket": str(path)})
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        proxy.stop()


@pytest.mark.parametrize("problem", ["writable by other users", "belongs to another user"])
def test_a_socket_directory_others_could_take_names_in_is_refused(sandbox: Sandbox, pg: Cluster, tmp_path: Path,
                                                                  problem: str) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    if problem.startswith("writable"):
        directory.chmod(0o777)
    elif os.geteuid() == 0:
        os.chown(directory, 65534, 65534)
    else:
        pytest.skip("only root can give a directory to another user")
    proxy = sandbox.proxy("admin-shared-dir", [pg], start=False, admin={"socket": str(directory / "admin.sock")})
    with pytest.raises(SandboxError, match=problem):
        proxy.start(timeout=5)
    assert not (directory / "admin.sock").exists()


def test_socket_is_private_and_serves_many_commands_per_connection(proxy: ProxyProcess, pg: Cluster) -> None:
    mode = os.stat(proxy.admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    commands = ["show pools", "SHOW NODES", "Show Shards", "SHOW CLIENTS", "SHOW SERVERS", "SHOW STATS",
                "SHOW CONFIG", "SHOW VERSION", "HELP", "route 42", "FROBNICATE", "KILL", ""]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(proxy.admin_socket)
        sock.sendall("".join(f"{command}\n" for command in commands).encode())  # all at once: one per line
        with sock.makefile("rb") as lines:
            replies = [json.loads(lines.readline()) for _ in commands[:-1]]  # blank lines get no answer
    by_command = dict(zip(commands, replies))
    assert by_command["show pools"]["columns"] == [
        "database", "user", "shard", "node", "role", "region", "cl_active", "cl_waiting", "sv_active", "sv_idle",
        "sv_used", "sv_login", "maxwait"]
    assert by_command["SHOW NODES"]["columns"] == [
        "shard", "host", "port", "region", "role", "state", "lag_bytes", "lag_seconds", "last_check", "last_error"]
    assert [row[:3] for row in by_command["SHOW NODES"]["rows"]] == [[pg.name, pg.primary.host, pg.primary.port]]
    assert by_command["Show Shards"]["columns"] == ["name", "weight", "ring_share", "primary", "replicas"]
    assert by_command["Show Shards"]["rows"] == [[pg.name, 1, 1.0, address(pg.primary), ""]]
    assert by_command["SHOW CLIENTS"]["columns"][:5] == ["id", "user", "database", "address", "state"]
    assert by_command["SHOW SERVERS"]["columns"][:6] == ["node", "user", "database", "state", "pid", "client"]
    assert "total_xact_count" in by_command["SHOW STATS"]["columns"]
    config = dict(by_command["SHOW CONFIG"]["rows"])
    assert config["pool.size"] == 2 and config["shards[0].name"] == pg.name
    assert {config["users[0].password"], config["users[2].password"]} == {"***"}
    assert not {"secret", "adminpw", "md5secret"} & {str(value) for value in config.values()}
    assert by_command["SHOW VERSION"]["rows"][0][0].startswith("shardproxy ")
    assert ["ROUTE <key>", "the shard, read node and write node a key goes to now"] in by_command["HELP"]["rows"]
    assert by_command["route 42"]["columns"] == ["key", "shard", "read_node", "write_node"]
    assert by_command["route 42"]["rows"] == [["42", pg.name, address(pg.primary), address(pg.primary)]]
    assert by_command["FROBNICATE"] == {"ok": False, "error": "unknown command 'FROBNICATE'; type HELP for the list "
                                                              "of commands"}
    assert by_command["KILL"] == {"ok": False, "error": "usage: KILL <id>"}


def test_clients_servers_pools_and_stats_follow_a_transaction(proxy: ProxyProcess, pg: Cluster) -> None:
    before = client_ids(proxy)
    with psycopg.connect(proxy.dsn()) as conn:
        backend_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # the transaction stays open
        [me] = client_ids(proxy) - before
        clients = {row["id"]: row for row in table(proxy, "SHOW CLIENTS")}
        assert clients[me]["state"] == "active" and clients[me]["user"] == "app"
        [server] = [row for row in table(proxy, "SHOW SERVERS") if row["pid"] == backend_pid]
        assert server["state"] == "active" and server["client"] == me and server["node"] == clients[me]["server"]
        [pool] = [row for row in table(proxy, "SHOW POOLS") if row["node"] == server["node"]
                  and row["database"] == "postgres" and row["user"] == "app"]
        assert pool["sv_active"] == 1 and pool["cl_active"] >= 1 and pool["shard"] == pg.name
        stats = {row["node"]: row for row in table(proxy, "SHOW STATS") if row["database"] == "postgres"}
        conn.commit()
        assert wait_until(lambda: {row["id"]: row for row in table(proxy, "SHOW CLIENTS")}[me]["state"] == "idle")
    after = {row["node"]: row for row in table(proxy, "SHOW STATS") if row["database"] == "postgres"}
    node = server["node"]
    assert after[node]["total_xact_count"] == stats[node]["total_xact_count"] + 1
    assert after[node]["total_xact_time"] > stats[node]["total_xact_time"]


def test_pause_waits_for_running_transactions_and_holds_new_ones_until_resume(proxy: ProxyProcess, pg: Cluster) -> None:
    assert admin(proxy, "RESUME")["error"] == "not paused"
    assert "unknown shard 'nope'" in admin(proxy, "PAUSE nope")["error"]
    with psycopg.connect(proxy.dsn()) as running, psycopg.connect(proxy.dsn(), autocommit=True) as held:
        running.execute("SELECT 1")  # a transaction in progress
        paused: list[dict[str, Any]] = []
        pausing = threading.Thread(target=lambda: paused.append(admin(proxy, f"PAUSE {pg.name}")))
        pausing.start()
        time.sleep(0.3)
        assert not paused  # PAUSE answers once running transactions have ended
        running.commit()
        pausing.join(5)
        assert paused == [{"ok": True, "columns": [], "rows": []}]
        assert not table(proxy, "SHOW SERVERS")  # idle connections closed
        answers: list[int] = []
        query = threading.Thread(target=lambda: answers.append(held.execute("SELECT 42").fetchone()[0]))
        query.start()
        assert wait_until(lambda: sum(row["cl_waiting"] for row in table(proxy, "SHOW POOLS")) == 1)
        assert not answers
        assert admin(proxy, "RESUME")["ok"]
        query.join(5)
        assert answers == [42]


def test_kill_closes_that_client_only(proxy: ProxyProcess) -> None:
    before = client_ids(proxy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as victim, \
            psycopg.connect(proxy.dsn(), autocommit=True) as bystander:
        victim.execute("SELECT 1")
        bystander.execute("SELECT 1")
        victim_id = min(client_ids(proxy) - before)  # the first to connect got the lower id
        assert admin(proxy, f"KILL {victim_id}")["ok"]
        with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 2").fetchone() == (2,)
        assert victim_id not in client_ids(proxy)
    assert admin(proxy, f"KILL {victim_id}") == {"ok": False, "error": f"no client with id '{victim_id}'; "
                                                                       "see SHOW CLIENTS"}


def test_nodes_shards_and_route_with_a_replica(replicated: ProxyProcess, replicas: Cluster) -> None:
    nodes = {row["port"]: row for row in table(replicated, "SHOW NODES")}
    assert set(nodes) == {node.port for node in replicas.nodes}
    assert nodes[replicas.primary.port]["region"] == "r1" and nodes[replicas.replicas[0].port]["region"] == "r2"
    [shard] = table(replicated, "SHOW SHARDS")
    assert shard["name"] == replicas.name and shard["primary"] == address(replicas.primary)
    [route] = table(replicated, "ROUTE 42")
    assert route["shard"] == replicas.name and route["write_node"] == address(replicas.primary)
    assert route["read_node"] in {address(node) for node in replicas.nodes}


def test_ban_and_unban(replicated: ProxyProcess, replicas: Cluster) -> None:
    replica = address(replicas.replicas[0])
    assert not admin(replicated, "BAN 10.9.9.9:1")["ok"]
    reply = admin(replicated, f"BAN {replica}")
    if not reply["ok"]:  # a proxy without health checks has no topology to ban a node in
        assert reply["error"].startswith("not available yet")
        return
    try:
        banned = {row["state"] for row in table(replicated, "SHOW NODES") if row["port"] == replicas.replicas[0].port}
        assert banned == {"banned"}
    finally:
        assert admin(replicated, f"UNBAN {replica}")["ok"]
    assert "banned" not in {row["state"] for row in table(replicated, "SHOW NODES")}


# -- the command line ---------------------------------------------------------------------------------------
def test_cli_table_json_and_exit_codes(proxy: ProxyProcess, pg: Cluster, tmp_path: Path) -> None:
    done = cli("-s", proxy.admin_socket, "SHOW", "VERSION")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].rstrip() == "version"
    assert set(done.stdout.splitlines()[1]) == {"-"}
    assert done.stdout.splitlines()[2].startswith("shardproxy ")
    done = cli("-c", proxy.config_path, "--json", "show", "shards")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"][0][0] == pg.name
    done = cli("-s", proxy.admin_socket, "SHOW", "NOTHING")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "shardproxy: unknown command 'SHOW NOTHING'; type HELP for the list of commands\n"
    missing = str(tmp_path / "none.sock")
    done = cli("-s", missing, "SHOW", "POOLS")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and missing in done.stderr


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardproxy", "check", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, check=False)


def test_health_checks_that_cannot_log_in_say_why(sandbox: Sandbox, replicas: Cluster) -> None:
    """The health checks' user (the first admin user) is missing on the servers: the log, SHOW NODES and
    `shardproxy check --connect` say why every node stays down, and the nodes come up once it exists."""
    users = [{"name": "app", "password": "secret"}, {"name": "monitor", "password": "monitorpw"}]
    fast = {"health_check_interval": "200ms"}
    proxy = sandbox.proxy("monitor", [replicas], start=False,
                          regions={"r1": {"primary": True, "priority": 1, **fast}, "r2": {"priority": 2, **fast}})
    proxy.write_config({**proxy.config, "users": users, "admin_users": ["monitor"]})
    proxy.start()
    refused = 'password authentication failed for user "monitor" (SQLSTATE 28P01)'
    assert {(row["role"], row["state"], row["last_error"]) for row in table(proxy, "SHOW NODES")} == {
        ("unknown", "down", refused)}
    time.sleep(1)  # a few more checks fail the same way: said once per node
    for node in replicas.nodes:
        assert proxy.log().count(f"health check of {address(node)} as user monitor failed: {refused}") == 1
    done = check("-c", proxy.config_path, "--connect")
    assert done.returncode == 1, done.stdout + done.stderr
    for node in replicas.nodes:
        assert f"{address(node)} ({node.region}): the health check as user monitor failed: {refused}" in done.stderr
    replicas.primary.sql("CREATE ROLE monitor LOGIN PASSWORD 'monitorpw'")
    assert wait_until(lambda: {(row["state"], row["last_error"]) for row in table(proxy, "SHOW NODES")} == {
        ("up", None)}, 10), table(proxy, "SHOW NODES")
    done = check("-c", proxy.config_path, "--connect")
    assert done.returncode == 0, done.stdout + done.stderr
    primary, replica = replicas.nodes
    assert f"{replicas.name} {address(primary)} (r1): primary, timeline 1" in done.stdout
    assert f"{replicas.name} {address(replica)} (r2): replica, timeline 1" in done.stdout


# -- the admin database over the PostgreSQL protocol ---------------------------------------------------------
async def test_psql_on_the_admin_database(proxy: ProxyProcess) -> None:
    done = psql(proxy, "admin", "adminpw", "SHOW POOLS")
    assert done.returncode == 0, done.stderr
    header = [name.strip() for name in done.stdout.splitlines()[0].split("|")]
    assert header[:3] == ["database", "user", "shard"] and "cl_waiting" in header
    done = psql(proxy, "admin", "adminpw", "SHOW VERSION; SHOW NODES")
    assert done.returncode == 0 and "shardproxy " in done.stdout and "lag_bytes" in done.stdout
    done = psql(proxy, "admin", "adminpw", "FROBNICATE")
    assert done.returncode == 1 and "unknown command 'FROBNICATE'" in done.stderr
    done = psql(proxy, "app", "secret", "SHOW POOLS")
    assert done.returncode == 2 and 'user "app" may not use the admin database' in done.stderr
    with pytest.raises(asyncpg.PostgresError) as refused:
        await asyncpg.connect(host=proxy.host, port=proxy.port, user="app", password="secret", database="shardproxy")
    assert refused.value.sqlstate == "28000"


# -- reload, and the socket's life cycle ---------------------------------------------------------------------
def test_reload_applies_a_valid_file_and_rejects_an_invalid_one(sandbox: Sandbox, pg: Cluster) -> None:
    proxy = sandbox.proxy("reload", [pg], pool={"size": 3})
    proxy.write_config({**proxy.config, "pool": {"size": 5}})
    assert table(proxy, "RELOAD") == [{"config": proxy.config_path, "fraction_moved": 0.0}]
    settings = {row["key"]: row["value"] for row in table(proxy, "SHOW CONFIG")}
    assert settings["pool.size"] == 5
    proxy.write_config({**proxy.config, "pool": {"size": 0}})
    reply = admin(proxy, "RELOAD")
    assert not reply["ok"] and "pool.size" in reply["error"] and "running config stays" in reply["error"]
    assert {row["key"]: row["value"] for row in table(proxy, "SHOW CONFIG")}["pool.size"] == 5
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stale_socket_is_replaced_a_live_one_refused_and_shutdown_exits_0(sandbox: Sandbox, pg: Cluster) -> None:
    path = os.path.join(sandbox.base_dir, "admin", "lifecycle.sock")
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)  # left behind, as by a proxy that was killed: nobody listens
    proxy = sandbox.proxy("lifecycle", [pg], admin={"socket": path})
    twin = sandbox.proxy("twin", [pg], start=False, admin={"socket": path})
    with pytest.raises(SandboxError, match="belongs to a running shardproxy"):
        twin.start()
    assert admin(proxy, "SHUTDOWN")["ok"]
    assert proxy.process is not None and proxy.process.wait(10) == 0
    assert not os.path.exists(path)


# -- metrics --------------------------------------------------------------------------------------------------
def test_metrics_follow_the_contract_and_count_traffic(proxy: ProxyProcess, replicated: ProxyProcess) -> None:
    before = scrape(proxy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(password="wrong"))
    text, with_replica = scrape(proxy), scrape(replicated)
    found = families(text, with_replica)  # lag shows for replicas only
    for name, labels in CONTRACT_METRICS.items():
        samples = found[name.removesuffix("_total")]  # the parser names counters without the suffix
        assert samples, name
        for sample in samples:
            assert labels <= sample.labels.keys(), (name, sample)
    assert "process_cpu_seconds" in found
    assert total(text, "shardproxy_queries_total") >= total(before, "shardproxy_queries_total") + 3
    assert total(text, "shardproxy_query_duration_seconds_count") >= \
        total(before, "shardproxy_query_duration_seconds_count") + 3
    auth_errors = total(before, "shardproxy_errors_total", kind="auth")
    assert total(text, "shardproxy_errors_total", kind="auth") == auth_errors + 1
    assert total(with_replica, "shardproxy_node_up") == 2
    if shutil.which("promtool"):
        for scraped in (text, with_replica):
            lint = subprocess.run(["promtool", "check", "metrics"], input=scraped, capture_output=True, text=True,
                                  timeout=30, check=False)
            assert lint.returncode == 0, lint.stdout + lint.stderr


def test_queries_total_counts_statements_not_transactions(proxy: ProxyProcess) -> None:
    """A transaction of five statements (BEGIN and COMMIT included), then one of three (BEGIN, a failing
    statement, and the COMMIT that leaving the block sends), are eight queries, not two."""
    before = total(scrape(proxy), "shardproxy_queries_total")
    with psycopg.connect(proxy.dsn()) as conn:  # psycopg's default: BEGIN before the first statement
        for n in range(3):
            conn.execute("SELECT %s::int", [n])
        conn.commit()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
    assert wait_until(lambda: total(scrape(proxy), "shardproxy_queries_total") == before + 8, 5), \
        total(scrape(proxy), "shardproxy_queries_total") - before


def test_statements_on_every_shard_count_as_their_kind(replicated: ProxyProcess, replicas: Cluster) -> None:
    """A DDL statement counts as ddl on each shard's primary, a read with no key as scatter, not by node role."""
    def count(text: str, kind: str) -> float:
        return total(text, "shardproxy_queries_total", shard=replicas.name, kind=kind)

    replicas.primary.sql("CREATE SCHEMA IF NOT EXISTS kinds AUTHORIZATION app")
    before = scrape(replicated)
    with psycopg.connect(replicated.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS kinds.t (user_id int, n int)")
        replicas.wait_replicas_caught_up(10)  # the read may go to the replica
        conn.execute("SELECT count(*) FROM kinds.t").fetchone()
    after = scrape(replicated)
    assert count(after, "ddl") == count(before, "ddl") + 1
    assert count(after, "scatter") == count(before, "scatter") + 1


def test_dashboard_queries_only_exported_metrics(proxy: ProxyProcess, replicated: ProxyProcess) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    referenced = set(re.findall(r"\b(?:shardproxy|process)_[a-z_]+", DASHBOARD.read_text()))
    found = families(scrape(proxy), scrape(replicated))
    exported = {sample.name for samples in found.values() for sample in samples} | set(found)
    assert referenced and referenced <= exported, referenced - exported


def test_failovers_total_counts_the_first_change_of_primary(sandbox: Sandbox) -> None:
    cluster = sandbox.cluster("admfo", replicas=1, regions=["r1", "r2"])
    fast = {"health_check_interval": "200ms"}
    proxy = sandbox.proxy("admfo", [cluster], metrics={"host": LOOPBACK, "port": sandbox.free_port()},
                          regions={"r1": {"primary": True, "priority": 1, **fast}, "r2": {"priority": 2, **fast}})
    assert total(scrape(proxy), "shardproxy_failovers_total", shard="admfo") == 0
    old, promoted = cluster.nodes
    old.stop()
    promoted.promote()
    assert wait_until(lambda: table(proxy, "SHOW SHARDS")[0]["primary"] == address(promoted), 10)
    assert total(scrape(proxy), "shardproxy_failovers_total", shard="admfo") == 1
    assert f"failover: shard admfo primary {address(old)} -> {address(promoted)}" in proxy.log()


def test_errors_total_counts_the_proxys_own_refusals(sandbox: Sandbox, pg: Cluster, replicas: Cluster) -> None:
    """Each way the proxy refuses a statement with 0A000 counts as kind="unsupported"; the client stays."""
    proxy = sandbox.proxy("refusals", [pg, replicas], metrics={"host": LOOPBACK, "port": sandbox.free_port()},
                          routing={"cross_shard_transactions": "refuse"})
    names = [pg.name, replicas.name]
    here, there = (next(key for key in range(1, 1000) if owner(key, names) == name) for name in names)
    refusals = [
        ["SELECT * FROM a JOIN b ON a.region = b.region"],  # by the router, before anything runs
        ["SELECT user_id, row_number() OVER () FROM t"],  # by the merge plan of a read on every shard
        ["BEGIN", f"/* shard_key: {here} */ SELECT 1", f"/* shard_key: {there} */ SELECT 1"],  # by placement
    ]
    before = total(scrape(proxy), "shardproxy_errors_total", kind="unsupported")
    for cursor in (psycopg.Cursor, psycopg.ClientCursor):  # the extended protocol, and the simple one
        with psycopg.connect(proxy.dsn(), autocommit=True, cursor_factory=cursor) as conn:
            for statements in refusals:
                with pytest.raises(psycopg.errors.FeatureNotSupported):
                    for sql in statements:
                        conn.execute(sql)
                conn.execute("ROLLBACK")
                assert conn.execute("SELECT 1").fetchone() == (1,)
    assert total(scrape(proxy), "shardproxy_errors_total", kind="unsupported") == before + 2 * len(refusals)
