"""Sharding end to end, through every client and protocol, against three real shards.

Every placement is checked on direct connections to the shards, against a plain model of the
contract's ring (below). No-key reads are checked against one unsharded server that holds the same
rows (the differential test). Whatever the proxy refuses must leave every shard as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import struct
import subprocess
import time
import uuid
from collections import Counter
from decimal import Decimal

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from tests.support import APP_DB, app_clusters
from tests.support.ring import owner

SHARDS = 3
USERS = 10_000  # the `users` table of the pgbench test


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(sandbox):
    return app_clusters(sandbox, "e2e", SHARDS)


@pytest.fixture(scope="module")
def names(shards):
    return [c.name for c in shards]


@pytest.fixture(scope="module")
def sharded(sandbox, shards):
    proxy = sandbox.proxy("e2e", shards, pool={"size": 4, "query_wait_timeout": "20s"},
                          sharding={"key": "user_id", "reference_tables": ["countries"]},
                          server_auth={"methods": ["scram-sha-256", "md5"]})  # md5user logs in with md5
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id bigserial, user_id bigint NOT NULL, item text, amount int)")
        conn.execute("CREATE TABLE sessions (user_id uuid NOT NULL, token text, via text)")
        conn.execute("CREATE TABLE countries (code text PRIMARY KEY, name text)")
    return proxy


@pytest.fixture(scope="module")
def reference(sandbox):
    """One unsharded server, for the differential test."""
    cluster = sandbox.cluster("e2eref")
    cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    return cluster


# -- helpers ---------------------------------------------------------------------------------------------------
def connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=APP_DB), connect_timeout=10, **kwargs)


async def aconnect(proxy, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(dbname=APP_DB), timeout=10, **kwargs)


def direct(cluster, query: str) -> list[tuple]:
    """Rows as one shard itself has them, bypassing the proxy."""
    return cluster.primary.sql(query, dbname=APP_DB)


def everywhere(shards, query: str) -> dict[str, list[tuple]]:
    return {c.name: direct(c, query) for c in shards}


def users_on_each_shard(names, start: int = 1) -> dict[str, int]:
    """One user id per shard, the smallest from start on."""
    found: dict[str, int] = {}
    key = start
    while len(found) < len(names):
        found.setdefault(owner(key, names), key)
        key += 1
    return found


def two_users_apart(names, start: int) -> tuple[int, int]:
    a = start
    b = next(k for k in range(a + 1, a + 1000) if owner(k, names) != owner(a, names))
    return a, b


def assert_placed(shards, names, table: str, where: str, expected: int) -> None:
    """Every row matching `where` is on the shard the ring gives its user_id, and there are `expected`."""
    total = 0
    for cluster in shards:
        for (key,) in direct(cluster, f"SELECT user_id FROM {table} WHERE {where}"):
            assert owner(key, names) == cluster.name, (table, key, cluster.name)
            total += 1
    assert total == expected


def psql(proxy, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": "secret", "PGCONNECT_TIMEOUT": "10"}
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port),
               "-U", "app", "-d", APP_DB, *args]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done


# -- rows land on their owner, through every client and protocol ------------------------------------------------
def test_psql_simple_protocol_inserts(sharded, shards, names):
    script = "".join(f"INSERT INTO orders (user_id, item, amount) VALUES ({u}, 'psql', {u % 7});\n"
                     for u in range(100, 130))
    psql(sharded, stdin=script)
    assert_placed(shards, names, "orders", "item = 'psql'", 30)
    done = psql(sharded, "-A", "-t", "-c", "SELECT amount FROM orders WHERE user_id = 117 AND item = 'psql'")
    assert done.stdout.strip() == str(117 % 7)


def test_psycopg_extended_text_and_binary_parameters(sharded, shards, names):
    with connect(sharded, autocommit=True) as conn:
        for u in range(200, 220):  # %t: text format
            conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%t, %t, %t)", (u, "psycopg", u))
        for u in range(220, 230):  # %b: binary format (int2/int4/int8 by the value's size)
            conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%b, %b, %b)", (u, "psycopg", u))
        conn.execute("INSERT INTO orders (user_id, item) VALUES (%b, 'psycopg-big')", (2**40 + 7,))
        # a key cast in SQL, and a string parameter for a bigint key
        conn.execute("INSERT INTO orders (user_id, item) VALUES (%t::bigint, 'psycopg-cast')", ("230",))
        assert conn.execute("SELECT amount FROM orders WHERE orders.user_id = %t::bigint AND item = 'psycopg'",
                            (215,)).fetchall() == [(215,)]
        assert conn.execute("SELECT amount FROM orders WHERE user_id = %b AND item = 'psycopg'",
                            (225,)).fetchall() == [(225,)]
    assert_placed(shards, names, "orders", "item LIKE 'psycopg%'", 32)


def test_psycopg_server_side_prepared(sharded, shards, names):
    with connect(sharded, autocommit=True, prepare_threshold=0) as conn:
        for u in range(300, 330):
            conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%s, 'prepared', %s)", (u, u))
        for u in (300, 311, 329):  # the same named statement, bound to keys on different shards
            assert conn.execute("SELECT amount FROM orders WHERE user_id = %s AND item = 'prepared'",
                                (u,)).fetchall() == [(u,)]
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] >= 0
    assert_placed(shards, names, "orders", "item = 'prepared'", 30)


def test_psycopg_pipeline(sharded, shards, names):
    """Statements up to a Sync are one implicit transaction on one server: a pipeline syncs between
    statements for different shards, or keeps to one shard until its Sync."""
    by_shard = {}
    for u in range(400, 440):
        by_shard.setdefault(owner(u, names), []).append(u)
    with connect(sharded, autocommit=True) as conn:
        with conn.pipeline() as pipeline:
            for u in range(400, 420):  # a Sync after each: every statement routed on its own
                conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%s, 'pipeline', %s)", (u, u))
                pipeline.sync()
            for users in by_shard.values():  # one batch per shard
                for u in users:
                    if u >= 420:
                        conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%s, 'pipeline', %s)", (u, u))
                pipeline.sync()
            cursors = [conn.execute("SELECT amount FROM orders WHERE user_id = %s AND item = 'pipeline'", (u,))
                       for u in (401, 420, 439)]
        assert [c.fetchall() for c in cursors] == [[(401,)], [(420,)], [(439,)]]
    assert_placed(shards, names, "orders", "item = 'pipeline'", 40)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _read_until_ready(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """Messages from the proxy up to the count-th ReadyForQuery."""
    data, messages = b"", []
    while sum(kind == b"Z" for kind, _ in messages) < count:
        chunk = sock.recv(65536)
        assert chunk, messages
        data += chunk
        while len(data) >= 5 and len(data) >= 1 + struct.unpack_from("!i", data, 1)[0]:
            length = struct.unpack_from("!i", data, 1)[0]
            messages.append((data[:1], data[5:1 + length]))
            data = data[1 + length:]
    return messages


def _logged_in(sharded) -> socket.socket:
    """A raw socket logged in to the proxy as md5user (granted its rights on orders)."""
    sock = socket.create_connection((sharded.host, sharded.port), timeout=10)
    startup = b"user\0md5user\0database\0" + APP_DB.encode() + b"\0\0"
    sock.sendall(struct.pack("!ii", len(startup) + 8, 196608) + startup)
    request = b""
    while len(request) < 13:  # AuthenticationMD5Password: answer it
        request += sock.recv(13 - len(request))
    assert request[:1] == b"R" and struct.unpack_from("!i", request, 5)[0] == 5, request
    inner = hashlib.md5(b"md5secret" + b"md5user").hexdigest().encode()
    sock.sendall(_message(b"p", b"md5" + hashlib.md5(inner + request[9:13]).hexdigest().encode() + b"\0"))
    assert _read_until_ready(sock, 1)[-1] == (b"Z", b"I")
    return sock


def _extended(sql: str, *values: str) -> bytes:
    """Parse, Bind (text parameters), Execute and Sync of the unnamed statement."""
    bind = b"\0\0\0\0" + struct.pack("!h", len(values))
    bind += b"".join(struct.pack("!i", len(v.encode())) + v.encode() for v in values) + b"\0\0"
    return (_message(b"P", b"\0" + sql.encode() + b"\0\0\0") + _message(b"B", bind)
            + _message(b"E", b"\0\0\0\0\0") + _message(b"S", b""))


def test_batches_for_different_shards_in_one_read(sharded, shards, names):
    """Sync-ended batches arriving together, also right after the end of a batch begun in an earlier read:
    each is routed on its own."""
    for cluster in shards:
        direct(cluster, "GRANT SELECT, INSERT ON orders TO md5user; GRANT USAGE ON SEQUENCE orders_id_seq TO md5user")
    users = list(users_on_each_shard(names, 4500).values())
    with _logged_in(sharded) as sock:
        batches = b""
        for user in users:  # Parse, Bind (a text parameter), Execute, Sync: one batch per shard, all in one write
            batches += _message(b"P", b"\0INSERT INTO orders (user_id, item) VALUES ($1, 'one-read')\0\0\0")
            key = str(user).encode()
            batches += _message(b"B", b"\0\0\0\0\0\1" + struct.pack("!i", len(key)) + key + b"\0\0")
            batches += _message(b"E", b"\0\0\0\0\0") + _message(b"S", b"")
        first_sync = batches.index(_message(b"S", b""))
        sock.sendall(batches[:first_sync])  # the first batch but its Sync, read on its own
        time.sleep(0.3)
        sock.sendall(batches[first_sync:])  # its Sync and the other batches
        replies = _read_until_ready(sock, len(users))
        assert [kind for kind, _ in replies] == [b"1", b"2", b"C", b"Z"] * len(users), replies
        sock.sendall(_message(b"X", b""))
    assert_placed(shards, names, "orders", "item = 'one-read'", len(users))


def test_extended_begin_and_a_statement_elsewhere_in_one_read(sharded, shards, names):
    """An extended-protocol BEGIN runs tentatively on the home shard; a statement for another shard arriving
    in the same read moves the transaction there, the BEGIN answered and replayed, in the client's order."""
    for cluster in shards:
        direct(cluster, "GRANT SELECT, INSERT ON orders TO md5user; GRANT USAGE ON SEQUENCE orders_id_seq TO md5user")
    users = users_on_each_shard(names, 4600)
    with _logged_in(sharded) as sock:  # one connection, one home shard: most of these users live elsewhere
        for user in users.values():
            sock.sendall(_extended("BEGIN") + _extended("INSERT INTO orders (user_id, item) VALUES ($1, 'begin-read')",
                                                        str(user)) + _extended("COMMIT"))
            replies = _read_until_ready(sock, 3)
            assert [kind for kind, _ in replies] == [b"1", b"2", b"C", b"Z"] * 3, replies
            assert [body for kind, body in replies if kind in b"CZ"] == [
                b"BEGIN\0", b"T", b"INSERT 0 1\0", b"T", b"COMMIT\0", b"I"], replies
        sock.sendall(_message(b"X", b""))
    assert_placed(shards, names, "orders", "item = 'begin-read'", len(users))


def test_a_parse_sent_alone_and_a_statement_for_another_shard(sharded, shards, names):
    """A named Parse that arrives on its own goes to the transaction's shard, where the server answers it only
    once asked to flush; the Bind that follows, for another shard, must not wait for that answer forever, whether
    the Parse succeeded or failed (then the rest of the batch is skipped, as PostgreSQL does)."""
    for cluster in shards:
        direct(cluster, "GRANT SELECT, INSERT ON orders TO md5user; GRANT USAGE ON SEQUENCE orders_id_seq TO md5user")
    a, b = two_users_apart(names, 4700)

    def bind(statement: bytes, value: str) -> bytes:
        parameter = struct.pack("!h", 1) + struct.pack("!i", len(value)) + value.encode()
        return (_message(b"B", b"\0" + statement + b"\0\0\0" + parameter + b"\0\0")
                + _message(b"E", b"\0\0\0\0\0") + _message(b"S", b""))

    with _logged_in(sharded) as sock:
        sock.sendall(_message(b"Q", b"BEGIN\0"))
        sock.sendall(_extended("INSERT INTO orders (user_id, item) VALUES ($1, 'alone')", str(a)))
        assert [kind for kind, _ in _read_until_ready(sock, 2)] == [b"C", b"Z", b"1", b"2", b"C", b"Z"]
        sock.sendall(_message(b"P", b"ins\0INSERT INTO orders (user_id, item) VALUES ($1, 'alone')\0\0\0"))
        time.sleep(0.2)
        sock.sendall(bind(b"ins", str(b)))
        assert _read_until_ready(sock, 1) == [(b"1", b""), (b"2", b""), (b"C", b"INSERT 0 1\0"), (b"Z", b"T")]
        sock.sendall(_message(b"P", b"bad\0INSERT INTO no_such_table VALUES ($1)\0\0\0"))
        time.sleep(0.2)
        sock.sendall(bind(b"bad", str(b)))
        replies = _read_until_ready(sock, 1)
        assert [kind for kind, _ in replies] == [b"E", b"Z"] and replies[-1] == (b"Z", b"E"), replies
        sock.sendall(_message(b"Q", b"ROLLBACK\0"))
        assert _read_until_ready(sock, 1)[-1] == (b"Z", b"I")
        sock.sendall(_message(b"X", b""))
    assert everywhere(shards, "SELECT 1 FROM orders WHERE item = 'alone'") == {name: [] for name in names}


def test_psycopg_pipeline_batch_across_shards_is_one_transaction(sharded, shards, names):
    """A pipeline's statements share one Sync, so PostgreSQL runs them as one implicit transaction: across
    shards they commit together, or (when one fails) not at all."""
    a, b = two_users_apart(names, 450)
    with connect(sharded, autocommit=True) as conn:
        with conn.pipeline():
            conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'pipeline-x')", (a,))
            conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'pipeline-x')", (b,))
        with pytest.raises(psycopg.errors.UndefinedColumn), conn.pipeline():
            conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'pipeline-y')", (a,))
            conn.execute("INSERT INTO orders (user_id, nope) VALUES (%s, 'pipeline-y')", (b,))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    placed = everywhere(shards, "SELECT item FROM orders WHERE item LIKE 'pipeline-_'")
    assert sorted(row for rows in placed.values() for row in rows) == [("pipeline-x",), ("pipeline-x",)]
    assert len([name for name, rows in placed.items() if rows]) == 2


async def test_asyncpg_binary_int8_and_uuid_keys(sharded, shards, names):
    keys = [uuid.UUID(int=(i * 0x9E3779B97F4A7C15) % 2**128) for i in range(1, 31)]
    conn = await aconnect(sharded)
    try:
        for u in range(500, 530):
            await conn.execute("INSERT INTO orders (user_id, item, amount) VALUES ($1, 'asyncpg', $2)", u, u)
        for key in keys:
            await conn.execute("INSERT INTO sessions (user_id, token, via) VALUES ($1, $2, 'asyncpg')", key, key.hex)
        for key in keys[::7]:
            assert await conn.fetchval("SELECT token FROM sessions WHERE user_id = $1", key) == key.hex
        assert await conn.fetchval("SELECT amount FROM orders WHERE user_id = $1 AND item = 'asyncpg'", 517) == 517
    finally:
        await conn.close()
    assert_placed(shards, names, "orders", "item = 'asyncpg'", 30)
    assert_placed(shards, names, "sessions", "via = 'asyncpg'", 30)
    for cluster in shards:  # the uuid's canonical text is what the ring hashed
        for key, token in direct(cluster, "SELECT user_id, token FROM sessions"):
            assert key.hex == token and owner(key, names) == cluster.name


async def test_asyncpg_parse_anywhere_bind_decides(sharded, shards, names):
    """A statement is prepared (Parse, Describe) on whichever shard; each execution goes where its Bind's key
    says, with named statements and with unnamed ones (statement_cache_size=0, as behind PgBouncer)."""
    users = list(users_on_each_shard(names, 510).values())
    for cache in (0, 100):
        conn = await aconnect(sharded, statement_cache_size=cache)
        try:
            statement = await conn.prepare("SELECT inet_server_port(), count(*) FROM orders WHERE user_id = $1")
            for user in users:
                port, count = await statement.fetchrow(user)
                assert (port, count) == (port_of(shards, owner(user, names)), 1), (cache, user)
            for user in users:
                await conn.execute("UPDATE orders SET amount = amount + 1 WHERE user_id = $1 AND item = 'asyncpg'",
                                   user)
        finally:
            await conn.close()
    for user in users:
        assert direct(next(c for c in shards if c.name == owner(user, names)),
                      f"SELECT amount FROM orders WHERE user_id = {user}") == [(user + 2,)]


async def test_asyncpg_error_before_sync_leaves_a_clean_connection(sharded):
    """asyncpg prepares with Parse, Describe and Flush. When that Parse fails, the server ignores everything
    until a Sync: the connection must not go back to the pool in that state."""
    conn = await aconnect(sharded)
    other = await aconnect(sharded)
    try:
        for _ in range(6):
            with pytest.raises(asyncpg.exceptions.UndefinedTableError):
                await conn.fetch("SELECT * FROM no_such_table WHERE user_id = $1", 1)
        for _ in range(12):
            assert await asyncio.wait_for(other.fetchval("SELECT 1"), 10) == 1
            assert await asyncio.wait_for(conn.fetchval("SELECT 2"), 10) == 2
    finally:
        conn.terminate()  # without waiting: after a failure the proxy may not answer
        other.terminate()


def test_uuid_keys_in_text_and_literals(sharded, shards, names):
    keys = [uuid.UUID(int=i * 7919 + 1) for i in range(10)]
    with connect(sharded, autocommit=True) as conn:
        for key in keys[:5]:
            conn.execute("INSERT INTO sessions (user_id, token, via) VALUES (%s, %s, 'text')", (key, key.hex))
        for key in keys[5:]:  # upper case in the literal: the cast to uuid makes it canonical
            conn.execute(f"INSERT INTO sessions (user_id, token, via) VALUES ('{str(key).upper()}'::uuid, "
                         f"'{key.hex}', 'text')")
    assert_placed(shards, names, "sessions", "via = 'text'", 10)


class Base(orm.DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "e2e_accounts"
    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, primary_key=True)
    user_id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(50))
    balance: orm.Mapped[Decimal] = orm.mapped_column(sa.Numeric(12, 2), default=Decimal(0))


class Purchase(Base):
    """A server-generated key: the ORM inserts several rows at once as INSERT ... SELECT ... FROM (VALUES ...)."""

    __tablename__ = "e2e_purchases"
    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    user_id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, index=True)
    item: orm.Mapped[str] = orm.mapped_column(sa.String(50))


def test_sqlalchemy_create_all_and_orm(sharded, shards, names):
    url = sa.engine.make_url(sharded.dsn(dbname=APP_DB)).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, pool_size=2, max_overflow=0)
    try:
        Base.metadata.create_all(engine)  # psycopg's default mode: the DDL runs in a transaction
        for cluster in shards:
            assert direct(cluster, "SELECT to_regclass('e2e_accounts') IS NOT NULL") == [(True,)]
        for user in range(600, 620):
            with orm.Session(engine) as session:
                session.add_all([Account(id=n, user_id=user, name=f"a{user}-{n}") for n in range(3)])
                session.commit()
        with orm.Session(engine) as session:
            account = session.get(Account, (1, 607))
            account.balance += Decimal("12.50")
            session.commit()
            found = session.scalars(sa.select(Account).where(Account.user_id == 607).order_by(Account.id)).all()
            assert [(a.name, a.balance) for a in found] == [("a607-0", 0), ("a607-1", Decimal("12.50")),
                                                             ("a607-2", 0)]
        with orm.Session(engine) as session:  # no key, in a transaction of its own: a scatter read, merged
            assert session.scalar(sa.select(sa.func.count()).select_from(Account)) == 60
        for user in range(620, 630):
            with orm.Session(engine) as session:
                purchases = [Purchase(user_id=user, item=f"p{n}") for n in range(4)]
                session.add_all(purchases)
                session.commit()
                assert all(p.id is not None for p in purchases)
        with orm.Session(engine) as session:  # users of several shards in one INSERT: split by shard
            session.add_all([Account(id=9, user_id=user, name="mixed") for user in two_users_apart(names, 630)])
            session.commit()
    finally:
        engine.dispose()
    assert_placed(shards, names, "e2e_accounts", "true", 62)
    assert_placed(shards, names, "e2e_purchases", "true", 40)


# -- statements that name no table, and keys given outside the statement ------------------------------------------
def test_utility_statements_go_to_one_shard(sharded, shards):
    ports = {c.primary.port for c in shards}
    with connect(sharded, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT version()").fetchone()[0].startswith("PostgreSQL")
        conn.execute("SET application_name = 'e2e-utility'")
        assert conn.execute("SHOW application_name").fetchone() == ("e2e-utility",)
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == ("e2e-utility",)
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] in ports
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
    done = psql(sharded, "-A", "-t", "-c", "SHOW server_version_num")
    assert done.stdout.strip().isdigit()


def test_session_settings_follow_the_client_onto_every_shard(sharded, shards, names):
    """A statement on every shard runs with the client's settings on each, and they stay the client's after it."""
    users = users_on_each_shard(names, 5100)
    with connect(sharded, autocommit=True) as conn:
        for user in users.values():
            conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%s, 'settings', 0)", (user,))
        conn.execute("SET TimeZone TO 'Asia/Kathmandu'")
        conn.execute("SET DateStyle TO 'SQL, DMY'")
        rows = conn.execute("SELECT user_id, current_setting('TimeZone'), current_setting('DateStyle'), "
                            "date '2024-03-05'::text FROM orders WHERE item = 'settings'").fetchall()
        assert sorted(rows) == sorted((user, "Asia/Kathmandu", "SQL, DMY", "05/03/2024") for user in users.values())
        assert conn.info.parameter_status("TimeZone") == "Asia/Kathmandu"
        for user in users.values():  # and on each shard's own connections afterwards
            assert conn.execute("SELECT current_setting('TimeZone'), current_setting('DateStyle') FROM orders "
                                "WHERE user_id = %s AND item = 'settings'", (user,)).fetchone() == \
                ("Asia/Kathmandu", "SQL, DMY")


def test_comment_and_session_keys_route(sharded, shards, names):
    a, b = two_users_apart(names, 4300)
    with connect(sharded, autocommit=True) as conn:
        for user in (a, b):
            conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%s, 'session-key', 0)", (user,))
        # a comment names the shard of a statement that has no key of its own
        assert conn.execute(f"/* shard_key: {a} */ SELECT inet_server_port()").fetchone()[0] == \
            port_of(shards, owner(a, names))
        conn.execute(f"/* shard_key: {b} */ UPDATE orders SET amount = 1 WHERE item = 'session-key'")
        conn.execute("/* target: primary */ SELECT count(*) FROM orders WHERE user_id = %s", (a,))
        # the session's key, until RESET
        conn.execute(f"SET shardproxy.shard_key = '{a}'")
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == port_of(shards, owner(a, names))
        conn.execute("UPDATE orders SET amount = amount + 2 WHERE item = 'session-key'")
        conn.execute("RESET shardproxy.shard_key")  # no key any more: every shard
        assert conn.execute("UPDATE orders SET amount = amount * 10 WHERE item = 'session-key'").rowcount == 2
    rows = everywhere(shards, "SELECT user_id, amount FROM orders WHERE item = 'session-key'")
    assert rows[owner(a, names)] == [(a, 20)] and rows[owner(b, names)] == [(b, 10)]
    done = psql(sharded, "-A", "-t", stdin=f"SET shardproxy.shard_key = '{b}';\nSELECT inet_server_port();\n")
    assert done.stdout.split()[-1] == str(port_of(shards, owner(b, names)))


# -- the differential test: no-key reads through the proxy against one server holding every row ------------------
def fact_rows() -> list[tuple]:
    rows = []
    for i in range(1, 601):
        rows.append((
            i,  # id
            1000 + (i * 37) % 150,  # user_id: 150 users over the shards
            "abcde"[i % 5] if i % 11 else None,  # grp
            (i * 13) % 50 - 10,  # qty
            Decimal(i % 97) + Decimal("0.25"),  # price
            (i % 8) / 4,  # score: quarters, so float sums are exact in any order
            f"2024-01-{1 + i % 30:02d}",  # day
            f"n{i % 17:02d}" if i % 3 else None,  # note
        ))
    return rows


FACTS = ("CREATE TABLE facts (id int PRIMARY KEY, user_id bigint NOT NULL, grp text, qty int, price numeric(10, 2), "
         "score float8, day date, note text)")


def _literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


@pytest.fixture(scope="module")
def facts(sharded, reference):
    """The same rows in `facts` behind the proxy (one multi-row INSERT per user) and on the reference server."""
    by_user: dict[int, list[tuple]] = {}
    for row in fact_rows():
        by_user.setdefault(row[1], []).append(row)
    inserts = ["INSERT INTO facts (id, user_id, grp, qty, price, score, day, note) VALUES "
               + ", ".join("(" + ", ".join(map(_literal, row)) + ")" for row in rows) for rows in by_user.values()]
    with connect(sharded, autocommit=True) as conn:
        conn.execute(FACTS)
        for insert in inserts:
            conn.execute(insert)
    with psycopg.connect(reference.primary.dsn(dbname=APP_DB), autocommit=True) as conn:
        conn.execute(FACTS)
        for insert in inserts:
            conn.execute(insert)
    return len(fact_rows())


SCATTER_QUERIES = [
    "SELECT count(*) FROM facts",
    "SELECT count(note), count(grp), count(*) FROM facts",
    "SELECT sum(qty), min(qty), max(qty) FROM facts",
    "SELECT avg(qty) FROM facts",
    "SELECT sum(price), avg(price), min(price), max(price) FROM facts",
    "SELECT sum(score), avg(score), min(score), max(score) FROM facts",
    "SELECT min(day), max(day), min(note), max(note) FROM facts",
    "SELECT count(*) FILTER (WHERE qty < 0), sum(qty) FILTER (WHERE grp = 'a') FROM facts",
    "SELECT sum(qty), count(*), avg(qty) FROM facts WHERE qty > 1000",
    "SELECT count(*) FROM facts WHERE note IS NULL AND grp IS NOT NULL",
    "SELECT grp, count(*) FROM facts GROUP BY grp",
    "SELECT grp, count(*), sum(qty), avg(price) FROM facts GROUP BY grp ORDER BY grp NULLS FIRST",
    "SELECT grp, min(day), max(note), avg(score) FROM facts GROUP BY grp ORDER BY grp DESC NULLS LAST",
    "SELECT day, count(*) FROM facts WHERE qty > 0 GROUP BY day ORDER BY day DESC LIMIT 5",
    "SELECT grp, count(*) AS n FROM facts GROUP BY grp ORDER BY n DESC, grp LIMIT 3",
    "SELECT user_id, count(*), sum(qty) FROM facts GROUP BY user_id ORDER BY user_id",
    "SELECT grp, day, max(qty) FROM facts GROUP BY grp, day ORDER BY grp, day LIMIT 20 OFFSET 10",
    "SELECT count(*) FROM facts GROUP BY note ORDER BY 1 DESC, min(id) LIMIT 4",
    "SELECT id, user_id, qty FROM facts ORDER BY id LIMIT 10",
    "SELECT id, qty FROM facts ORDER BY qty DESC, id LIMIT 7 OFFSET 5",
    "SELECT id FROM facts ORDER BY price, id DESC LIMIT 12 OFFSET 30",
    "SELECT id, note FROM facts ORDER BY note NULLS FIRST, id LIMIT 8",
    "SELECT id, qty * 2 AS doubled FROM facts ORDER BY doubled DESC, id LIMIT 5",
    "SELECT id FROM facts ORDER BY day DESC, score, id OFFSET 590",
    "SELECT id, grp FROM facts WHERE qty = 7 ORDER BY user_id, id",
    "SELECT * FROM facts WHERE qty BETWEEN 3 AND 5",
    "SELECT user_id, grp, price FROM facts WHERE grp = 'b'",
    "SELECT DISTINCT grp FROM facts",
    "SELECT DISTINCT day FROM facts ORDER BY day LIMIT 10",
    "SELECT id, score FROM facts WHERE note = 'n05'",
    "SELECT * FROM facts",
    # keyed point reads: one shard answers
    "SELECT * FROM facts WHERE user_id = 1007 ORDER BY id",
    "SELECT count(*), sum(qty) FROM facts WHERE user_id = 1042",
    "SELECT id FROM facts WHERE user_id IN (1100) AND qty > 0 ORDER BY id",
]


def _same(query: str, got: list, expected: list) -> None:
    """Equal rows; without ORDER BY, equal as multisets."""
    if "ORDER BY" in query:
        assert got == expected, query
    else:
        assert Counter(map(tuple, got)) == Counter(map(tuple, expected)), query


def test_differential_psycopg_text(sharded, reference, facts):
    """The simple protocol, then named prepared statements (extended protocol), both with text results."""
    with connect(sharded, autocommit=True) as proxied, \
            psycopg.connect(reference.primary.dsn(dbname=APP_DB), autocommit=True) as direct_conn:
        for query in SCATTER_QUERIES:
            expected = direct_conn.execute(query).fetchall()
            _same(query, proxied.execute(query).fetchall(), expected)
            _same(query, proxied.execute(query, prepare=True).fetchall(), expected)
        # parameters: the key one routes, the others travel to every shard
        for query, params in [("SELECT count(*), sum(qty) FROM facts WHERE qty > %s AND grp <> %s", (3, "c")),
                              ("SELECT id FROM facts WHERE user_id = %s ORDER BY id", (1007,)),
                              ("SELECT grp, max(price) FROM facts WHERE day >= %s GROUP BY grp ORDER BY grp",
                               ("2024-01-15",))]:
            _same(query, proxied.execute(query, params).fetchall(), direct_conn.execute(query, params).fetchall())


async def test_differential_asyncpg_binary(sharded, reference, facts):
    """asyncpg: prepared statements, binary results (numeric, float8, date, int8 decoded by the driver)."""
    proxied = await aconnect(sharded)
    direct_conn = await asyncpg.connect(reference.primary.dsn(dbname=APP_DB), timeout=10)
    try:
        for query in SCATTER_QUERIES:
            expected = [tuple(r) for r in await direct_conn.fetch(query)]
            _same(query, [tuple(r) for r in await proxied.fetch(query)], expected)
        statement = await proxied.prepare("SELECT grp, count(*), sum(price) FROM facts WHERE qty > $1 "
                                          "GROUP BY grp ORDER BY grp")
        for floor in (-5, 0, 20):
            expected = [tuple(r) for r in await direct_conn.fetch(statement.get_query(), floor)]
            assert [tuple(r) for r in await statement.fetch(floor)] == expected
    finally:
        await proxied.close()
        await direct_conn.close()


# -- joins and subqueries of sharded tables: exact, or refused with 0A000 before anything runs ---------------------
LEDGER_USERS = range(1, 61)
LEDGER = [
    "CREATE TABLE accounts (user_id bigint PRIMARY KEY, region text, name text, threshold int)",
    "CREATE TABLE payments (id int, user_id bigint NOT NULL, region text, amount int, status text, "
    "paid_at timestamptz)",
]


def ledger_rows(user: int) -> tuple[tuple, list[tuple]]:
    """One account, and user % 4 payments (none for a quarter of the users), in regions R1-R3."""
    account = (user, f"R{user % 3 + 1}", f"user {user}", user % 50)
    payments = [(user * 10 + n, user, f"R{(user + n) % 3 + 1}", (user * 37 + n * 11) % 100,
                 "open" if (user + n) % 3 == 0 else "paid", f"2024-{1 + (user + n) % 6:02d}-{1 + n * 7:02d} 12:00+00")
                for n in range(user % 4)]
    return account, payments


def _row(values: tuple) -> str:
    return "(" + ", ".join(map(_literal, values)) + ")"


@pytest.fixture(scope="module")
def ledger(sharded, shards, reference):
    """accounts and payments behind the proxy (each user's rows in one INSERT) and on the reference server, with
    countries R1-R3 in the reference table; and ran(), which logs each call in ran_log on the shard calling it."""
    inserts = ["INSERT INTO countries (code, name) VALUES ('R1', 'Rivia'), ('R2', 'Redania'), ('R3', 'Rozwadow')"]
    for user in LEDGER_USERS:
        account, payments = ledger_rows(user)
        inserts.append(f"INSERT INTO accounts (user_id, region, name, threshold) VALUES {_row(account)}")
        if payments:
            inserts.append("INSERT INTO payments (id, user_id, region, amount, status, paid_at) VALUES "
                           + ", ".join(map(_row, payments)))
    with connect(sharded, autocommit=True) as conn:
        for statement in LEDGER + ["CREATE TABLE ran_log (at timestamptz DEFAULT now())",
                                   "CREATE FUNCTION ran() RETURNS boolean LANGUAGE sql "
                                   "AS 'INSERT INTO ran_log DEFAULT VALUES RETURNING true'"] + inserts:
            conn.execute(statement)
    with psycopg.connect(reference.primary.dsn(dbname=APP_DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS countries (code text PRIMARY KEY, name text)")
        for statement in LEDGER + inserts:
            conn.execute(statement)
    return "ledger"


JOIN_QUERIES = [
    # joined on equal keys: every shard holds every pair that matches
    "SELECT a.region, count(*), sum(p.amount) FROM accounts a JOIN payments p ON p.user_id = a.user_id "
    "GROUP BY a.region ORDER BY a.region",
    "SELECT count(*), sum(amount) FROM accounts a JOIN payments p USING (user_id) WHERE p.status = 'open'",
    "SELECT a.user_id, p.id FROM accounts a LEFT JOIN payments p ON p.user_id = a.user_id AND p.amount > 50 "
    "ORDER BY a.user_id, p.id NULLS FIRST",
    "SELECT count(*), count(a.user_id), count(p.user_id) FROM accounts a FULL JOIN payments p "
    "ON p.user_id = a.user_id AND p.amount > 90",
    "SELECT count(*) FROM payments x JOIN payments y ON x.user_id = y.user_id AND x.id < y.id",
    # subqueries and LATERAL correlated on the key, a CTE joined on it
    "SELECT count(*) FROM payments p WHERE EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = p.user_id "
    "AND a.region = 'R2')",
    "SELECT count(*), sum(amount) FROM payments WHERE user_id IN (SELECT user_id FROM accounts WHERE region = 'R3')",
    "SELECT a.user_id FROM accounts a WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.user_id = a.user_id) "
    "ORDER BY a.user_id",
    "SELECT a.user_id, l.id, l.amount FROM accounts a CROSS JOIN LATERAL (SELECT p.id, p.amount FROM payments p "
    "WHERE p.user_id = a.user_id AND p.amount > a.threshold) l ORDER BY a.user_id, l.id",
    "WITH big AS (SELECT user_id, amount FROM payments WHERE amount > 60) SELECT a.region, count(*), max(b.amount) "
    "FROM accounts a JOIN big b ON b.user_id = a.user_id GROUP BY a.region ORDER BY a.region",
    # with the reference table, which every shard holds whole
    "SELECT c.name, count(*), sum(p.amount) FROM payments p JOIN countries c ON c.code = p.region "
    "GROUP BY c.name ORDER BY c.name",
    "SELECT c.name, count(*) FROM accounts a JOIN payments p USING (user_id) JOIN countries c ON c.code = a.region "
    "WHERE p.status = 'paid' GROUP BY c.name ORDER BY c.name",
    # GROUP BY an output column's alias (the query), and a name that is an input column too
    "SELECT status, date_trunc('month', paid_at) AS m, count(*) FROM payments GROUP BY status, m ORDER BY status, m",
    "SELECT p.region AS r, count(*), avg(amount) FROM payments p GROUP BY r ORDER BY r",
    "SELECT amount / 25 AS amount, count(*) FROM payments GROUP BY amount",
]
KEYED_JOIN_QUERIES = [
    "SELECT a.name, p.id, p.amount FROM accounts a JOIN payments p ON p.user_id = a.user_id WHERE a.user_id = %s "
    "ORDER BY p.id",
    "SELECT count(*) FROM accounts a JOIN payments p ON p.region = a.region AND p.user_id = a.user_id "
    "WHERE a.user_id = %s",
    "SELECT a.name, p.id FROM accounts a LEFT JOIN payments p USING (user_id) WHERE user_id = %s ORDER BY p.id",
    "SELECT p.id FROM payments p WHERE p.user_id = %s AND EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = "
    "p.user_id AND a.threshold >= 0) ORDER BY p.id",
    "SELECT c.name, p.amount FROM payments p JOIN countries c ON c.code = p.region WHERE p.user_id = %s "
    "ORDER BY p.id",
]


def test_joins_and_subqueries_on_the_shard_key_match_one_server(sharded, reference, ledger):
    """Scatters of joins on equal keys, reference-table joins and GROUP BY aliases, in the simple protocol and
    as prepared statements, against one server holding every row."""
    with connect(sharded, autocommit=True) as proxied, \
            psycopg.connect(reference.primary.dsn(dbname=APP_DB), autocommit=True) as direct_conn:
        for query in JOIN_QUERIES:
            expected = direct_conn.execute(query).fetchall()
            assert expected, query
            _same(query, proxied.execute(query).fetchall(), expected)
            _same(query, proxied.execute(query, prepare=True).fetchall(), expected)


def test_keyed_joins_run_on_the_key_shard_and_match_one_server(sharded, shards, names, reference, ledger):
    users = [3, 7, 8, 42]  # 8 has no payments
    with connect(sharded, autocommit=True) as proxied, \
            psycopg.connect(reference.primary.dsn(dbname=APP_DB), autocommit=True) as direct_conn:
        for query in KEYED_JOIN_QUERIES:
            for user in users:
                expected = direct_conn.execute(query, (user,)).fetchall()
                _same(query, proxied.execute(query, (user,)).fetchall(), expected)
        for user in users:  # one shard answers: the key's
            port = proxied.execute("SELECT inet_server_port() FROM accounts a JOIN payments p USING (user_id) "
                                   "WHERE a.user_id = %s AND p.user_id = %s LIMIT 1", (user, user)).fetchall()
            assert port in ([], [(port_of(shards, owner(user, names)),)])


JOIN_REFUSALS = [
    # the join: summing each shard's pairs misses the pairs across shards
    "SELECT count(*) FROM accounts a JOIN accounts b ON a.region = b.region WHERE ran()",
    "SELECT count(*) FROM accounts a JOIN payments p ON p.region = a.region WHERE a.user_id = 7 AND ran()",
    "SELECT count(*) FROM payments WHERE region IN (SELECT region FROM accounts) AND ran()",
    "SELECT count(*) FROM payments WHERE user_id NOT IN (SELECT user_id FROM accounts WHERE threshold > 10) AND ran()",
    "SELECT count(*) FROM accounts a WHERE EXISTS (SELECT 1 FROM payments p WHERE p.region = a.region) AND ran()",
    "SELECT count(*) FROM accounts a CROSS JOIN LATERAL (SELECT * FROM payments p WHERE p.region = a.region) l "
    "WHERE ran()",
    "WITH r AS (SELECT region FROM accounts WHERE user_id = 7) SELECT count(*) FROM payments JOIN r USING (region) "
    "WHERE ran()",
    "SELECT count(*) FROM payments p JOIN (SELECT * FROM accounts ORDER BY user_id LIMIT 5) a USING (user_id) "
    "WHERE ran()",
]


def test_combinations_across_shards_are_refused_before_anything_runs(sharded, shards, names, reference, ledger):
    with connect(sharded, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM accounts a JOIN payments p USING (user_id) WHERE ran()").fetchone()
        assert sum(rows[0][0] for rows in everywhere(shards, "SELECT count(*) FROM ran_log").values()) > 0
        for cluster in shards:  # ran() leaves its trace where it runs
            direct(cluster, "DELETE FROM ran_log")
        before = everywhere(shards, "SELECT count(*), sum(amount) FROM payments")
        for query in JOIN_REFUSALS:
            for prepare in (None, True):
                with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy: SELECT combines rows of"):
                    conn.execute(query, prepare=prepare)
                assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy: UPDATE combines rows of"):
            conn.execute("UPDATE payments p SET amount = amount + 1 FROM accounts a WHERE a.region = p.region "
                         "AND p.user_id = %s AND ran()", (7,))
        # an output column named like an input column: PostgreSQL groups by the input column; the probe tells
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy: GROUP BY status names an input"):
            conn.execute("SELECT amount % 2 AS status, count(*) FROM payments WHERE ran() GROUP BY status")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert everywhere(shards, "SELECT count(*) FROM ran_log") == {name: [(0,)] for name in names}
    assert everywhere(shards, "SELECT count(*), sum(amount) FROM payments") == before
    # what running the join on each shard and adding up would have answered: not the whole's answer
    query = "SELECT count(*) FROM accounts a JOIN accounts b ON a.region = b.region"
    per_shard = sum(rows[0][0] for rows in everywhere(shards, query).values())
    assert per_shard < direct(reference, query)[0][0]


# -- transactions: held until a shard is named, then kept there ---------------------------------------------------
def port_of(shards, name: str) -> int:
    return next(c.primary.port for c in shards if c.name == name)


def test_transaction_stays_on_its_shard(sharded, shards, names):
    user = 2001
    with connect(sharded) as conn:  # psycopg's default: BEGIN before the first statement
        conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%s, 'tx-a', 1)", (user,))
        conn.execute("UPDATE orders SET amount = amount + 1 WHERE user_id = %s AND item = 'tx-a'", (user,))
        conn.execute("INSERT INTO orders (user_id, item, amount) VALUES (%s, 'tx-b', 5)", (user,))
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == port_of(shards, owner(user, names))
        assert conn.execute("SELECT sum(amount) FROM orders WHERE user_id = %s", (user,)).fetchone()[0] == 7
        conn.commit()
    placed = everywhere(shards, f"SELECT item, amount FROM orders WHERE user_id = {user} ORDER BY item")
    assert placed[owner(user, names)] == [("tx-a", 2), ("tx-b", 5)]
    assert sum(map(len, placed.values())) == 2


def test_tentative_transaction_moves_to_the_named_shard(sharded, shards, names):
    """Reads that name no shard run on a home shard; the first statement naming another shard moves the
    transaction there (the home shard's part is rolled back and the BEGIN and SETs replayed)."""
    for shard, user in users_on_each_shard(names, 2100).items():
        with connect(sharded) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("SELECT count(*) > 0 FROM pg_class").fetchone() == (True,)
            conn.execute("SET LOCAL work_mem = '3MB'")
            conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'moved')", (user,))
            assert conn.execute("SELECT inet_server_port()").fetchone()[0] == port_of(shards, shard)
            assert conn.execute("SHOW work_mem").fetchone() == ("3MB",)
            assert conn.execute("SELECT count(*) FROM orders WHERE user_id = %s AND item = 'moved'",
                                (user,)).fetchone() == (1,)
            conn.commit()
    assert_placed(shards, names, "orders", "item = 'moved'", SHARDS)


def test_held_transaction_rollback(sharded, shards, names):
    user = 2300
    with connect(sharded) as conn:
        conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'rolled-back')", (user,))
        conn.rollback()
        conn.execute("SELECT 1")  # a held BEGIN, ended by the proxy itself
        conn.rollback()
    psql(sharded, stdin="BEGIN;\nROLLBACK;\nBEGIN;\nCOMMIT;\n")
    assert everywhere(shards, "SELECT 1 FROM orders WHERE item = 'rolled-back'") == {name: [] for name in names}


def test_begin_read_only(sharded, shards, names, facts):
    with connect(sharded) as conn:
        conn.read_only = True  # BEGIN READ ONLY
        assert conn.execute("SELECT count(*) FROM facts").fetchone() == (facts,)  # a scatter read
        assert conn.execute("SELECT count(*) FROM facts WHERE user_id = %s", (1007,)).fetchone()[0] > 0
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO orders (user_id, item) VALUES (1007, 'read-only')")
        conn.rollback()
    done = psql(sharded, "-A", "-t", stdin="BEGIN READ ONLY;\nSELECT count(*) FROM facts WHERE user_id = 1042;\n"
                                          "SHOW transaction_read_only;\nCOMMIT;\n")
    assert done.stdout.split()[-1] == "on"
    assert everywhere(shards, "SELECT 1 FROM orders WHERE item = 'read-only'") == {name: [] for name in names}


# -- refusals touch nothing, and the connection goes on ---------------------------------------------------------------
def test_refusals_touch_nothing(sharded, shards, names, facts):
    a, b = two_users_apart(names, 2400)
    before = everywhere(shards, "SELECT count(*), sum(amount) FROM orders")
    refused = [
        ("UPDATE orders o SET amount = 0 FROM orders p WHERE p.item = o.item", None),
        ("DELETE FROM orders WHERE amount > (SELECT avg(amount) FROM orders)", None),
        (f"WITH s AS (SELECT 1) INSERT INTO orders (user_id, item) VALUES ({a}, 'multi'), ({b}, 'multi')", None),
        ("INSERT INTO orders (user_id, item) VALUES (%s, 'multi'), (%s, (SELECT max(item) FROM orders))", (a, b)),
        ("INSERT INTO orders (item) VALUES ('no key')", None),
        ("SELECT id, row_number() OVER (ORDER BY id) FROM facts", None),
        ("SELECT DISTINCT ON (grp) grp, id FROM facts ORDER BY grp, id", None),
        ("SELECT grp, count(*) FROM facts GROUP BY grp HAVING count(*) > 10", None),
        ("SELECT string_agg(note, ',') FROM facts", None),
        ("SELECT count(DISTINCT grp) FROM facts", None),
        ("SELECT sum(score::real) FROM facts", None),  # refused once the shards' rows show a real
        ("EXECUTE refused_insert(2400)", None),  # its statement was PREPARE'd on some shard, out of sight
    ]
    with connect(sharded, autocommit=True) as conn:
        conn.execute("PREPARE refused_insert(bigint) AS INSERT INTO orders (user_id, item) VALUES ($1, 'multi')")
        for query, params in refused:
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy:"):
                conn.execute(query, params)
            assert conn.execute("SELECT 1").fetchone() == (1,)
    done = psql(sharded, "-c", "DELETE FROM orders o USING orders p WHERE p.id = o.id + 1", check=False)
    assert done.returncode != 0 and "shardproxy:" in done.stderr
    assert everywhere(shards, "SELECT count(*), sum(amount) FROM orders") == before
    assert everywhere(shards, "SELECT 1 FROM orders WHERE item IN ('multi', 'no key')") == {n: [] for n in names}


# -- reference tables: read on one shard, written on every shard's primary atomically --------------------------------
def test_reference_table_writes_reach_every_shard(sharded, shards):
    with connect(sharded, autocommit=True) as conn:
        conn.execute("INSERT INTO countries (code, name) VALUES ('FR', 'France'), ('JP', 'Japan')")
        conn.execute("INSERT INTO countries (code, name) VALUES (%s, %s)", ("BR", "Brazil"))
        conn.execute("UPDATE countries SET name = 'République française' WHERE code = 'FR'")
        expected = [("BR", "Brazil"), ("FR", "République française"), ("JP", "Japan")]
        for cluster in shards:
            assert direct(cluster, "SELECT code, name FROM countries WHERE code IN ('BR', 'FR', 'JP') "
                                   "ORDER BY code") == expected
        # reads: one copy, from one shard
        assert conn.execute("SELECT code, name FROM countries WHERE code IN ('BR', 'FR', 'JP') "
                            "ORDER BY code").fetchall() == expected
        assert conn.execute("SELECT count(*) FROM countries WHERE code IN ('BR', 'FR', 'JP')").fetchone() == (3,)
        # a sharded table joined to a reference table: each shard has the whole reference table to join
        for user in (3001, 3002, 3003):
            conn.execute("INSERT INTO orders (user_id, item) VALUES (%s, 'FR'), (%s, 'JP')", (user, user))
        joined = conn.execute("SELECT c.name FROM orders o JOIN countries c ON c.code = o.item "
                              "WHERE o.user_id = %s ORDER BY c.name", (3002,)).fetchall()
        assert joined == [("Japan",), ("République française",)]
        joined = conn.execute("SELECT c.name, count(*) FROM orders o JOIN countries c ON c.code = o.item "
                              "WHERE o.user_id BETWEEN 3001 AND 3003 GROUP BY c.name ORDER BY c.name").fetchall()
        assert joined == [("Japan", 3), ("République française", 3)]


def test_failing_reference_write_changes_no_shard(sharded, shards):
    direct(shards[1], "INSERT INTO countries (code, name) VALUES ('XX', 'only on one shard')")
    before = everywhere(shards, "SELECT code, name FROM countries ORDER BY code")
    with connect(sharded, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO countries (code, name) VALUES ('YY', 'new'), ('XX', 'clash')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("UPDATE countries SET code = 'XX' WHERE code = 'JP'")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert everywhere(shards, "SELECT code, name FROM countries ORDER BY code") == before
    for cluster in shards:  # no transaction was left prepared
        assert direct(cluster, "SELECT count(*) FROM pg_prepared_xacts") == [(0,)]


# -- DDL: every shard's primary, all-or-nothing ------------------------------------------------------------------------
def columns(cluster, table: str) -> list[tuple]:
    return direct(cluster, "SELECT column_name, data_type FROM information_schema.columns "
                           f"WHERE table_name = '{table}' ORDER BY ordinal_position")


def test_ddl_runs_on_every_shard(sharded, shards):
    with connect(sharded, autocommit=True) as conn:
        conn.execute("CREATE TABLE ddl_ok (user_id bigint, note text)")
        conn.execute("ALTER TABLE ddl_ok ADD COLUMN extra int")
        conn.execute("CREATE INDEX ddl_ok_note ON ddl_ok (note)")
    for cluster in shards:
        assert columns(cluster, "ddl_ok") == [("user_id", "bigint"), ("note", "text"), ("extra", "integer")]
        assert direct(cluster, "SELECT to_regclass('ddl_ok_note') IS NOT NULL") == [(True,)]
    psql(sharded, "-c", "DROP TABLE ddl_ok")
    assert everywhere(shards, "SELECT to_regclass('ddl_ok') IS NULL") == {c.name: [(True,)] for c in shards}


def test_failing_ddl_changes_no_shard(sharded, shards):
    direct(shards[2], "CREATE TABLE ddl_clash (only_here int); ALTER TABLE ddl_clash OWNER TO app")
    direct(shards[0], "ALTER TABLE orders ADD COLUMN clash int")
    before = {c.name: (columns(c, "ddl_clash"), columns(c, "orders")) for c in shards}
    with connect(sharded, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DuplicateTable):
            conn.execute("CREATE TABLE ddl_clash (user_id bigint)")
        with pytest.raises(psycopg.errors.DuplicateColumn):
            conn.execute("ALTER TABLE orders ADD COLUMN clash int")
        with pytest.raises(psycopg.errors.DuplicateColumn):  # several statements in one query: all or nothing
            conn.execute("CREATE TABLE ddl_two (user_id bigint); ALTER TABLE orders ADD COLUMN clash text")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert {c.name: (columns(c, "ddl_clash"), columns(c, "orders")) for c in shards} == before
    assert everywhere(shards, "SELECT to_regclass('ddl_two') IS NULL") == {c.name: [(True,)] for c in shards}
    for cluster in shards:
        assert direct(cluster, "SELECT count(*) FROM pg_prepared_xacts") == [(0,)]
    direct(shards[0], "ALTER TABLE orders DROP COLUMN clash")


def test_create_index_concurrently(sharded, shards, names):
    """Not transactional, so it cannot be all-or-nothing: it runs on each shard on its own, and a failure
    says on which shards the index exists."""
    with connect(sharded, autocommit=True) as conn:
        conn.execute("CREATE INDEX CONCURRENTLY orders_item ON orders (item)")
        assert everywhere(shards, "SELECT to_regclass('orders_item') IS NOT NULL") == {n: [(True,)] for n in names}
        direct(shards[1], "CREATE INDEX orders_amount ON orders (amount)")
        with pytest.raises(psycopg.errors.DuplicateTable) as failure:
            conn.execute("CREATE INDEX CONCURRENTLY orders_amount ON orders (amount)")
        message = str(failure.value)
        assert message.startswith("shardproxy:") and names[1] in message, message
        assert f"{names[0]}, {names[2]}" in message, message
        assert everywhere(shards, "SELECT to_regclass('orders_amount') IS NOT NULL") == {n: [(True,)] for n in names}
        conn.execute("DROP INDEX CONCURRENTLY orders_amount")
        assert everywhere(shards, "SELECT to_regclass('orders_amount') IS NULL") == {n: [(True,)] for n in names}
        conn.execute("VACUUM (ANALYZE) orders")  # refused in a transaction block too: run the same way
        assert all(rows[0][0] is not None for rows in everywhere(
            shards, "SELECT last_vacuum FROM pg_stat_user_tables WHERE relname = 'orders'").values())
    # inside a transaction block, as PostgreSQL itself says
    with connect(sharded) as conn, pytest.raises(psycopg.errors.ActiveSqlTransaction):
        conn.execute("CREATE INDEX CONCURRENTLY orders_never ON orders (amount)")
    assert everywhere(shards, "SELECT to_regclass('orders_never') IS NULL") == {n: [(True,)] for n in names}


# -- pgbench: point reads and updates by random user_id, spread over the shards ----------------------------------------
PGBENCH_SCRIPT = """\\set uid random(1, {users})
BEGIN;
SELECT balance FROM users WHERE user_id = :uid;
UPDATE users SET balance = balance + 1 WHERE user_id = :uid;
END;
SELECT name FROM users WHERE user_id = :uid;
"""


@pytest.fixture(scope="module")
def users_table(sharded, shards, names):
    """`users` made through the proxy, each shard loaded directly with the rows the ring gives it."""
    with connect(sharded, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (user_id bigint PRIMARY KEY, name text NOT NULL, balance bigint NOT NULL)")
    for cluster in shards:
        with psycopg.connect(cluster.primary.dsn(dbname=APP_DB), autocommit=True) as conn, \
                conn.cursor().copy("COPY users (user_id, name, balance) FROM STDIN") as copy:
            for user in range(1, USERS + 1):
                if owner(user, names) == cluster.name:
                    copy.write_row((user, f"user {user}", 0))
    return "users"


@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_pgbench_point_reads_and_updates(sharded, shards, names, users_table, tmp_path, mode):
    script = tmp_path / "users.sql"
    script.write_text(PGBENCH_SCRIPT.format(users=USERS))
    before = sum(rows[0][0] or 0 for rows in everywhere(shards, "SELECT sum(balance) FROM users").values())
    env = {**os.environ, "PGPASSWORD": "secret", "PGCONNECT_TIMEOUT": "10"}
    # A thread per client: pgbench prepares each statement synchronously when a client first runs it, which
    # would freeze the other clients of its thread in their transactions while it waits for a connection of a
    # pool (4) smaller than the clients (README, Pooling).
    done = subprocess.run(["pgbench", "-h", sharded.host, "-p", str(sharded.port), "-U", "app", "-n", "-f", str(script),
                           "-M", mode, "-c", "8", "-j", "8", "-T", "3", APP_DB],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "number of failed transactions: 0 " in report, report
    processed = int(re.search(r"number of transactions actually processed: (\d+)", report).group(1))
    assert processed > 0, report
    # every UPDATE found its row: one increment per transaction, all on the right shards
    after = sum(rows[0][0] or 0 for rows in everywhere(shards, "SELECT sum(balance) FROM users").values())
    assert after - before == processed, report
    assert_placed(shards, names, "users", "true", USERS)


# -- bad SQL: PostgreSQL's own error, never a worse one of the proxy's ----------------------------------------------
BAD_SQL = [
    "SELEC 1",
    "SELECT * FROM orders WHERE user_id = ",
    "SELECT * FROM orders WHERE user_id = 1 AND",
    "INSERT INTO orders (user_id, item VALUES (1, 'x')",
    "UPDATE orders SET WHERE user_id = 1",
    "SELECT 'unterminated",
    "SELECT 1; SELEC 2",
    "/* shard_key: 5 */ DELET FROM orders",
]


def _error(conn: psycopg.Connection, query: str, prepare: bool | None) -> tuple[str | None, str]:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(query, prepare=prepare)
    return caught.value.sqlstate, caught.value.diag.message_primary or ""


@pytest.mark.parametrize("prepare", [None, True], ids=["simple", "extended"])
def test_bad_sql_gets_postgresqls_own_error(sharded, reference, prepare):
    """The router cannot parse these: the client still gets the server's syntax error, as a direct connection
    would, in the simple and the extended protocol, and the connection goes on (also inside a transaction)."""
    with connect(sharded, autocommit=True) as proxied, \
            psycopg.connect(reference.primary.dsn(dbname=APP_DB), autocommit=True) as direct_conn:
        for query in BAD_SQL:
            expected = _error(direct_conn, query, prepare)
            assert expected[0] == "42601", expected
            assert _error(proxied, query, prepare) == expected, query
            assert proxied.execute("SELECT 1").fetchone() == (1,)
    with connect(sharded) as conn:  # inside a transaction: aborted as PostgreSQL aborts it
        conn.execute("SELECT count(*) FROM orders WHERE user_id = 1")
        assert _error(conn, "SELEC 1", prepare)[0] == "42601"
        assert _error(conn, "SELECT 1", prepare)[0] == "25P02"
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
