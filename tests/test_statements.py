"""The process-wide statement registry: one server-side name per distinct Parse body, bounded."""

from __future__ import annotations

import asyncpg

from shardproxy.datapath.statements import Registry
from shardproxy.devtools.sandbox import Cluster, Sandbox
from tests.support import APP_DB


def body(sql: str) -> bytes:
    return sql.encode() + b"\0\0\0"


def test_one_name_per_body_and_the_least_recently_parsed_goes_first() -> None:
    registry = Registry(limit=2)
    a, b = registry.get(body("SELECT 1")), registry.get(body("SELECT 2"))
    assert registry.get(body("SELECT 1")) is a  # a hit makes it the most recent
    c = registry.get(body("SELECT 3"))  # evicts SELECT 2, not SELECT 1
    assert len(registry) == 2
    assert registry.get(body("SELECT 1")) is a
    b_again = registry.get(body("SELECT 2"))
    assert b_again is not b
    assert len({a.name, b.name, c.name, b_again.name}) == 4  # a name is never given twice


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
