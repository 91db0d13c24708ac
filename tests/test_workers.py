"""Several workers: one proxy with workers: 2 in front of the session's primary, shared by the module's tests.

Connections are spread over both workers by the kernel; cancels, KILL, RELOAD, the admin socket, the admin
database and /metrics must behave as one proxy's. The last tests kill a worker and stop the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from shardproxy.ops.admin.replies import Table
from shardproxy.ops.admin.socket import request
from shardproxy.supervisor import MERGES, Held, sum_expositions
from shardproxy.worker import admin_path
from tests.support.admin import admin, table

DB = "workersdb"  # only this module's clients use it: pg_stat_activity tells their server connections apart


def connect(proxy: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=DB), autocommit=True)


def local_address(conn: psycopg.Connection) -> str:
    """The client's end of the connection, as SHOW CLIENTS shows it."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        host, port = sock.getsockname()
    return f"{host}:{port}"


def worker_argument(pid: int, option: str) -> str:
    argv = open(f"/proc/{pid}/cmdline").read().split("\0")
    return argv[argv.index(option) + 1]


def worker_of(pid: int) -> int:
    return int(worker_argument(pid, "--worker"))


def worker_table(pid: int, command: str) -> list[dict[str, Any]]:
    """An ok reply of one worker, from its internal admin socket: what it holds, not what the supervisor merges."""
    reply = json.loads(request(admin_path(worker_argument(pid, "--runtime-dir"), worker_of(pid)), command))
    assert reply["ok"], reply
    return [dict(zip(reply["columns"], row)) for row in reply["rows"]]


def restart_a_worker(proxy: ProxyProcess, worker: int | None = None) -> int:
    """SIGKILL a worker (the given one, else either) and wait until its successor is ready; returns the
    successor's pid."""
    victim, survivor = sorted(proxy.worker_pids(), key=lambda pid: worker_of(pid) != worker)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(proxy.worker_pids()) == 2 and victim not in proxy.worker_pids())
    (successor,) = set(proxy.worker_pids()) - {survivor}
    assert wait_until(lambda: f"(pid {successor}) ready" in proxy.log())
    assert f"(pid {victim}) exited with code -9; restarting it" in proxy.log()
    return successor


def metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://{proxy.host}:{proxy.config['metrics']['port']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


@pytest.fixture(scope="module")
def proxy(sandbox: Sandbox, pg: Cluster) -> Iterator[ProxyProcess]:
    if not pg.primary.sql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'"):
        pg.primary.sql(f"CREATE DATABASE {DB} OWNER app")
    proxy = sandbox.proxy("workers", [pg], workers=2, pool={"size": 4}, shutdown_timeout="5s", log={"level": "debug"},
                          metrics={"host": "127.0.0.1", "port": sandbox.free_port()})
    yield proxy
    proxy.stop()


@pytest.fixture
def clients(proxy: ProxyProcess) -> Iterator[list[psycopg.Connection]]:
    """Twelve logged-in clients, closed after the test; the proxy has forgotten them before the next one."""
    conns = [connect(proxy) for _ in range(12)]
    yield conns
    for conn in conns:
        conn.close()
    assert wait_until(lambda: not table(proxy, "SHOW CLIENTS"))


def test_clients_are_served_by_both_workers(proxy: ProxyProcess, clients: list[psycopg.Connection]) -> None:
    for conn in clients:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    rows = table(proxy, "SHOW CLIENTS")
    assert len(rows) == 12 and {row["worker"] for row in rows} == {0, 1}, rows
    assert len({row["id"] for row in rows}) == 12, "client ids are unique across workers"
    assert all(row["id"] % 2 == row["worker"] for row in rows), "a client id names its worker"
    pools = table(proxy, "SHOW POOLS")
    assert [(row["database"], row["cl_active"]) for row in pools if row["database"] == DB] == [(DB, 12)], pools
    assert sum(row["sv_active"] + row["sv_idle"] for row in pools if row["database"] == DB) <= 8  # 2 × size
    servers = table(proxy, "SHOW SERVERS")
    assert {row["worker"] for row in servers if row["database"] == DB} <= {0, 1}
    # The admin database gives the same merged answers as the socket.
    with psycopg.connect(proxy.dsn("admin", "adminpw", "shardproxy"), autocommit=True) as console:
        cursor = console.execute("SHOW CLIENTS")
        names = [column.name for column in cursor.description]
        seen = [dict(zip(names, row)) for row in cursor.fetchall()]
    assert {row["worker"] for row in seen} == {"0", "1"} and len(seen) == 13  # the console is a client too


def test_cancel_reaches_the_owner_from_either_worker(proxy: ProxyProcess) -> None:
    """Each cancel is a new connection that the kernel gives to either worker: about half are forwarded."""
    forwarded = proxy.log().count("forwarded to worker")
    for attempt in range(10):
        with connect(proxy) as conn:
            timer = threading.Timer(0.2, conn.cancel)
            started = time.monotonic()
            timer.start()
            with pytest.raises(psycopg.errors.QueryCanceled) as caught:
                conn.execute("SELECT pg_sleep(10)")
            elapsed = time.monotonic() - started
            assert caught.value.sqlstate == "57014"
            assert elapsed < 2, f"attempt {attempt}: canceled after {elapsed:.1f}s"
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.log().count("forwarded to worker") > forwarded  # fails once in 2**10 runs by chance alone
    assert wait_until(lambda: not table(proxy, "SHOW CLIENTS"))


def test_metrics_are_summed_over_workers(proxy: ProxyProcess, clients: list[psycopg.Connection]) -> None:
    before = metrics(proxy)
    for conn in clients:
        for _ in range(5):
            conn.execute("SELECT 1")
    after = metrics(proxy)
    queries = total(after, "shardproxy_queries_total") - total(before, "shardproxy_queries_total")
    assert queries == 60, queries
    assert total(after, "shardproxy_client_connections") == 12
    workers = {row["worker"] for row in table(proxy, "SHOW CLIENTS")}
    assert workers == {0, 1}, "both workers' samples are in the sum"


def test_kill_a_client_of_each_worker(proxy: ProxyProcess, clients: list[psycopg.Connection]) -> None:
    by_address = {row["address"]: row for row in table(proxy, "SHOW CLIENTS")}
    rows = [by_address[local_address(conn)] for conn in clients]
    victims = {row["worker"]: conn for conn, row in zip(clients, rows)}
    assert set(victims) == {0, 1}
    for conn in victims.values():
        client_id = by_address[local_address(conn)]["id"]
        assert admin(proxy, f"KILL {client_id}") == {"ok": True, "columns": [], "rows": []}
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    for conn in clients:
        if conn not in victims.values():
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert admin(proxy, "KILL 999999")["error"] == "no client with id '999999'; see SHOW CLIENTS"


def test_reload_reaches_every_worker(proxy: ProxyProcess) -> None:
    done = proxy.log().count("reloaded ")
    reply = table(proxy, "RELOAD")
    assert reply == [{"config": proxy.config_path, "fraction_moved": 0.0}]
    assert proxy.log().count("reloaded ") == done + 2
    proxy.signal(signal.SIGHUP)
    assert wait_until(lambda: proxy.log().count("reloaded ") == done + 4)


def test_a_worker_error_keeps_its_sqlstate_through_the_supervisor(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn("admin", "adminpw", "shardproxy"), autocommit=True) as console:
        for command in ("FROBNICATE", "KILL"):  # one worker answers the first, every worker the second
            with pytest.raises(psycopg.errors.SyntaxError):
                console.execute(command)
            assert set(admin(proxy, command)) == {"ok", "error"}, command  # the socket's reply, as the contract says
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            console.execute("KILL 999999")


def test_a_killed_worker_is_restarted(proxy: ProxyProcess) -> None:
    restart_a_worker(proxy)
    conns = [connect(proxy) for _ in range(12)]
    try:
        assert all(conn.execute("SELECT 1").fetchone() == (1,) for conn in conns)
        assert {row["worker"] for row in table(proxy, "SHOW CLIENTS")} == {0, 1}
    finally:
        for conn in conns:
            conn.close()


def assert_held_by_both_workers_until_resume(proxy: ProxyProcess) -> None:
    """Queries of clients of both workers wait (the shard is paused on each) until RESUME, which ends with it."""
    conns = [connect(proxy) for _ in range(12)]
    answers: list[int] = []
    queries = [threading.Thread(target=lambda c=conn: answers.append(c.execute("SELECT 42").fetchone()[0]))
               for conn in conns]
    try:
        for query in queries:
            query.start()
        assert wait_until(lambda: sum(row["state"] == "waiting" for row in table(proxy, "SHOW CLIENTS")) == 12)
        assert {row["worker"] for row in table(proxy, "SHOW CLIENTS")} == {0, 1}
        time.sleep(0.3)
        assert not answers
    finally:
        assert admin(proxy, "RESUME")["ok"]
    for query in queries:
        query.join(5)
    assert answers == [42] * 12
    for conn in conns:
        conn.close()
    assert wait_until(lambda: not table(proxy, "SHOW CLIENTS"))


def test_a_restarted_worker_holds_a_paused_shard_until_resume(proxy: ProxyProcess, pg: Cluster) -> None:
    assert admin(proxy, f"PAUSE {pg.name}")["ok"]
    try:
        restart_a_worker(proxy)
    finally:
        assert_held_by_both_workers_until_resume(proxy)


def test_a_worker_restarted_while_pause_waits_is_paused_too(proxy: ProxyProcess, pg: Cluster) -> None:
    """PAUSE answers once running transactions end; a worker that dies after the PAUSE reached it and restarts
    before that answer is paused by the supervisor all the same."""
    with connect(proxy) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # a transaction running: PAUSE waits for it
        owner = next(row["worker"] for row in table(proxy, "SHOW CLIENTS") if row["address"] == local_address(holder))
        replies: list[dict[str, Any]] = []
        pause = threading.Thread(target=lambda: replies.append(admin(proxy, f"PAUSE {pg.name}")))
        pause.start()
        time.sleep(0.5)  # the PAUSE has reached both workers, one of which waits for the transaction
        assert not replies
        successor = restart_a_worker(proxy, 1 - owner)
        holder.execute("COMMIT")
        pause.join(10)
    assert replies and replies[0]["ok"], replies
    assert successor in proxy.worker_pids()
    assert_held_by_both_workers_until_resume(proxy)


def test_a_restarted_worker_keeps_a_banned_node_banned(proxy: ProxyProcess, pg: Cluster) -> None:
    node = f"{pg.primary.host}:{pg.primary.port}"
    assert admin(proxy, f"BAN {node}")["ok"]
    try:
        successor = restart_a_worker(proxy)
        for pid in proxy.worker_pids():
            assert {row["state"] for row in worker_table(pid, "SHOW NODES")} == {"banned"}, pid
        assert successor in proxy.worker_pids()
    finally:
        assert admin(proxy, f"UNBAN {node}")["ok"]
    for pid in proxy.worker_pids():
        assert {row["state"] for row in worker_table(pid, "SHOW NODES")} == {"up"}, pid


def test_sigterm_stops_every_worker(proxy: ProxyProcess, pg: Cluster) -> None:
    pids = proxy.worker_pids()
    with connect(proxy) as conn:
        conn.execute("SELECT 1")
    assert proxy.stop() == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not os.path.exists(proxy.admin_socket)
    left = "SELECT count(*) FROM pg_stat_activity WHERE datname = '" + DB + "'"
    assert wait_until(lambda: pg.primary.sql(left) == [(0,)], 5)


def test_workers_that_cannot_start_stop_the_supervisor(sandbox: Sandbox, pg: Cluster) -> None:
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: the workers cannot bind its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broken = sandbox.proxy("workers-bad-port", [pg], start=False, workers=2,
                               listen={"host": "127.0.0.1", "port": taken.getsockname()[1]})
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "shardproxy", "run", "-c", broken.config_path],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "died 3 times before it was ready" in result.stderr
    assert time.monotonic() - started < 20


def test_workers_clean_up_after_a_killed_supervisor(sandbox: Sandbox, pg: Cluster) -> None:
    orphaned = sandbox.proxy("workers-orphaned", [pg], workers=2, pool={"size": 1})
    workers = orphaned.worker_pids()
    argv = open(f"/proc/{workers[0]}/cmdline").read().split("\0")
    runtime_dir = argv[argv.index("--runtime-dir") + 1]
    # Two workers' admin and cancel sockets, and the supervisor's.
    assert wait_until(lambda: len(os.listdir(runtime_dir)) == 5)
    orphaned.process.kill()
    orphaned.process.wait()
    assert wait_until(lambda: not any(_alive(pid) for pid in workers))
    assert not os.path.exists(runtime_dir)


def _alive(pid: int) -> bool:
    """Running, not exited (an orphan's exit may leave a zombie that no init reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- merging, without processes -------------------------------------------------------------------------------
def test_held_state_is_what_the_commands_left() -> None:
    held = Held()
    held.record("PAUSE", [], ["s0", "s1", "s2"])
    held.record("RESUME", ["s1"], [])
    held.record("BAN", ["h:1"], [])
    held.record("BAN", ["h:2"], [])
    held.record("UNBAN", ["h:1"], [])
    assert held.commands() == ["PAUSE s0", "PAUSE s2", "BAN h:2"]
    held.record("RESUME", [], [])
    assert held.commands() == ["BAN h:2"]


def test_a_refused_command_takes_back_its_own_change_only() -> None:
    held = Held()
    held.record("PAUSE", ["s0"], [])
    refused = held.record("PAUSE", ["nosuch"], [])  # while the workers are asked, another operator's commands land
    held.record("PAUSE", ["s1"], [])
    held.record("BAN", ["h:1"], [])
    refused()
    assert held.commands() == ["PAUSE s0", "PAUSE s1", "BAN h:1"]
    refused = held.record("UNBAN", ["h:1"], [])
    held.record("RESUME", ["s0"], [])
    refused()
    assert held.commands() == ["PAUSE s1", "BAN h:1"]


def test_pools_are_summed_and_maxwait_is_the_longest() -> None:
    columns = ["database", "user", "shard", "node", "role", "region", "cl_active", "sv_idle", "maxwait"]
    first = Table(columns, [["db", "app", "s0", "h:1", "primary", None, 3, 1, 0.5],
                            ["db", "app", "s1", "h:2", "primary", None, 1, 0, 0.0]])
    second = Table(columns, [["db", "app", "s0", "h:1", "primary", None, 2, 4, 0.25]])
    merged = MERGES["SHOW POOLS"]([(0, first), (1, second)])
    assert merged.rows == [["db", "app", "s0", "h:1", "primary", None, 5, 5, 0.5],
                           ["db", "app", "s1", "h:2", "primary", None, 1, 0, 0.0]]


def test_expositions_are_summed_by_name_and_labels() -> None:
    def worker(queries: float, up: float, lag: float) -> str:
        return ("# HELP q_total Queries\n# TYPE q_total counter\n"
                f'q_total{{shard="a"}} {queries}\nq_total{{shard="b"}} 1.0\n'
                "# HELP d Duration\n# TYPE d histogram\n"
                f'd_bucket{{le="1.0"}} {queries}\nd_bucket{{le="+Inf"}} {queries}\nd_count {queries}\nd_sum 2.0\n'
                "# HELP shardproxy_node_up Up\n# TYPE shardproxy_node_up gauge\n"
                f'shardproxy_node_up{{node="n"}} {up}\n'
                "# HELP shardproxy_replica_lag_seconds Lag\n# TYPE shardproxy_replica_lag_seconds gauge\n"
                f'shardproxy_replica_lag_seconds{{node="n"}} {lag}\n')

    text = sum_expositions([worker(3.0, 1.0, float("nan")), worker(4.0, 0.0, 2.5)]).decode()
    samples = {(s.name, tuple(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("q_total", (("shard", "a"),))] == 7.0
    assert samples[("q_total", (("shard", "b"),))] == 2.0
    assert samples[("d_count", ())] == 7.0 and samples[("d_bucket", (("le", "+Inf"),))] == 7.0
    assert samples[("d_sum", ())] == 4.0
    assert samples[("shardproxy_node_up", (("node", "n"),))] == 0.0  # up only if every worker sees it up
    assert samples[("shardproxy_replica_lag_seconds", (("node", "n"),))] == 2.5  # the worst known
