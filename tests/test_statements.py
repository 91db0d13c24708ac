"""The process-wide statement registry: one server-side name per distinct Parse body, bounded, and out of
clients' reach."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal

import asyncpg
import psycopg
import pytest

from shardproxy.datapath.statements import Registry
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox
from tests.support import APP_DB


def body(sql: str) -> bytes:
    return sql.encode() + b"\0\0\0"


def test_one_name_per_body_and_the_least_recently_parsed_goes_first() -> None:
    registry = Registry(limit=2, max_bytes=1 << 20)
    a, b = registry.get(body("SELECT 1")), registry.get(body("SELECT 2"))
    assert registry.get(body("SELECT 1")) is a  # a hit makes it the most recent
    c = registry.get(body("SELECT 3"))  # evicts SELECT 2, not SELECT 1
    assert len(registry) == 2
    assert registry.get(body("SELECT 1")) is a
    b_again = registry.get(body("SELECT 2"))
    assert b_again is not b
    assert len({a.name, b.name, c.name, b_again.name}) == 4  # a name is never given twice


def test_the_registry_holds_so_many_bytes_of_statement_text() -> None:
    registry = Registry(limit=100, max_bytes=1000)
    first = registry.get(body("SELECT 1 -- " + "x" * 400))
    for i in range(2, 5):
        registry.get(body(f"SELECT {i} -- " + "x" * 400))
    assert len(registry) == 2
    assert registry.get(body("SELECT 1 -- " + "x" * 400)) is not first


async def test_statements_forgotten_by_the_proxy_keep_working(sandbox: Sandbox, pg: Cluster) -> None:
    """More live prepared statements than the registry holds, over a pool smaller than the clients."""
    proxy = sandbox.proxy("statements", [pg], pool={"size": 2, "statement_cache_size": 3})
    try:
        clients = [await asyncpg.connect(proxy.dsn(dbname=APP_DB), statement_cache_size=0) for _ in range(3)]
        statements = [[await conn.prepare(f"SELECT $1::int + {i}") for i in range(8)] for conn in clients]
        for round_ in range(3):
            for conn_statements in statements:
                for i, statement in enumerate(conn_statements):
                    assert await statement.fetchval(round_) == round_ + i
        for conn in clients:
            await conn.close()
    finally:
        proxy.stop()


# -- one client against another's statements ----------------------------------------------------------------------
BALANCE = "SELECT balance FROM acct WHERE user_id = %s"
FORGED = "PREPARE {name}(bigint) AS SELECT 1000000::numeric AS balance"


@pytest.fixture(scope="module")
def one_server(sandbox: Sandbox, pg: Cluster) -> Iterator[ProxyProcess]:
    """Every client on the same server connection, where their statements are prepared."""
    pg.primary.sql("CREATE TABLE IF NOT EXISTS acct (user_id bigint, balance numeric)", dbname=APP_DB)
    pg.primary.sql("TRUNCATE acct; INSERT INTO acct VALUES (7, 12.5); GRANT ALL ON acct TO app", dbname=APP_DB)
    proxy = sandbox.proxy("statements-one-server", [pg], pool={"size": 1})
    yield proxy
    proxy.stop()


def prepared_balance(proxy: ProxyProcess) -> tuple[psycopg.Connection, str]:
    """A client that runs BALANCE as a prepared statement, and the statement's server-side name, as any client
    on the same server connection can read it."""
    victim = psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True)
    assert victim.execute(BALANCE, [7], prepare=True).fetchone() == (Decimal("12.5"),)
    rows = victim.execute("SELECT name FROM pg_prepared_statements WHERE statement LIKE 'SELECT balance%'")
    return victim, rows.fetchone()[0]


@pytest.mark.parametrize("attack", [
    "DEALLOCATE {name}; " + FORGED,
    "SELECT 1; DEALLOCATE \"{name}\"; " + FORGED.replace("{name}", "\"{name}\""),
    "deallocate {upper}; " + FORGED.replace("{name}", "{upper}"),
    "EXECUTE {name}(7)",
])
def test_a_client_cannot_drop_or_replace_the_statements_of_others(one_server: ProxyProcess, attack: str) -> None:
    victim, name = prepared_balance(one_server)
    with victim, psycopg.connect(one_server.dsn(dbname=APP_DB), autocommit=True) as attacker:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="proxy's own"):
            attacker.execute(attack.format(name=name, upper=name.upper()))
        assert victim.execute(BALANCE, [7], prepare=True).fetchone() == (Decimal("12.5"),)
        assert attacker.execute("SELECT 1").fetchone() == (1,)  # refused, not thrown out


def test_a_parse_naming_them_is_refused_in_its_place(one_server: ProxyProcess) -> None:
    """In the extended protocol too, and inside a transaction, which the refusal aborts as any error would."""
    victim, name = prepared_balance(one_server)
    with victim, psycopg.connect(one_server.dsn(dbname=APP_DB)) as attacker:
        attacker.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            attacker.execute(f"EXECUTE {name}(%s)", [7])
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            attacker.execute("SELECT 1")
        attacker.rollback()
        assert victim.execute(BALANCE, [7], prepare=True).fetchone() == (Decimal("12.5"),)


def test_server_side_names_carry_a_random_mark_of_the_process(sandbox: Sandbox, pg: Cluster,
                                                              one_server: ProxyProcess) -> None:
    victim, name = prepared_balance(one_server)
    victim.close()
    other = sandbox.proxy("statements-other-mark", [pg], pool={"size": 1})
    try:
        second, other_name = prepared_balance(other)
        second.close()
    finally:
        other.stop()
    assert re.fullmatch(r"sp\d{12}_\d+", name) and re.fullmatch(r"sp\d{12}_\d+", other_name)
    assert name[:14] != other_name[:14]


def test_a_statement_dropped_by_another_client_keeps_working(one_server: ProxyProcess) -> None:
    """A DEALLOCATE ALL among other statements drops every statement of that client's server connection: as on
    PostgreSQL, where it drops only that session's statements, the other clients' statements keep working."""
    victim, _ = prepared_balance(one_server)
    with victim, psycopg.connect(one_server.dsn(dbname=APP_DB), autocommit=True) as other:
        other.execute("SELECT 1; DEALLOCATE ALL")
        for _ in range(2):
            assert victim.execute(BALANCE, [7], prepare=True).fetchone() == (Decimal("12.5"),)
        with psycopg.connect(one_server.dsn(dbname=APP_DB), autocommit=True) as third:
            assert third.execute(BALANCE, [7], prepare=True).fetchone() == (Decimal("12.5"),)
