"""Writes that name no single shard, against three real shards and one unsharded server that holds the same rows
(the differential check): an UPDATE or DELETE with no shard key runs on every shard's primary, all-or-nothing,
and answers with the row count and RETURNING rows of all shards; a multi-row INSERT whose rows belong to several
shards is split, each shard getting its own rows. Every outcome is read on direct connections to the shards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import orm

from shardproxy.devtools.sandbox import wait_until
from tests.support import APP_DB, app_clusters
from tests.support.admin import table
from tests.support.ring import owner

SHARDS = 3
USERS = range(1, 31)
WALLETS = "CREATE TABLE wallets (user_id bigint NOT NULL, n int NOT NULL, amount int CHECK (amount < 1000), " \
          "PRIMARY KEY (user_id, n))"


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(sandbox):
    return app_clusters(sandbox, "split", SHARDS)


@pytest.fixture(scope="module")
def names(shards):
    return [c.name for c in shards]


@pytest.fixture(scope="module")
def proxy(sandbox, shards):
    proxy = sandbox.proxy("split", shards, pool={"size": 4, "query_wait_timeout": "20s"},
                          sharding={"key": "user_id", "reference_tables": ["countries"]})
    with connect(proxy, autocommit=True) as conn:
        conn.execute(WALLETS)
        conn.execute("CREATE TABLE countries (code text PRIMARY KEY, name text)")
    return proxy


@pytest.fixture(scope="module")
def refusing(sandbox, shards, proxy):
    """routing.keyless_writes: refuse, on the same shards."""
    return sandbox.proxy("split-refuse", shards, sharding={"key": "user_id"}, routing={"keyless_writes": "refuse"})


@pytest.fixture(scope="module")
def reference(sandbox):
    """One unsharded server, for the differential checks."""
    cluster = sandbox.cluster("splitref")
    cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    cluster.primary.sql(WALLETS, dbname=APP_DB)
    return cluster


@pytest.fixture()
def wallets(shards, names, reference):
    """Three wallets per user, each row on its user's shard, and all of them on the unsharded server."""
    for cluster in shards:
        rows = ", ".join(f"({u}, {n}, {u})" for u in USERS for n in range(3) if owner(u, names) == cluster.name)
        direct(cluster, f"TRUNCATE wallets; INSERT INTO wallets VALUES {rows}")
    rows = ", ".join(f"({u}, {n}, {u})" for u in USERS for n in range(3))
    reference.primary.sql(f"TRUNCATE wallets; INSERT INTO wallets VALUES {rows}", dbname=APP_DB)


# -- helpers ---------------------------------------------------------------------------------------------------
def connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=APP_DB), connect_timeout=10, **kwargs)


def direct(cluster, query: str) -> list[tuple]:
    return cluster.primary.sql(query, dbname=APP_DB)


def placed(shards, names, query: str = "SELECT user_id, n, amount FROM wallets") -> list[tuple]:
    """Every shard's rows of the query, each checked to be on its user's shard, sorted."""
    rows = []
    for cluster in shards:
        for row in direct(cluster, query):
            assert owner(row[0], names) == cluster.name, (row, cluster.name)
            rows.append(row)
    return sorted(rows)


def on_reference(reference, query: str) -> list[tuple]:
    return sorted(reference.primary.sql(query, dbname=APP_DB))


def psql(proxy, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": "secret", "PGCONNECT_TIMEOUT": "10"}
    command = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port), "-U", "app",
               "-d", APP_DB, *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False)


def differential(conn: psycopg.Connection, reference, query: str, params: tuple = ()) -> list[tuple]:
    """Run a statement through the proxy and on the unsharded server: the same status, the same rows (sorted)."""
    cursor = conn.execute(query, params)
    rows = sorted(cursor.fetchall()) if cursor.description else []
    with psycopg.connect(reference.primary.dsn(dbname=APP_DB), autocommit=True) as plain:
        expected = plain.execute(query, params)
        assert cursor.statusmessage == expected.statusmessage, query
        assert rows == (sorted(expected.fetchall()) if expected.description else []), query
    return rows


def fails_and_aborts(proxy, error: type[Exception], *statements: str) -> None:
    """Inside a transaction (psycopg's default), the last statement fails with `error` and aborts it: what
    follows gets 25P02 until the rollback."""
    with connect(proxy) as conn:
        for sql in statements[:-1]:
            conn.execute(sql)
        with pytest.raises(error):
            conn.execute(statements[-1])
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()


def assert_clean(proxy, shards) -> None:
    """Once its clients left: no server connection held, none left inside a transaction, no prepared transaction
    behind."""
    assert wait_until(lambda: all(row["state"] == "idle" for row in table(proxy, "SHOW SERVERS")), 10)
    for cluster in shards:
        states = direct(cluster, "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND state LIKE 'idle in transaction%'")
        assert states == [], cluster.name
        assert direct(cluster, "SELECT gid FROM pg_prepared_xacts") == []


# -- UPDATE and DELETE with no shard key ---------------------------------------------------------------------
@pytest.mark.parametrize("prepare_threshold", [None, 0], ids=["unnamed", "prepared"])
def test_keyless_update_and_delete_match_one_server(proxy, shards, names, reference, wallets, prepare_threshold):
    with connect(proxy, autocommit=True, prepare_threshold=prepare_threshold) as conn:
        differential(conn, reference, "UPDATE wallets SET amount = amount + 1 WHERE n = 0")
        differential(conn, reference, "UPDATE wallets SET amount = amount * 2 WHERE n = %s AND amount > %s", (1, 9))
        assert differential(conn, reference, "DELETE FROM wallets WHERE n = 2 RETURNING user_id, amount") == [
            (u, u) for u in USERS]
        rows = differential(conn, reference, "UPDATE wallets SET amount = 7 WHERE amount < 5 RETURNING *")
        assert len(rows) == 7
        differential(conn, reference, "DELETE FROM wallets WHERE user_id > 1000")  # no row anywhere: DELETE 0
    assert placed(shards, names) == on_reference(reference, "SELECT user_id, n, amount FROM wallets")
    assert_clean(proxy, shards)


def test_keyless_update_in_the_simple_protocol(proxy, shards, names, reference, wallets):
    done = psql(proxy, "-c", "UPDATE wallets SET amount = 0 WHERE n = 1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"UPDATE {len(USERS)}"
    done = psql(proxy, "-c", "DELETE FROM wallets WHERE amount = 0 RETURNING n")
    assert done.stdout.splitlines()[-1] == f"DELETE {len(USERS)}"
    assert placed(shards, names, "SELECT user_id, n FROM wallets WHERE n = 1") == []
    assert len(placed(shards, names)) == 2 * len(USERS)


def test_keyless_update_through_asyncpg(proxy, shards, names, wallets):
    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB), timeout=10)
        try:
            assert await conn.execute("UPDATE wallets SET amount = amount + $1 WHERE n = $2", 100, 0) == \
                f"UPDATE {len(USERS)}"
            rows = await conn.fetch("DELETE FROM wallets WHERE n = $1 RETURNING user_id", 2)
            assert sorted(r["user_id"] for r in rows) == list(USERS)
        finally:
            await conn.close()

    asyncio.run(main())
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n = 0") == [(u, u + 100) for u in USERS]
    assert placed(shards, names, "SELECT user_id FROM wallets WHERE n = 2") == []


def test_keyless_writes_inside_a_transaction(proxy, shards, names, wallets):
    before = placed(shards, names)
    with connect(proxy) as conn:  # psycopg's default: every statement inside a transaction
        conn.execute("INSERT INTO wallets (user_id, n, amount) VALUES (%s, 9, 1)", (USERS[0],))
        cursor = conn.execute("UPDATE wallets SET amount = amount + 1 WHERE n = 9 OR n = 0")
        assert cursor.rowcount == len(USERS) + 1  # its own uncommitted row too
        assert conn.execute("DELETE FROM wallets WHERE n = 1").rowcount == len(USERS)
        conn.rollback()  # undone on every shard
        assert placed(shards, names) == before
        conn.execute("UPDATE wallets SET amount = amount + 1 WHERE n = 0")
        conn.execute("DELETE FROM wallets WHERE n = 1")
        conn.commit()
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n = 0") == [(u, u + 1) for u in USERS]
    assert placed(shards, names, "SELECT user_id FROM wallets WHERE n = 1") == []
    assert_clean(proxy, shards)


def test_a_keyless_write_that_fails_on_one_shard_changes_none(proxy, shards, names, wallets):
    before = placed(shards, names)
    with connect(proxy, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):  # the server's own error: only user 30's rows fail
            conn.execute("UPDATE wallets SET amount = amount + 970")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    fails_and_aborts(proxy, psycopg.errors.CheckViolation, "UPDATE wallets SET amount = 0 WHERE n = 0",
                     "UPDATE wallets SET amount = amount + 970")
    assert placed(shards, names) == before
    assert_clean(proxy, shards)


def test_keyless_writes_combining_shards_rows_are_refused(proxy, shards, names, wallets):
    before = placed(shards, names)
    with connect(proxy, autocommit=True) as conn:
        for query in ("UPDATE wallets w SET amount = 0 FROM wallets v WHERE v.n = w.n AND v.amount > 20",
                      "DELETE FROM wallets w USING wallets v WHERE v.amount = w.amount + 1",
                      "UPDATE wallets SET amount = (SELECT max(amount) FROM wallets)"):
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy: .* combines rows of"):
                conn.execute(query)
        # on equal keys each shard holds every pair: it runs
        conn.execute("UPDATE wallets w SET amount = v.amount + 1 FROM wallets v WHERE v.user_id = w.user_id "
                     "AND v.n = 0 AND w.n = 1")
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n = 1") == [(u, u + 1) for u in USERS]
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n <> 1") == [
        row[::2] for row in before if row[1] != 1]
    assert_clean(proxy, shards)


def test_keyless_writes_refused_by_config(refusing, shards, names, wallets):
    before = placed(shards, names)
    with connect(refusing, autocommit=True) as conn:
        for query in ("UPDATE wallets SET amount = 0", "DELETE FROM wallets WHERE n = 1"):
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="needs user_id = <value>"):
                conn.execute(query)
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert placed(shards, names) == before
    assert_clean(refusing, shards)


def test_a_reference_table_write_counts_once(proxy, shards):
    with connect(proxy, autocommit=True) as conn:
        conn.execute("DELETE FROM countries")
        assert conn.execute("INSERT INTO countries VALUES ('FR', 'France'), ('JP', 'Japan')").rowcount == 2
        assert conn.execute("UPDATE countries SET name = upper(name)").rowcount == 2
    assert [direct(c, "SELECT name FROM countries ORDER BY 1") for c in shards] == [[("FRANCE",), ("JAPAN",)]] * 3


# -- a multi-row INSERT whose rows belong to several shards -----------------------------------------------------
def spread(names, count: int, start: int = 1000) -> list[int]:
    """Users from start on, as many as count, on at least two shards (in key order)."""
    users = list(range(start, start + count))
    assert len({owner(u, names) for u in users}) > 1
    return users


def test_insert_split_in_the_simple_protocol(proxy, shards, names, wallets):
    users = spread(names, 9)
    values = ", ".join(f"({u}, 7, {u % 5})" for u in users)
    done = psql(proxy, "-A", "-t", "-c", f"INSERT INTO wallets (user_id, n, amount) VALUES {values} RETURNING user_id")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(u) for u in users] + [f"INSERT 0 {len(users)}"]  # in the VALUES order
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n = 7") == [(u, u % 5) for u in users]


@pytest.mark.parametrize("prepare_threshold", [None, 0], ids=["unnamed", "prepared"])
def test_insert_split_through_psycopg(proxy, shards, names, reference, wallets, prepare_threshold):
    query = "INSERT INTO wallets (user_id, n, amount) VALUES (%s, %s, 1), (%s, %s, 2), (%s, %s, 3), (%s, %s, 4) " \
            "RETURNING user_id, n, amount"
    with connect(proxy, autocommit=True, prepare_threshold=prepare_threshold) as conn:
        users = spread(names, 4, 1100)
        for n in range(10, 14):  # one pattern of rows to shards, again and again (a prepared statement past 0)
            params = [x for u in users for x in (u, n)]
            cursor = conn.execute(query, params)
            assert cursor.fetchall() == [(u, n, i + 1) for i, u in enumerate(users)]
            assert cursor.statusmessage == "INSERT 0 4"
        differential(conn, reference, query.replace("RETURNING user_id, n, amount", ""), [1, 20, 2, 20, 3, 20, 4, 20])
    assert len(placed(shards, names, "SELECT user_id FROM wallets WHERE n BETWEEN 10 AND 13")) == 16
    assert placed(shards, names, "SELECT user_id, n, amount FROM wallets WHERE n = 20") == \
        on_reference(reference, "SELECT user_id, n, amount FROM wallets WHERE n = 20")
    assert_clean(proxy, shards)


def test_insert_split_through_asyncpg(proxy, shards, names, wallets):
    users = spread(names, 6, 2000)

    async def main() -> None:
        conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB), timeout=10)
        try:
            query = "INSERT INTO wallets (user_id, n, amount) VALUES " + ", ".join(
                f"(${2 * i + 1}, 30, ${2 * i + 2})" for i in range(len(users))) + " RETURNING user_id, amount"
            args = [x for u in users for x in (u, u % 7)]
            for _ in range(2):  # asyncpg prepares the statement, then binds it (binary int8 keys)
                rows = await conn.fetch(query, *args)
                assert [tuple(r) for r in rows] == [(u, u % 7) for u in users]
                await conn.execute("DELETE FROM wallets WHERE n = 30")
            status = await conn.execute(query.replace(" RETURNING user_id, amount", ""), *args)
            assert status == f"INSERT 0 {len(users)}"
        finally:
            await conn.close()

    asyncio.run(main())
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n = 30") == [(u, u % 7) for u in users]


def test_insert_split_on_conflict_matches_one_server(proxy, shards, names, reference, wallets):
    rows = [(u, n, 100 + u) for u in (1, 2, 3, 40, 41, 42) for n in (0, 5)]
    values = ", ".join(f"({u}, {n}, {a})" for u, n, a in rows)
    with connect(proxy, autocommit=True) as conn:
        for conflict in ("DO NOTHING RETURNING user_id, n", "(user_id, n) DO UPDATE SET amount = EXCLUDED.amount "
                         "RETURNING user_id, n, amount, xmax = 0 AS inserted"):
            differential(conn, reference, f"INSERT INTO wallets VALUES {values} ON CONFLICT {conflict}"
                         .replace("VALUES", "(user_id, n, amount) VALUES", 1))
    assert placed(shards, names) == on_reference(reference, "SELECT user_id, n, amount FROM wallets")


def test_a_failing_row_leaves_no_row_anywhere(proxy, shards, names, wallets):
    users = spread(names, 8, 3000)
    values = ", ".join(f"({u}, 0, 1)" for u in users) + f", ({USERS[-1]}, 0, 1)"  # that row is there already
    before = placed(shards, names)
    with connect(proxy, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):  # the shard's own error, SQLSTATE 23505
            conn.execute(f"INSERT INTO wallets (user_id, n, amount) VALUES {values}")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO wallets (user_id, n, amount) VALUES (%s, 0, 1), (%s, 0, 1)", (users[0], 1))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    fails_and_aborts(proxy, psycopg.errors.UniqueViolation, f"INSERT INTO wallets (user_id, n, amount) VALUES {values}")
    assert placed(shards, names) == before
    assert_clean(proxy, shards)


def test_insert_split_inside_a_transaction(proxy, shards, names, wallets):
    a = USERS[0]
    b = next(u for u in USERS if owner(u, names) != owner(a, names))
    idle = [c for c in shards if c.name not in (owner(a, names), owner(b, names))]
    query = "INSERT INTO wallets (user_id, n, amount) VALUES (%s, 8, 1), (%s, 8, 2)"
    with connect(proxy) as conn:
        assert conn.execute(query, (a, b)).rowcount == 2
        # legs on the two shards of the rows only
        in_transaction = "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        assert [direct(c, in_transaction) for c in idle] == [[(0,)]] * len(idle)
        assert conn.execute("SELECT count(*) FROM wallets WHERE n = 8").fetchone() == (2,)  # its own rows
        conn.rollback()
        assert placed(shards, names, "SELECT user_id FROM wallets WHERE n = 8") == []
        conn.execute(query, (a, b))
        conn.execute("UPDATE wallets SET amount = amount * 10 WHERE n = 8")
        conn.commit()
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n = 8") == sorted([(a, 10), (b, 20)])
    assert_clean(proxy, shards)


class Base(orm.DeclarativeBase):
    pass


class Note(Base):
    """A server-generated key (each shard's own sequence): the ORM inserts several rows at once as
    INSERT ... SELECT ... FROM (VALUES ...) ... RETURNING id, and matches the ids to its objects by their order."""

    __tablename__ = "split_notes"
    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    user_id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    text: orm.Mapped[str] = orm.mapped_column(sa.String(50))


def test_sqlalchemy_orm_bulk_add_across_shards(proxy, shards, names):
    url = sa.engine.make_url(proxy.dsn(dbname=APP_DB)).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, pool_size=2, max_overflow=0)
    sent: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda _c, _cur, statement, *_: sent.append(statement))
    users = spread(names, 12, 4000)
    try:
        Base.metadata.create_all(engine)
        for i, cluster in enumerate(shards):  # ids apart on each shard, as the ORM keys its objects by id alone
            direct(cluster, f"ALTER TABLE split_notes ALTER COLUMN id RESTART WITH {1 + 1_000_000 * i}")
        with orm.Session(engine) as session:
            notes = [Note(user_id=u, text=f"note {u}") for u in users]
            session.add_all(notes)
            session.commit()
            made = {(note.user_id, note.id, note.text) for note in notes}
        with orm.Session(engine) as session:  # again: the same pattern of rows to shards, once more
            session.add_all([Note(user_id=u, text=f"again {u}") for u in users])
            session.commit()
    finally:
        engine.dispose()
    assert sum("FROM (VALUES" in statement for statement in sent) == 2  # each flush, one INSERT of all rows
    # every object got the id its own row has on its own shard
    assert made <= set(placed(shards, names, "SELECT user_id, id, text FROM split_notes"))
    assert len(placed(shards, names, "SELECT user_id FROM split_notes")) == 2 * len(users)
    assert_clean(proxy, shards)


def test_a_split_insert_described_in_its_own_batch_is_refused(proxy, shards, names, wallets):
    """libpq's pipeline: Parse, Describe of the statement, Bind, Describe of the portal, Execute, Sync in one batch.
    Each shard's statement has other parameters than the client's: the Describe cannot be answered exactly."""
    a = 5000
    b = next(u for u in range(a + 1, a + 1000) if owner(u, names) != owner(a, names))
    with connect(proxy, autocommit=True) as conn:
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        pgconn.send_prepare(b"described", b"INSERT INTO wallets (user_id, n, amount) VALUES ($1, 6, 1), ($2, 6, 2)")
        pgconn.send_describe_prepared(b"described")
        pgconn.send_query_prepared(b"described", [str(a).encode(), str(b).encode()])
        pgconn.pipeline_sync()
        results = []
        while not results or results[-1][0] != psycopg.pq.ExecStatus.PIPELINE_SYNC:
            result = pgconn.get_result()
            if result is not None:
                results.append((result.status, result.error_field(psycopg.pq.DiagnosticField.SQLSTATE)))
        pgconn.exit_pipeline_mode()
        assert results[0] == (psycopg.pq.ExecStatus.FATAL_ERROR, b"0A000")
        assert {status for status, _ in results[1:-1]} == {psycopg.pq.ExecStatus.PIPELINE_ABORTED}
        assert conn.execute("INSERT INTO wallets (user_id, n, amount) VALUES (%s, 6, 1), (%s, 6, 2)",
                            (a, b)).rowcount == 2  # described in batches of their own (psycopg does not)
    assert placed(shards, names, "SELECT user_id, amount FROM wallets WHERE n = 6") == [(a, 1), (b, 2)]
    assert_clean(proxy, shards)
