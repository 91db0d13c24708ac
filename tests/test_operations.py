"""Operations under traffic: PAUSE, a server restart and RESUME with zero client errors; the log as JSON lines;
a reload that adds a shard while clients stay connected.

Three primary-only clusters, one region: the proxies here route over the first two, and the reload test adds
the third. Each test runs its own proxy.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from shardproxy.routing.ring import Ring
from tests.support.admin import admin, table

TABLE = "ops_items"
REGION = "r1"


def create_table(cluster: Cluster) -> None:
    cluster.primary.sql(f"CREATE TABLE IF NOT EXISTS {TABLE} (user_id bigint, n int); "
                        f"GRANT ALL ON {TABLE} TO app")


def owner(proxy: ProxyProcess, key: int) -> str:
    return table(proxy, f"ROUTE {key}")[0]["shard"]


@pytest.fixture(scope="module")
def clusters(sandbox: Sandbox) -> list[Cluster]:
    found = [sandbox.cluster(f"ops{i}", regions=[REGION]) for i in range(3)]
    for cluster in found[:2]:
        create_table(cluster)
    return found


# -- PAUSE, restart, RESUME ----------------------------------------------------------------------------------
class Worker(threading.Thread):
    """A client looping short transactions on keys of both shards: autocommit statements, or BEGIN .. COMMIT."""

    def __init__(self, proxy: ProxyProcess, number: int, explicit: bool, stop: threading.Event):
        super().__init__(daemon=True)
        self.proxy, self.number, self.explicit, self.stop = proxy, number, explicit, stop
        self.done = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.proxy.dsn(), autocommit=not self.explicit) as conn:
                while not self.stop.is_set():
                    key = self.number * 1_000_000 + self.done
                    if self.explicit:
                        with conn.transaction():
                            conn.execute(f"INSERT INTO {TABLE} (user_id, n) VALUES (%s, 1)", (key,))
                            conn.execute(f"UPDATE {TABLE} SET n = n + 1 WHERE user_id = %s", (key,))
                    else:
                        conn.execute(f"INSERT INTO {TABLE} (user_id, n) VALUES (%s, 1)", (key,))
                        assert conn.execute(f"SELECT n FROM {TABLE} WHERE user_id = %s", (key,)).fetchone() == (1,)
                    self.done += 1
        except BaseException as exc:  # every error counts; the test reports them
            self.errors.append(exc)


def test_pause_restart_resume_loses_no_client(sandbox: Sandbox, clusters: list[Cluster]) -> None:
    # Fast health checks see the stopped primary down, so new transactions find no primary: they must wait as
    # long as the pause lasts (query_wait_timeout), not only failover_timeout.
    proxy = sandbox.proxy("ops-pause", clusters[:2], pool={"size": 4, "query_wait_timeout": "30s"},
                          regions={REGION: {"primary": True, "priority": 1, "health_check_interval": "200ms"}},
                          routing={"failover_timeout": "1s"})
    paused = clusters[0]
    stop = threading.Event()
    workers = [Worker(proxy, number, explicit, stop) for number, explicit in enumerate([False, False, True, True], 1)]
    try:
        for worker in workers:
            worker.start()
        assert wait_until(lambda: all(worker.done >= 5 for worker in workers) or any(w.errors for w in workers))
        assert admin(proxy, f"PAUSE {paused.name}")["ok"]
        assert not [row for row in table(proxy, "SHOW SERVERS") if row["node"].endswith(f":{paused.primary.port}")]
        paused.primary.stop()  # a restart, with a pause in the middle long enough for health checks to notice
        assert wait_until(lambda: [row["state"] for row in table(proxy, "SHOW NODES")
                            if row["port"] == paused.primary.port] == ["down"])
        late = Worker(proxy, 5, False, stop)  # logs in, and finds no primary for the paused shard
        workers.append(late)
        late.start()
        time.sleep(1.5)  # past failover_timeout
        paused.primary.start()
        held = [worker.done for worker in workers]
        time.sleep(0.3)
        assert admin(proxy, f"RESUME {paused.name}")["ok"]
        assert wait_until(lambda: all(w.done >= done + 5 for w, done in zip(workers, held))
                          or any(w.errors for w in workers))
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
    errors = [repr(error) for worker in workers for error in worker.errors]
    assert errors == [], errors + [proxy.log()[-3000:]]
    assert all(not worker.is_alive() for worker in workers)


# -- the log -------------------------------------------------------------------------------------------------
def test_log_lines_are_json_events_naming_the_client(sandbox: Sandbox, clusters: list[Cluster]) -> None:
    proxy = sandbox.proxy("ops-log", clusters[:1], log={"format": "json", "slow_queries": "150ms"})
    node = f"{clusters[0].primary.host}:{clusters[0].primary.port}"

    def ids() -> set[int]:
        return {row["id"] for row in table(proxy, "SHOW CLIENTS")}

    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        [me] = ids()
        conn.execute("SELECT pg_sleep(0.3)")
        conn.execute("SELECT 1")
    with psycopg.connect(proxy.dsn(), autocommit=True) as victim:
        [killed] = ids() - {me}
        assert admin(proxy, f"KILL {killed}")["ok"]
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(password="not-the-password"))

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in proxy.log().splitlines() if line.strip()]  # each line is JSON

    assert wait_until(lambda: sum(event.get("event") == "disconnect" for event in events()) == 3)
    found = events()
    assert all({"time", "level", "logger", "message"} <= event.keys() for event in found)
    by_client: dict[int, dict[str, dict[str, Any]]] = {}
    for event in found:
        if "client" in event:
            by_client.setdefault(event["client"], {})[event["event"]] = event
    assert by_client[me]["connect"]["user"] == "app"
    assert by_client[me]["disconnect"]["reason"] == "client sent Terminate"
    assert by_client[me]["disconnect"]["seconds"] >= 0.3
    slow = by_client[me]["slow"]
    assert slow["level"] == "warning" and slow["shard"] == clusters[0].name and slow["node"] == node
    assert 0.3 <= slow["seconds"] < 10
    assert [event for event in found if event.get("event") == "slow"] == [slow]  # SELECT 1 was not slow
    assert by_client[killed]["disconnect"]["reason"] == "killed by admin (KILL)"
    [refused] = set(by_client) - {me, killed}
    assert set(by_client[refused]) == {"auth_failure", "disconnect"}
    assert by_client[refused]["disconnect"]["reason"] == 'password authentication failed for user "app"'
    text = proxy.log()
    assert "not-the-password" not in text and "secret" not in text


# -- reload ------------------------------------------------------------------------------------------------
def test_reload_from_one_node_to_two_shards_routes_connected_clients(
        sandbox: Sandbox, clusters: list[Cluster]) -> None:
    """A proxy with one node does not route; once a reload adds a shard, clients connected before route too."""
    proxy = sandbox.proxy("ops-one", clusters[:1])
    one, two = dict(proxy.config), dict(proxy.config)
    second = clusters[1]
    two["shards"] = [*one["shards"], {"name": second.name, "nodes": [
        {"host": second.primary.host, "port": second.primary.port, "region": REGION}]}]
    ring = Ring([(cluster.name, 1) for cluster in clusters[:2]], 256)
    key = next(k for k in range(20_000_000, 20_001_000) if ring.owner(k) == second.name)
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("SELECT 1")
            proxy.write_config(two)
            table(proxy, "RELOAD FORCE")
            conn.execute(f"INSERT INTO {TABLE} (user_id, n) VALUES (%s, 5)", (key,))
            assert second.primary.sql(f"SELECT n FROM {TABLE} WHERE user_id = {key}") == [(5,)]
            assert clusters[0].primary.sql(f"SELECT count(*) FROM {TABLE} WHERE user_id = {key}") == [(0,)]
            proxy.write_config(one)  # and back: everything goes to the one node again
            table(proxy, "RELOAD FORCE")
            conn.execute(f"INSERT INTO {TABLE} (user_id, n) VALUES (%s, 6)", (key,))
            assert clusters[0].primary.sql(f"SELECT n FROM {TABLE} WHERE user_id = {key}") == [(6,)]
    finally:
        proxy.stop()


def test_reload_adds_a_shard_under_connected_clients_and_drains_it_when_removed(
        sandbox: Sandbox, clusters: list[Cluster]) -> None:
    proxy = sandbox.proxy("ops-reload", clusters[:2])
    third = clusters[2]
    create_table(third)
    two = dict(proxy.config)
    three = {**two, "shards": [*two["shards"], {"name": third.name, "nodes": [
        {"host": third.primary.host, "port": third.primary.port, "region": REGION}]}]}
    old_ring = Ring([(cluster.name, 1) for cluster in clusters[:2]], 256)
    new_ring = Ring([(cluster.name, 1) for cluster in clusters], 256)
    keys = range(10_000_000, 10_001_000)
    stays = next(key for key in keys if old_ring.owner(key) == new_ring.owner(key))
    moves = next(key for key in keys if new_ring.owner(key) == third.name)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, psycopg.connect(proxy.dsn()) as open_tx:
        conn.execute(f"SELECT count(*) FROM {TABLE}")
        open_tx.execute(f"INSERT INTO {TABLE} (user_id, n) VALUES (%s, 1)", (stays,))  # open across the reload
        proxy.write_config(three)
        [reply] = table(proxy, "RELOAD FORCE")
        shares = {row["name"]: row["ring_share"] for row in table(proxy, "SHOW SHARDS")}
        # Only keys of the new shard moved: the share of the key space that moved is the new shard's share.
        assert 0.2 < reply["fraction_moved"] < 0.5
        assert reply["fraction_moved"] == pytest.approx(shares[third.name], abs=1e-5)
        open_tx.commit()
        assert owner(proxy, moves) == third.name
        conn.execute(f"INSERT INTO {TABLE} (user_id, n) VALUES (%s, 7)", (moves,))  # the same connection
        assert third.primary.sql(f"SELECT n FROM {TABLE} WHERE user_id = {moves}") == [(7,)]
        assert conn.execute(f"SELECT n FROM {TABLE} WHERE user_id = %s", (stays,)).fetchone() == (1,)
        assert conn.execute(f"SELECT n FROM {TABLE} WHERE user_id = %s", (moves,)).fetchone() == (7,)

        proxy.write_config(two)  # the shard leaves again: its pool drains
        assert table(proxy, "RELOAD FORCE")[0]["fraction_moved"] == reply["fraction_moved"]
        gone = f":{third.primary.port}"
        assert wait_until(lambda: not [row for row in table(proxy, "SHOW POOLS") if row["node"].endswith(gone)])
        assert not [row for row in table(proxy, "SHOW SERVERS") if row["node"].endswith(gone)]
        assert wait_until(lambda: third.primary.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
                   == [(0,)])
        assert conn.execute(f"SELECT n FROM {TABLE} WHERE user_id = %s", (stays,)).fetchone() == (1,)
        open_tx.execute(f"SELECT n FROM {TABLE} WHERE user_id = %s", (stays,))
        open_tx.commit()
