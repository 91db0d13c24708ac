"""RESHARD against real servers: two shards become three while clients of two proxies write, and the faults of a
job (the new shard stops during the copy, a member of the fleet cannot be reached at the cut-over, the proxy
running the job is killed); RELOAD refuses a change of key ownership, RELOAD FORCE applies it.

Three primary-only clusters shared by the module: the proxies route over the first two, and RESHARD adds the third.
Each test starts from the same rows on the first two (`fresh_data`) and its own proxies.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from shardproxy.ops.reshard.data import key_text
from shardproxy.routing.ring import Ring, fraction_moved
from tests.support.admin import admin, table

ITEMS = "rs_items"  # sharded: its primary key includes user_id
MORE = "rs_more"  # sharded too, copied after ITEMS (the fault tests stall the copy on it)
PLANS = "rs_plans"  # a reference table
RESHARDER = {"name": "resharder", "password": "reshardpw", "auth": "scram-sha-256"}
PRELOADED_KEYS = range(1, 601)
ROWS_PER_KEY = 4


@pytest.fixture(scope="module")
def clusters(sandbox: Sandbox) -> list[Cluster]:
    found = [sandbox.cluster(f"rs{i}") for i in range(3)]
    for cluster in found:
        cluster.primary.sql("CREATE ROLE resharder LOGIN SUPERUSER PASSWORD 'reshardpw'")
    return found


def rings(clusters: list[Cluster]) -> tuple[Ring, Ring]:
    return Ring([(c.name, 1) for c in clusters[:2]], 256), Ring([(c.name, 1) for c in clusters], 256)


@pytest.fixture
def fresh_data(clusters: list[Cluster]) -> Iterator[None]:
    """The tables on the first two shards with the rows the old ring gives each; none on the third."""
    old, _ = rings(clusters)
    for cluster in clusters:
        cluster.primary.sql(f"DROP TABLE IF EXISTS {ITEMS}, {MORE}, {PLANS}")
    for cluster in clusters[:2]:
        cluster.primary.sql(
            f"CREATE TABLE {ITEMS} (user_id bigint, id bigint, n int NOT NULL, note text, PRIMARY KEY (user_id, id));"
            f"CREATE INDEX ON {ITEMS} (n);"
            f"CREATE TABLE {MORE} (user_id bigint PRIMARY KEY, label text);"
            f"CREATE TABLE {PLANS} (id int PRIMARY KEY, name text NOT NULL);"
            f"GRANT ALL ON {ITEMS}, {MORE}, {PLANS} TO app;"
            f"INSERT INTO {PLANS} SELECT i, 'plan ' || i FROM generate_series(1, 5) i")
        keys = [key for key in PRELOADED_KEYS if old.owner(key) == cluster.name]
        cluster.primary.sql(
            f"INSERT INTO {ITEMS} SELECT k, i, 0, 'preloaded' FROM unnest(ARRAY{keys}::bigint[]) k, "
            f"generate_series(1, {ROWS_PER_KEY}) i;"
            f"INSERT INTO {MORE} SELECT k, 'more ' || k FROM unnest(ARRAY{keys}::bigint[]) k")
    yield
    for cluster in clusters:
        assert not slots_and_publications(cluster), f"left on {cluster.name}"


def slots_and_publications(cluster: Cluster) -> list[tuple[Any, ...]]:
    return cluster.primary.sql("SELECT slot_name FROM pg_replication_slots UNION ALL SELECT pubname FROM "
                               "pg_publication")


def shard_config(clusters: list[Cluster]) -> list[dict[str, Any]]:
    return [{"name": c.name, "nodes": [{"host": c.primary.host, "port": c.primary.port}]} for c in clusters]


def start_proxy(sandbox: Sandbox, name: str, clusters: list[Cluster], **sections: Any) -> ProxyProcess:
    proxy = sandbox.proxy(name, clusters[:2], start=False, admin_users=["admin"],
                          sharding={"reference_tables": [PLANS]}, **sections)
    config = proxy.config
    config["users"] = [*config["users"], RESHARDER]
    config.setdefault("reshard", {})["user"] = "resharder"
    proxy.write_config(config)
    proxy.start()
    return proxy


def add_third_shard(proxy: ProxyProcess, clusters: list[Cluster]) -> None:
    proxy.write_config({**proxy.config, "shards": shard_config(clusters)})


def admin_dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn("admin", "adminpw", "shardproxy")


def reshard(proxy: ProxyProcess, timeout: float = 120) -> dict[str, Any]:
    """Start RESHARD and wait for its end; returns SHOW RESHARD's row."""
    [started] = table(proxy, "RESHARD")
    assert started["phase"] in ("schema", "copy"), started
    return finished(proxy, timeout)


def finished(proxy: ProxyProcess, timeout: float = 120) -> dict[str, Any]:
    assert wait_until(lambda: table(proxy, "SHOW RESHARD")[0]["phase"] in ("done", "failed"), timeout)
    return table(proxy, "SHOW RESHARD")[0]


def rows_by_shard(clusters: list[Cluster], name: str = ITEMS) -> dict[str, list[tuple[Any, ...]]]:
    return {c.name: c.primary.sql(f"SELECT * FROM {name} ORDER BY 1, 2") if has_table(c, name) else []
            for c in clusters}


def has_table(cluster: Cluster, name: str) -> bool:
    return cluster.primary.sql(f"SELECT to_regclass('{name}') IS NOT NULL")[0][0]


def xmins(cluster: Cluster) -> dict[tuple[int, int], str]:
    return {(u, i): x for u, i, x in cluster.primary.sql(f"SELECT user_id, id, xmin::text FROM {ITEMS}")}


def owner_on(proxy: ProxyProcess, key: int) -> str:
    return table(proxy, f"ROUTE {key}")[0]["shard"]


def stall_copy(clusters: list[Cluster]) -> psycopg.Connection[Any]:
    """The third shard gets MORE beforehand, and a transaction there locks it against writes: the job's copy
    waits there, once it has copied ITEMS."""
    third = clusters[2].primary
    third.sql(f"CREATE TABLE {MORE} (user_id bigint PRIMARY KEY, label text)")
    conn = psycopg.connect(third.dsn())
    conn.execute(f"LOCK TABLE {MORE} IN SHARE MODE")
    return conn


# -- writers ---------------------------------------------------------------------------------------------------
class Writer(threading.Thread):
    """A client of one proxy inserting, updating and deleting its own rows (keys k with k % 8 == its number, from
    10_000), keeping the rows it was told were written. Every statement is timed."""

    def __init__(self, proxy: ProxyProcess, number: int, old: Ring, stop: threading.Event):
        super().__init__(daemon=True)
        self.proxy, self.number, self.old, self.stop = proxy, number, old, stop
        self.rows: dict[tuple[int, int], int] = {}  # (user_id, id) -> n, as acknowledged
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self.statements = 0
        self.random = random.Random(number)

    def run(self) -> None:
        try:
            with psycopg.connect(self.proxy.dsn(), autocommit=True) as conn:
                while not self.stop.is_set():
                    self.step(conn)
        except BaseException as exc:  # the test reports it
            self.errors.append(exc)

    def key(self) -> int:
        return 10_000 + 8 * self.random.randrange(400) + self.number

    def step(self, conn: psycopg.Connection[Any]) -> None:
        choice = self.random.random()
        if choice < 0.5 or not self.rows:
            key, ident = self.key(), self.statements
            self.timed(conn, f"INSERT INTO {ITEMS} (user_id, id, n, note) VALUES (%s, %s, 0, 'w')", (key, ident))
            self.rows[key, ident] = 0
            return
        (key, ident), n = self.random.choice(list(self.rows.items()))
        if choice < 0.85:
            self.timed(conn, f"UPDATE {ITEMS} SET n = n + 1 WHERE user_id = %s AND id = %s", (key, ident))
            self.rows[key, ident] = n + 1
        else:
            self.timed(conn, f"DELETE FROM {ITEMS} WHERE user_id = %s AND id = %s", (key, ident))
            del self.rows[key, ident]

    def timed(self, conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> None:
        began = time.monotonic()
        conn.execute(sql, params)
        self.longest = max(self.longest, time.monotonic() - began)
        self.statements += 1


class ReferenceWriter(threading.Thread):
    """A client appending a dot to a reference table's rows in turn (each write goes to every shard)."""

    def __init__(self, proxy: ProxyProcess, stop: threading.Event):
        super().__init__(daemon=True)
        self.proxy, self.stop = proxy, stop
        self.dots = dict.fromkeys(range(1, 6), 0)  # id -> dots acknowledged
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with psycopg.connect(self.proxy.dsn(), autocommit=True) as conn:
                while not self.stop.is_set():
                    ident = 1 + sum(self.dots.values()) % 5
                    conn.execute(f"UPDATE {PLANS} SET name = name || '.' WHERE id = %s", (ident,))
                    self.dots[ident] += 1
        except BaseException as exc:  # the test reports it
            self.errors.append(exc)


def rekey(cluster: Cluster, old: Ring, new: Ring) -> dict[tuple[int, int], tuple[int, int]]:
    """Updates of the key column, on the shard itself (the router refuses them): a row that stays moves onto a
    key that moves, and a row that moves onto a key that stays. Returns old (user_id, id) -> new."""
    name = cluster.name
    mine = [key for key in PRELOADED_KEYS if old.owner(key) == name]
    spare = [key for key in range(1000, 5000) if old.owner(key) == name]
    pairs = [(next(k for k in mine if new.owner(k) == name), next(k for k in spare if new.owner(k) != name)),
             (next(k for k in mine if new.owner(k) != name), next(k for k in spare if new.owner(k) == name))]
    for before, after in pairs:
        cluster.primary.sql(f"UPDATE {ITEMS} SET user_id = {after} WHERE user_id = {before} AND id = 1")
    return {(before, 1): (after, 1) for before, after in pairs}


def start_writers(proxies: list[ProxyProcess], old: Ring, per_proxy: int = 2) -> tuple[list[Writer], threading.Event]:
    stop = threading.Event()
    writers = [Writer(proxy, i * per_proxy + j, old, stop) for i, proxy in enumerate(proxies) for j in range(per_proxy)]
    for writer in writers:
        writer.start()
    return writers, stop


def stop_writers(writers: list[Writer], stop: threading.Event) -> None:
    stop.set()
    for writer in writers:
        writer.join(30)
    assert not [writer.errors for writer in writers if writer.errors]
    assert all(writer.statements > 10 for writer in writers)


# -- choosing rows ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "index", "key"), [
    (b"42\t1\tx\n", 0, b"42"),
    (b"1\t42\n", 1, b"42"),
    (b"1\t\\N\n", 1, None),
    (b"a\\tb\\\\c\\101\\x42\tz\n", 0, b"a\tb\\cAB"),  # COPY's escapes: the text the ring hashes
    ("3f2504e0-4f89-11d3-9a0c-0305e82c3301\té\n".encode(), 1, "é".encode()),
])
def test_the_key_of_a_copy_line_is_its_text(line: bytes, index: int, key: bytes | None) -> None:
    assert key_text(line, index) == key


# -- RELOAD ----------------------------------------------------------------------------------------------------
def test_reload_refuses_new_owners_and_reload_force_applies_them(sandbox: Sandbox, clusters: list[Cluster]) -> None:
    proxy = start_proxy(sandbox, "rs-reload", clusters)
    old, new = rings(clusters)
    moving = next(key for key in range(1000) if old.owner(key) != new.owner(key))
    try:
        add_third_shard(proxy, clusters)
        reply = admin(proxy, "RELOAD")
        assert not reply["ok"]
        assert "RESHARD" in reply["error"] and "RELOAD FORCE" in reply["error"]
        assert f"{fraction_moved(old, new):.2%}" in reply["error"]
        proxy.signal(signal.SIGHUP)  # refused the same way
        assert wait_until(lambda: proxy.log().count("reload rejected") == 2)
        assert owner_on(proxy, moving) == old.owner(moving)
        [reply] = table(proxy, "RELOAD FORCE")
        assert reply["fraction_moved"] == pytest.approx(fraction_moved(old, new), abs=1e-6)
        assert owner_on(proxy, moving) == new.owner(moving)
        assert admin(proxy, "RELOAD SOFTLY")["error"] == "usage: RELOAD [FORCE]"
    finally:
        proxy.stop()


# -- RESHARD under load ------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("fresh_data")
def test_reshard_two_shards_to_three_under_writes_from_two_proxies(sandbox: Sandbox, clusters: list[Cluster]) -> None:
    old, new = rings(clusters)
    second = start_proxy(sandbox, "rs-second", clusters)
    first = start_proxy(sandbox, "rs-first", clusters, workers=2, fleet=[admin_dsn(second)])
    before = {c.name: xmins(c) for c in clusters[:2]}
    lock = stall_copy(clusters)
    writers, stop = start_writers([first, second], old)
    plans = ReferenceWriter(second, stop)
    plans.start()
    try:
        time.sleep(1)
        for proxy in (first, second):
            add_third_shard(proxy, clusters)
        table(first, "RESHARD")
        # The first source's ITEMS is copied, from its slot's snapshot: what changes there now is streamed.
        assert wait_until(lambda: table(first, "SHOW RESHARD")[0]["rows_copied"] > 0, 30)
        assert admin(first, "RESHARD")["error"] == "a RESHARD job is running; see SHOW RESHARD"
        rekeyed = rekey(clusters[0], old, new)
        # A transaction on a moving key, open as the job goes on to its cut-over, which waits for it to end.
        open_key = next(key for key in range(20_000, 21_000) if old.owner(key) != new.owner(key))
        with psycopg.connect(first.dsn()) as open_tx:
            open_tx.execute(f"INSERT INTO {ITEMS} (user_id, id, n) VALUES (%s, 1, 7)", (open_key,))
            lock.close()
            time.sleep(1)
        report = finished(first)
        time.sleep(1)  # writes go on on the new ring
        moving = [key for key in PRELOADED_KEYS if old.owner(key) != new.owner(key) and (key, 1) not in rekeyed][:20]
        for proxy in (first, second):
            assert [owner_on(proxy, key) for key in moving] == [new.owner(key) for key in moving]
        for _ in range(6):  # new connections, which the kernel spreads over both workers of the first proxy
            with psycopg.connect(first.dsn(), autocommit=True) as conn:
                for key in moving:  # their old owners have none left
                    count = conn.execute(f"SELECT count(*) FROM {ITEMS} WHERE user_id = %s", (key,)).fetchone()
                    assert count == (ROWS_PER_KEY,), key
        with psycopg.connect(admin_dsn(first), autocommit=True) as console:  # the admin database answers too
            assert console.execute("SHOW RESHARD").fetchone()[0] == "done"
        metrics = table(first, "METRICS")[0]["text"]
        moved = re.search(r'shardproxy_reshard_rows_total\{phase="copy"\} (\S+)', metrics)
        assert moved and float(moved.group(1)) == report["rows_copied"]
    finally:
        lock.close()
        stop_writers(writers, stop)
        plans.join(30)
        first.stop()
        second.stop()
    assert report["phase"] == "done", report
    assert report["error"] is None
    assert report["moved_share"] == pytest.approx(fraction_moved(old, new), abs=1e-6)
    assert report["rows_copied"] > 0 and report["rows_streamed"] > 0 and report["tables"] == 3
    assert max(writer.longest for writer in writers) < 5  # held at the cut-over, never failed

    # Every row once, on its owner under the new ring: the preloaded ones, and those the writers were told of.
    rows = rows_by_shard(clusters)
    where = {}
    for shard, found in rows.items():
        for user_id, ident, *_ in found:
            assert (user_id, ident) not in where, f"{(user_id, ident)} on {where[user_id, ident]} and {shard}"
            where[user_id, ident] = shard
            assert new.owner(user_id) == shard, (user_id, shard)
    expected = {(key, i): 0 for key in PRELOADED_KEYS for i in range(1, ROWS_PER_KEY + 1)}
    for before_key, after_key in rekeyed.items():
        del expected[before_key]
        expected[after_key] = 0
    expected[open_key, 1] = 7
    for writer in writers:
        expected.update(writer.rows)
    actual = {(user_id, ident): n for found in rows.values() for user_id, ident, n, _ in found}
    assert actual == expected
    # A row that did not move was not rewritten.
    for shard, found in before.items():
        still = xmins(next(c for c in clusters if c.name == shard))
        for row, xmin in found.items():
            if new.owner(row[0]) == shard and row not in rekeyed:
                assert still[row] == xmin, row
    assert len(rows_by_shard(clusters, MORE)[clusters[2].name]) == sum(
        1 for key in PRELOADED_KEYS if new.owner(key) == clusters[2].name)
    # The reference table, whole on the new shard, with every write made to it during the job.
    assert not plans.errors and sum(plans.dots.values()) > 5
    written = [(i, f"plan {i}" + "." * dots) for i, dots in plans.dots.items()]
    for cluster in clusters:
        assert cluster.primary.sql(f"SELECT id, name FROM {PLANS} ORDER BY id") == written, cluster.name


# -- faults ---------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("fresh_data")
def test_a_sharded_table_without_the_key_in_its_primary_key_is_refused(
        sandbox: Sandbox, clusters: list[Cluster]) -> None:
    old, new = rings(clusters)
    for cluster in clusters[:2]:
        cluster.primary.sql("CREATE TABLE rs_loose (user_id bigint, note text)")
    proxy = start_proxy(sandbox, "rs-loose", clusters)
    try:
        add_third_shard(proxy, clusters)
        report = reshard(proxy)
        assert report["phase"] == "failed"
        assert report["error"] == ("table postgres.public.rs_loose needs a primary key that includes user_id for "
                                   "RESHARD: its changes are applied by that key on the new owner")
        moving = next(key for key in PRELOADED_KEYS if old.owner(key) != new.owner(key))
        assert owner_on(proxy, moving) == old.owner(moving)
        assert not has_table(clusters[2], ITEMS)  # it stopped before anything was made
    finally:
        proxy.stop()
        for cluster in clusters[:2]:
            cluster.primary.sql("DROP TABLE rs_loose")


@pytest.mark.usefixtures("fresh_data")
def test_an_unreachable_fleet_member_means_nobody_switches(sandbox: Sandbox, clusters: list[Cluster]) -> None:
    old, new = rings(clusters)
    member = start_proxy(sandbox, "rs-member", clusters)
    gone = f"postgresql://admin:adminpw@127.0.0.1:{sandbox.free_port()}/shardproxy"
    proxy = start_proxy(sandbox, "rs-lonely", clusters, fleet=[admin_dsn(member), gone],
                        reshard={"cutover_timeout": "3s"})
    writers, stop = start_writers([proxy], old, per_proxy=1)
    try:
        for each in (proxy, member):
            add_third_shard(each, clusters)
        began = time.monotonic()
        report = reshard(proxy)
        took = time.monotonic() - began
    finally:
        stop_writers(writers, stop)
    try:
        assert report["phase"] == "failed"
        assert "cut-over" in report["error"] and "connect" in report["error"].lower(), report
        assert took > 3
        moving = next(key for key in PRELOADED_KEYS if old.owner(key) != new.owner(key))
        for each in (proxy, member):  # neither switched
            assert owner_on(each, moving) == old.owner(moving)
        assert rows_by_shard(clusters)[clusters[2].name] == []  # what it copied is gone
        assert writers[0].longest < 5
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            assert conn.execute(f"SELECT count(*) FROM {ITEMS} WHERE user_id = %s", (moving,)).fetchone() == (
                ROWS_PER_KEY,)
    finally:
        proxy.stop()
        member.stop()
    found = {(u, i): n for rows in rows_by_shard(clusters).values() for u, i, n, _ in rows}
    expected = {(key, i): 0 for key in PRELOADED_KEYS for i in range(1, ROWS_PER_KEY + 1)} | writers[0].rows
    assert found == expected


@pytest.mark.usefixtures("fresh_data")
def test_the_new_shard_stopping_during_the_copy_fails_the_job_and_a_new_one_succeeds(
        sandbox: Sandbox, clusters: list[Cluster]) -> None:
    old, new = rings(clusters)
    proxy = start_proxy(sandbox, "rs-stop", clusters)
    lock = stall_copy(clusters)
    try:
        add_third_shard(proxy, clusters)
        table(proxy, "RESHARD")
        assert wait_until(lambda: table(proxy, "SHOW RESHARD")[0]["rows_copied"] > 0, 30)
        time.sleep(0.5)
        clusters[2].primary.stop()
        report = finished(proxy)
        assert report["phase"] == "failed" and report["error"], report
        moving = next(key for key in PRELOADED_KEYS if old.owner(key) != new.owner(key))
        assert owner_on(proxy, moving) == old.owner(moving)
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # nothing lost
            assert conn.execute(f"SELECT count(*) FROM {ITEMS}").fetchone() == (
                len(PRELOADED_KEYS) * ROWS_PER_KEY,)
        assert not any(slots_and_publications(c) for c in clusters[:2])
        lock.close()
        clusters[2].primary.start()
        report = reshard(proxy)  # the rows the first copy left on the new shard do not stand in its way
        assert report["phase"] == "done", report
        rows = rows_by_shard(clusters)
        assert sum(len(found) for found in rows.values()) == len(PRELOADED_KEYS) * ROWS_PER_KEY
        assert all(new.owner(row[0]) == shard for shard, found in rows.items() for row in found)
    finally:
        lock.close()
        proxy.stop()


@pytest.mark.usefixtures("fresh_data")
def test_a_job_whose_proxy_was_killed_is_abandoned_and_run_again(sandbox: Sandbox, clusters: list[Cluster]) -> None:
    old, new = rings(clusters)
    proxy = start_proxy(sandbox, "rs-killed", clusters)
    two = proxy.config
    lock = stall_copy(clusters)
    try:
        add_third_shard(proxy, clusters)
        table(proxy, "RESHARD")
        assert wait_until(lambda: table(proxy, "SHOW RESHARD")[0]["rows_copied"] > 0, 30)
        assert proxy.process is not None
        proxy.process.kill()
        proxy.process.wait()
        lock.close()
        # Left: the first source's slot (which keeps WAL there) and the rows copied to the new shard.
        assert slots_and_publications(clusters[0])
        assert rows_by_shard(clusters)[clusters[2].name]
        proxy.write_config(two)  # the ring it ran on: the job did not switch
        proxy.start()
        moving = next(key for key in PRELOADED_KEYS if old.owner(key) != new.owner(key))
        assert owner_on(proxy, moving) == old.owner(moving)
        add_third_shard(proxy, clusters)
        report = reshard(proxy)
        assert report["phase"] == "done", report
        assert re.search(r"left \d+ slots", proxy.log())
        rows = rows_by_shard(clusters)
        assert sorted(row[:2] for found in rows.values() for row in found) == sorted(
            (key, i) for key in PRELOADED_KEYS for i in range(1, ROWS_PER_KEY + 1))
        assert all(new.owner(row[0]) == shard for shard, found in rows.items() for row in found)
        assert owner_on(proxy, moving) == new.owner(moving)
    finally:
        lock.close()
        proxy.stop()
