"""Sharding end to end: rows land where the contract's ring says, reads find them, and what cannot be
routed exactly is refused with 0A000 and touches nothing."""


import asyncpg
import psycopg
import pytest

from tests.support import APP_DB
from tests.support.ring import owner

SHARDS = 3


@pytest.fixture(scope="module")
def shards(sandbox):
    clusters = [sandbox.cluster(f"ring{i}") for i in range(SHARDS)]
    for cluster in clusters:
        cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    return clusters


@pytest.fixture(scope="module")
def sharded(sandbox, shards):
    proxy = sandbox.proxy("sharded", shards, pool={"size": 4},
                          sharding={"key": "user_id", "reference_tables": ["countries"]})
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigserial, user_id bigint NOT NULL, item text, amount int)")
        conn.execute("CREATE TABLE countries (code text PRIMARY KEY, name text)")
    return proxy


def rows_on(cluster, table="orders"):
    return cluster.primary.sql(f"SELECT user_id, item FROM {table} ORDER BY user_id, item", dbname=APP_DB)


def test_ddl_runs_on_every_shard(sharded, shards):
    for cluster in shards:
        assert cluster.primary.sql("SELECT to_regclass('orders') IS NOT NULL", dbname=APP_DB) == [(True,)]


def test_rows_land_on_the_ring_owner_through_every_protocol(sharded, shards):
    names = [c.name for c in shards]
    users = list(range(1000, 1060))
    with psycopg.connect(sharded.dsn(dbname=APP_DB), autocommit=True) as conn:
        for user in users[:20]:  # extended protocol, text parameters
            conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'psycopg')", (user,))
        for user in users[20:40]:  # simple protocol, literals
            conn.execute(f"INSERT INTO orders (user_id, item) VALUES ({user}, 'literal')".encode(), prepare=False)

    async def binary():
        conn = await asyncpg.connect(sharded.dsn(dbname=APP_DB))
        try:
            for user in users[40:]:  # binary int8 parameters
                await conn.execute("INSERT INTO orders (user_id, item) VALUES ($1, 'asyncpg')", user)
        finally:
            await conn.close()

    import asyncio
    asyncio.run(binary())
    placed = {name: {u for u, _ in rows_on(c) if u in users} for name, c in zip(names, shards)}
    for user in users:
        assert user in placed[owner(user, names)], user
    assert sum(len(v) for v in placed.values()) == len(users)
    assert all(placed.values())  # every shard got some


def test_point_reads_find_their_rows(sharded):
    with psycopg.connect(sharded.dsn(dbname=APP_DB), autocommit=True) as conn:
        for user in (1001, 1025, 1050):
            assert conn.execute("SELECT count(*) FROM orders WHERE user_id = %s", (user,)).fetchone() == (1,)
            assert conn.execute(f"SELECT count(*) FROM orders WHERE user_id = {user}").fetchone() == (1,)


def test_reads_without_a_key_merge_all_shards(sharded):
    with psycopg.connect(sharded.dsn(dbname=APP_DB), autocommit=True) as conn:
        total = conn.execute("SELECT count(*) FROM orders WHERE user_id BETWEEN 1000 AND 1059").fetchone()[0]
        assert total == 60
        top = conn.execute("SELECT user_id FROM orders WHERE user_id >= 1000 ORDER BY user_id DESC LIMIT 3").fetchall()
        assert top == [(1059,), (1058,), (1057,)]
        simple = conn.execute(b"SELECT min(user_id), max(user_id) FROM orders WHERE user_id >= 1000").fetchone()
        assert simple == (1000, 1059)


def test_write_that_cannot_be_exact_is_refused_and_touches_nothing(sharded, shards):
    with psycopg.connect(sharded.dsn(dbname=APP_DB), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy:"):
            conn.execute("UPDATE orders o SET amount = 1 FROM orders p WHERE p.item = o.item")
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection survives
    for cluster in shards:
        assert cluster.primary.sql("SELECT count(*) FROM orders WHERE amount IS NOT NULL", dbname=APP_DB) == [(0,)]


def test_transaction_across_shards_commits_or_rolls_back_on_every_shard(sharded, shards):
    names = [c.name for c in shards]
    a, b = 5000, next(u for u in range(5001, 6000) if owner(u, names) != owner(5000, names))
    with psycopg.connect(sharded.dsn(dbname=APP_DB)) as conn:  # psycopg's default: statements in a transaction
        conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'tx')", (a,))
        conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'tx')", (b,))
        conn.rollback()
        conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'tx2')", (a,))
        conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'tx2')", (b,))
        conn.commit()
    items = {row for c in shards for row in rows_on(c) if row[0] in (a, b)}
    assert items == {(a, "tx2"), (b, "tx2")}


def test_session_shard_key(sharded, shards):
    names = [c.name for c in shards]
    with psycopg.connect(sharded.dsn(dbname=APP_DB), autocommit=True) as conn:
        conn.execute("SET shardproxy.shard_key = '7777'")
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]
        conn.execute("RESET shardproxy.shard_key")
    expected = next(c for c in shards if c.name == owner(7777, names))
    assert port == expected.primary.port


def test_ddl_inside_a_transaction_is_undone_by_its_rollback(sharded, shards):
    with psycopg.connect(sharded.dsn(dbname=APP_DB)) as conn:  # psycopg's default: statements in a transaction
        conn.execute("CREATE TABLE made_in_a_transaction (user_id bigint)")
        conn.execute("INSERT INTO made_in_a_transaction (user_id) VALUES (5000)")
        assert conn.execute("SELECT count(*) FROM made_in_a_transaction").fetchone() == (1,)  # its own writes
        conn.rollback()
    for cluster in shards:
        assert cluster.primary.sql("SELECT to_regclass('made_in_a_transaction')", dbname=APP_DB) == [(None,)]
    with psycopg.connect(sharded.dsn(dbname=APP_DB)) as conn:
        conn.execute("CREATE TABLE made_in_a_transaction (user_id bigint)")
        conn.commit()
    for cluster in shards:
        assert cluster.primary.sql("SELECT to_regclass('made_in_a_transaction') IS NOT NULL",
                                   dbname=APP_DB) == [(True,)]
