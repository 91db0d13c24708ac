"""Bad input gets a clear answer and loses nothing.

Real clients (psycopg, asyncpg, psql) and raw sockets against real proxy daemons in front of real servers.
What happened is checked on the server itself: its rows, locks and pg_stat_activity.
Tests that break things run their own proxy (and, to restart a server, their own cluster).
"""

from __future__ import annotations

import asyncio
import random
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import asyncpg
import psycopg
import pytest
from psycopg import errors

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from tests.support import APP_DB
from tests.support.admin import table
from tests.support.wire import PROTOCOL_3_0, TRUST_USERS, connect_soon, error_codes, message, startup_packet


# -- helpers ------------------------------------------------------------------------------------------------
def create_table(pg: Cluster, name: str) -> None:
    """A table `app` may write, with one committed row (1, 'committed')."""
    pg.primary.sql(
        f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY, v text);"
        f" INSERT INTO {name} VALUES (1, 'committed'); GRANT ALL ON {name} TO app",
        dbname=APP_DB,
    )


def idle_in_transaction(pg: Cluster, application_name: str) -> int:
    """Server sessions of that application that sit inside a transaction."""
    rows = pg.primary.sql(
        "SELECT count(*) FROM pg_stat_activity"
        f" WHERE application_name = '{application_name}' AND state LIKE 'idle in transaction%'"
    )
    return rows[0][0]


def readable(conn: psycopg.Connection, timeout: float) -> bool:
    """Whether the proxy sent this idle client something (an error, or the end) within the timeout."""
    return bool(select.select([conn.fileno()], [], [], timeout)[0])


class RawClient:
    """The wire protocol over a plain socket, for what no driver would ever send."""

    def __init__(self, proxy: ProxyProcess, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def login(self, **params: str) -> None:
        self.send(startup_packet(user="app", database=APP_DB, **params))
        replies = self.read_until_ready()
        assert (b"R", struct.pack("!I", 0)) in replies  # AuthenticationOk

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(message(b"Q", sql.encode() + b"\0"))
        return self.read_until_ready()

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        replies: list[tuple[bytes, bytes]] = []
        while True:
            reply = self.read_message()
            assert reply is not None, f"connection closed; got {replies}"
            replies.append(reply)
            if reply[0] == b"Z":
                return replies

    def read_until_closed(self) -> list[tuple[bytes, bytes]]:
        """Every message up to the end of the connection; a hang fails on the socket timeout."""
        replies: list[tuple[bytes, bytes]] = []
        try:
            while (reply := self.read_message()) is not None:
                replies.append(reply)
        except ConnectionResetError:
            pass
        return replies

    def read_message(self) -> tuple[bytes, bytes] | None:
        header = self._read(5)
        if header is None:
            return None
        (length,) = struct.unpack("!I", header[1:])
        body = self._read(length - 4)
        return None if body is None else (header[:1], body)

    def _read(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data


# -- logins ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("user", "password", "dbname", "sqlstate"),
    [
        ("app", "wrong", APP_DB, "28P01"),
        ("md5user", "wrong", APP_DB, "28P01"),
        ("nobody", "secret", APP_DB, "28P01"),
        ("app", "secret", "failures_no_such_db", "3D000"),
    ],
    ids=["scram-wrong-password", "md5-wrong-password", "unknown-user", "unknown-database"],
)
async def test_refused_login_gets_the_sqlstate_a_server_would_send(
    proxy: ProxyProcess, user: str, password: str, dbname: str, sqlstate: str
) -> None:
    with pytest.raises(asyncpg.PostgresError) as refused:
        await asyncpg.connect(proxy.dsn(user, password, dbname))
    assert refused.value.sqlstate == sqlstate

    good = await asyncpg.connect(proxy.dsn(dbname=APP_DB))
    try:
        assert await good.fetchval("SELECT current_user") == "app"
    finally:
        await good.close()


def test_logins_need_a_reachable_node_of_any_shard_not_of_the_first(sandbox: Sandbox, pg: Cluster) -> None:
    """The first shard refuses the proxy (as a TLS-only server refuses a proxy that does not use TLS), then
    all its nodes are down: clients still log in, with the other shard's parameters, and use that shard."""
    first = sandbox.cluster("login-first", replicas=1)
    first.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    proxy = sandbox.proxy("login-first", [first, pg],
                          server_auth={"methods": ["scram-sha-256", "md5"]})  # md5user: its servers ask md5
    key = next(k for k in range(1, 1000) if table(proxy, f"ROUTE {k}")[0]["shard"] == pg.name)
    where = f"/* shard_key: {key} */ SELECT inet_server_port()"

    def log_in_and_read(user: str, password: str) -> int:
        with psycopg.connect(proxy.dsn(user, password, APP_DB), autocommit=True, connect_timeout=10) as conn:
            return conn.execute(where).fetchone()[0]

    first.primary.sql("ALTER ROLE app NOLOGIN")  # reaches the replica too: a refusal with SQLSTATE 28000
    first.wait_replicas_caught_up()
    assert log_in_and_read("app", "secret") == pg.primary.port
    for node in first.nodes:
        node.stop()
    try:
        for user, password in (("app", "secret"), ("md5user", "md5secret")):  # md5user: pools all new
            assert log_in_and_read(user, password) == pg.primary.port
    finally:
        for node in first.nodes:
            node.start()


# -- cancel -----------------------------------------------------------------------------------------------------
def test_cancel_interrupts_the_running_query(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        threading.Timer(0.3, conn.cancel).start()
        started = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 1.3
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_asyncpg_timeout_cancels_the_query_and_keeps_the_connection(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB))
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("SELECT pg_sleep(10)", timeout=0.3)
        # The next query waits for the cancelled one to end: seconds, not the rest of the ten.
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 1.5) == 1
    finally:
        await conn.close()


def test_cancel_key_of_a_finished_query_does_not_reach_the_next_client(sandbox: Sandbox, pg: Cluster) -> None:
    proxy = sandbox.proxy("failures-cancel", [pg], pool={"size": 1})
    dsn = proxy.dsn(dbname=APP_DB)
    with (
        psycopg.connect(dsn, autocommit=True) as a,
        psycopg.connect(dsn, autocommit=True) as b,
        ThreadPoolExecutor(1) as background,
    ):
        server_pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert a.info.backend_pid != server_pid  # clients hold the proxy's cancel keys, not a server's

        b_query = background.submit(lambda: b.execute("SELECT pg_backend_pid(), pg_sleep(1)").fetchone())
        assert wait_until(lambda: pg.primary.sql(
            f"SELECT 1 FROM pg_stat_activity WHERE pid = {server_pid} AND query LIKE '%pg_sleep(1)'"))
        a.cancel()  # A's query is long done; B's now runs on the connection A used
        assert b_query.result(timeout=5)[0] == server_pid

        threading.Timer(0.3, b.cancel).start()  # B's own key does cancel B's query
        with pytest.raises(errors.QueryCanceled):
            b.execute("SELECT pg_sleep(5)")


# -- a client that dies -------------------------------------------------------------------------------------
def test_client_killed_mid_transaction_leaves_no_lock_and_no_trace(sandbox: Sandbox, pg: Cluster) -> None:
    create_table(pg, "failures_killed")
    proxy = sandbox.proxy("failures-killed", [pg], pool={"size": 2})
    psql = subprocess.Popen(["psql", "-X", "-q", proxy.dsn(dbname=APP_DB)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        psql.stdin.write(b"BEGIN;\nUPDATE failures_killed SET v = 'uncommitted' WHERE id = 1;\n")
        psql.stdin.flush()
        holds_lock = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
                      " AND query LIKE 'UPDATE failures_killed%'")
        assert wait_until(lambda: pg.primary.sql(holds_lock) == [(1,)])
    finally:
        psql.kill()
        psql.wait()

    started = time.monotonic()
    with psycopg.connect(proxy.dsn(dbname=APP_DB)) as other:
        other.execute("SET LOCAL lock_timeout = '3s'")
        assert other.execute("SELECT v FROM failures_killed WHERE id = 1 FOR UPDATE").fetchone() == ("committed",)
        assert time.monotonic() - started < 2
        other.execute("UPDATE failures_killed SET v = 'second' WHERE id = 1")
    assert pg.primary.sql("SELECT v FROM failures_killed", dbname=APP_DB) == [("second",)]
    assert pg.primary.sql(holds_lock) == [(0,)]


# -- a server that restarts ---------------------------------------------------------------------------------
@dataclass
class Looper:
    """A client that runs short queries until told to stop, reconnecting after every error."""

    dsn: str
    successes: list[float] = field(default_factory=list)  # when each query ended
    failures: list[tuple[float, float, str | None, str]] = field(default_factory=list)  # start, end, sqlstate, text

    def run(self, stop: threading.Event) -> None:
        conn = None
        while not stop.is_set():
            started = time.monotonic()
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                conn.execute("SELECT pg_sleep(0.02)")
                self.successes.append(time.monotonic())
            except psycopg.Error as exc:
                self.failures.append((started, time.monotonic(), exc.sqlstate, str(exc)))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()


def test_server_restart_fails_in_flight_queries_cleanly_and_pools_recover(sandbox: Sandbox) -> None:
    cluster = sandbox.cluster("failures-restart")
    proxy = sandbox.proxy("failures-restart", [cluster], pool={"size": 4, "query_wait_timeout": "10s"})
    loopers = [Looper(proxy.dsn()) for _ in range(6)]
    stop = threading.Event()
    threads = [threading.Thread(target=looper.run, args=(stop,), daemon=True) for looper in loopers]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: all(len(looper.successes) >= 3 for looper in loopers))
        cluster.primary.restart()
        back = time.monotonic()
        assert wait_until(lambda: all(sum(t > back for t in looper.successes) >= 10 for looper in loopers), 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "a client hung"

    failures = [failure for looper in loopers for failure in looper.failures]
    assert failures, "the restart went unnoticed: were queries in flight?"
    for started, ended, sqlstate, text in failures:
        assert sqlstate in ("57P01", "57P03", "08006"), text  # shutdown, starting up, or server unreachable
        assert ended - started < 3, f"took {ended - started:.1f}s to fail: {text}"
        assert started < back, f"failed after the server was back: {text}"

    with psycopg.connect(proxy.dsn(), connect_timeout=5) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)
    assert cluster.primary.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")[0][0] <= 4


# -- garbage ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_proxy(sandbox: Sandbox, pg: Cluster) -> ProxyProcess:
    """Trust logins for raw sockets, a 1MB message limit and a 1s login timeout."""
    proxy = sandbox.proxy("failures-strict", [pg], start=False, admin_users=[],
                          pool={"size": 3, "max_message_size": "1MB", "client_login_timeout": "1s"})
    proxy.write_config({**proxy.config, "users": TRUST_USERS})
    proxy.start()
    return proxy


@pytest.fixture
def bystander(strict_proxy: ProxyProcess) -> psycopg.Connection:
    """A well-behaved client, mid-transaction while another one misbehaves."""
    with psycopg.connect(strict_proxy.dsn(dbname=APP_DB)) as conn:
        conn.execute("SELECT 1")
        yield conn


def assert_unharmed(proxy: ProxyProcess, bystander: psycopg.Connection) -> None:
    assert proxy.process.poll() is None
    assert bystander.execute("SELECT 41 + 1").fetchone() == (42,)
    bystander.commit()
    with psycopg.connect(proxy.dsn(dbname=APP_DB)) as newcomer:
        assert newcomer.execute("SELECT 'still serving'").fetchone() == ("still serving",)


@pytest.mark.parametrize(
    "packet",
    [
        b"GET / HTTP/1.1\r\nHost: shardproxy\r\n\r\n",
        random.Random(20241128).randbytes(200),
        struct.pack("!I", 0x7FFFFFF0) + startup_packet(user="app")[4:],
        struct.pack("!II", 16, PROTOCOL_3_0) + b"user\0app",  # no terminating NULs
    ],
    ids=["http-request", "random-bytes", "huge-length", "unterminated-parameters"],
)
def test_garbage_startup_packet_gets_protocol_violation(
    strict_proxy: ProxyProcess, bystander: psycopg.Connection, packet: bytes
) -> None:
    raw = RawClient(strict_proxy)
    started = time.monotonic()
    raw.send(packet)
    replies = raw.read_until_closed()
    raw.close()
    assert error_codes(replies) == ["08P01"]
    assert time.monotonic() - started < 0.5  # refused at once, not left to the login timeout
    assert_unharmed(strict_proxy, bystander)


@pytest.mark.parametrize(
    "abuse",
    [
        message(b"!", b"no such message"),
        # Only the header of a 2MB query: the length alone is reason enough.
        b"Q" + struct.pack("!I", 2 * 1024 * 1024 + 4) + b"SELECT '",
    ],
    ids=["bad-type-byte", "over-max-message-size"],
)
def test_bad_message_mid_transaction_closes_that_client_and_rolls_back(
    strict_proxy: ProxyProcess, bystander: psycopg.Connection, pg: Cluster, abuse: bytes
) -> None:
    raw = RawClient(strict_proxy)
    raw.login(application_name="failures-abuser")
    assert raw.query("BEGIN")[-1] == (b"Z", b"T")
    assert idle_in_transaction(pg, "failures-abuser") == 1

    raw.send(abuse)
    replies = raw.read_until_closed()
    raw.close()
    assert error_codes(replies) == ["08P01"]
    assert wait_until(lambda: idle_in_transaction(pg, "failures-abuser") == 0, 2)
    assert_unharmed(strict_proxy, bystander)


def test_query_over_max_message_size_from_a_driver_fails(
    strict_proxy: ProxyProcess, bystander: psycopg.Connection
) -> None:
    conn = psycopg.connect(strict_proxy.dsn(dbname=APP_DB), autocommit=True)
    with conn, pytest.raises(psycopg.OperationalError) as refused:
        conn.execute("SELECT '" + "x" * (2 * 1024 * 1024) + "'")
    assert refused.value.sqlstate == "08P01"
    assert_unharmed(strict_proxy, bystander)


def test_a_client_still_sending_an_oversized_message_reads_its_error(
    strict_proxy: ProxyProcess, bystander: psycopg.Connection
) -> None:
    """The proxy refuses a message over the limit from its first bytes, while the client goes on sending it (as a
    driver does, which reads nothing before its query is sent): the client can send the rest, then reads the
    error (08P01) and the end of the connection. A reset instead fails the driver's send, which then raises
    without the error's SQLSTATE."""
    raw = RawClient(strict_proxy)
    raw.login()
    size = 2 * 1024 * 1024
    raw.send(b"Q" + struct.pack("!I", size) + b"x" * (size // 4))
    time.sleep(0.3)  # refused and answered by now
    raw.send(b"x" * (size - 4 - size // 4))
    replies = raw.read_until_closed()
    raw.close()
    assert error_codes(replies) == ["08P01"]
    assert_unharmed(strict_proxy, bystander)


@pytest.mark.parametrize(
    "sent", [b"", startup_packet(user="app", database=APP_DB)[:10]], ids=["silent", "half-a-startup-packet"]
)
def test_client_login_timeout_closes_a_stalled_login(strict_proxy: ProxyProcess, sent: bytes) -> None:
    raw = RawClient(strict_proxy)
    started = time.monotonic()
    raw.send(sent)
    replies = raw.read_until_closed()
    raw.close()
    assert 0.9 < time.monotonic() - started < 2.5
    assert error_codes(replies) == ["08P01"]


# -- pool limits -------------------------------------------------------------------------------------------------
def test_query_wait_timeout_fails_the_waiter_and_spares_the_holder(sandbox: Sandbox, pg: Cluster) -> None:
    create_table(pg, "failures_wait")
    proxy = sandbox.proxy("failures-wait", [pg], pool={"size": 1, "query_wait_timeout": "1s"})
    dsn = proxy.dsn(dbname=APP_DB)
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as waiter:
        holder.execute("INSERT INTO failures_wait VALUES (2, 'held')")  # the only server connection, held
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as timed_out:
            waiter.execute("SELECT 1")
        assert 0.9 < time.monotonic() - started < 2.5
        assert timed_out.value.sqlstate == "08000"
        assert "query_wait_timeout" in str(timed_out.value)

        holder.execute("INSERT INTO failures_wait VALUES (3, 'held')")
        holder.commit()
    assert pg.primary.sql("SELECT id FROM failures_wait ORDER BY id", dbname=APP_DB) == [(1,), (2,), (3,)]


async def test_max_client_conn_refuses_extra_clients_yet_lets_cancels_through(sandbox: Sandbox, pg: Cluster) -> None:
    proxy = sandbox.proxy("failures-maxconn", [pg], pool={"size": 2, "max_client_conn": 3})
    dsn = proxy.dsn(dbname=APP_DB)
    clients = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await asyncpg.connect(dsn)
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            psycopg.connect(dsn)

        # A cancel request is a connection too, but a full proxy must still let clients stop their queries.
        threading.Timer(0.3, clients[0].cancel).start()
        with pytest.raises(errors.QueryCanceled):
            clients[0].execute("SELECT pg_sleep(5)")

        clients.pop().close()
        clients.append(connect_soon(dsn))  # the proxy may take a moment to notice the goodbye
        assert all(client.execute("SELECT 1").fetchone() == (1,) for client in clients)
    finally:
        for client in clients:
            client.close()


# -- session pooling ---------------------------------------------------------------------------------------------
def test_session_mode_wipes_the_session_before_the_next_client(sandbox: Sandbox, pg: Cluster) -> None:
    proxy = sandbox.proxy("failures-session", [pg], pool={"mode": "session", "size": 1})
    dsn = proxy.dsn(dbname=APP_DB)
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as first:
        server_pid = first.execute("SELECT pg_backend_pid()").fetchone()[0]
        first.execute("CREATE TEMP TABLE failures_scratch (id int)")
        first.execute("SET work_mem = '7MB'")
        assert first.execute("SELECT %s::int + 1", [1]).fetchone() == (2,)
    last_query = f"SELECT query FROM pg_stat_activity WHERE pid = {server_pid}"
    assert wait_until(lambda: pg.primary.sql(last_query) == [("DISCARD ALL",)], 2)

    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as second:
        # psycopg names statements _pg3_0, _pg3_1, ... per connection: this one reuses the first's names.
        assert second.execute("SELECT %s::text || 'b'", ["a"]).fetchone() == ("ab",)
        assert second.execute("SELECT pg_backend_pid()").fetchone() == (server_pid,)
        assert second.execute("SELECT to_regclass('pg_temp.failures_scratch')").fetchone() == (None,)
        assert second.execute("SHOW work_mem").fetchone() == ("4MB",)
        assert second.execute("SELECT %s::int + 1", [41]).fetchone() == (42,)


# -- timeouts ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_idle_transaction_timeout_ends_only_idle_transactions(sandbox: Sandbox, pg: Cluster, mode: str) -> None:
    table = f"failures_idle_{mode}"
    create_table(pg, table)
    proxy = sandbox.proxy(f"failures-idle-txn-{mode}", [pg],
                          pool={"mode": mode, "size": 2, "idle_transaction_timeout": "1s"})
    dsn = proxy.dsn(dbname=APP_DB)
    with psycopg.connect(dsn) as stuck, psycopg.connect(dsn, autocommit=True) as between:
        between.execute("SELECT 1")
        stuck.execute(f"UPDATE {table} SET v = 'uncommitted' WHERE id = 1")
        started = time.monotonic()
        assert readable(stuck, 4), "the idle transaction was left open"
        assert 0.9 < time.monotonic() - started < 2.5
        with pytest.raises(errors.IdleInTransactionSessionTimeout):
            stuck.execute("SELECT 1")
        # Idle for as long, but outside a transaction: no reason to go.
        assert between.execute("SELECT 1").fetchone() == (1,)

    with psycopg.connect(pg.primary.dsn(dbname=APP_DB)) as direct:
        direct.execute("SET LOCAL lock_timeout = '2s'")
        assert direct.execute(f"SELECT v FROM {table} WHERE id = 1 FOR UPDATE").fetchone() == ("committed",)


def test_server_idle_timeout_closes_server_connections_down_to_min_size(sandbox: Sandbox, pg: Cluster) -> None:
    proxies: dict[str, ProxyProcess] = {}
    for min_size in (0, 2):
        database = f"failures_idle_min{min_size}"
        pg.primary.sql(f"CREATE DATABASE {database} OWNER app")
        proxies[database] = sandbox.proxy(f"failures-server-idle-{min_size}", [pg],
                                          pool={"size": 4, "min_size": min_size, "server_idle_timeout": "1s"})

    def server_connections() -> dict[str, int]:
        rows = pg.primary.sql("SELECT datname, count(*) FROM pg_stat_activity"
                              " WHERE datname LIKE 'failures_idle_min%' GROUP BY datname")
        return {database: dict(rows).get(database, 0) for database in proxies}

    # Load: four transactions at once make each pool open four server connections.
    clients = [psycopg.connect(proxy.dsn(dbname=database)) for database, proxy in proxies.items() for _ in range(4)]
    for client in clients:
        client.execute("SELECT 1")
    assert server_connections() == {"failures_idle_min0": 4, "failures_idle_min2": 4}
    for client in clients:
        client.commit()
        client.close()

    settled = {"failures_idle_min0": 0, "failures_idle_min2": 2}
    assert wait_until(lambda: server_connections() == settled, 4), server_connections()
    time.sleep(1.5)
    assert server_connections() == settled


# -- shutdown ---------------------------------------------------------------------------------------------------
def test_sigterm_lets_open_transactions_commit_then_exits_cleanly(sandbox: Sandbox, pg: Cluster) -> None:
    create_table(pg, "failures_shutdown")
    proxy = sandbox.proxy("failures-shutdown", [pg], shutdown_timeout="10s", pool={"size": 2})
    dsn = proxy.dsn(dbname=APP_DB)
    busy = psycopg.connect(dsn)
    idle = psycopg.connect(dsn, autocommit=True)
    try:
        busy.execute("INSERT INTO failures_shutdown VALUES (2, 'before SIGTERM')")
        idle.execute("SELECT 1")

        proxy.signal(signal.SIGTERM)
        assert readable(idle, 2), "the idle client was not told"
        with pytest.raises(errors.AdminShutdown):
            idle.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=2)

        busy.execute("INSERT INTO failures_shutdown VALUES (3, 'after SIGTERM')")
        busy.commit()
        assert proxy.process.wait(timeout=3) == 0  # as soon as the last transaction is done
    finally:
        busy.close()
        idle.close()
    rows = pg.primary.sql("SELECT id, v FROM failures_shutdown ORDER BY id", dbname=APP_DB)
    assert rows == [(1, "committed"), (2, "before SIGTERM"), (3, "after SIGTERM")]
