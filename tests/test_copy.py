"""COPY across two real shards: rows split by their key's owner in text, csv and binary, all or nothing (a bad row
or a NULL key anywhere leaves no row on any shard), reference tables, COPY TO of every shard's rows, inside a
client's transaction, a client that leaves mid-COPY, and through psql, pg_dump, psycopg and asyncpg.

Every outcome is read on direct connections to the shards.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import uuid

import asyncpg
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import pq

from shardproxy._hash import HashRing
from shardproxy.devtools.sandbox import LOOPBACK, wait_until
from shardproxy.routing.copy import BINARY_HEADER, CopyError, RowSplitter, copy_spec
from tests.support import APP_DB, app_clusters
from tests.support.ring import owner

SHARDS = 2
USERS_DDL = "CREATE TABLE users (user_id bigint NOT NULL, name text, score int)"
EVENTS_DDL = "CREATE TABLE events (id int NOT NULL, note text, user_id bigint NOT NULL)"
COUNTRIES_DDL = "CREATE TABLE countries (code text PRIMARY KEY, name text)"


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(sandbox):
    return app_clusters(sandbox, "copy", SHARDS)


@pytest.fixture(scope="module")
def names(shards):
    return [c.name for c in shards]


def start_proxy(sandbox, shards, name: str, mode: str):
    return sandbox.proxy(name, shards, pool={"size": 6, "mode": mode, "query_wait_timeout": "20s"},
                         sharding={"reference_tables": ["countries"]},
                         metrics={"host": LOOPBACK, "port": sandbox.free_port()})


@pytest.fixture(scope="module")
def proxy(sandbox, shards):
    """Transaction pooling, the default. The tables are made through it (DDL on every shard)."""
    proxy = start_proxy(sandbox, shards, "copy", "transaction")
    with connect(proxy) as conn:
        for ddl in (USERS_DDL, EVENTS_DDL, COUNTRIES_DDL):
            conn.execute(ddl)
    return proxy


@pytest.fixture(scope="module")
def session_proxy(sandbox, shards, proxy):
    return start_proxy(sandbox, shards, "copy-session", "session")


@pytest.fixture(params=["transaction", "session"])
def any_proxy(request, proxy, session_proxy):
    return proxy if request.param == "transaction" else session_proxy


@pytest.fixture(scope="module")
def single(sandbox):
    """One unsharded server with the same tables, for differential tests."""
    cluster = sandbox.cluster("copyref")
    cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    with psycopg.connect(cluster.primary.dsn("app", dbname=APP_DB), autocommit=True) as conn:
        for ddl in (USERS_DDL, EVENTS_DDL, COUNTRIES_DDL):
            conn.execute(ddl)
    return cluster


@pytest.fixture(autouse=True)
def empty_tables(request):
    """Every test starts from empty tables, emptied on each shard directly."""
    if "shards" in request.fixturenames or "proxy" in request.fixturenames:
        for cluster in request.getfixturevalue("shards"):
            cluster.primary.sql("TRUNCATE users, events, countries", dbname=APP_DB)
    if "single" in request.fixturenames:
        request.getfixturevalue("single").primary.sql("TRUNCATE users, events, countries", dbname=APP_DB)
    yield


def connect(proxy, **kwargs) -> psycopg.Connection:
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(proxy.dsn(dbname=APP_DB), connect_timeout=10, **kwargs)


def on_shards(shards, sql: str) -> list[list[tuple]]:
    """Rows of sql on each shard, read directly."""
    return [sorted(cluster.primary.sql(sql, dbname=APP_DB)) for cluster in shards]


def assert_placed(shards, names, table: str, expected: list[tuple], key_column: int = 0) -> None:
    """Every expected row is on the shard that owns its key, and nowhere else."""
    per_shard = on_shards(shards, f"SELECT * FROM {table}")
    for name, rows in zip(names, per_shard):
        assert rows == sorted(row for row in expected if owner(row[key_column], names) == name), name


def user_rows(count: int, start: int = 1) -> list[tuple]:
    return [(n, f"user {n}", n % 100) for n in range(start, start + count)]


def nothing_anywhere(shards) -> bool:
    return all(rows == [] for rows in on_shards(shards, "SELECT * FROM users"))


def no_server_left_busy(shards) -> bool:
    """No session of the app on any shard is in a COPY or a transaction."""
    sql = "SELECT state, query FROM pg_stat_activity WHERE usename = 'app' AND state <> 'idle'"  # (COPY: active)
    return all(cluster.primary.sql(sql) == [] for cluster in shards)


# -- the splitter alone: every row to the owner of its key, however the data is cut --------------------------------
RING_NAMES = ("copy0", "copy1", "copy2")


def split(fmt_sql: str, data: bytes, key_index: int, key_type: int, piece: int) -> list[bytes]:
    """What each shard gets of data sent in pieces of `piece` bytes."""
    splitter = RowSplitter(copy_spec(fmt_sql).format, key_index, key_type,
                           HashRing([(name, 1) for name in RING_NAMES], 256), "t", "user_id")
    parts = [b""] * len(RING_NAMES)
    for start in range(0, len(data), piece):
        parts = [part + bytes(more) for part, more in zip(parts, splitter.feed(data[start:start + piece]))]
    return [part + bytes(more) for part, more in zip(parts, splitter.end())]


def expected_lines(rows: list[tuple[object, bytes]], header: bytes = b"") -> list[bytes]:
    """Per shard: the header, then the lines of the rows whose key it owns."""
    return [header + b"".join(line for key, line in rows if owner(key, RING_NAMES) == name) for name in RING_NAMES]


@pytest.mark.parametrize("piece", [1, 5, 64, 100_000])
def test_text_rows_split_whatever_the_cut(piece):
    rows = [(n, b"%d\tname %d\\ with \\N\t%d\n" % (n, n, n)) for n in range(-30, 300)]
    rows += [(7, b"007\tleading zeros\t1\n"), (5, b"5\tline\\\nbreak\t2\r\n"), (8, b"\\x38\thex key\t3\n")]
    data = b"".join(line for _, line in rows)
    assert split("COPY t FROM STDIN", data, 0, 20, piece) == expected_lines(rows)


@pytest.mark.parametrize("piece", [1, 7, 100_000])
def test_csv_rows_split_whatever_the_cut(piece):
    rows = [(f"user-{n}", b'x;"a;b\n%d "" q";user-%d\n' % (n, n)) for n in range(200)]
    rows += [("plain", b"y;z;plain\n"), ("quoted key", b'y;z;"quoted key"\n'), ("", b'y;z;""\n')]
    data = b"".join(line for _, line in rows)
    sql = "COPY t FROM STDIN (FORMAT csv, HEADER, DELIMITER ';')"
    assert split(sql, b"a;b;c\n" + data, 2, 25, piece) == expected_lines(rows, header=b"a;b;c\n")


def test_binary_tuples_split_whatever_the_cut():
    keys = [uuid.uuid4() for _ in range(100)]
    tuples = [(key, struct.pack("!hi", 2, 3) + b"abc" + struct.pack("!i", 16) + key.bytes) for key in keys]
    data = BINARY_HEADER + b"".join(t for _, t in tuples) + b"\xff\xff"
    for piece in (1, 9, 100_000):
        parts = split("COPY t FROM STDIN (FORMAT binary)", data, 1, 2950, piece)
        assert parts == [BINARY_HEADER + rows + b"\xff\xff" for rows in expected_lines(tuples)]


def test_rows_without_a_key_are_refused_with_their_line():
    for data, code in ((b"x\t1\ny\t\\N\n", "23502"), (b"x\t1\ny\n", "22P04"), (b"x\t1\ny\tabc\n", "22P02")):
        with pytest.raises(CopyError) as raised:
            split("COPY t FROM STDIN", data, 1, 20, 3)
        assert raised.value.sqlstate == code
        assert raised.value.message.startswith("shardproxy:") and "line 2" in raised.value.message


def test_the_end_of_data_line_ends_the_rows():
    assert split("COPY t FROM STDIN", b"1\ta\n\\.\n2\tb\n", 0, 20, 4) == expected_lines([(1, b"1\ta\n")])


# -- COPY FROM STDIN: formats ----------------------------------------------------------------------------------
def test_text_rows_go_to_the_owner_of_their_key(any_proxy, shards, names):
    rows = user_rows(3000)
    with connect(any_proxy) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY users FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        assert cursor.rowcount == 3000
        assert cursor.statusmessage == "COPY 3000"
    assert_placed(shards, names, "users", rows)
    assert all(on_shards(shards, "SELECT count(*) FROM users")), "both shards got rows"


def test_csv_with_header_and_custom_options_split_anywhere(proxy, shards, names):
    """A csv file with a header, its own delimiter, quote, escape and NULL, quoted fields holding delimiters and
    newlines, sent in pieces of 7 bytes: rows span CopyData messages."""
    rows = [(n, f"a;b\n{n} |q|", None if n % 3 == 0 else n) for n in range(1, 400)]
    escaped = {key: name.replace("|", "\\|") for key, name, _ in rows}
    lines = ["user_id;name;score"] + [f"{key};|{escaped[key]}|;{'NULL' if score is None else score}"
                                      for key, _, score in rows]
    data = ("\r\n".join(lines) + "\r\n").encode()
    with connect(proxy) as conn, conn.cursor() as cursor:
        sql = "COPY users FROM STDIN WITH (FORMAT csv, HEADER, DELIMITER ';', QUOTE '|', ESCAPE '\\', NULL 'NULL')"
        with cursor.copy(sql) as copy:
            for start in range(0, len(data), 7):
                copy.write(data[start:start + 7])
        assert cursor.rowcount == len(rows)
    assert_placed(shards, names, "users", rows)


def test_binary_rows(proxy, shards, names):
    rows = user_rows(1000, start=-500)
    with connect(proxy) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY users (user_id, name, score) FROM STDIN (FORMAT binary)") as copy:
            copy.set_types(["int8", "text", "int4"])
            for row in rows:
                copy.write_row(row)
        assert cursor.rowcount == 1000
    assert_placed(shards, names, "users", rows)


def test_reordered_columns_and_a_key_that_is_not_first(proxy, shards, names):
    """The key is found by name in the column list, or by the table's column order when there is none."""
    rows = [(n, f"note {n}", n * 7) for n in range(1, 300)]
    with connect(proxy) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY events (user_id, note, id) FROM STDIN") as copy:
            for id_, note, user_id in rows[:150]:
                copy.write_row((user_id, note, id_))
        with cursor.copy("COPY events FROM STDIN (FORMAT csv)") as copy:
            copy.write("".join(f"{id_},{note},{user_id}\n" for id_, note, user_id in rows[150:]).encode())
    assert_placed(shards, names, "events", rows, key_column=2)


def test_escaped_text_fields(proxy, shards, names):
    """Backslash escapes, an escaped delimiter and an escaped newline in text format: the server's reading of
    the row is the proxy's."""
    data = b"1\tsome\\ttab\t5\n2\tescaped \\\t delimiter\t6\n3\tline\\\nbreak\t7\n\\x34\toctal and hex key\t8\n"
    with connect(proxy) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY users FROM STDIN") as copy:
            copy.write(data)
    rows = [(1, "some\ttab", 5), (2, "escaped \t delimiter", 6), (3, "line\nbreak", 7), (4, "octal and hex key", 8)]
    assert_placed(shards, names, "users", rows)


# -- all or nothing --------------------------------------------------------------------------------------------
def test_a_bad_row_in_the_middle_leaves_nothing_anywhere(any_proxy, shards):
    lines = [f"{n}\tuser {n}\t{n}" for n in range(1, 3001)]
    lines[1500] = "1501\tuser 1501\tnot a number"
    with connect(any_proxy) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as raised:
            with conn.cursor().copy("COPY users FROM STDIN") as copy:
                copy.write(("\n".join(lines) + "\n").encode())
        assert "not a number" in str(raised.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on
    assert nothing_anywhere(shards)
    assert wait_until(lambda: no_server_left_busy(shards))


def test_a_null_key_fails_the_whole_copy(proxy, shards):
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.NotNullViolation) as raised:
            with conn.cursor().copy("COPY users FROM STDIN") as copy:
                for row in [*user_rows(500), (None, "nobody", 1), *user_rows(500, start=600)]:
                    copy.write_row(row)
        assert str(raised.value).startswith("shardproxy: the shard key user_id is NULL")
        assert "line 501" in str(raised.value)
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
    assert nothing_anywhere(shards)


def test_a_missing_key_column_is_refused_before_any_row(proxy, shards):
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy: .*needs the shard key user_id"):
            with conn.cursor().copy("COPY users (name, score) FROM STDIN") as copy:
                copy.write_row(("x", 1))
        with pytest.raises(psycopg.errors.BadCopyFileFormat, match="^shardproxy: missing data for the shard key"):
            with conn.cursor().copy("COPY events FROM STDIN") as copy:
                copy.write(b"1\tonly two columns\n")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("COPY no_such_table FROM STDIN")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert nothing_anywhere(shards)


def test_a_shard_that_cannot_begin_the_copy_fails_it_everywhere(proxy, shards):
    """A table only the first shard has: the other's error is the client's, and the first shard's COPY ends too."""
    shards[0].primary.sql("CREATE TABLE IF NOT EXISTS lonely (user_id bigint); GRANT ALL ON lonely TO app",
                          dbname=APP_DB)
    with connect(proxy) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.UndefinedTable):
                with conn.cursor().copy("COPY lonely FROM STDIN") as copy:
                    copy.write_row((1,))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert shards[0].primary.sql("SELECT count(*) FROM lonely", dbname=APP_DB) == [(0,)]
    assert wait_until(lambda: no_server_left_busy(shards))


def test_copy_inside_a_transaction_then_rollback(any_proxy, shards, names):
    rows = user_rows(800)
    with connect(any_proxy, autocommit=False) as conn:
        with conn.cursor().copy("COPY users FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (800,)  # its own writes, on every shard
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
        conn.rollback()
        with conn.cursor().copy("COPY users FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.execute("INSERT INTO users (user_id, name, score) VALUES (5000, 'after', 1)")
        conn.commit()
    assert_placed(shards, names, "users", [*rows, (5000, "after", 1)])


def test_an_error_inside_a_transaction_aborts_it(proxy, shards):
    with connect(proxy, autocommit=False) as conn:
        conn.execute("INSERT INTO users (user_id, name, score) VALUES (1, 'before', 1)")
        with pytest.raises(psycopg.errors.NotNullViolation):
            with conn.cursor().copy("COPY users FROM STDIN") as copy:
                copy.write_row((None, "x", 1))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT count(*) FROM users")
        conn.rollback()
    assert nothing_anywhere(shards)


def test_a_client_that_leaves_mid_copy_leaves_nothing(proxy, shards):
    """The client sends rows and its connection breaks before CopyDone: every shard's COPY is rolled back, and no
    server connection stays in COPY or in a transaction."""
    conn = connect(proxy)
    copy_context = conn.cursor().copy("COPY users FROM STDIN")
    copy = copy_context.__enter__()
    for row in user_rows(2000):
        copy.write_row(row)
    copy.writer.finish = lambda *args: None  # (psycopg would end the COPY on the closed socket)
    assert wait_until(lambda: sum(len(rows) for rows in on_shards(shards, COPYING)) == SHARDS)
    socket.socket(fileno=os.dup(conn.pgconn.socket)).shutdown(socket.SHUT_RDWR)
    assert wait_until(lambda: no_server_left_busy(shards))
    assert nothing_anywhere(shards)
    with connect(proxy) as other:  # the proxy and its pools go on
        assert other.execute("SELECT count(*) FROM users").fetchone() == (0,)


COPYING = "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND query ILIKE 'COPY users FROM STDIN%'"


# -- reference tables and COPY TO ----------------------------------------------------------------------------
def test_reference_table_rows_go_to_every_shard(proxy, shards):
    rows = [(f"c{n}", f"country {n}") for n in range(200)]
    with connect(proxy) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY countries FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        assert cursor.statusmessage == "COPY 200"
    assert on_shards(shards, "SELECT * FROM countries") == [sorted(rows)] * SHARDS


def test_copy_to_stdout_joins_every_shard(any_proxy, shards, names):
    rows = user_rows(500)
    with connect(any_proxy) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY users FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        out = io.BytesIO()
        with cursor.copy("COPY users TO STDOUT (FORMAT csv, HEADER)") as copy:
            for chunk in copy:
                out.write(chunk)
        assert cursor.rowcount == 500
        lines = out.getvalue().decode().splitlines()
        assert lines[0] == "user_id,name,score"
        assert sorted(tuple(line.split(",")) for line in lines[1:]) == sorted(
            (str(key), name, str(score)) for key, name, score in rows)
        with cursor.copy("COPY (SELECT user_id, name FROM users WHERE score < 10) TO STDOUT (FORMAT binary)") as copy:
            copy.set_types(["int8", "text"])
            got = sorted(copy.rows())
        assert got == sorted((key, name) for key, name, score in rows if score < 10)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy: COPY \\(query\\) TO STDOUT"):
            cursor.execute("COPY (SELECT * FROM users ORDER BY user_id LIMIT 3) TO STDOUT")
        with cursor.copy("COPY (SELECT * FROM users WHERE user_id = 7) TO STDOUT") as copy:  # one shard's
            assert [tuple(row) for row in copy.rows()] == [("7", "user 7", "7")]


def test_a_cancel_request_stops_a_copy_on_every_shard(proxy, shards):
    """A client's cancel reaches the shards' legs: the COPY TO ends with 57014 and the connection goes on."""
    with connect(proxy) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY users FROM STDIN") as copy:
            for row in user_rows(200):
                copy.write_row(row)
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            with cursor.copy("COPY (SELECT user_id, pg_sleep(0.05) FROM users) TO STDOUT") as copy:
                for _ in copy:
                    pass
        timer.join()
        assert time.monotonic() - started < 4  # (200 rows of 50 ms would take 10 s)
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (200,)
    assert wait_until(lambda: no_server_left_busy(shards))


# -- drivers and tools -----------------------------------------------------------------------------------------
def test_asyncpg_copy_records_and_copy_out(proxy, shards, names):
    rows = user_rows(2000)

    async def work() -> tuple[str, list, bytes]:
        conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB), statement_cache_size=0)
        try:
            status = await conn.copy_records_to_table("users", records=rows, columns=["user_id", "name", "score"])
            records = await conn.copy_from_table("users", output=io.BytesIO(), format="csv")
            out = io.BytesIO()
            await conn.copy_from_query("SELECT user_id FROM users WHERE score = 3", output=out)
            await conn.copy_to_table("events", source=io.BytesIO(b"1\tfrom asyncpg\t42\n2\tagain\t43\n"))
            return status, [records], out.getvalue()
        finally:
            await conn.close()

    status, _, out = asyncio.run(work())
    assert status == "COPY 2000"
    assert_placed(shards, names, "users", rows)
    assert sorted(int(line) for line in out.split()) == [key for key, _, score in rows if score == 3]
    assert_placed(shards, names, "events", [(1, "from asyncpg", 42), (2, "again", 43)], key_column=2)


def run_psql(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    done = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_psql_copy_loads_as_into_one_server(proxy, single, shards, names, tmp_path):
    """psql's \\copy of one file, through the proxy and into one server: the same rows, the same count."""
    path = tmp_path / "users.csv"
    path.write_text("".join(f'{n},"name, {n}",{n % 7}\n' for n in range(1, 5001)))
    command = f"\\copy users FROM '{path}' WITH (FORMAT csv)"
    through_proxy = run_psql(proxy.dsn(dbname=APP_DB), "-c", command)
    direct = run_psql(single.primary.dsn("app", dbname=APP_DB), "-c", command)
    assert through_proxy.stdout == direct.stdout
    expected = single.primary.sql("SELECT * FROM users", dbname=APP_DB)
    assert_placed(shards, names, "users", expected)
    out = tmp_path / "out.txt"
    run_psql(proxy.dsn(dbname=APP_DB), "-c", f"\\copy users TO '{out}'")
    assert sorted(out.read_text().splitlines()) == sorted(
        "\t".join(map(str, row)) for row in expected)


def test_pg_dump_data_only_replays_as_into_one_server(sandbox, shards, single, names):
    """A data-only dump of an unsharded database, replayed with psql through the proxy: the same rows, each on the
    shard that owns it. (Through a proxy of its own: a dump empties search_path with set_config(), which stays on
    the server connections that ran it.)"""
    source = single.primary
    with psycopg.connect(source.dsn("app", dbname=APP_DB), autocommit=True) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY users FROM STDIN") as copy:
            for n in range(1, 3001):
                copy.write_row((n, f"tab\there, newline\nthere, backslash \\ {n}", n % 9 or None))
        with cursor.copy("COPY events FROM STDIN") as copy:
            for n in range(1, 501):
                copy.write_row((n, f"event {n}", n * 3))
        cursor.execute("INSERT INTO countries VALUES ('fr', 'France'), ('jp', 'Japan')")
    dump = subprocess.run(["pg_dump", "--data-only", "-d", source.dsn("app", dbname=APP_DB)], capture_output=True,
                          text=True, check=True, timeout=60).stdout
    assert "COPY public.users" in dump
    expected = {table: sorted(source.sql(f"SELECT * FROM {table}", dbname=APP_DB))
                for table in ("users", "events", "countries")}
    replayed = run_psql(start_proxy(sandbox, shards, "copy-restore", "transaction").dsn(dbname=APP_DB), stdin=dump)
    assert replayed.stderr == ""
    assert_placed(shards, names, "users", expected["users"])
    assert_placed(shards, names, "events", expected["events"], key_column=2)
    assert on_shards(shards, "SELECT * FROM countries") == [expected["countries"]] * SHARDS


def test_extended_protocol_copy_answers_as_a_server(any_proxy, single, shards, names):
    """libpq's PQsendQueryParams runs a COPY in the extended protocol (Parse, Bind, Describe, Execute, Sync): the
    proxy answers it as a server does, in and out."""
    data = "".join(f"{n}\tuser {n}\t{n}\n" for n in range(1, 101)).encode()

    def conversation(dsn: str) -> list[object]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pgconn = conn.pgconn
            pgconn.send_query_params(b"COPY users FROM STDIN", None)
            began = pgconn.get_result()
            pgconn.put_copy_data(data[:1000])
            pgconn.put_copy_data(data[1000:])
            pgconn.put_copy_end()
            ended = pgconn.get_result()
            assert pgconn.get_result() is None
            pgconn.send_query_params(b"COPY users TO STDOUT", None)
            out_began = pgconn.get_result()
            rows = []
            while (row := pgconn.get_copy_data(0))[0] > 0:
                rows.append(bytes(row[1]))
            out_ended = pgconn.get_result()
            assert pgconn.get_result() is None
            pgconn.send_query_params(b"COPY no_such_table FROM STDIN", None)
            refused = pgconn.get_result()
            assert pgconn.get_result() is None
            return [began.status, ended.status, ended.command_status, out_began.status, sorted(rows),
                    out_ended.status, out_ended.command_status, refused.status,
                    refused.error_field(pq.DiagnosticField.SQLSTATE), conn.info.transaction_status]

    assert conversation(any_proxy.dsn(dbname=APP_DB)) == conversation(single.primary.dsn("app", dbname=APP_DB))
    assert_placed(shards, names, "users", [(n, f"user {n}", n) for n in range(1, 101)])


# -- metrics -------------------------------------------------------------------------------------------------
def test_copied_rows_are_counted_per_shard(proxy, shards, names):
    def copied() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://{LOOPBACK}:{proxy.config['metrics']['port']}/metrics").read()
        family = next(f for f in text_string_to_metric_families(text.decode()) if f.name == "shardproxy_copy_rows")
        return {s.labels["shard"]: s.value for s in family.samples if s.name.endswith("_total")}

    before = copied()
    rows = user_rows(1000)
    with connect(proxy) as conn, conn.cursor().copy("COPY users FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    after = copied()
    for name in names:
        assert after[name] - before[name] == sum(owner(row[0], names) == name for row in rows)
