"""Reads on every shard stream through the proxy: bounded memory, other clients served meanwhile, a byte limit on
what a read must hold, and cancels that stop every shard's part.

Two shards hold a million rows between them, loaded on each shard directly (odd ids on one, even ids on the
other: a read with no key does not care which shard holds a row), and one unsharded server holds them all, the
reference every answer is compared with. Keyed queries use the ids whose owner on the ring holds them.
"""

from __future__ import annotations

import hashlib
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from shardproxy.devtools.workload import rss_kb
from tests.support import APP_DB
from tests.support.ring import owner

pytestmark = pytest.mark.e2e

ROWS = 1_000_000
RSS_BOUND_KB = 64 * 1024
MEMORY_LIMIT = "8MB"
TABLE = "CREATE TABLE big (user_id bigint NOT NULL, payload text)"
BIG_READER = f"""
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    rows = sum(1 for _ in conn.cursor().stream("SELECT user_id, payload FROM big ORDER BY payload"))
sys.exit(0 if rows == {ROWS} else 1)
"""
RUNNING = (f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{APP_DB}' AND state <> 'idle' "
           "AND query LIKE '%FROM big%' AND pid <> pg_backend_pid()")


@pytest.fixture(scope="module")
def shards(sandbox: Sandbox) -> list[Cluster]:
    clusters = [sandbox.cluster(f"stream{i}") for i in range(2)]
    for i, cluster in enumerate(clusters):
        cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
        load(cluster, f"WHERE g % 2 = {i}")
    return clusters


@pytest.fixture(scope="module")
def reference(sandbox: Sandbox) -> Cluster:
    cluster = sandbox.cluster("streamref")
    cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    load(cluster, "")
    return cluster


@pytest.fixture(scope="module")
def proxy(sandbox: Sandbox, shards: list[Cluster]) -> ProxyProcess:
    return sandbox.proxy("stream", shards, pool={"size": 4, "query_wait_timeout": "20s"},
                         routing={"scatter_memory_limit": MEMORY_LIMIT})


def load(cluster: Cluster, where: str) -> None:
    cluster.primary.sql(f"{TABLE}; INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g {where};"
                        "CREATE INDEX ON big (user_id); ANALYZE big; GRANT SELECT ON big TO app", dbname=APP_DB)


def connect(proxy: ProxyProcess, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=APP_DB), connect_timeout=10, **kwargs)


def reference_rows(reference: Cluster, query: str) -> list[tuple]:
    return reference.primary.sql(query, dbname=APP_DB)


def md5(key: int) -> str:
    """The payload of a row."""
    return hashlib.md5(str(key).encode()).hexdigest()


def sample_rss(pid: int, samples: list[int], stop: threading.Event) -> None:
    """The proxy's RSS every 20 ms, until stop."""
    while not stop.wait(0.02):
        samples.append(rss_kb(pid))


def stored(shards: list[Cluster], start: int = 1) -> list[int]:
    """Ids from start on that a keyed query finds: their owner on the ring holds them."""
    names = [cluster.name for cluster in shards]
    return [key for key in range(start, start + 20_000) if owner(key, names) == names[key % 2]]


def nothing_running(shards: list[Cluster]) -> bool:
    """No shard runs a statement on `big` any more: every leg of the read has stopped."""
    return all(cluster.primary.sql(RUNNING, dbname=APP_DB) == [(0,)] for cluster in shards)


@pytest.mark.parametrize("order", ["", " ORDER BY user_id"])
def test_a_million_rows_stream_in_bounded_memory(proxy: ProxyProcess, reference: Cluster, order: str) -> None:
    """Concatenated and k-way merged, a million rows (~55MB on the wire) pass through while the proxy's RSS stays
    within 64MB of idle; the rows are the reference server's (in its order, when ordered)."""
    pid = proxy.process.pid
    query = f"SELECT user_id, payload FROM big{order}"
    with connect(proxy, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM big")  # legs and pools warm
        idle = rss_kb(pid)
        samples = [idle]
        reading = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(pid, samples, reading))
        count = total = 0
        expected = psycopg.connect(reference.primary.dsn(dbname=APP_DB))
        with expected:
            sampler.start()
            try:
                mine = conn.cursor().stream(query)
                theirs = expected.cursor().stream(query)
                for got, want in zip(mine, theirs, strict=True):
                    count += 1
                    if order:
                        assert got == want
                    total += got[0]
            finally:
                reading.set()
                sampler.join()
    peak = max(samples)
    print(f"{query}: RSS idle {idle} kB, peak {peak} kB ({len(samples)} samples)")
    assert count == ROWS
    assert total == ROWS * (ROWS + 1) // 2
    assert peak - idle < RSS_BOUND_KB


EXACT = [
    "SELECT user_id, payload FROM big ORDER BY user_id DESC LIMIT 7 OFFSET 400000",
    "SELECT user_id, payload FROM big ORDER BY payload, user_id LIMIT 20",
    "SELECT count(*), sum(user_id), min(payload), max(user_id), avg(user_id) FROM big",
    "SELECT user_id % 7 AS g, count(*), sum(user_id), min(user_id), max(payload) FROM big GROUP BY 1 ORDER BY 1",
    "SELECT user_id % 3 AS g, count(*) FROM big WHERE user_id > 999990 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 2",
]
UNORDERED = [
    "SELECT user_id, payload FROM big WHERE user_id % 1000 = 3",
    "SELECT user_id, payload FROM big WHERE user_id + 0 = 5",  # rows on one shard only
    "SELECT user_id, payload FROM big WHERE user_id < 0",
    "SELECT DISTINCT user_id % 50 FROM big WHERE user_id < 5000",
]


@pytest.mark.parametrize("query", EXACT + UNORDERED)
def test_streamed_answers_equal_one_servers(proxy: ProxyProcess, reference: Cluster, query: str) -> None:
    with connect(proxy, autocommit=True) as conn:
        got = conn.execute(query).fetchall()
    expected = reference_rows(reference, query)
    if query in UNORDERED:
        got, expected = sorted(got), sorted(expected)
    assert got == expected


async def test_streamed_answers_in_binary_equal_one_servers(proxy: ProxyProcess, reference: Cluster) -> None:
    conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB), timeout=10)
    expected = await asyncpg.connect(reference.primary.dsn(dbname=APP_DB), timeout=10)
    try:
        for query in EXACT:
            assert [tuple(r) for r in await conn.fetch(query)] == [tuple(r) for r in await expected.fetch(query)]
        query = "SELECT user_id, payload FROM big ORDER BY user_id LIMIT $1"  # LIMIT $n: refused, 0A000
        with pytest.raises(asyncpg.FeatureNotSupportedError):
            await conn.fetch(query, 5)
        assert await conn.fetchval("SELECT count(*) FROM big WHERE user_id < 100") == 99
    finally:
        await conn.close()
        await expected.close()


def test_a_read_that_holds_too_much_fails_with_54000(proxy: ProxyProcess, shards: list[Cluster]) -> None:
    """A million groups are more than scatter_memory_limit: 54000, the shards' parts stop, and the connection
    goes on, inside a transaction as outside one."""
    with connect(proxy, autocommit=True) as conn:
        started = time.monotonic()
        with pytest.raises(errors.ProgramLimitExceeded) as refused:
            conn.execute("SELECT user_id, count(*) FROM big GROUP BY user_id").fetchall()
        assert refused.value.sqlstate == "54000"
        assert str(refused.value).startswith("shardproxy:")
        assert "scatter_memory_limit" in str(refused.value)
        assert time.monotonic() - started < 10
        assert wait_until(lambda: nothing_running(shards), 5)
        key = stored(shards)[0]
        assert conn.execute("SELECT payload FROM big WHERE user_id = %s", (key,)).fetchone() == (md5(key),)
        assert conn.execute("SELECT count(*) FROM big WHERE user_id <= 10").fetchone() == (10,)
    with connect(proxy) as conn:  # autocommit off: the read runs in a transaction on every shard
        conn.execute("SELECT count(*) FROM big WHERE user_id <= 10")
        with pytest.raises(errors.ProgramLimitExceeded):
            conn.execute("SELECT DISTINCT payload FROM big").fetchall()
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM big WHERE user_id <= 10").fetchone() == (10,)
        conn.rollback()
    assert wait_until(lambda: nothing_running(shards), 5)


def test_a_limit_met_early_inside_a_transaction_leaves_it_usable(proxy: ProxyProcess) -> None:
    """The merge needs only the first rows: the rest of each shard's part is drained, not cancelled, so the
    transaction goes on."""
    with connect(proxy) as conn:
        assert conn.execute("SELECT user_id FROM big ORDER BY user_id LIMIT 3").fetchall() == [(1,), (2,), (3,)]
        conn.execute("SELECT user_id FROM big ORDER BY payload LIMIT 1 OFFSET 1000")
        assert conn.execute("SELECT count(*) FROM big WHERE user_id <= 5").fetchone() == (5,)
        conn.commit()


async def test_a_cursor_over_every_shard_is_refused_and_aborts_its_transaction(proxy: ProxyProcess) -> None:
    """asyncpg's cursor binds a portal in one batch and fetches from it in later ones, which a read on every shard
    cannot serve: the Bind gets 0A000 rather than a reply that leaves the driver out of step, and the transaction
    is aborted as by a server's error (25P02 for what follows, on any shard, in either protocol)."""
    conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB))
    try:
        transaction = conn.transaction()
        await transaction.start()
        assert await conn.fetchval("SELECT count(*) FROM big WHERE user_id <= 7") == 7  # a leg on every shard
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="cursor"):
            await conn.cursor("SELECT user_id FROM big ORDER BY user_id")
        assert conn.is_in_transaction()
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT payload FROM big WHERE user_id = $1", 1)
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute("SELECT 1")
        await transaction.rollback()
        assert await conn.fetchval("SELECT count(*) FROM big WHERE user_id <= 7") == 7
    finally:
        await conn.close()


def test_a_client_cancel_stops_every_shards_part(proxy: ProxyProcess, shards: list[Cluster]) -> None:
    with connect(proxy, autocommit=True) as conn:
        rows = 0
        with pytest.raises(errors.QueryCanceled):
            for _ in conn.cursor().stream("SELECT user_id, payload FROM big ORDER BY user_id"):
                rows += 1
                if rows == 1000:
                    conn.cancel()
        assert rows < ROWS
        assert wait_until(lambda: nothing_running(shards), 5)
        key = stored(shards)[1]
        assert conn.execute("SELECT payload FROM big WHERE user_id = %s", (key,)).fetchone() == (md5(key),)


def test_a_client_gone_mid_read_stops_every_shards_part(proxy: ProxyProcess, shards: list[Cluster]) -> None:
    conn = connect(proxy, autocommit=True)
    stream = conn.cursor().stream("SELECT user_id, payload FROM big ORDER BY user_id")
    next(stream)
    conn.pgconn.finish()  # the socket closes under the read
    assert wait_until(lambda: nothing_running(shards), 5)
    with connect(proxy, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM big WHERE user_id <= 3").fetchone() == (3,)


def test_a_client_that_stops_reading_holds_the_shards_back(proxy: ProxyProcess, shards: list[Cluster]) -> None:
    """It sends the read and never reads the answer: the shards wait to send (ClientWrite) rather than the proxy
    filling up; once the client leaves, their parts stop."""
    pid = proxy.process.pid
    with connect(proxy, autocommit=True) as other:
        other.execute("SELECT count(*) FROM big WHERE user_id < 10")
        idle = rss_kb(pid)
        stuck = connect(proxy, autocommit=True)
        with socket.socket(fileno=os.dup(stuck.pgconn.socket)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.pgconn.send_query(b"SELECT user_id, payload FROM big ORDER BY payload")
        waiting = RUNNING + " AND wait_event = 'ClientWrite'"
        try:
            assert wait_until(lambda: all(c.primary.sql(waiting, dbname=APP_DB) == [(1,)] for c in shards), 15)
            samples = []
            for _ in range(5):
                time.sleep(0.3)
                samples.append(rss_kb(pid))
                assert other.execute("SELECT count(*) FROM big WHERE user_id <= 3").fetchone() == (3,)
            print(f"stuck reader: RSS idle {idle} kB, then {samples} kB")
            assert max(samples) - idle < RSS_BOUND_KB
        finally:
            stuck.close()
        assert wait_until(lambda: nothing_running(shards), 5)


def test_other_clients_are_served_during_a_big_read(proxy: ProxyProcess, shards: list[Cluster]) -> None:
    """A keyed query of another client answers promptly while a million rows are merged (a behaviour bound, not
    a speed target). The big read runs in a process of its own, whose row handling would otherwise hold this
    process's interpreter lock while the keyed queries are timed."""
    latencies: list[float] = []
    with connect(proxy, autocommit=True) as other:
        other.execute("SELECT payload FROM big WHERE user_id = 1")
        keys = stored(shards, 500_000)
        reader = subprocess.Popen([sys.executable, "-c", BIG_READER, proxy.dsn(dbname=APP_DB)])
        try:
            while reader.poll() is None:
                key = keys[len(latencies) % len(keys)]
                started = time.monotonic()
                assert other.execute("SELECT payload FROM big WHERE user_id = %s", (key,)).fetchone() == (md5(key),)
                latencies.append(time.monotonic() - started)
                time.sleep(0.005)
        finally:
            reader.kill()
    assert reader.wait() == 0
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"{len(latencies)} keyed queries during the read: median {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    assert len(latencies) > 50
    assert p99 < 0.2
    assert latencies[-1] < 1.5

