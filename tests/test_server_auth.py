"""The proxy's login to servers (server_auth, as libpq's require_auth): which requests of a server it answers,
against real servers whose pg_hba.conf asks for a cleartext password, md5 or nothing, and against an impostor
for what no real server does (an AuthenticationOk in the middle of SCRAM, a wrong or malformed SCRAM message)."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest

from shardproxy.devtools.faults import Impostor
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from tests.support import APP_DB

AUTH_OK = b"R" + struct.pack("!II", 8, 0)


@pytest.fixture(scope="module")
def lax_pg(sandbox: Sandbox) -> Cluster:
    """A server that asks `app` for a cleartext password and `admin` for nothing."""
    cluster = sandbox.cluster("auth-lax")
    cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    cluster.primary.authenticate("app", "password")
    cluster.primary.authenticate("admin", "trust")
    return cluster


@pytest.fixture
def proxy_for(sandbox: Sandbox) -> Iterator[Callable[..., ProxyProcess]]:
    """Proxies started by the test, stopped after it."""
    started: list[ProxyProcess] = []

    def start(cluster: Cluster, name: str, server: tuple[str, int] | None = None, **sections: object) -> ProxyProcess:
        """server: a (host, port) to put in the cluster's place."""
        proxy = sandbox.proxy(name, [cluster], start=False, pool={"size": 2, "min_size": 1}, **sections)
        started.append(proxy)
        if server is not None:
            proxy.write_config({**proxy.config, "shards": [{"name": "impostor", "nodes": [
                {"host": server[0], "port": server[1]}]}]})
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def login_error(proxy: ProxyProcess, user: str = "app", password: str = "secret") -> asyncpg.PostgresError:
    """The error a client's login gets (asyncpg: it gives the SQLSTATE of a refused login)."""
    with pytest.raises(asyncpg.PostgresError) as refused:
        asyncio.run(asyncpg.connect(proxy.dsn(user, password, APP_DB), timeout=10))
    return refused.value


def current_user(proxy: ProxyProcess, user: str, password: str) -> str:
    with psycopg.connect(proxy.dsn(user, password, APP_DB), autocommit=True, connect_timeout=10) as conn:
        return str(conn.execute("SELECT current_user").fetchone()[0])


@pytest.mark.parametrize("server_tls", ["disable", "prefer"])
def test_no_cleartext_password_over_a_connection_tls_did_not_verify(lax_pg: Cluster, proxy_for,
                                                                    server_tls: str) -> None:
    """By default: not over plaintext, nor where `prefer` fell back to it."""
    proxy = proxy_for(lax_pg, f"auth-cleartext-{server_tls}", server_tls={"mode": server_tls})
    error = login_error(proxy)
    assert error.sqlstate == "28000"
    assert "asked for a cleartext password" in str(error) and "verify-full" in str(error)
    assert "cannot log in to server" in proxy.log()


def test_cleartext_anywhere_when_the_operator_says_so(lax_pg: Cluster, proxy_for) -> None:
    proxy = proxy_for(lax_pg, "auth-cleartext-allowed",
                      server_auth={"methods": ["password"], "cleartext_needs_verified_tls": False})
    assert current_user(proxy, "app", "secret") == "app"


def test_a_server_that_asks_for_nothing_is_refused_unless_none_is_allowed(lax_pg: Cluster, proxy_for) -> None:
    refusing = proxy_for(lax_pg, "auth-none-refused")
    error = login_error(refusing, "admin", "adminpw")
    assert error.sqlstate == "28000" and "asked for no authentication" in str(error)
    allowing = proxy_for(lax_pg, "auth-none-allowed", server_auth={"methods": ["scram-sha-256", "none"]})
    assert current_user(allowing, "admin", "adminpw") == "admin"


def test_md5_only_when_allowed(pg: Cluster, proxy_for) -> None:
    """The sandbox's md5user: its server asks for md5."""
    refusing = proxy_for(pg, "auth-md5-refused")
    error = login_error(refusing, "md5user", "md5secret")
    assert error.sqlstate == "28000" and "md5 authentication" in str(error)
    allowing = proxy_for(pg, "auth-md5-allowed", server_auth={"methods": ["scram-sha-256", "md5"]})
    assert current_user(allowing, "md5user", "md5secret") == "md5user"
    assert current_user(refusing, "app", "secret") == "app"  # SCRAM, the default


# -- an impostor --------------------------------------------------------------------------------------------------
def auth(code: int, data: bytes = b"") -> bytes:
    return b"R" + struct.pack("!II", 8 + len(data), code) + data


SASL = auth(10, b"SCRAM-SHA-256\0\0")


def client_nonce(initial: bytes) -> bytes:
    """The nonce of a SASLInitialResponse (the proxy's client-first message)."""
    return initial.rpartition(b"r=")[2]


def server_first(initial: bytes) -> bytes:
    salt = base64.b64encode(b"0123456789abcdef")
    return auth(11, b"r=" + client_nonce(initial) + b"impostor,s=" + salt + b",i=4096")


SCRIPTS = {
    # AuthenticationOk right after the client-first message: the server proved nothing.
    "ok-before-the-proof": (lambda i, m: [SASL, AUTH_OK][i] if i < 2 else None, "28000",
                            "ended SCRAM authentication before proving"),
    # A server-final message whose signature is not the server's.
    "wrong-signature": (lambda i, m: [SASL, server_first(m), auth(12, b"v=" + base64.b64encode(b"\0" * 32))][i]
                        if i < 3 else None, "28000", "signature is wrong"),
    # A server-first message that is not even UTF-8.
    "malformed": (lambda i, m: [SASL, auth(11, b"\xff\xfe")][i] if i < 2 else None, "08006", "malformed SCRAM"),
    # A message length no server sends.
    "bad-length": (lambda i, m: b"R\xff\xff\xff\xff" if i == 0 else None, "08006", "invalid answer"),
}


@pytest.mark.parametrize("case", sorted(SCRIPTS))
def test_an_impostor_gets_nothing_and_leaks_nothing(pg: Cluster, proxy_for, case: str) -> None:
    """Each login fails with a clear error, the impostor's connections are closed, and the pool keeps trying
    (min_size 1): a failed opening does not keep its place."""
    script, code, text = SCRIPTS[case]
    data_path = []

    def play(index: int, message: bytes) -> bytes | None:
        if index == 0 and b"shardproxy health check" in message:
            return None  # health checks: hung up on
        if index == 0:
            data_path.append(message)
        return script(index, message)

    with Impostor(play) as impostor:
        proxy = proxy_for(pg, f"auth-impostor-{case}", server=(impostor.host, impostor.port))
        error = login_error(proxy)
        assert (error.sqlstate, text in str(error)) == (code, True), str(error)
        assert wait_until(lambda: len(data_path) >= 4, 5), "the pool stopped opening connections"
        assert wait_until(lambda: impostor.open == 0, 5), "a connection to the impostor was left open"
    assert "Traceback" not in proxy.log()
