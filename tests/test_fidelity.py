"""A client cannot tell the proxy from one PostgreSQL server, where pooling makes no documented difference.

What psycopg's own test suite found different through the proxy (tools/PSYCOPG_SUITE.md), checked with real
clients (psycopg, libpq through psycopg.pq, asyncpg) against real servers, in both pooling modes. What the server
holds (locks, sessions, prepared statements) is read on a direct connection, never through the proxy. Each mode's
proxy has one server connection, so in transaction pooling every client shares it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest
import uvloop
from psycopg import errors, pq

from shardproxy.datapath.connection import Connection
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from tests.support import APP_DB

MODES = ["session", "transaction"]
ANSWER_TIMEOUT = 5.0  # seconds a test waits for an answer the proxy must give at once


# -- helpers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proxies(sandbox: Sandbox, pg: Cluster) -> Callable[[str], ProxyProcess]:
    """The proxy of a pooling mode, started on first use: one server connection, and a short wait for it."""
    started: dict[str, ProxyProcess] = {}

    def proxy_of(mode: str) -> ProxyProcess:
        if mode not in started:
            started[mode] = sandbox.proxy(f"fidelity-{mode}", [pg],
                                          pool={"mode": mode, "size": 1, "query_wait_timeout": "5s"})
        return started[mode]

    return proxy_of


def connect(proxy: ProxyProcess, autocommit: bool = True, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=autocommit, connect_timeout=10, **kwargs)


def create_table(pg: Cluster, name: str, columns: str = "id int") -> str:
    """A fresh table owned by `app`, made directly on the server."""
    pg.primary.sql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns}); ALTER TABLE {name} OWNER TO app",
                   dbname=APP_DB)
    return name


def results(pgconn: pq.PGconn) -> list[pq.PGresult]:
    """libpq's results of what was sent, up to the end of the query or the start of a COPY; fails rather than
    waits past ANSWER_TIMEOUT."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    found: list[pq.PGresult] = []
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                return found
            found.append(result)
            if result.status in (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT):
                return found
        left = deadline - time.monotonic()
        assert left > 0, "no answer"
        select.select([pgconn.socket], [], [], left)


def statuses(found: list[pq.PGresult]) -> list[str]:
    return [pq.ExecStatus(result.status).name for result in found]


def copy_in_extended(pgconn: pq.PGconn, statement: bytes) -> None:
    """Start a COPY FROM STDIN with libpq's extended protocol (PQsendQueryParams): Parse, Bind, Describe,
    Execute and Sync go out together, before the client knows the statement is a COPY."""
    pgconn.send_query_params(statement, None)
    assert statuses(results(pgconn)) == ["COPY_IN"]


def copy_in_simple(pgconn: pq.PGconn, statement: bytes) -> None:
    pgconn.send_query(statement)
    assert statuses(results(pgconn)) == ["COPY_IN"]


def assert_nothing_holds(pg: Cluster, table: str) -> None:
    """No server session is left in a COPY into the table, and no lock on it is held."""
    copying = f"SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'copy {table} %' AND state = 'active'"
    assert wait_until(lambda: pg.primary.sql(copying, dbname=APP_DB) == [(0,)], ANSWER_TIMEOUT), \
        "a server session is still in the COPY"
    pg.primary.sql(f"BEGIN; SET LOCAL lock_timeout = '2s'; LOCK TABLE {table}; COMMIT", dbname=APP_DB)


# -- COPY begun with the extended protocol ---------------------------------------------------------------------
def test_a_copy_begun_with_the_extended_protocol_ends_and_gives_the_server_connection_back(
        proxies: Callable[[str], ProxyProcess], pg: Cluster) -> None:
    # The server ignores the Sync sent with the Execute: only the one after the data is answered. Transaction
    # pooling, one server connection: the next client gets it while the first stays connected.
    table = create_table(pg, "fidelity_copy_extended")
    proxy = proxies("transaction")
    with connect(proxy) as copier, connect(proxy) as other:
        copy_in_extended(copier.pgconn, f"COPY {table} FROM STDIN".encode())
        copier.pgconn.put_copy_data(b"1\n2\n3\n")
        copier.pgconn.put_copy_end()
        done = results(copier.pgconn)
        assert statuses(done) == ["COMMAND_OK"] and done[0].command_status == b"COPY 3"
        assert other.execute(f"SELECT sum(id) FROM {table}").fetchone() == (6,)
        assert copier.execute(f"SELECT count(*) FROM {table}").fetchone() == (3,)


def test_a_copy_that_fails_midway_ends_and_gives_the_server_connection_back(
        proxies: Callable[[str], ProxyProcess], pg: Cluster) -> None:
    # The server fails the COPY at a bad row while the client still sends data: it drops the rest, up to the
    # client's Sync. Transaction pooling, one server connection.
    table = create_table(pg, "fidelity_copy_failed")
    proxy = proxies("transaction")
    with connect(proxy) as copier, connect(proxy) as other:
        copy_in_extended(copier.pgconn, f"COPY {table} FROM STDIN".encode())
        copier.pgconn.put_copy_data(b"1\nnot a number\n")
        copier.pgconn.flush()
        assert wait_until(lambda: select.select([copier.pgconn.socket], [], [], 0)[0], ANSWER_TIMEOUT)
        copier.pgconn.put_copy_data(b"3\n")
        copier.pgconn.put_copy_end()
        failed = results(copier.pgconn)
        assert statuses(failed) == ["FATAL_ERROR"]
        assert failed[0].error_field(pq.DiagnosticField.SQLSTATE) == b"22P02"
        assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        assert copier.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_what_is_sent_after_a_message_that_came_in_several_reads_keeps_its_place() -> None:
    # A message longer than a read (a large COPY row) is joined in a bytearray and written through the transport;
    # bytes sent after it, once the socket has room again, must not overtake what the transport still holds
    # (the server saw a CopyDone inside a row: "invalid byte sequence for encoding UTF8: 0x00").
    async def run() -> bytes:
        near, far = socket.socketpair()
        far.setblocking(False)
        _, endpoint = await asyncio.get_running_loop().connect_accepted_socket(Connection, near)
        endpoint.send_directly()
        endpoint.write(b"head")  # sent at once: nothing waits in the transport
        endpoint.write(bytearray(b"x" * (8 << 20)))  # more than the socket takes
        received = await receive(far, 1 << 20)  # room again, while the transport still holds the rest
        endpoint.write(b"tail")
        received += await receive(far, (8 << 20) + 8 - len(received))
        endpoint.close()
        far.close()
        return received

    received = uvloop.run(run())
    assert received == b"head" + b"x" * (8 << 20) + b"tail"


async def receive(sock: socket.socket, size: int) -> bytes:
    """At least `size` bytes from a non-blocking socket."""
    received = bytearray()
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while len(received) < size:
        assert time.monotonic() < deadline, "nothing more came"
        try:
            received += sock.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.001)
    return bytes(received)


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_leaves_mid_copy_leaves_no_session_behind(proxies: Callable[[str], ProxyProcess],
                                                                pg: Cluster, mode: str) -> None:
    # psycopg refuses a COPY given to execute() once the server has started it, and the client then closes.
    table = create_table(pg, f"fidelity_copy_left_{mode}")
    conn = connect(proxies(mode), autocommit=False)
    with pytest.raises(psycopg.ProgrammingError, match="COPY cannot be used"):
        conn.execute(f"COPY {table} FROM STDIN")
    conn.close()
    assert_nothing_holds(pg, table)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("start", [copy_in_simple, copy_in_extended], ids=["simple", "extended"])
def test_a_client_that_terminates_mid_copy_leaves_no_session_behind(proxies: Callable[[str], ProxyProcess],
                                                                    pg: Cluster, mode: str,
                                                                    start: Callable[[pq.PGconn, bytes], None]) -> None:
    table = create_table(pg, f"fidelity_copy_quit_{mode}_{start.__name__}")
    conn = connect(proxies(mode))
    start(conn.pgconn, f"COPY {table} FROM STDIN".encode())
    conn.pgconn.put_copy_data(b"1\n")
    conn.pgconn.finish()  # Terminate, then the socket closes
    assert_nothing_holds(pg, table)
    with connect(proxies(mode)) as after:  # the pool has its connection (again)
        assert after.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


# -- prepared statements after the objects they name changed ------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_a_statement_prepared_again_after_deallocate_all_sees_new_columns(proxies: Callable[[str], ProxyProcess],
                                                                        pg: Cluster, mode: str) -> None:
    # psycopg sends DEALLOCATE ALL after an ALTER and prepares its statements again.
    table = create_table(pg, f"fidelity_alter_{mode}", "id int, data text")
    with connect(proxies(mode), autocommit=False, prepare_threshold=0) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert conn.execute(f"SELECT * FROM {table}").fetchall() == [(1, "a")]
        conn.execute(f"ALTER TABLE {table} ADD more int DEFAULT 7")
        assert conn.execute(f"SELECT * FROM {table}").fetchall() == [(1, "a", 7)]


@pytest.mark.parametrize("mode", MODES)
def test_a_statement_prepared_again_after_its_type_was_made_again_works(proxies: Callable[[str], ProxyProcess],
                                                                      mode: str) -> None:
    insert = "INSERT INTO fidelity_typed (tags) VALUES (%s::fidelity_tag[])"
    with connect(proxies(mode), autocommit=False, prepare_threshold=0) as conn:
        for _ in range(2):  # DROP: psycopg deallocates its statements, and prepares the INSERT again
            conn.execute("DROP TABLE IF EXISTS fidelity_typed")
            conn.execute("DROP TYPE IF EXISTS fidelity_tag")
            conn.execute("CREATE TYPE fidelity_tag AS ENUM ('a', 'b')")
            conn.execute("CREATE TABLE fidelity_typed (tags fidelity_tag[])")
            conn.execute(insert, [["a", "b"]])
        assert conn.execute("SELECT tags::text FROM fidelity_typed").fetchall() == [("{a,b}",)]
        conn.rollback()


@pytest.mark.parametrize("mode", MODES)
def test_discard_all_in_the_extended_protocol_forgets_the_statements(proxies: Callable[[str], ProxyProcess],
                                                                     mode: str) -> None:
    with connect(proxies(mode), prepare_threshold=0) as conn:  # DISCARD ALL too goes as a prepared statement
        assert conn.execute("SELECT %s::int", [1]).fetchone() == (1,)
        conn.execute("DISCARD ALL")
        assert conn.execute("SELECT %s::int", [2]).fetchone() == (2,)
        assert conn.execute("SELECT %s::int + 1", [2]).fetchone() == (3,)


def test_a_new_client_sees_the_columns_a_table_has_now(proxies: Callable[[str], ProxyProcess], pg: Cluster) -> None:
    # Transaction pooling: the first client's statement stays prepared on the one server connection.
    table = create_table(pg, "fidelity_new_client", "id int")
    pg.primary.sql(f"INSERT INTO {table} VALUES (1)", dbname=APP_DB)
    proxy = proxies("transaction")
    with connect(proxy, prepare_threshold=0) as first:
        assert first.execute(f"SELECT * FROM {table}").fetchall() == [(1,)]
        pg.primary.sql(f"ALTER TABLE {table} ADD data text DEFAULT 'x'", dbname=APP_DB)
        with connect(proxy, prepare_threshold=0) as second:
            assert second.execute(f"SELECT * FROM {table}").fetchall() == [(1, "x")]

        async def prepare_fetch() -> list[tuple[object, ...]]:  # asyncpg asks for the columns when it prepares
            conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB))
            try:
                return [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table}")]
            finally:
                await conn.close()

        assert asyncio.run(prepare_fetch()) == [(1, "x")]


@pytest.mark.parametrize("mode", MODES)
def test_a_statement_out_of_date_outside_a_transaction_runs_on_a_fresh_plan(proxies: Callable[[str], ProxyProcess],
                                                                         pg: Cluster, mode: str) -> None:
    # psycopg never asks for a statement's columns, it reads each result's: the batch runs again, unseen (where
    # PostgreSQL fails it once: the README says why), and the client's own server session keeps one statement.
    table = create_table(pg, f"fidelity_out_of_date_{mode}", "id int")
    pg.primary.sql(f"INSERT INTO {table} VALUES (1)", dbname=APP_DB)
    query = f"SELECT * FROM {table}"
    with connect(proxies(mode), prepare_threshold=0) as conn:
        assert conn.execute(query).fetchall() == [(1,)]
        pg.primary.sql(f"ALTER TABLE {table} ADD data text DEFAULT 'x'", dbname=APP_DB)
        assert conn.execute(query).fetchall() == [(1, "x")]
        if mode == "session":
            listed = "SELECT count(*) FROM pg_prepared_statements WHERE statement = %s"
            assert conn.execute(listed, [query], prepare=False).fetchone() == (1,)


@pytest.mark.parametrize("mode", MODES)
def test_asyncpg_prepares_again_after_a_change_as_it_does_on_postgresql(proxies: Callable[[str], ProxyProcess],
                                                                        pg: Cluster, mode: str) -> None:
    # asyncpg knows its statement's columns: the change fails it, and asyncpg prepares it again outside a
    # transaction (and lets the error through inside one), as with PostgreSQL.
    table = create_table(pg, f"fidelity_asyncpg_{mode}", "id int")
    pg.primary.sql(f"INSERT INTO {table} VALUES (1)", dbname=APP_DB)

    async def run() -> None:
        conn = await asyncpg.connect(proxies(mode).dsn(dbname=APP_DB))
        try:
            assert [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table}")] == [(1,)]
            pg.primary.sql(f"ALTER TABLE {table} ADD data text DEFAULT 'x'", dbname=APP_DB)
            assert [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table}")] == [(1, "x")]
            pg.primary.sql(f"ALTER TABLE {table} ADD more int DEFAULT 7", dbname=APP_DB)
            with pytest.raises(asyncpg.InvalidCachedStatementError):
                async with conn.transaction():
                    await conn.fetch(f"SELECT * FROM {table}")
            assert [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table}")] == [(1, "x", 7)]
        finally:
            await conn.close()

    asyncio.run(run())


def test_pg_prepared_statements_lists_what_the_client_has_prepared(proxies: Callable[[str], ProxyProcess]) -> None:
    # Session pooling: the server session is the client's. (Names are the proxy's: see the README.)
    listed = "SELECT statement FROM pg_prepared_statements ORDER BY prepare_time"
    with connect(proxies("session"), prepare_threshold=0) as conn:
        conn.prepared_max = 2  # psycopg closes the least recently used statement past two
        for number in range(1, 4):
            conn.execute(f"SELECT {number}")
        assert conn.execute(listed, prepare=False).fetchall() == [("SELECT 2",), ("SELECT 3",)]
        conn.execute("DEALLOCATE ALL")
        assert conn.execute(listed, prepare=False).fetchall() == []
        assert conn.execute("SELECT %s::int", [5]).fetchone() == (5,)


# -- a session ended by the server -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_idle_in_transaction_session_timeout_reaches_the_client_as_the_server_said_it(
        proxies: Callable[[str], ProxyProcess], mode: str) -> None:
    with connect(proxies(mode), autocommit=False) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 100")
        time.sleep(0.5)
        with pytest.raises(errors.IdleInTransactionSessionTimeout):
            conn.execute("SELECT 1")
        assert conn.closed


def test_idle_session_timeout_reaches_the_client_as_the_server_said_it(
        proxies: Callable[[str], ProxyProcess]) -> None:
    # Session pooling: the server session is the client's; in transaction pooling it is idle in the pool.
    with connect(proxies("session")) as conn:
        conn.execute("SET idle_session_timeout = 100")
        time.sleep(0.5)
        with pytest.raises(errors.IdleSessionTimeout):
            conn.execute("SELECT 1")


# -- parameters reported at login ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("given, reported", [("latin1", "LATIN1"), ("euc-jp", "EUC_JP"), ("utf_8", "UTF8"),
                                             ("Windows-1251", "WIN1251"), ("iso_8859_5", "ISO_8859_5")])
def test_client_encoding_is_reported_by_postgresql_s_name_for_it(proxies: Callable[[str], ProxyProcess],
                                                                 mode: str, given: str, reported: str) -> None:
    with connect(proxies(mode), client_encoding=given) as conn:
        assert conn.info.parameter_status("client_encoding") == reported
        assert conn.execute("SHOW client_encoding").fetchone() == (reported,)


def test_an_unknown_client_encoding_is_refused_at_login(proxies: Callable[[str], ProxyProcess]) -> None:
    with pytest.raises(psycopg.OperationalError, match='invalid value for parameter "client_encoding": "klingon"'):
        connect(proxies("transaction"), client_encoding="klingon")
