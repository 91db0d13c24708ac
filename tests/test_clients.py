"""Real client libraries and tools through a transaction-pooling proxy, against a real PostgreSQL server.

Every test checks that an application sees the database as it would directly, while its statements are
spread over the proxy's small pool (4 server connections) by more clients than that. What actually reached
the server is checked on a direct connection, never through the proxy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from hashlib import md5

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy import orm

from tests.support import APP_DB

POOL_SIZE = 4  # the `proxy` fixture's pool


# -- helpers ------------------------------------------------------------------------------------------------
def connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=APP_DB), connect_timeout=10, **kwargs)


def on_server(pg, query: str) -> list[tuple]:
    """Rows as the server itself has them, bypassing the proxy."""
    return pg.primary.sql(query, dbname=APP_DB)


def create_table(pg, name: str, columns: str) -> str:
    """A fresh table owned by `app`, made directly on the server."""
    pg.primary.sql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns}); ALTER TABLE {name} OWNER TO app",
                   dbname=APP_DB)
    return name


def run_threads(count: int, work) -> list:
    """Run work(i) for i in range(count), each in its own thread, all started together; their results."""
    barrier = threading.Barrier(count)

    def start(i: int):
        barrier.wait(timeout=30)
        return work(i)

    with ThreadPoolExecutor(count) as executor:
        return list(executor.map(start, range(count)))


# -- psql ---------------------------------------------------------------------------------------------------
def psql(proxy, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": "secret", "PGCONNECT_TIMEOUT": "10"}
    command = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port), "-U", "app",
               "-d", APP_DB, *args]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def test_psql_query_output(proxy):
    done = psql(proxy, "-A", "-t", "-F", "|", "-c",
                "SELECT n, repeat('x', n), n * 1.5 FROM generate_series(1, 3) AS n ORDER BY n")
    assert done.stdout.splitlines() == ["1|x|1.5", "2|xx|3.0", "3|xxx|4.5"]


def test_psql_copy_in_and_out(proxy, pg, tmp_path):
    table = create_table(pg, "clients_psql_copy", "id int PRIMARY KEY, name text")
    source = tmp_path / "in.csv"
    source.write_text("".join(f"{i},name {i}\n" for i in range(1, 1001)))
    psql(proxy, "-c", f"\\copy {table} FROM '{source}' WITH (FORMAT csv)")
    assert on_server(pg, f"SELECT count(*), sum(id) FROM {table}") == [(1000, 500500)]

    # COPY FROM STDIN with the data inline in the script psql reads
    psql(proxy, stdin=f"COPY {table} FROM STDIN WITH (FORMAT csv);\n2001,from stdin\n2002,\"quoted, comma\"\n\\.\n")
    assert on_server(pg, f"SELECT name FROM {table} WHERE id > 2000 ORDER BY id") == [
        ("from stdin",), ("quoted, comma",)]

    target = tmp_path / "out.csv"
    query = f"SELECT id, name FROM {table} WHERE id <= 3 ORDER BY id"
    psql(proxy, "-c", f"\\copy ({query}) TO '{target}' WITH (FORMAT csv)")
    assert target.read_text() == "1,name 1\n2,name 2\n3,name 3\n"


# -- psycopg 3 ----------------------------------------------------------------------------------------------
def test_psycopg_autocommit_queries(proxy, pg):
    table = create_table(pg, "clients_pg_autocommit", "id int, note text")
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT %s::int + %s::int", (40, 2)).fetchone() == (42,)
        conn.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
        cur = conn.execute(f"UPDATE {table} SET note = upper(note) WHERE id = %s", (2,))
        assert cur.rowcount == 1
        assert conn.execute(f"SELECT id, note FROM {table} ORDER BY id").fetchall() == [(1, "one"), (2, "TWO")]
    # autocommit: each statement is committed as it runs, the server has them all
    assert on_server(pg, f"SELECT id, note FROM {table} ORDER BY id") == [(1, "one"), (2, "TWO")]


def test_psycopg_commit_is_visible_to_others_and_rollback_is_not(proxy, pg):
    table = create_table(pg, "clients_pg_txn", "id int PRIMARY KEY")
    with connect(proxy) as writer, connect(proxy, autocommit=True) as reader:
        writer.execute(f"INSERT INTO {table} VALUES (1)")
        # not committed yet: another connection does not see it
        assert reader.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        writer.commit()
        assert reader.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]

        writer.execute(f"INSERT INTO {table} VALUES (2)")
        assert writer.execute(f"SELECT count(*) FROM {table}").fetchone() == (2,)  # its own write, seen
        writer.rollback()
        assert reader.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]
        assert writer.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]
        writer.commit()
    assert on_server(pg, f"SELECT id FROM {table}") == [(1,)]


def test_psycopg_prepared_statements_from_many_threads(proxy, pg):
    """Server-side prepared statements used by 10 connections at once hop between the 4 server
    connections: each connection must keep getting its own statements' results."""
    table = create_table(pg, "clients_pg_prepared", "client int, n int, PRIMARY KEY (client, n)")
    clients, rounds = 10, 60

    def work(i: int) -> set[int]:
        backends = set()
        with connect(proxy, autocommit=True, prepare_threshold=0) as conn:
            for n in range(rounds):
                assert conn.execute("SELECT %s::int * 1000 + %s::int", (i, n)).fetchone() == (i * 1000 + n,)
                assert conn.execute("SELECT %s::text || '-' || %s::text", (f"c{i}", n)).fetchone() == (f"c{i}-{n}",)
                conn.execute(f"INSERT INTO {table} (client, n) VALUES (%s, %s)", (i, n))
                backends.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
            got = conn.execute(f"SELECT count(*), sum(n) FROM {table} WHERE client = %s", (i,)).fetchone()
            assert got == (rounds, sum(range(rounds)))
        return backends

    backends = run_threads(clients, work)
    assert len(set().union(*backends)) <= POOL_SIZE
    assert any(len(seen) > 1 for seen in backends), "no connection moved between server connections"
    assert on_server(pg, f"SELECT count(*), count(DISTINCT client) FROM {table}") == [(clients * rounds, clients)]


def test_a_server_connection_keeps_its_most_recently_used_statements(sandbox, pg):
    """With room for 2 statements per server connection, preparing a third closes the least recently used one
    on the server; the client can still run it (prepared there again)."""
    proxy = sandbox.proxy("lru", [pg], pool={"size": 1, "prepared_statements_per_server": 2})
    try:
        with connect(proxy, autocommit=True, prepare_threshold=0) as conn:
            run = {text: (lambda text=text: conn.execute(text, (1,)).fetchone()) for text in
                   ("SELECT %s::int + 1 AS a", "SELECT %s::int + 2 AS b", "SELECT %s::int + 3 AS c")}
            a, b, c = run.values()

            def on_server_connection() -> list[str]:  # the pool's one server connection
                rows = conn.execute("SELECT statement FROM pg_prepared_statements ORDER BY 1", prepare=False)
                return [row[0].split(" AS ")[1] for row in rows]

            assert (a(), b(), a()) == ((2,), (3,), (2,))  # b is now the least recently used
            assert c() == (4,)
            assert on_server_connection() == ["a", "c"]
            assert b() == (3,)  # prepared again, in place of a
            assert on_server_connection() == ["b", "c"]
    finally:
        proxy.stop()


def test_a_statement_that_fails_to_prepare_leaves_the_server_connection_s_statements_as_they_were(sandbox, pg):
    """With room for one statement per server connection, preparing a second closes the first one there, in
    the same batch after its Parse. When that Parse fails, the server skips the Close: the first statement is
    still prepared there, and still runs (the proxy does not prepare it again, which the server would refuse)."""
    proxy = sandbox.proxy("lru_error", [pg], pool={"size": 1, "prepared_statements_per_server": 1})
    try:
        with connect(proxy, autocommit=True) as conn:
            libpq = conn.pgconn
            assert libpq.prepare(b"good", b"SELECT 41 + 1").status == pq.ExecStatus.COMMAND_OK
            failed = libpq.prepare(b"bad", b"SELEC 1")
            assert failed.error_field(pq.DiagnosticField.SQLSTATE) == b"42601"
            ran = libpq.exec_prepared(b"good", None)
            assert (ran.status, ran.get_value(0, 0)) == (pq.ExecStatus.TUPLES_OK, b"42"), ran.error_message
            assert conn.execute("SELECT statement FROM pg_prepared_statements", prepare=False).fetchall() == [
                ("SELECT 41 + 1",)]
            missing = libpq.exec_prepared(b"bad", None)  # as PostgreSQL: a statement that failed does not exist
            assert missing.error_field(pq.DiagnosticField.SQLSTATE) == b"26000"
    finally:
        proxy.stop()


def test_statements_named_or_closed_after_an_error_in_a_batch_are_as_postgresql_leaves_them(proxy, pg):
    """After an error the server skips the rest of the batch up to Sync: a Parse there names nothing, a Close
    there closes nothing. The proxy answers some of those messages itself; what a client sees afterwards is
    compared with what PostgreSQL itself does (the same libpq calls on a direct connection)."""
    def attempt(dsn: str) -> list:
        with psycopg.connect(dsn, autocommit=True) as conn:
            libpq = conn.pgconn
            seen = [libpq.prepare(b"kept", b"SELECT 1").status]
            libpq.enter_pipeline_mode()
            libpq.send_query_params(b"SELECT 1/0", None)
            libpq.send_prepare(b"skipped", b"SELECT 2")
            libpq.send_prepare(b"repeated", b"SELECT 1")  # the body of `kept`: the proxy knows it, answers itself
            libpq.send_close_prepared(b"kept")
            libpq.pipeline_sync()
            while (result := libpq.get_result()) is None or result.status != pq.ExecStatus.PIPELINE_SYNC:
                if result is not None:
                    seen.append((result.status, result.error_field(pq.DiagnosticField.SQLSTATE)))
            libpq.exit_pipeline_mode()
            for name in (b"kept", b"skipped", b"repeated"):
                ran = libpq.exec_prepared(name, None)
                seen.append((name, ran.status, ran.error_field(pq.DiagnosticField.SQLSTATE),
                             ran.get_value(0, 0) if ran.ntuples else None))
            return seen

    through_proxy = attempt(proxy.dsn(dbname=APP_DB))
    assert through_proxy == attempt(pg.primary.dsn(user="app", password="secret", dbname=APP_DB))
    assert through_proxy[-3:] == [(b"kept", pq.ExecStatus.TUPLES_OK, None, b"1"),
                                  (b"skipped", pq.ExecStatus.FATAL_ERROR, b"26000", None),
                                  (b"repeated", pq.ExecStatus.FATAL_ERROR, b"26000", None)]


def test_psycopg_pipeline(proxy, pg):
    """Pipelines from more connections than the pool has: batches of statements sent before any result is read,
    and an error that aborts the rest of its batch, not the batches synced before it."""
    table = create_table(pg, "clients_pg_pipeline", "id int PRIMARY KEY, v text")

    def work(i: int) -> None:
        low, high = i * 1000, i * 1000 + 1000
        with connect(proxy, autocommit=True) as conn:
            with conn.pipeline():
                cursors = [conn.execute(f"INSERT INTO {table} VALUES (%s, %s) RETURNING id", (low + n, f"v{n}"))
                           for n in range(50)]
                count = conn.execute(f"SELECT count(*) FROM {table} WHERE id >= %s AND id < %s", (low, high))
            assert [c.fetchone()[0] for c in cursors] == [low + n for n in range(50)]
            assert count.fetchone() == (50,)

            with pytest.raises(psycopg.errors.UniqueViolation):
                with conn.pipeline() as pipeline:
                    conn.execute(f"UPDATE {table} SET v = 'changed' WHERE id >= %s AND id < %s", (low, low + 10))
                    pipeline.sync()
                    conn.execute(f"INSERT INTO {table} VALUES (%s, 'duplicate')", (low,))
                    conn.execute(f"UPDATE {table} SET v = 'lost' WHERE id >= %s AND id < %s", (low, high))
            outcome = conn.execute(f"SELECT v, count(*) FROM {table} WHERE id >= %s AND id < %s GROUP BY v "
                                   "ORDER BY count(*) DESC LIMIT 1", (low, high)).fetchone()
            assert outcome == ("changed", 10)

    run_threads(6, work)
    assert on_server(pg, f"SELECT count(*), count(*) FILTER (WHERE v = 'changed'), "
                         f"count(*) FILTER (WHERE v = 'lost') FROM {table}") == [(300, 60, 0)]


def test_psycopg_copy_in_and_out(proxy, pg):
    table = create_table(pg, "clients_pg_copy", "id int PRIMARY KEY, name text, score numeric")
    rows = [(i, f"name\t{i}", Decimal(i) / 4) for i in range(1, 201)]
    with connect(proxy, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, name, score) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            with cur.copy(f"COPY {table} TO STDOUT") as copy:
                copy.set_types(["int4", "text", "numeric"])
                assert sorted(copy.rows()) == rows
        # the connection goes on as usual after COPY
        assert conn.execute(f"SELECT name FROM {table} WHERE id = 7").fetchone() == ("name\t7",)
    assert on_server(pg, f"SELECT count(*), sum(score) FROM {table}") == [(200, sum(r[2] for r in rows))]


def test_psycopg_large_copy(proxy, pg):
    table = create_table(pg, "clients_pg_bigcopy", "id int, payload text")
    total = 50_000
    with connect(proxy) as conn:
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            for i in range(total):
                copy.write_row((i, f"row {i} " + "p" * 40))
        conn.commit()
        with conn.cursor().copy(f"COPY (SELECT id FROM {table} ORDER BY id) TO STDOUT") as copy:
            out = b"".join(bytes(chunk) for chunk in copy)
        assert out == "".join(f"{i}\n" for i in range(total)).encode()
        conn.commit()
    assert on_server(pg, f"SELECT count(*), count(DISTINCT id), max(id) FROM {table}") == [(total, total, total - 1)]


def test_a_client_reading_slowly_gets_a_large_result_whole_and_in_order(proxy):
    """psql copies a large result into a pipe that nobody reads for a while: the client's socket fills, what
    it does not take waits in the proxy, and the result still arrives whole and in order; other clients are
    served meanwhile."""
    rows = 400_000
    query = f"COPY (SELECT i, md5(i::text) FROM generate_series(1, {rows}) i) TO STDOUT"
    reader = subprocess.Popen(["psql", "-X", "-d", proxy.dsn(dbname=APP_DB), "-c", query], stdout=subprocess.PIPE)
    try:
        time.sleep(2)  # psql blocks writing to the full pipe and stops reading its socket
        assert reader.poll() is None
        with connect(proxy, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM generate_series(1, 10)").fetchone() == (10,)
        out, _ = reader.communicate(timeout=120)
    finally:
        reader.kill()
    assert reader.returncode == 0
    assert out == "".join(f"{i}\t{md5(str(i).encode()).hexdigest()}\n" for i in range(1, rows + 1)).encode()


def test_statements_larger_than_a_read(proxy, pg):
    """A first statement that arrives over many reads (a 1 MB literal or parameter) waits for its end on the
    server connection it got, in both protocols, inside a transaction and out."""
    big = "x" * 1_000_000
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute(f"SELECT length('{big}')").fetchone() == (len(big),)
        assert conn.execute("SELECT length(%s)", (big,)).fetchone() == (len(big),)
        assert conn.execute("SELECT md5(%s)", (big,), prepare=True).fetchone() == (md5(big.encode()).hexdigest(),)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE big_values (v text) ON COMMIT DROP")
            conn.execute(f"INSERT INTO big_values VALUES ('{big}')")
            assert conn.execute("SELECT length(v) FROM big_values").fetchone() == (len(big),)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_notices(proxy):
    with connect(proxy, autocommit=True) as conn:
        notices = []
        conn.add_notice_handler(lambda diag: notices.append((diag.severity_nonlocalized, diag.message_primary)))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
        assert notices == [("NOTICE", "hello 42"), ("WARNING", "careful")]
        # and the connection keeps working afterwards
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)


def test_psycopg_binary_parameters_and_results(proxy, pg):
    table = create_table(pg, "clients_pg_binary", "id int8, f float8, b bool, ts timestamptz, t text[], j jsonb")
    when = dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.UTC)
    row = (2**40, 1.25, True, when, ["a", "b c", None], {"k": [1, 2]})
    with connect(proxy, autocommit=True) as conn:
        with conn.cursor(binary=True) as cur:
            cur.execute(f"INSERT INTO {table} VALUES (%b, %b, %b, %b, %b, %b)",
                        (*row[:5], psycopg.types.json.Jsonb(row[5])))
            cur.execute(f"SELECT id, f, b, ts, t, j FROM {table}")
            assert cur.pgresult.fformat(0) == 1  # really binary on the wire
            assert cur.fetchone() == row
        assert conn.execute("SELECT %b::int4 + 1", (41,), binary=True).fetchone() == (42,)
    assert on_server(pg, f"SELECT id, ts, t FROM {table}") == [(2**40, when, ["a", "b c", None])]


def test_psycopg_type_round_trips(proxy, pg):
    table = create_table(pg, "clients_pg_types",
                         "id int PRIMARY KEY, n text, blob bytea, amount numeric, at timestamptz, missing int")
    values = [
        (1, "ascii", b"\x00\x01\xff" * 100, Decimal("12345678901234567890.000000000001"),
         dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC), None),
        (2, "ünïcödé ✓ 日本語 🐘", bytes(range(256)), Decimal("-0.000001"),
         dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))), None),
        (3, "", b"", Decimal("NaN"), dt.datetime(1970, 1, 1, tzinfo=dt.UTC), None),
    ]
    with connect(proxy, autocommit=True) as conn:
        conn.cursor().executemany(f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s)", values)
        for binary in (False, True):
            got = conn.execute(f"SELECT * FROM {table} ORDER BY id", binary=binary).fetchall()
            assert [r[:3] + r[4:] for r in got] == [v[:3] + v[4:] for v in values]
            assert got[0][3] == values[0][3] and got[1][3] == values[1][3] and got[2][3].is_nan()
        assert conn.execute("SELECT NULL::text, %s::int IS NULL", (None,)).fetchone() == (None, True)
    assert on_server(pg, f"SELECT id, n, octet_length(blob), amount::text, missing FROM {table} ORDER BY id") == [
        (1, "ascii", 300, "12345678901234567890.000000000001", None),
        (2, "ünïcödé ✓ 日本語 🐘", 256, "-0.000001", None),
        (3, "", 0, "NaN", None),
    ]


def test_psycopg_error_inside_transaction(proxy, pg):
    table = create_table(pg, "clients_pg_errors", "id int PRIMARY KEY")
    with connect(proxy) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        conn.commit()
    assert on_server(pg, f"SELECT id FROM {table}") == [(2,)]


def test_psycopg_error_in_prepared_statement(proxy, pg):
    """An error at Bind of a prepared statement, inside a transaction and out of one."""
    table = create_table(pg, "clients_pg_bind_errors", "id int PRIMARY KEY")
    with connect(proxy, prepare_threshold=0) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT %s::int", ("not a number",))
        conn.rollback()
        with pytest.raises(psycopg.errors.UniqueViolation):
            for i in (2, 3, 2):
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (i,))
        conn.rollback()
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (4,))
        assert conn.execute("SELECT %s::int", ("5",)).fetchone() == (5,)
        conn.commit()
        conn.autocommit = True
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT %s::int", ("nope",))
        assert conn.execute("SELECT %s::int", ("6",)).fetchone() == (6,)
    assert on_server(pg, f"SELECT id FROM {table}") == [(4,)]


# -- session parameters -------------------------------------------------------------------------------------
DATESTYLES = [("ISO, MDY", "2024-03-05"), ("SQL, DMY", "05/03/2024"), ("German, DMY", "05.03.2024"),
              ("Postgres, MDY", "03-05-2024")]
TIMEZONES = ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Berlin", "Australia/Adelaide"]


def test_session_parameters_follow_each_client(proxy, pg):
    clients, rounds = 8, 25
    for i in range(clients):
        on_server(pg, f"DROP SCHEMA IF EXISTS clients_sp{i} CASCADE; CREATE SCHEMA clients_sp{i} AUTHORIZATION app")
        on_server(pg, f"CREATE TABLE clients_sp{i}.marker AS SELECT {i} AS owner; "
                      f"ALTER TABLE clients_sp{i}.marker OWNER TO app")

    def wanted(i: int) -> dict[str, str]:
        return {"application_name": f"client-{i}", "TimeZone": TIMEZONES[i % len(TIMEZONES)],
                "search_path": f"clients_sp{i}, public", "DateStyle": DATESTYLES[i % len(DATESTYLES)][0]}

    def check(conn: psycopg.Connection, i: int) -> int:
        want = wanted(i)
        row = conn.execute("SELECT current_setting('application_name'), current_setting('TimeZone'), "
                           "current_setting('search_path'), current_setting('DateStyle'), "
                           "'2024-03-05'::date::text, owner, pg_backend_pid() FROM marker").fetchone()
        assert row[:6] == (*want.values(), DATESTYLES[i % len(DATESTYLES)][1], i)
        assert conn.info.parameter_status("application_name") == want["application_name"]
        assert conn.info.parameter_status("TimeZone") == want["TimeZone"]
        return row[6]

    def work(i: int) -> set[int]:
        backends = set()
        with connect(proxy, autocommit=True) as conn:
            for name, value in wanted(i).items():
                conn.execute(f"SET {name} TO {value}" if name == "search_path" else f"SET {name} TO '{value}'")
            for r in range(rounds):
                if r % 3 == 0:  # some rounds in an explicit transaction
                    with conn.transaction():
                        backends.add(check(conn, i))
                        assert conn.execute("SHOW TimeZone").fetchone() == (wanted(i)["TimeZone"],)
                else:
                    backends.add(check(conn, i))
                assert conn.execute("SHOW search_path").fetchone() == (wanted(i)["search_path"],)
        return backends

    backends = run_threads(clients, work)
    assert len(set().union(*backends)) <= POOL_SIZE  # 8 clients really shared 4 server sessions
    assert any(len(seen) > 1 for seen in backends)

    # new clients start from the server's defaults, whatever the last user of their connection set
    with connect(proxy, autocommit=True) as conn:
        conn.execute("SET application_name TO 'dirty'; SET TimeZone TO 'Asia/Kolkata'")
        conn.execute("SET search_path TO clients_sp0")
        conn.execute("SET DateStyle TO 'SQL, DMY'")
    assert on_every_server_connection(proxy, SETTINGS) == [server_defaults(pg)] * POOL_SIZE


SETTINGS = ("SELECT current_setting('application_name'), current_setting('TimeZone'), "
            "current_setting('search_path'), current_setting('DateStyle')")


def server_defaults(pg) -> tuple:
    return on_server(pg, SETTINGS)[0]


def on_every_server_connection(proxy, query: str) -> list[tuple]:
    """Run query in new clients that each hold a transaction open, until every server connection of the
    pool has run it once; a row from each."""
    clients = [connect(proxy) for _ in range(POOL_SIZE)]
    try:
        rows = [conn.execute(f"SELECT pg_backend_pid(), * FROM ({query}) AS q").fetchone() for conn in clients]
        assert len({row[0] for row in rows}) == POOL_SIZE
        return [row[1:] for row in rows]
    finally:
        for conn in clients:
            conn.close()


def test_set_with_other_statements_in_one_query(proxy, pg):
    """A SET sharing a simple query with other statements: the setting follows the client, the other
    statements run once."""
    on_server(pg, "DROP SCHEMA IF EXISTS clients_multi CASCADE; CREATE SCHEMA clients_multi AUTHORIZATION app")
    create_table(pg, "clients_multi.log", "n serial, note text")
    with connect(proxy, autocommit=True) as conn:
        conn.execute("SET search_path TO clients_multi, public; INSERT INTO log (note) VALUES ('once')")
        for _ in range(3):
            on_every_server_connection(proxy, "SELECT 1")  # the next query lands where others just were
            assert conn.execute("SELECT current_setting('search_path'), count(*) FROM log").fetchone() == (
                "clients_multi, public", 1)
    assert on_server(pg, "SELECT note FROM clients_multi.log") == [("once",)]
    assert on_every_server_connection(proxy, SETTINGS) == [server_defaults(pg)] * POOL_SIZE


def test_set_through_extended_protocol(proxy, pg):
    """SET sent as Parse/Bind/Execute (as pipelines, JDBC and asyncpg's fetch do) is tracked like a
    simple-query SET: it follows its client and is not left behind for others."""
    on_server(pg, "DROP SCHEMA IF EXISTS clients_ext CASCADE; CREATE SCHEMA clients_ext AUTHORIZATION app")
    with connect(proxy, autocommit=True) as conn:
        with conn.pipeline():
            conn.execute("SET search_path TO clients_ext")
            conn.execute("SET application_name TO 'extended'")
        for _ in range(3):
            on_every_server_connection(proxy, "SELECT 1")
            assert conn.execute(SETTINGS).fetchone()[::2] == ("extended", "clients_ext")
    assert on_every_server_connection(proxy, SETTINGS) == [server_defaults(pg)] * POOL_SIZE


def test_reset_all_and_rolled_back_set(proxy, pg):
    """RESET ALL, and a SET undone by its transaction's rollback, stay undone wherever the client lands."""
    on_server(pg, "DROP SCHEMA IF EXISTS clients_undo CASCADE; CREATE SCHEMA clients_undo AUTHORIZATION app")
    defaults = server_defaults(pg)
    with connect(proxy, autocommit=True) as conn:
        conn.execute("SET search_path TO clients_undo")
        conn.execute("RESET ALL")
        on_every_server_connection(proxy, "SELECT 1")
        assert conn.execute(SETTINGS).fetchone() == defaults

        with conn.transaction(force_rollback=True):
            conn.execute("SET search_path TO clients_undo")
            conn.execute("SET application_name TO 'undone'")
        assert conn.execute(SETTINGS).fetchone() == defaults
        on_every_server_connection(proxy, "SELECT 1")
        assert conn.execute(SETTINGS).fetchone() == defaults

        with pytest.raises(psycopg.errors.DivisionByZero):  # the error rolls the implicit transaction back
            conn.execute("SET search_path TO clients_undo; SELECT 1 / 0")
        on_every_server_connection(proxy, "SELECT 1")
        assert conn.execute(SETTINGS).fetchone() == defaults
    assert on_every_server_connection(proxy, SETTINGS) == [defaults] * POOL_SIZE


# -- asyncpg ------------------------------------------------------------------------------------------------
async def aconnect(proxy) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(dbname=APP_DB), timeout=10)


async def test_asyncpg_prepared_statements_and_executemany(proxy, pg):
    table = create_table(pg, "clients_apg_prepared", "id int PRIMARY KEY, name text")
    conn = await aconnect(proxy)
    try:
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"n{i}") for i in range(300)])
        statement = await conn.prepare(f"SELECT id, name FROM {table} WHERE id >= $1 AND id < $2 ORDER BY id")
        for start in range(0, 300, 30):
            rows = await statement.fetch(start, start + 3)
            assert [tuple(r) for r in rows] == [(i, f"n{i}") for i in range(start, start + 3)]
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE name LIKE $1", "n1%") == 111
        assert [a.name for a in statement.get_attributes()] == ["id", "name"]
    finally:
        await conn.close()
    assert on_server(pg, f"SELECT count(*) FROM {table}") == [(300,)]


async def test_asyncpg_binary_types(proxy, pg):
    table = create_table(pg, "clients_apg_types",
                         "a int2, b int4, c int8, u uuid, t text, j jsonb, at timestamptz")
    rows = [
        (-32768, -2**31, -2**63, uuid.UUID(int=0), "", json.dumps({}), dt.datetime(1900, 1, 1, 0, 0, 1, tzinfo=dt.UTC)),
        (32767, 2**31 - 1, 2**63 - 1, uuid.UUID("12345678-1234-5678-1234-567812345678"), "ŝtrîng ✓ 🐘",
         json.dumps({"list": [1, 2.5, None], "nested": {"ok": True}}),
         dt.datetime(2024, 2, 29, 12, 30, 45, 999999, tzinfo=dt.UTC)),
        (None, None, None, None, None, None, None),
    ]
    conn = await aconnect(proxy)
    try:
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3, $4, $5, $6, $7)", rows)
        got = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY a NULLS LAST")]
        assert [r[:5] + r[6:] for r in got] == [r[:5] + r[6:] for r in rows]
        assert [None if r[5] is None else json.loads(r[5]) for r in got] == \
               [None if r[5] is None else json.loads(r[5]) for r in rows]
        assert await conn.fetchval("SELECT $1::uuid", rows[1][3]) == rows[1][3]
    finally:
        await conn.close()
    assert on_server(pg, f"SELECT c, u::text, j->'nested'->>'ok' FROM {table} WHERE a = 32767") == [
        (2**63 - 1, "12345678-1234-5678-1234-567812345678", "true")]


async def test_asyncpg_many_connections_through_small_pool(proxy):
    clients, queries = 20, 50

    async def work(i: int) -> set[int]:
        conn = await aconnect(proxy)
        backends = set()
        try:
            for n in range(queries):
                assert await conn.fetchval("SELECT $1::int8 * 1000 + $2::int4", i, n) == i * 1000 + n
                if n % 10 == 0:
                    backends.add(await conn.fetchval("SELECT pg_backend_pid()"))
        finally:
            await conn.close()
        return backends

    backends = await asyncio.wait_for(asyncio.gather(*(work(i) for i in range(clients))), 60)
    assert len(set().union(*backends)) <= POOL_SIZE


async def test_startup_settings_follow_the_client(proxy):
    """Settings given at connect time (asyncpg server_settings, libpq options) hold on every pooled connection."""
    special = await asyncpg.connect(proxy.dsn(dbname=APP_DB), server_settings={"statement_timeout": "1234"})
    plain = [await asyncpg.connect(proxy.dsn(dbname=APP_DB)) for _ in range(4)]
    try:
        for _ in range(10):
            # The plain clients keep every server connection busy in turn, so `special` lands on all of them.
            await asyncio.gather(*(c.execute("SELECT pg_sleep(0.005)") for c in plain))
            assert await special.fetchval("SHOW statement_timeout") == "1234ms"
            assert {await c.fetchval("SHOW statement_timeout") for c in plain} == {"0"}
    finally:
        for conn in [special, *plain]:
            await conn.close()
    with psycopg.connect(proxy.dsn(dbname=APP_DB), options="-c work_mem=3MB", autocommit=True) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("3MB",)


async def test_asyncpg_transactions(proxy, pg):
    table = create_table(pg, "clients_apg_txn", "id int PRIMARY KEY")
    conn = await aconnect(proxy)
    try:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", 2)
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (3)")
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 3
                raise ZeroDivisionError
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (4)")
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
        async with conn.transaction():
            async with conn.transaction():  # a savepoint
                await conn.execute(f"INSERT INTO {table} VALUES (5)")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (5)")
            await conn.execute(f"INSERT INTO {table} VALUES (6)")
        assert await conn.fetchval(f"SELECT array_agg(id ORDER BY id) FROM {table}") == [1, 2, 5, 6]
    finally:
        await conn.close()
    assert on_server(pg, f"SELECT array_agg(id ORDER BY id) FROM {table}") == [([1, 2, 5, 6],)]


async def test_asyncpg_copy_records(proxy, pg):
    table = create_table(pg, "clients_apg_copy", "id int PRIMARY KEY, name text, at timestamptz")
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    records = [(i, f"rec {i}", start + dt.timedelta(minutes=i)) for i in range(5000)]
    conn = await aconnect(proxy)
    try:
        result = await conn.copy_records_to_table(table, records=records, columns=["id", "name", "at"])
        assert result == "COPY 5000"
        assert tuple(await conn.fetchrow(f"SELECT * FROM {table} WHERE id = 4999")) == records[-1]
    finally:
        await conn.close()
    assert on_server(pg, f"SELECT count(*), max(at) FROM {table}") == [(5000, records[-1][2])]


# -- SQLAlchemy ---------------------------------------------------------------------------------------------
class Base(orm.DeclarativeBase):
    pass


class Widget(Base):
    __tablename__ = "clients_sa_widget"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    worker: orm.Mapped[int]
    name: orm.Mapped[str] = orm.mapped_column(sa.String(100))
    price: orm.Mapped[Decimal] = orm.mapped_column(sa.Numeric(10, 2))


def test_sqlalchemy_orm(proxy, pg):
    on_server(pg, f"DROP TABLE IF EXISTS {Widget.__tablename__}")
    url = sa.engine.make_url(proxy.dsn(dbname=APP_DB)).set(drivername="postgresql+psycopg")
    workers, per_worker = 8, 25
    engine = sa.create_engine(url, pool_size=workers, max_overflow=0)  # twice the proxy's pool
    try:
        Base.metadata.create_all(engine)

        def work(w: int) -> None:
            for n in range(per_worker):
                with orm.Session(engine) as session:
                    session.add(Widget(worker=w, name=f"w{w}-{n}", price=Decimal(n) + Decimal("0.99")))
                    session.commit()
                    mine = session.scalars(sa.select(Widget).where(Widget.worker == w).order_by(Widget.id)).all()
                    assert [x.name for x in mine] == [f"w{w}-{k}" for k in range(n + 1)]

        run_threads(workers, work)
        with orm.Session(engine) as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Widget)) == workers * per_worker
            widget = session.scalars(sa.select(Widget).where(Widget.name == "w3-7")).one()
            assert (widget.worker, widget.price) == (3, Decimal("7.99"))
    finally:
        engine.dispose()
    assert on_server(pg, f"SELECT count(*), count(DISTINCT worker), sum(price) FROM {Widget.__tablename__}") == [
        (workers * per_worker, workers, workers * sum(Decimal(n) + Decimal("0.99") for n in range(per_worker)))]


# -- pgbench ------------------------------------------------------------------------------------------------
PGBENCH_DB = "clients_pgbench"


@pytest.fixture(scope="module")
def pgbench_db(pg, proxy):
    """A database of its own, so the fixed pgbench_* table names clash with nobody; initialised through the proxy."""
    pg.primary.sql(f"DROP DATABASE IF EXISTS {PGBENCH_DB}")
    pg.primary.sql(f"CREATE DATABASE {PGBENCH_DB} OWNER app")
    done = pgbench(proxy, "-i", "-s", "1", "-q")
    assert done.returncode == 0, done.stderr
    assert pg.primary.sql("SELECT count(*) FROM pgbench_accounts", dbname=PGBENCH_DB) == [(100_000,)]
    return PGBENCH_DB


def pgbench(proxy, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": "secret", "PGCONNECT_TIMEOUT": "10"}
    command = ["pgbench", "-h", proxy.host, "-p", str(proxy.port), "-U", "app", *args, PGBENCH_DB]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("script, mode", [
    ("-S", "simple"), ("-S", "extended"), ("-S", "prepared"), ("tpcb", "prepared"), ("tpcb", "simple"),
])
def test_pgbench(proxy, pg, pgbench_db, script, mode):
    history = pg.primary.sql("SELECT count(*) FROM pgbench_history", dbname=pgbench_db)[0][0]
    options = ["-S"] if script == "-S" else []
    done = pgbench(proxy, *options, "-M", mode, "-c", "16", "-j", "2", "-T", "2", "-n")
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "number of failed transactions: 0 " in report, report
    processed = int(re.search(r"number of transactions actually processed: (\d+)", report).group(1))
    tps = float(re.search(r"tps = ([\d.]+)", report).group(1))
    assert processed > 0 and tps > 0, report
    added = pg.primary.sql("SELECT count(*) FROM pgbench_history", dbname=pgbench_db)[0][0] - history
    # TPC-B inserts one history row per transaction; the select-only script writes nothing
    assert added == (processed if script == "tpcb" else 0)
