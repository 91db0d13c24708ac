"""The query router as a pure function: statement text + session state + ring -> route."""

from __future__ import annotations

import struct
import uuid
from itertools import count

import pytest

from shardproxy.config import Config, parse_config
from shardproxy.datapath._core import bind_parameter as read_bind_parameter
from shardproxy.routing.keys import ShardKeyError, decode_key
from shardproxy.routing.router import KeyRef, Plan, Route, Router

CONFIG = """\
sharding:
  key: user_id
  virtual_nodes: 64
  reference_tables: [countries, public.Currencies]
routing: {strong_tables: [audit_log]}
shards:
  - {name: shard0, nodes: [{host: db0, port: 5432}]}
  - {name: shard1, nodes: [{host: db1, port: 5432}]}
  - {name: shard2, nodes: [{host: db2, port: 5432}]}
users: [{name: app, password: secret}]
"""

U = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(CONFIG)


@pytest.fixture()
def router(config: Config) -> Router:
    return Router(config)


def shard_of(router: Router, key: object) -> int:
    return router.ring.owner_index(key)


def keys_on_two_shards(router: Router) -> tuple[int, int, int]:
    """Keys a, b on one shard and c on another."""
    a = 1
    same = next(k for k in count(2) if shard_of(router, k) == shard_of(router, a))
    other = next(k for k in count(2) if shard_of(router, k) != shard_of(router, a))
    return a, same, other


def error_of(result: Route) -> str:
    """The message of an error route, which the data path sends with SQLSTATE 0A000."""
    assert result.target == "error" and result.message is not None, result
    assert result.message.startswith("shardproxy: ")
    return result.message


def route(router: Router, sql: str, params: list[object] | None = None, session_key: object = None) -> Route:
    return router.route(router.plan(sql), params=params, session_key=session_key)


def route_simple(router: Router, sql: str, session_key: object = None) -> Route:
    plan, literals = router.plan_simple(sql)
    return router.route(plan, literals, session_key=session_key)


# -- classification ------------------------------------------------------------------------------

KINDS = [
    ("SELECT 1", "read"),
    ("select * from orders where user_id = 1", "read"),
    ("VALUES (1), (2)", "read"),
    ("TABLE orders", "read"),
    ("SHOW search_path", "read"),
    ("EXPLAIN SELECT * FROM orders", "read"),
    ("EXPLAIN UPDATE orders SET x = 1", "read"),
    ("EXPLAIN (ANALYZE false) UPDATE orders SET x = 1 WHERE user_id = 1", "read"),
    ("EXPLAIN ANALYZE SELECT * FROM orders WHERE user_id = 1", "read"),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "read"),
    ("SELECT currval('s')", "read"),
    ("COPY orders TO STDOUT", "read"),
    ("COPY (SELECT * FROM orders WHERE user_id = 1) TO STDOUT", "read"),
    ("DECLARE c CURSOR FOR SELECT * FROM orders WHERE user_id = 1", "read"),
    ("INSERT INTO orders (user_id) VALUES (1)", "write"),
    ("UPDATE orders SET x = 1 WHERE user_id = 1", "write"),
    ("DELETE FROM orders WHERE user_id = 1", "write"),
    ("MERGE INTO orders o USING src s ON o.user_id = 1 WHEN MATCHED THEN DELETE", "write"),
    ("SELECT * FROM orders WHERE user_id = 1 FOR UPDATE", "write"),
    ("SELECT * FROM orders WHERE user_id = 1 FOR SHARE", "write"),
    ("SELECT * FROM orders WHERE user_id = 1 FOR NO KEY UPDATE", "write"),
    ("SELECT * FROM orders WHERE user_id = 1 FOR KEY SHARE", "write"),
    ("SELECT * FROM (SELECT * FROM orders WHERE user_id = 1 FOR UPDATE) s", "write"),
    ("WITH d AS (DELETE FROM orders WHERE user_id = 1 RETURNING *) SELECT * FROM d", "write"),
    ("SELECT nextval('orders_id_seq')", "write"),
    ("SELECT x, setval('s', 10) FROM countries", "write"),
    ("SELECT * FROM orders WHERE user_id = 1 AND id = nextval('s')", "write"),
    ("SELECT * INTO tmp FROM orders WHERE user_id = 1", "write"),
    ("COPY orders FROM STDIN", "write"),
    ("EXPLAIN ANALYZE UPDATE orders SET x = 1 WHERE user_id = 1", "write"),
    ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM orders WHERE user_id = 1", "write"),
    ("CREATE TABLE t (id int)", "ddl"),
    ("CREATE TABLE t AS SELECT * FROM orders", "ddl"),
    ("ALTER TABLE orders ADD COLUMN y int", "ddl"),
    ("DROP TABLE orders", "ddl"),
    ("TRUNCATE orders", "ddl"),
    ("COMMENT ON TABLE orders IS 'x'", "ddl"),
    ("GRANT SELECT ON orders TO app", "ddl"),
    ("REVOKE SELECT ON orders FROM app", "ddl"),
    ("GRANT admin TO app", "ddl"),
    ("CREATE INDEX i ON orders (x)", "ddl"),
    ("CREATE UNIQUE INDEX CONCURRENTLY i ON orders (x)", "ddl"),
    ("REINDEX TABLE orders", "ddl"),
    ("VACUUM orders", "ddl"),
    ("ANALYZE orders", "ddl"),
    ("CREATE VIEW v AS SELECT 1", "ddl"),
    ("CREATE SEQUENCE s", "ddl"),
    ("ALTER SEQUENCE s RESTART", "ddl"),
    ("CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql", "ddl"),
    ("CREATE EXTENSION pgcrypto", "ddl"),
    ("ALTER TABLE orders RENAME TO orders2", "ddl"),
    ("CREATE MATERIALIZED VIEW m AS SELECT 1", "ddl"),
    ("REFRESH MATERIALIZED VIEW m", "ddl"),
    ("CLUSTER orders", "ddl"),
    ("CREATE TYPE mood AS ENUM ('a')", "ddl"),
    ("BEGIN", "begin"),
    ("START TRANSACTION", "begin"),
    ("COMMIT", "commit"),
    ("END", "commit"),
    ("ROLLBACK", "rollback"),
    ("ABORT", "rollback"),
    ("SAVEPOINT s1", "savepoint"),
    ("RELEASE SAVEPOINT s1", "release"),
    ("ROLLBACK TO SAVEPOINT s1", "rollback_to"),
    ("PREPARE TRANSACTION 'g'", "prepare_transaction"),
    ("COMMIT PREPARED 'g'", "commit_prepared"),
    ("ROLLBACK PREPARED 'g'", "rollback_prepared"),
    ("SET shardproxy.shard_key = '42'", "set_shard_key"),
    ("set ShardProxy.Shard_Key to 42", "set_shard_key"),
    ("RESET shardproxy.shard_key", "reset_shard_key"),
    ("SET shardproxy.shard_key TO DEFAULT", "reset_shard_key"),
    ("SET search_path TO app", "session"),
    ("SET LOCAL statement_timeout = 5", "session"),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "session"),
    ("RESET ALL", "session"),
    ("RESET search_path", "session"),
    ("DISCARD ALL", "session"),
    ("DISCARD PLANS", "session"),
    ("DEALLOCATE ALL", "session"),
    ("DEALLOCATE p1", "session"),
    ("LISTEN ch", "session"),
    ("UNLISTEN *", "session"),
    ("NOTIFY ch", "session"),
    ("PREPARE p AS SELECT 1", "session"),
    ("FETCH 10 FROM c", "session"),
    ("CLOSE c", "session"),
    ("", "session"),
    ("EXECUTE p", "utility"),
    ("CALL do_it()", "utility"),
    ("DO $$BEGIN END$$", "utility"),
    ("LOCK TABLE orders", "utility"),
    ("CHECKPOINT", "utility"),
    ("SELEKT 1", "utility"),
]


@pytest.mark.parametrize(("sql", "kind"), KINDS)
def test_statement_kinds(router: Router, sql: str, kind: str) -> None:
    assert router.plan(sql).kind == kind


@pytest.mark.parametrize(("sql", "kind"), KINDS)
def test_simple_protocol_gives_the_same_kinds(router: Router, sql: str, kind: str) -> None:
    assert router.plan_simple(sql)[0].kind == kind


def test_transaction_options(router: Router) -> None:
    plan = router.plan("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    assert (plan.read_only, plan.isolation) == (True, "repeatable read")
    assert router.plan("START TRANSACTION READ ONLY").read_only
    assert not router.plan("START TRANSACTION READ WRITE").read_only
    assert router.plan("BEGIN").isolation is None
    assert route(router, "BEGIN READ ONLY") == Route("any", "begin", write=False)
    assert route(router, "BEGIN") == Route("any", "begin", write=True)


def test_concurrently_flag(router: Router) -> None:
    for sql in (
        "CREATE INDEX CONCURRENTLY i ON orders (x)",
        "DROP INDEX CONCURRENTLY i",
        "REINDEX INDEX CONCURRENTLY i",
    ):
        assert router.plan(sql).concurrently, sql
    for sql in ("CREATE INDEX i ON orders (x)", "DROP INDEX i", "REINDEX INDEX i", "SELECT 1"):
        assert not router.plan(sql).concurrently, sql


def test_shard_key_setting(router: Router) -> None:
    assert router.plan("SET shardproxy.shard_key = '42'").shard_key_value == "42"
    assert router.plan("SET shardproxy.shard_key TO 42").shard_key_value == 42
    assert router.plan("SET SESSION shardproxy.shard_key TO -7").shard_key_value == -7
    # Each form lands where the key itself does.
    for sql in ("SET shardproxy.shard_key = '42'", "SET shardproxy.shard_key TO 42"):
        value = router.plan(sql).shard_key_value
        assert route(router, "SELECT * FROM orders", session_key=value).shard == shard_of(router, 42)
    assert router.plan("SET shardproxy.shard_key = 'a', 'b'").error is not None
    for sql in (
        "RESET shardproxy.shard_key",
        "RESET ALL",
        "DISCARD ALL",
        "SET shardproxy.shard_key TO DEFAULT",
    ):
        assert router.plan(sql).clears_shard_key, sql
    for sql in ("RESET search_path", "DISCARD PLANS", "SET search_path = x"):
        assert not router.plan(sql).clears_shard_key, sql


# -- tables --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("SELECT * FROM public.orders o JOIN Items i ON i.order_id = o.id", {"orders", "items"}),
        ('SELECT * FROM "Orders"', {"orders"}),
        ("SELECT * FROM a WHERE x IN (SELECT x FROM b) AND EXISTS (SELECT 1 FROM c)", {"a", "b", "c"}),
        ("SELECT (SELECT max(x) FROM b) FROM a", {"a", "b"}),
        ("WITH x AS (SELECT * FROM a) SELECT * FROM x, (SELECT * FROM b) s", {"a", "b"}),
        ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT * FROM t", set()),
        ("SELECT * FROM a UNION SELECT * FROM b", {"a", "b"}),
        ("INSERT INTO a (user_id) SELECT user_id FROM b WHERE user_id = 1", {"a", "b"}),
        ("UPDATE a SET x = b.x FROM b WHERE a.user_id = 1", {"a", "b"}),
        ("DELETE FROM a USING b WHERE a.user_id = 1", {"a", "b"}),
        ("SELECT * FROM pg_catalog.pg_class, information_schema.tables, pg_stat_activity", set()),
        ("SELECT * FROM countries JOIN currencies USING (code)", set()),
        ("SELECT * FROM orders o FOR UPDATE OF o", {"orders"}),
        ("SELECT * FROM generate_series(1, 3)", set()),
    ],
)
def test_tables(router: Router, sql: str, tables: set[str]) -> None:
    assert router.plan(sql).tables == tables


def test_reference_and_strong_tables(router: Router) -> None:
    plan = router.plan("SELECT * FROM public.COUNTRIES c JOIN currencies USING (code)")
    assert (plan.tables, plan.reference, plan.strong) == (frozenset(), True, False)
    assert router.plan("SELECT * FROM audit_log WHERE user_id = 1").strong
    assert not router.plan("SELECT * FROM orders WHERE user_id = 1").reference


# -- routes --------------------------------------------------------------------------------------


def test_targets(router: Router) -> None:
    assert route(router, "SELECT 1") == Route("any", "read")
    assert route(router, "SELECT * FROM pg_class") == Route("any", "read")
    assert route(router, "SELECT * FROM countries") == Route("any", "read")
    assert route(router, "UPDATE countries SET name = 'x'") == Route("all", "write", write=True)
    assert route(router, "INSERT INTO countries VALUES ('fr')") == Route("all", "write", write=True)
    assert route(router, "CREATE TABLE t (id int)") == Route("all", "ddl", write=True)
    assert route(router, "SELECT * FROM orders").target == "scatter"
    assert route(router, "SELECT nextval('s')") == Route("any", "write", write=True)
    assert route(router, "SELECT * FROM orders WHERE user_id = 7") == Route(
        "shard", "read", shard_of(router, 7)
    )
    assert route(router, "DELETE FROM orders WHERE user_id = 7") == Route(
        "shard", "write", shard_of(router, 7), write=True
    )
    assert route(router, "SELECT * FROM audit_log WHERE user_id = 7").force_primary
    assert route(router, "SELECT * FROM audit_log").force_primary
    assert route(router, "SELECT 1").force_primary is False


def test_reading_a_reference_table_with_a_sharded_one_follows_the_key(router: Router) -> None:
    sql = "SELECT * FROM orders o JOIN countries c USING (code) WHERE o.user_id = 3"
    assert route(router, sql) == Route("shard", "read", shard_of(router, 3))


def test_writing_reference_and_sharded_tables_together_is_an_error(router: Router) -> None:
    result = route(router, "INSERT INTO countries SELECT code FROM orders WHERE user_id = 1")
    assert error_of(result).startswith("shardproxy:")


def test_keyless_updates_and_deletes_run_on_each_shard(router: Router) -> None:
    for sql in ("UPDATE orders SET x = 1 WHERE id = 5", "DELETE FROM orders", "DELETE FROM orders RETURNING *",
                "UPDATE orders o SET x = 1 FROM countries c WHERE c.code = o.code",
                "UPDATE orders o SET x = 1 FROM items i WHERE i.user_id = o.user_id AND i.id = 3",
                "DELETE FROM orders o WHERE EXISTS (SELECT 1 FROM items i WHERE i.user_id = o.user_id)"):
        assert route(router, sql) == Route("each", "write", write=True), sql
    assert route(router, "UPDATE orders SET x = 1", session_key=7).shard == shard_of(router, 7)
    assert route(router, "/* shard_key: 7 */ DELETE FROM orders").shard == shard_of(router, "7")
    assert route(router, "UPDATE countries SET name = 'x'").target == "all"  # each shard holds every row


def test_keyless_writes_that_combine_shards_rows_are_refused(router: Router) -> None:
    message = error_of(route(router, "UPDATE orders o SET x = 1 FROM items i WHERE i.id = o.id"))
    assert message.startswith("shardproxy: UPDATE combines rows of orders o and items i")
    message = error_of(route(router, "DELETE FROM orders o USING items i WHERE i.region = o.region"))
    assert message.startswith("shardproxy: DELETE combines rows of orders o and items i")
    sql = "UPDATE orders SET x = (SELECT max(x) FROM items)"
    assert error_of(route(router, sql)).startswith("shardproxy: UPDATE combines rows of orders and items")


def test_keyless_writes_refused_by_config() -> None:
    router = Router(parse_config(CONFIG.replace("routing: {", "routing: {keyless_writes: refuse, ")))
    result = route(router, "UPDATE orders SET x = 1 WHERE id = 5")
    assert error_of(result).startswith("shardproxy: UPDATE on sharded table orders needs user_id")
    assert "WHERE" in error_of(result)
    assert error_of(route(router, "DELETE FROM orders")).startswith("shardproxy: DELETE on sharded table orders")
    message = error_of(route(router, "UPDATE orders o SET x = 1 FROM items i WHERE i.id = o.id"))
    assert message.startswith("shardproxy: UPDATE on sharded table orders needs user_id = <value>")


def test_unkeyed_writes_are_errors(router: Router) -> None:
    result = route(router, "INSERT INTO orders (id, total) VALUES (1, 2)")
    assert error_of(result).startswith(
        "shardproxy: INSERT on sharded table orders needs user_id in its column list"
    )
    for sql in (
        "SELECT * FROM orders FOR UPDATE",
        "COPY orders FROM '/tmp/orders.csv'",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT 1",
        "MERGE INTO orders o USING src s ON o.id = s.id WHEN MATCHED THEN DELETE",
        "INSERT INTO orders VALUES (1, 2)",
        "INSERT INTO orders DEFAULT VALUES",
        "EXPLAIN ANALYZE DELETE FROM orders",
    ):
        result = route(router, sql)
        assert error_of(result).startswith("shardproxy:"), sql


def test_reads_that_cannot_scatter_need_a_key(router: Router) -> None:
    for sql in ("COPY orders TO '/tmp/orders.csv'", "DECLARE c CURSOR FOR SELECT * FROM orders"):
        result = route(router, sql)
        assert error_of(result).startswith("shardproxy:"), sql
    assert route(router, "/* shard_key: 4 */ COPY orders TO STDOUT").shard == shard_of(router, "4")


def test_copy_with_the_client_runs_on_every_shard_without_a_key(router: Router) -> None:
    for sql, write in (("COPY orders FROM STDIN", True), ("COPY orders (user_id, id) FROM STDIN (FORMAT csv)", True),
                       ("COPY orders TO STDOUT", False), ("COPY (SELECT * FROM orders) TO STDOUT", False)):
        result = route(router, sql)
        assert (result.target, result.write) == ("copy", write), sql
    assert route(router, "COPY orders FROM STDIN", session_key=7).shard == shard_of(router, 7)
    assert route(router, "COPY countries FROM STDIN").target == "copy"  # a reference table: every shard
    assert route(router, "COPY countries TO STDOUT").target == "any"


def test_explain_without_key_runs_on_any_shard(router: Router) -> None:
    assert route(router, "EXPLAIN SELECT * FROM orders").target == "any"
    assert route(router, "EXPLAIN UPDATE orders SET x = 1").target == "any"
    assert route(router, "EXPLAIN SELECT * FROM orders WHERE user_id = 9").shard == shard_of(router, 9)


def test_update_cannot_move_a_row(router: Router) -> None:
    result = route(router, "UPDATE orders SET user_id = 2 WHERE user_id = 1")
    assert "cannot change the shard key" in error_of(result)
    assert route(router, "UPDATE countries SET user_id = 2").target == "all"


def test_scatter_plans(router: Router) -> None:
    assert router.plan("SELECT user_id, count(*) FROM orders GROUP BY user_id ORDER BY 2 DESC LIMIT 5").scatters
    assert not router.plan("SELECT * FROM orders WHERE user_id = 1").scatters
    assert not router.plan("SELECT 1").scatters


# -- key extraction ------------------------------------------------------------------------------

KEYED = [
    ("SELECT * FROM orders WHERE user_id = 42", [], 42),
    ("SELECT * FROM orders WHERE 42 = user_id", [], 42),
    ("SELECT * FROM orders o WHERE o.user_id = $1", [42], 42),
    ("SELECT * FROM public.orders WHERE public.orders.user_id = $1::bigint", ["42"], 42),
    ("SELECT * FROM orders WHERE user_id = CAST($1 AS int8)", ["42"], 42),
    ("SELECT * FROM orders WHERE user_id = '42'::bigint", [], 42),
    ("SELECT * FROM orders WHERE user_id = 42.0", [], 42),
    ("SELECT * FROM orders WHERE user_id = 5000000000", [], 5000000000),
    ("SELECT * FROM orders WHERE user_id = -5", [], -5),
    ("SELECT * FROM orders WHERE user_id = -$1", [5], -5),
    ("SELECT * FROM orders WHERE user_id IN (42)", [], 42),
    ("SELECT * FROM orders WHERE user_id IN ($2)", [0, 42], 42),
    ("SELECT * FROM orders WHERE USER_ID = 'abc'", [], "abc"),
    ('SELECT * FROM orders WHERE "user_id" = 42', [], 42),
    ("SELECT * FROM orders WHERE status = 'x' AND (total > 3 AND user_id = $1)", [42], 42),
    ("SELECT * FROM orders WHERE (user_id = 42 AND a = 1) AND (b = 2 OR c = 3)", [], 42),
    ("SELECT * FROM orders WHERE user_id = $1::uuid", [str(U).upper()], U),
    (f"SELECT * FROM orders WHERE user_id = '{U}'::uuid", [], U),
    ("WITH x AS (SELECT * FROM orders WHERE user_id = 42) SELECT * FROM x", [], 42),
    ("WITH x AS (SELECT * FROM orders) SELECT * FROM x WHERE user_id = 42", [], 42),
    ("SELECT * FROM (SELECT * FROM orders WHERE user_id = $1) s", [42], 42),
    ("SELECT * FROM (SELECT * FROM orders) s WHERE s.user_id = 42", [], 42),
    ("SELECT * FROM orders WHERE user_id = 42 UNION ALL SELECT * FROM orders WHERE user_id = 42", [], 42),
    ("SELECT * FROM orders WHERE user_id = 42 AND x IN (SELECT 1 FROM items WHERE user_id = 42)", [], 42),
    # joins and subqueries whose other sharded relations are held to the same key
    ("SELECT * FROM orders o JOIN items i ON i.order_id = o.id AND i.user_id = o.user_id AND o.user_id = 42", [], 42),
    ("SELECT * FROM orders o JOIN items i ON i.order_id = o.id WHERE i.user_id = 42 AND o.user_id = i.user_id", [], 42),
    ("SELECT * FROM orders o JOIN items i USING (user_id) WHERE user_id = 42", [], 42),
    ("SELECT * FROM orders o JOIN items i USING (user_id) JOIN lines l USING (user_id) WHERE user_id = $1", [42], 42),
    ("SELECT * FROM orders o JOIN items i ON i.region = o.region WHERE o.user_id = $1 AND i.user_id = $1", [42], 42),
    ("SELECT * FROM orders o LEFT JOIN items i ON i.user_id = o.user_id WHERE o.user_id = 42", [], 42),
    ("SELECT * FROM orders o RIGHT JOIN items i ON i.user_id = o.user_id WHERE i.user_id = 42", [], 42),
    ("SELECT * FROM orders o FULL JOIN items i USING (user_id) WHERE user_id = 42", [], 42),
    ("SELECT * FROM orders o JOIN countries c ON c.code = o.code WHERE user_id = 42", [], 42),
    ("SELECT * FROM orders o WHERE o.user_id = 42 AND EXISTS (SELECT 1 FROM items i WHERE i.user_id = o.user_id)",
     [], 42),
    ("SELECT *, (SELECT max(x) FROM items i WHERE i.user_id = o.user_id) FROM orders o WHERE o.user_id = 42", [], 42),
    ("SELECT * FROM orders WHERE user_id = 42 AND x IN (SELECT x FROM items i WHERE i.user_id = orders.user_id)",
     [], 42),
    ("SELECT * FROM orders WHERE user_id IN (SELECT user_id FROM items WHERE user_id = 42)", [], 42),
    (("SELECT * FROM orders o, LATERAL (SELECT * FROM items i WHERE i.user_id = o.user_id LIMIT 1) l "
      "WHERE o.user_id = 42"), [], 42),
    (("WITH x AS (SELECT * FROM orders) SELECT * FROM x a JOIN x b ON a.id = b.id WHERE a.user_id = 42 "
      "AND b.user_id = a.user_id"), [], 42),
    ("WITH x(uid) AS (SELECT user_id FROM orders) SELECT * FROM x JOIN items i ON i.user_id = uid WHERE uid = 42",
     [], 42),
    (("SELECT * FROM (SELECT user_id, count(*) FROM orders GROUP BY user_id) s JOIN items i USING (user_id) "
      "WHERE i.user_id = 42"), [], 42),
    ("INSERT INTO orders (id, user_id) VALUES (1, 42)", [], 42),
    ("INSERT INTO orders (id, user_id) VALUES ($1, $2), ($3, $4)", [1, 42, 2, 42], 42),
    ("INSERT INTO orders (user_id, id) VALUES ($1::bigint, 1) RETURNING id", ["42"], 42),
    ("INSERT INTO orders (user_id) VALUES (42) ON CONFLICT (user_id) DO UPDATE SET n = 1", [], 42),
    ("INSERT INTO orders (id, user_id) SELECT id, user_id FROM staging WHERE user_id = 42", [], 42),
    ("INSERT INTO orders SELECT * FROM staging WHERE user_id = 42", [], 42),
    ("INSERT INTO orders (user_id, total) SELECT 42, sum(x) FROM countries", [], 42),
    ("INSERT INTO orders (user_id, total) SELECT $1, 0", [42], 42),
    ("UPDATE orders SET total = 0 WHERE id = 3 AND user_id = $1", [42], 42),
    ("UPDATE orders o SET total = i.t FROM items i WHERE i.id = o.id AND i.user_id = o.user_id AND o.user_id = 42",
     [], 42),
    ("UPDATE orders o SET total = (SELECT max(t) FROM items i WHERE i.user_id = o.user_id) WHERE o.user_id = 42",
     [], 42),
    ("DELETE FROM orders o USING items i WHERE o.id = i.id AND i.user_id = 42 AND o.user_id = i.user_id", [], 42),
    ("MERGE INTO orders o USING src s ON o.user_id = 42 AND s.user_id = o.user_id WHEN MATCHED THEN DELETE", [], 42),
    (("MERGE INTO orders o USING (SELECT * FROM src WHERE user_id = 42) s ON o.user_id = s.user_id "
      "WHEN NOT MATCHED THEN INSERT (user_id) VALUES (s.user_id)"), [], 42),
    (("INSERT INTO orders (id, user_id) SELECT s.id, s.user_id FROM staging s JOIN other t USING (user_id) "
      "WHERE s.user_id = 42"), [], 42),
    (("INSERT INTO orders (user_id) VALUES (42) ON CONFLICT (id) DO UPDATE SET n = "
      "(SELECT count(*) FROM items i WHERE i.user_id = excluded.user_id)"), [], 42),
    ("DELETE FROM orders WHERE user_id = 42 RETURNING *", [], 42),
    ("WITH d AS (DELETE FROM orders WHERE user_id = 42 RETURNING *) SELECT * FROM d", [], 42),
    ("SELECT * FROM orders WHERE user_id = 42 FOR UPDATE", [], 42),
    ("DECLARE c CURSOR FOR SELECT * FROM orders WHERE user_id = 42", [], 42),
    ("COPY (SELECT * FROM orders WHERE user_id = 42) TO STDOUT", [], 42),
]


@pytest.mark.parametrize(("sql", "params", "key"), KEYED)
def test_keys(router: Router, sql: str, params: list[object], key: object) -> None:
    result = route(router, sql, params)
    assert result.target == "shard", result
    assert result.shard == shard_of(router, key)


UNKEYED_READS = [
    "SELECT * FROM orders WHERE user_id = 42 OR status = 'x'",
    "SELECT * FROM orders WHERE NOT (user_id = 42)",
    "SELECT * FROM orders WHERE (user_id = 42 AND a = 1) OR b = 2",
    "SELECT * FROM orders WHERE user_id IN (1, 2)",
    "SELECT * FROM orders WHERE user_id > 42",
    "SELECT * FROM orders WHERE user_id <> 42",
    "SELECT * FROM orders WHERE user_id = other_id",
    "SELECT * FROM orders WHERE user_id = 40 + 2",
    "SELECT * FROM orders WHERE user_id = NULL",
    "SELECT * FROM orders WHERE user_id = ANY($1)",
    "SELECT * FROM orders WHERE CASE WHEN user_id = 42 THEN true END",
    "SELECT * FROM orders WHERE coalesce(user_id = 42, false)",
    "SELECT *, user_id = 42 FROM orders",
]


@pytest.mark.parametrize("sql", UNKEYED_READS)
def test_no_key_scatters_reads(router: Router, sql: str) -> None:
    plan = router.plan(sql)
    assert plan.keys == ()
    assert router.route(plan, params=[[42]]).target == "scatter"


# Sharded relations whose rows combine only on equal keys: every shard holds every pair that can match.
CO_LOCATED_READS = [
    "SELECT count(*) FROM users a JOIN users b ON a.user_id = b.user_id",
    "SELECT count(*) FROM users a JOIN orders b USING (user_id) WHERE a.region = 'x'",
    "SELECT * FROM users a, orders b, items c WHERE a.user_id = b.user_id AND c.user_id = b.user_id",
    "SELECT * FROM users a LEFT JOIN orders b ON b.user_id = a.user_id AND b.total > 3",
    "SELECT * FROM users a FULL JOIN orders b ON b.user_id = a.user_id",
    "SELECT * FROM users a LEFT JOIN orders b ON b.user_id = a.user_id AND b.user_id = 42",
    "SELECT * FROM users a LEFT JOIN orders b ON a.user_id = 42 AND b.user_id = a.user_id WHERE b.total > 0",
    "SELECT * FROM users a LEFT JOIN (SELECT * FROM orders WHERE user_id = 42) b USING (user_id)",
    "SELECT * FROM users a JOIN (orders b JOIN items c USING (user_id)) AS j ON j.user_id = a.user_id",
    "SELECT * FROM orders o JOIN countries c ON c.code = o.code",
    "SELECT * FROM orders o, pg_class c, generate_series(1, 3) g, (VALUES (1)) v(n)",
    "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM users u WHERE u.user_id = o.user_id AND u.region = 'x')",
    "SELECT * FROM orders o WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.user_id = o.user_id)",
    "SELECT * FROM orders WHERE user_id IN (SELECT user_id FROM users WHERE region = 'x')",
    "SELECT * FROM orders WHERE user_id = ANY (SELECT u.user_id FROM users u JOIN items i USING (user_id))",
    "SELECT *, (SELECT count(*) FROM items i WHERE i.user_id = o.user_id) FROM orders o",
    "SELECT * FROM users a CROSS JOIN LATERAL (SELECT * FROM orders b WHERE b.user_id = a.user_id) l",
    "WITH x AS (SELECT * FROM orders) SELECT * FROM x a JOIN x b ON a.user_id = b.user_id",
    "WITH x AS (SELECT user_id AS uid FROM orders) SELECT * FROM x JOIN users u ON u.user_id = x.uid",
    "WITH x(uid) AS (SELECT user_id FROM orders) SELECT * FROM x JOIN users u ON u.user_id = uid",
    "SELECT * FROM (SELECT o.*, 1 AS one FROM orders o) s JOIN users u ON u.user_id = s.user_id",
]


@pytest.mark.parametrize("sql", CO_LOCATED_READS)
def test_co_located_reads_scatter(router: Router, sql: str) -> None:
    assert route(router, sql).target == "scatter"


# Rows of two sharded relations combined on anything but equal keys: pairs across shards would be missed.
# The first thirteen were routed (to one shard, or every shard's part merged) before this rule.
APART = [
    "SELECT * FROM orders o JOIN items i ON i.order_id = o.id AND o.user_id = 42",
    "SELECT * FROM orders o JOIN items i ON i.order_id = o.id WHERE i.user_id = 42",
    "SELECT * FROM orders WHERE user_id = 42 AND id IN (SELECT order_id FROM items)",
    "UPDATE orders o SET total = i.t FROM items i WHERE i.id = o.id AND o.user_id = 42",
    "DELETE FROM orders o USING items i WHERE o.id = i.id AND o.user_id = 42",
    "MERGE INTO orders o USING src s ON o.user_id = 42 AND o.id = s.id WHEN MATCHED THEN DELETE",
    "SELECT * FROM orders o LEFT JOIN items i ON i.user_id = 42",
    "SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders WHERE user_id = 42)",
    "SELECT * FROM orders WHERE id IN (SELECT order_id FROM items WHERE user_id = 42)",
    "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM items i WHERE i.user_id = 42)",
    "WITH x AS (SELECT * FROM orders WHERE user_id = 42) SELECT * FROM x JOIN items USING (id)",
    "SELECT * FROM orders WHERE user_id = 42 UNION ALL SELECT * FROM orders",
    "SELECT * FROM (SELECT * FROM orders WHERE user_id = 42) a, (SELECT * FROM items) b",
    # the join of users on region, and its keyed form
    "SELECT count(*) FROM users a JOIN users b ON a.region = b.region",
    "SELECT * FROM users a JOIN orders b ON a.region = b.region WHERE a.user_id = 5",
    "SELECT * FROM users a, users b",
    "SELECT * FROM users a JOIN users b ON a.user_id = b.user_id OR a.region = b.region",
    "SELECT * FROM users a JOIN users b ON a.user_id + 0 = b.user_id",
    "SELECT * FROM users a JOIN users b ON a.user_id = b.user_id::bigint",
    "SELECT * FROM orders o NATURAL JOIN items i",
    # subqueries: uncorrelated, correlated on something else, or whose rows differ per shard
    "SELECT * FROM orders WHERE region IN (SELECT region FROM users)",
    "SELECT * FROM orders WHERE user_id NOT IN (SELECT user_id FROM users)",
    "SELECT * FROM orders WHERE (user_id, x) IN (SELECT user_id, x FROM items)",
    "SELECT * FROM orders WHERE user_id IN (SELECT user_id FROM users ORDER BY user_id LIMIT 3)",
    "SELECT * FROM orders WHERE user_id = (SELECT max(user_id) FROM users)",
    "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM users u WHERE u.region = o.region)",
    "SELECT *, (SELECT count(*) FROM items) FROM orders",
    "SELECT * FROM users a CROSS JOIN LATERAL (SELECT * FROM orders b WHERE b.region = a.region) l",
    "SELECT * FROM users a JOIN LATERAL (SELECT * FROM items WHERE items.user_id = user_id) c ON true",
    "SELECT * FROM users u JOIN (SELECT * FROM orders ORDER BY id LIMIT 5) o USING (user_id)",
    "SELECT * FROM users u JOIN (SELECT *, row_number() OVER () FROM orders) o USING (user_id)",
    "SELECT * FROM users u JOIN (SELECT DISTINCT ON (region) * FROM orders) o USING (user_id)",
    "SELECT * FROM users u FULL JOIN (SELECT user_id, count(*) FROM t GROUP BY ROLLUP (user_id)) o USING (user_id)",
    "SELECT * FROM (SELECT o.user_id AS uid, o.id AS user_id FROM orders o) s JOIN items i USING (user_id)",
    "SELECT * FROM orders o(a, b) JOIN items i ON i.user_id = o.user_id",
    # WITH queries: each reference reads the rows anew
    "WITH x AS (SELECT * FROM orders) SELECT * FROM x a JOIN x b ON a.id = b.id",
    ("WITH RECURSIVE r AS (SELECT id FROM edges WHERE user_id = 5 UNION ALL "
     "SELECT e.dst FROM edges e JOIN r ON e.src = r.id) SELECT * FROM r"),
    # a keyed statement that reads another sharded table in full
    "UPDATE orders o SET total = (SELECT max(t) FROM items) WHERE o.user_id = 42",
    "INSERT INTO orders (user_id, x) SELECT 42, x FROM staging",
    "INSERT INTO orders (user_id, x) SELECT s.user_id, t.x FROM staging s JOIN t ON t.x = s.x WHERE s.user_id = 42",
]


@pytest.mark.parametrize("sql", APART)
def test_rows_of_different_shards_are_never_combined(router: Router, sql: str) -> None:
    verb = router.plan(sql).verb
    for params in ([42, 42], [1, 2]):
        message = error_of(route(router, sql, params))
        assert message.startswith(f"shardproxy: {verb} combines rows of "), message
        assert "join them on the shard key" in message and "/* shard_key: ... */" in message


def test_refusal_names_the_relations_and_the_join_to_write(router: Router) -> None:
    message = error_of(route(router, "SELECT count(*) FROM users a JOIN users b ON a.region = b.region"))
    assert message.startswith("shardproxy: SELECT combines rows of users a and users b, which can be on different ")
    assert "(a.user_id = b.user_id)" in message
    message = error_of(route(router, "WITH x AS (SELECT * FROM orders) SELECT * FROM x p JOIN x q ON p.id = q.id"))
    assert "rows of x p and x q" in message and "(p.user_id = q.user_id)" in message
    sql = "SELECT * FROM (SELECT * FROM orders) s JOIN (SELECT * FROM items) t ON s.id = t.id"
    assert "(s.user_id = t.user_id)" in error_of(route(router, sql))


def test_a_refused_combination_runs_where_the_client_names_the_shard(router: Router) -> None:
    sql = "SELECT count(*) FROM users a JOIN users b ON a.region = b.region"
    assert route(router, f"/* shard_key: 7 */ {sql}").shard == shard_of(router, "7")
    assert route(router, sql, session_key=7).shard == shard_of(router, 7)
    assert route(router, f"EXPLAIN {sql}").target == "any"  # a plan, not an answer


def test_a_write_without_a_key_of_its_own_is_told_so_first(router: Router) -> None:
    message = error_of(route(router, "INSERT INTO orders SELECT 1, 2 FROM staging WHERE user_id = 42"))
    assert message.startswith("shardproxy: INSERT on sharded table orders needs user_id in its column list")
    # WHEN NOT MATCHED BY SOURCE acts on the target rows that ON does not match: ON holds none of them to a key
    sql = "MERGE INTO orders o USING s ON o.user_id = s.user_id AND o.user_id = 4 WHEN NOT MATCHED BY SOURCE THEN "
    sql += "DELETE"
    assert error_of(route(router, sql)).startswith("shardproxy: MERGE on sharded table orders needs user_id")


def test_several_statements_with_a_refused_combination(router: Router) -> None:
    result = route(router, "SELECT 1; SELECT count(*) FROM users a JOIN users b ON a.region = b.region")
    assert error_of(result).startswith("shardproxy: SELECT combines rows of users a and users b")


def test_a_dml_target_is_never_a_with_query(router: Router) -> None:
    """WITH names are not visible to INSERT/UPDATE/DELETE targets: this deletes every row of the table orders."""
    assert route(router, "WITH orders AS (SELECT 1) DELETE FROM orders").target == "each"
    assert route(router, "WITH orders AS (SELECT 1) SELECT * FROM orders").target == "any"


def test_statements_too_large_to_walk_are_refused(router: Router) -> None:
    doubling = "WITH c0 AS (SELECT * FROM orders)" + "".join(
        f", c{i} AS (SELECT * FROM c{i - 1} a JOIN c{i - 1} b USING (user_id))" for i in range(1, 40)
    )
    assert "too many" in error_of(route(router, f"{doubling} SELECT * FROM c39"))
    chain = "WITH c0 AS (SELECT * FROM orders)" + "".join(f", c{i} AS (SELECT * FROM c{i - 1})" for i in range(1, 600))
    assert "too many" in error_of(route(router, f"{chain} SELECT * FROM c599"))
    chain = "WITH c0 AS (SELECT * FROM orders)" + "".join(f", c{i} AS (SELECT * FROM c{i - 1})" for i in range(1, 60))
    assert route(router, f"{chain} SELECT * FROM c59 WHERE user_id = 3").shard == shard_of(router, 3)


@pytest.mark.parametrize("sql", [s.replace("SELECT *", "DELETE", 1) for s in UNKEYED_READS[:12]])
def test_no_key_deletes_run_on_each_shard(router: Router, sql: str) -> None:
    assert route(router, sql, [[42]]).target == "each"


def test_data_modifying_cte_needs_its_own_key(router: Router) -> None:
    sql = "WITH d AS (DELETE FROM orders WHERE id = 3 RETURNING *) SELECT * FROM d WHERE user_id = 42"
    assert route(router, sql).target == "error"


def test_conflicting_keys(router: Router) -> None:
    a, same, other = keys_on_two_shards(router)
    result = route(router, f"SELECT * FROM orders WHERE user_id = {a} AND user_id = {other}")
    assert error_of(result).startswith("shardproxy: SELECT has shard keys on different shards")
    assert route(router, f"SELECT * FROM orders WHERE user_id = {a} AND user_id = {same}").shard == shard_of(
        router, a
    )
    sql = f"SELECT * FROM orders WHERE user_id = {a} AND x IN (SELECT x FROM items WHERE user_id = {other})"
    assert route(router, sql).target == "error"
    sql = "WITH x AS (SELECT * FROM orders WHERE user_id = $1) SELECT * FROM x, items i WHERE i.user_id = $2"
    assert route(router, sql, [a, other]).target == "error"
    assert route(router, sql, [a, same]).shard == shard_of(router, a)


def test_multi_row_insert(router: Router) -> None:
    a, same, other = keys_on_two_shards(router)
    sql = "INSERT INTO orders (user_id, x) VALUES ($1, 1), ($2, 2)"
    assert route(router, sql, [a, same]) == Route("shard", "write", shard_of(router, a), write=True)
    rows = (shard_of(router, a), shard_of(router, other))
    assert route(router, sql, [a, other]) == Route("split", "write", write=True, rows=rows)
    assert route_simple(router, f"INSERT INTO orders (user_id) VALUES ({a}), ({other}), ({a})").rows == (*rows, rows[0])
    assert error_of(route(router, sql, [a, None])) == "shardproxy: the shard key is NULL"
    # rows are split only where each shard's part is the same statement on its own rows
    for sql in (f"WITH s AS (SELECT 1) INSERT INTO orders (user_id) VALUES ({a}), ({other})",
                f"INSERT INTO orders (user_id, x) VALUES ({a}, (SELECT x FROM items WHERE user_id = {a})), "
                f"({other}, 1)",
                f"INSERT INTO orders (user_id) VALUES ({a}); INSERT INTO orders (user_id) VALUES ({other})",
                f"EXPLAIN ANALYZE INSERT INTO orders (user_id) VALUES ({a}), ({other})"):
        assert error_of(route(router, sql)).startswith("shardproxy: "), sql
    # A row whose key is not a literal or parameter leaves the whole INSERT without a key.
    assert route(router, f"INSERT INTO orders (user_id) VALUES ({a}), (DEFAULT)").target == "error"
    assert route(router, f"INSERT INTO orders (user_id) VALUES ({a}), ({a} + 1)").target == "error"


def test_insert_select_from_values(router: Router) -> None:
    """SQLAlchemy's ORM inserts several rows as INSERT ... SELECT ... FROM (VALUES ...) AS alias(columns)."""
    a, same, other = keys_on_two_shards(router)
    sql = ("INSERT INTO orders (user_id, item) SELECT p0::BIGINT, p1::VARCHAR "
           "FROM (VALUES ($1::BIGINT, $2::VARCHAR, 0), ($3::BIGINT, $4::VARCHAR, 1)) AS imp_sen(p0, p1, sen_counter) "
           "ORDER BY sen_counter RETURNING orders.id")
    assert route(router, sql, [str(a), "x", str(same), "y"]) == Route("shard", "write", shard_of(router, a), write=True)
    assert route(router, sql, [a, "x", other, "y"]).rows == (shard_of(router, a), shard_of(router, other))
    values = f"VALUES ('x', {a}), ('y', {same})"
    assert route_simple(router, f"INSERT INTO orders (item, user_id) SELECT i, k FROM ({values}) AS v(i, k)").shard \
        == shard_of(router, a)
    # a row without a literal or parameter, a second FROM item, a column not from the VALUES: no key
    for sql in (f"INSERT INTO orders (user_id) SELECT k FROM (VALUES ({a}), (DEFAULT)) AS v(k)",
                f"INSERT INTO orders (user_id) SELECT k FROM (VALUES ({a})) AS v(k), orders o2",
                f"INSERT INTO orders (user_id) SELECT other FROM (VALUES ({a})) AS v(k)"):
        assert route_simple(router, sql).target == "error", sql


def test_missing_and_null_parameters(router: Router) -> None:
    plan = router.plan("SELECT * FROM orders WHERE user_id = $2")
    assert error_of(router.route(plan, params=[1])) == "shardproxy: no value for shard key parameter $2"
    assert router.route(plan).target == "error"
    assert error_of(router.route(plan, params=[1, None])) == "shardproxy: the shard key is NULL"
    assert router.route(plan, params=lambda n: {2: 42}[n]).shard == shard_of(router, 42)

    def undecodable(number: int) -> object:
        return decode_key(b"\0" * 8, 1, 701)  # a binary float8: refused, never guessed

    assert "cannot read a binary" in error_of(router.route(plan, params=undecodable))
    bad = router.plan("SELECT * FROM orders WHERE user_id = $1::bigint")
    assert error_of(router.route(bad, params=["abc"])).startswith("shardproxy: invalid shard key")


# -- session key and comments ------------------------------------------------------------------------


def test_session_key(router: Router) -> None:
    assert route(router, "SELECT * FROM orders", session_key="42").shard == shard_of(router, 42)
    assert route(router, "UPDATE orders SET x = 1", session_key=42).shard == shard_of(router, 42)
    # The statement's own key wins over the session's.
    assert route(router, "SELECT * FROM orders WHERE user_id = 7", session_key=42).shard == shard_of(
        router, 7
    )
    # Statements on no sharded table follow the session's shard too, except DDL and reference writes.
    assert route(router, "SELECT 1", session_key=42).shard == shard_of(router, 42)
    assert route(router, "CALL p()", session_key=42).shard == shard_of(router, 42)
    assert route(router, "CREATE TABLE t (x int)", session_key=42).target == "all"
    assert route(router, "DELETE FROM countries", session_key=42).target == "all"
    assert route(router, "SET search_path = x", session_key=42).target == "any"


def test_comment_key_overrides_the_sql(router: Router) -> None:
    assert route(router, "/* shard_key: 42 */ SELECT * FROM orders").shard == shard_of(router, 42)
    sql = "SELECT * FROM orders WHERE user_id = 7 /* shard_key: 42 */"
    assert route(router, sql).shard == shard_of(router, 42)
    assert route(router, "UPDATE orders SET x = 1 /*shard_key='abc'*/").shard == shard_of(router, "abc")
    assert route(router, "/* app: x, shard_key: 42, target: primary */ SELECT 1").shard == shard_of(
        router, 42
    )
    assert route(router, "-- shard_key: 42\nSELECT * FROM orders").target == "scatter"
    assert route(router, "CALL p() /* shard_key: 9 */").shard == shard_of(router, 9)


def test_target_primary_comment(router: Router) -> None:
    assert route(router, "/* target: primary */ SELECT * FROM orders WHERE user_id = 1").force_primary
    assert route(router, "SELECT 1 /* target: primary */").force_primary
    assert not route(router, "/* target: replica */ SELECT 1").force_primary
    assert route_simple(router, "/* target: primary */ SELECT * FROM orders WHERE user_id = 1").force_primary


# -- several statements --------------------------------------------------------------------------


def test_multi_statement(router: Router) -> None:
    a, same, other = keys_on_two_shards(router)
    plan = router.plan(f"SELECT 1; UPDATE orders SET x = 1 WHERE user_id = {a}")
    assert plan.kind == "write"
    assert router.route(plan).shard == shard_of(router, a)
    assert router.plan("SELECT 1; CREATE TABLE t (x int); SELECT 2").kind == "ddl"
    plan = router.plan(f"BEGIN; SELECT * FROM orders WHERE user_id = {a}; COMMIT")
    assert (plan.kind, router.route(plan).shard) == ("read", shard_of(router, a))
    sql = f"UPDATE orders SET x = 1 WHERE user_id = {a}; DELETE FROM items WHERE user_id = {same}"
    assert route(router, sql).shard == shard_of(router, a)
    sql = f"UPDATE orders SET x = 1 WHERE user_id = {a}; DELETE FROM items WHERE user_id = {other}"
    assert route(router, sql).target == "error"
    result = route(router, f"SELECT * FROM orders; SELECT * FROM orders WHERE user_id = {a}")
    assert error_of(result).startswith("shardproxy:")
    assert route(router, "SELECT * FROM orders; SELECT 1", session_key=a).shard == shard_of(router, a)
    assert route(router, "SET shardproxy.shard_key = 1; SELECT 1").target == "error"
    assert route(router, "ALTER TABLE orders ADD y int; UPDATE orders SET y = 0").target == "error"
    assert route(router, "CREATE TABLE t (x int); INSERT INTO countries VALUES ('x')").target == "all"
    assert router.plan("SELECT 1; RESET ALL").clears_shard_key


# -- plan cache and simple-protocol templates ---------------------------------------------------------


def test_plan_cache_returns_the_same_plan(router: Router) -> None:
    sql = "SELECT * FROM orders WHERE user_id = $1"
    assert router.plan(sql) is router.plan(sql)


def test_template_shared_across_literal_values(router: Router) -> None:
    a, _, other = keys_on_two_shards(router)
    plan_a, literals_a = router.plan_simple(f"SELECT * FROM orders WHERE user_id = {a} AND status = 'new'")
    plan_b, literals_b = router.plan_simple(
        f"select * from orders where user_id = {other} and status = 'it''s'"
    )
    plan_c, literals_c = router.plan_simple(f"SELECT * FROM orders WHERE user_id = {other} AND status = 'x'")
    assert plan_a is plan_c and plan_a is not plan_b  # the text's spelling is part of the template
    assert literals_a == [a, "new"] and literals_b == [other, "it's"]
    assert plan_a.keys == (KeyRef("literal", 0),)
    assert router.route(plan_a, literals_a).shard == shard_of(router, a)
    assert router.route(plan_c, literals_c).shard == shard_of(router, other)
    assert router.route(plan_a, literals_a).shard == shard_of(router, a)  # nothing leaked from c


def test_template_never_keeps_a_literal_key(router: Router) -> None:
    a, _, other = keys_on_two_shards(router)
    for sql in (
        "INSERT INTO orders (user_id, s) VALUES ({}, 'x')",
        "SELECT * FROM orders WHERE user_id = '{}'",
        "SELECT * FROM orders WHERE user_id = -{}",
        "UPDATE orders SET x = 1 WHERE user_id = {}::int8",
    ):
        first, second = sql.format(a), sql.format(other)
        plan, literals = router.plan_simple(first)
        assert router.plan_simple(second)[0] is plan, sql
        negate = -1 if "-{}" in sql else 1
        assert router.route(plan, literals).shard == shard_of(router, negate * a)
        assert router.route(*router.plan_simple(second)).shard == shard_of(router, negate * other)


@pytest.mark.parametrize(
    ("sql", "literals"),
    [
        ("SELECT 'a', 1.5, .5, 1e3, 2 FROM t", ["a", "1.5", ".5", 1000, 2]),
        ('SELECT "col 1", t2.c3, x$1y FROM t2 WHERE a = 4', [4]),
        ("SELECT 1 -- 2\n, 3 /* 4 '5' */", [1, 3]),
        ("SELECT E'x', B'101', X'1F', N'n', U&'u' FROM t WHERE a = 'b'", ["b"]),
        ("SELECT date'2020-01-01' FROM t WHERE a = 7", [7]),
        ("SELECT a[1] FROM t WHERE b = $2 AND c = 3", [1, 3]),
    ],
)
def test_normalisation_literals(router: Router, sql: str, literals: list[object]) -> None:
    assert router.plan_simple(sql)[1] == literals


def test_placeholders_follow_the_highest_parameter(router: Router) -> None:
    plan, literals = router.plan_simple("SELECT * FROM orders WHERE a = $2 AND user_id = 42")
    assert plan.literal_base == 2 and literals == [42]
    assert plan.keys == (KeyRef("literal", 0),)
    assert router.route(plan, literals).shard == shard_of(router, 42)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT $$5$$ FROM orders WHERE user_id = 5",  # dollar quotes
        "SELECT $q$x$q$ FROM orders WHERE user_id = 5",
        "SELECT E'\\'' FROM orders WHERE user_id = 5",  # backslash escapes
        "EXPLAIN SELECT * FROM orders WHERE user_id = 5",  # not a query: a literal may be an option
        "SELECT x::varchar(10) FROM orders WHERE user_id = 5",  # the template does not parse
    ],
)
def test_texts_planned_as_written(router: Router, sql: str) -> None:
    plan, literals = router.plan_simple(sql)
    assert literals == [] and plan.literal_base is None
    assert router.route(plan, literals).shard == shard_of(router, 5)


def test_positional_order_by_scatter_keeps_its_numbers(router: Router) -> None:
    plan, literals = router.plan_simple("SELECT user_id, total FROM orders ORDER BY 2 DESC LIMIT 10")
    assert literals == [] and plan.scatters and plan.literal_base is None  # planned as written: 2 is a position


def test_scatter_template_limit_is_a_literal(router: Router) -> None:
    plan, literals = router.plan_simple("SELECT * FROM orders ORDER BY created LIMIT 10")
    assert plan.scatters and literals == [10] and plan.literal_base == 0


def test_multi_statement_template(router: Router) -> None:
    a, same, other = keys_on_two_shards(router)
    sql = (
        "BEGIN; UPDATE orders SET n = n + 1 WHERE user_id = {}; INSERT INTO log (user_id) VALUES ({}); COMMIT"
    )
    plan, literals = router.plan_simple(sql.format(a, same))
    assert literals == [1, a, same] and plan.kind == "write"
    assert router.route(plan, literals).shard == shard_of(router, a)
    plan_other, literals = router.plan_simple(sql.format(a, other))
    assert plan_other is plan and error_of(router.route(plan, literals)).startswith("shardproxy: UPDATE")


@pytest.mark.timeout(10)
def test_huge_number_literals_stay_text(router: Router) -> None:
    """A literal no integer column can hold is routed by its text, at once: as an int, 1e999999999 would
    stall the proxy for minutes, and 5000 digits are more than Python reads into an int."""
    for literal in ("1e999999999", "9" * 5000, "1" + "0" * 4999 + ".0"):
        plan, literals = router.plan_simple(f"SELECT * FROM orders WHERE user_id = {literal}")
        assert literals == [literal]
        assert router.route(plan, literals).shard == shard_of(router, literal)
    assert router.plan_simple("SELECT * FROM orders WHERE user_id = 1e3")[1] == [1000]


def test_set_shard_key_is_planned_as_written(router: Router) -> None:
    for value in ("42", "43"):
        plan, literals = router.plan_simple(f"SET shardproxy.shard_key = '{value}'")
        assert (plan.kind, plan.shard_key_value, literals) == ("set_shard_key", value, [])


def test_keyed_positional_order_by_shares_its_template(router: Router) -> None:
    plan, literals = router.plan_simple("SELECT * FROM orders WHERE user_id = 5 ORDER BY 1")
    assert literals == [5, 1] and not plan.scatters
    assert router.route(plan, literals).shard == shard_of(router, 5)


def test_simple_comment_key_stays_in_the_template(router: Router) -> None:
    a, _, other = keys_on_two_shards(router)
    for key in (a, other):
        plan, literals = router.plan_simple(f"/* shard_key: {key} */ SELECT * FROM orders WHERE x = 1")
        assert literals == [1]
        assert router.route(plan, literals).shard == shard_of(router, key)


def test_cache_is_bounded(config: Config) -> None:
    small = Router(config, cache_size=2)
    first = small.plan("SELECT 1")
    small.plan("SELECT 2")
    small.plan("SELECT 3")
    assert small.plan("SELECT 1") is not first


def test_cache_holds_so_many_bytes_of_text() -> None:
    """By text and by template alike: huge texts do not fill the cache to its count."""
    small = Router(parse_config(CONFIG + "pool: {statement_cache_bytes: 1kB}\n"))
    pad = "x" * 600
    first = small.plan(f"SELECT 1 /* {pad} */")
    first_template, _ = small.plan_simple(f"SELECT * FROM orders WHERE user_id = 1 /* {pad} */")
    small.plan(f"SELECT 2 /* {pad} */")
    small.plan_simple(f"SELECT * FROM orders WHERE user_id = 2 AND 3 = 3 /* {pad} */")
    assert small.plan(f"SELECT 1 /* {pad} */") is not first
    assert small.plan_simple(f"SELECT * FROM orders WHERE user_id = 5 /* {pad} */")[0] is not first_template


# -- parameters ------------------------------------------------------------------------------------

INT8, INT4, INT2, TEXT, VARCHAR, UUID_OID, NUMERIC, UNKNOWN = 20, 23, 21, 25, 1043, 2950, 1700, 705


@pytest.mark.parametrize(
    ("value", "fmt", "oid", "expected"),
    [
        (b"42", 0, INT8, 42),
        (b" -42", 0, INT4, -42),
        (b"042", 0, INT2, 42),
        (b"42", 0, 0, "42"),
        (b"42", 0, TEXT, "42"),
        (b"abc", 0, VARCHAR, "abc"),
        (b"abc", 0, UNKNOWN, "abc"),
        (b"42", 0, NUMERIC, 42),
        (b"42.000", 0, NUMERIC, 42),
        (b"4.5", 0, NUMERIC, "4.5"),
        (str(U).upper().encode(), 0, UUID_OID, U),
        (struct.pack(">h", -2), 1, INT2, -2),
        (struct.pack(">i", 42), 1, INT4, 42),
        (struct.pack(">q", -(2**40)), 1, INT8, -(2**40)),
        (U.bytes, 1, UUID_OID, U),
        ("日本".encode(), 1, TEXT, "日本"),
        (b"abc", 1, VARCHAR, "abc"),
    ],
)
def test_decode_key(value: bytes, fmt: int, oid: int, expected: object) -> None:
    decoded = decode_key(value, fmt, oid)
    assert decoded == expected and type(decoded) is type(expected)


@pytest.mark.parametrize(
    ("value", "fmt", "oid", "message"),
    [
        (struct.pack(">i", 42), 1, 0, "cannot read a binary shard key parameter of type 0"),
        (struct.pack(">d", 1.0), 1, 701, "cannot read a binary shard key parameter of type 701"),
        (b"\x00" * 8, 1, NUMERIC, "cannot read a binary"),
        (struct.pack(">i", 42), 1, INT8, "must be 8 bytes, not 4"),
        (b"\x00" * 15, 1, UUID_OID, "must be 16 bytes"),
        (b"x", 0, INT8, "invalid shard key parameter"),
        (b"nope", 0, UUID_OID, "invalid shard key parameter"),
        (b"\xff", 0, TEXT, "invalid shard key parameter"),
        (b"42", 2, INT8, "unknown parameter format code 2"),
    ],
)
def test_decode_key_errors(value: bytes, fmt: int, oid: int, message: str) -> None:
    with pytest.raises(ShardKeyError, match="^shardproxy: ") as info:
        decode_key(value, fmt, oid)
    assert message in str(info.value)


def test_integer_key_lands_on_one_shard_however_it_is_sent(router: Router) -> None:
    literal = route(router, "SELECT * FROM orders WHERE user_id = 42").shard
    text_literal = route(router, "SELECT * FROM orders WHERE user_id = '42'").shard
    simple = route_simple(router, "SELECT * FROM orders WHERE user_id = 42").shard
    plan = router.plan("SELECT * FROM orders WHERE user_id = $1")
    sent = [
        decode_key(b"42", 0, 0),  # an untyped text parameter stays "42": the same bytes as 42
        decode_key(b"42", 0, TEXT),
        decode_key(b"42", 0, INT8),
        decode_key(struct.pack(">h", 42), 1, INT2),
        decode_key(struct.pack(">i", 42), 1, INT4),
        decode_key(struct.pack(">q", 42), 1, INT8),
    ]
    shards = {router.route(plan, params=[value]).shard for value in sent}
    assert shards == {literal} == {text_literal} == {simple} == {shard_of(router, "42")}
    session = route(
        router,
        "SELECT * FROM orders",
        session_key=router.plan("SET shardproxy.shard_key = '42'").shard_key_value,
    )
    assert session.shard == literal


def test_uuid_key_lands_on_one_shard_however_it_is_sent(router: Router) -> None:
    cast = route(router, f"SELECT * FROM orders WHERE user_id = '{str(U).upper()}'::uuid").shard
    plain = route(router, f"SELECT * FROM orders WHERE user_id = '{U}'").shard
    simple = route_simple(router, f"SELECT * FROM orders WHERE user_id = '{str(U).upper()}'::uuid").shard
    plan = router.plan("SELECT * FROM orders WHERE user_id = $1")
    sent = [
        decode_key(str(U).upper().encode(), 0, UUID_OID),
        decode_key(U.bytes, 1, UUID_OID),
        decode_key(str(U).encode(), 0, 0),
    ]
    shards = {router.route(plan, params=[value]).shard for value in sent}
    assert shards == {cast} == {plain} == {simple} == {shard_of(router, U)}
    untyped = router.plan("SELECT * FROM orders WHERE user_id = $1::uuid")
    assert router.route(untyped, params=[str(U).upper()]).shard == cast


def bind_body(values: list[bytes | None], formats: list[int]) -> bytes:
    body = (
        b"portal\0stmt\0" + struct.pack(">h", len(formats)) + b"".join(struct.pack(">h", f) for f in formats)
    )
    body += struct.pack(">h", len(values))
    for value in values:
        body += struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value
    return body + struct.pack(">hh", 1, 1)  # result formats follow the parameters


def bind_parameter(body: bytes, index: int) -> tuple[bytes | None, int]:
    """The compiled reader on a Bind body in the middle of a buffer, as the client's receive buffer holds it."""
    buf = bytearray(b"Q-before" + body + b"S-after")
    return read_bind_parameter(buf, 8, 8 + len(body), index)


def test_bind_parameter() -> None:
    values: list[bytes | None] = [b"a", None, b"", struct.pack(">q", 42)]
    assert [bind_parameter(bind_body(values, []), i) for i in (1, 2, 3, 4)] == [
        (b"a", 0),
        (None, 0),
        (b"", 0),
        (struct.pack(">q", 42), 0),
    ]
    assert bind_parameter(bind_body(values, [1]), 4) == (struct.pack(">q", 42), 1)
    assert bind_parameter(bind_body(values, [0, 0, 0, 1]), 4) == (struct.pack(">q", 42), 1)
    assert bind_parameter(bind_body(values, [0, 0, 0, 1]), 1) == (b"a", 0)
    assert bind_parameter(b"\0\0" + bind_body(values, [])[12:], 1) == (b"a", 0)  # unnamed portal/statement
    value, fmt = bind_parameter(bind_body(values, [1]), 4)
    assert value is not None and decode_key(value, fmt, INT8) == 42
    for index in (0, 5):
        with pytest.raises(ShardKeyError, match="Bind has 4 parameters"):
            bind_parameter(bind_body(values, []), index)
    with pytest.raises(ShardKeyError, match="malformed"):
        bind_parameter(b"portal", 1)
    for malformed, index in (
        (bind_body([b"abcdef"], [])[:-8], 1),  # the value runs past the message
        (b"portal\0stmt\0" + struct.pack(">hh", 3, 0), 1),  # format codes run past it
        (bind_body(values, [0, 1]), 4),  # two format codes for four parameters
    ):
        with pytest.raises(ShardKeyError, match="malformed"):
            bind_parameter(malformed, index)


def test_plan_and_route_are_immutable(router: Router) -> None:
    plan = router.plan("SELECT 1")
    with pytest.raises(AttributeError):
        plan.kind = "write"  # type: ignore[misc]
    assert isinstance(plan, Plan) and not hasattr(plan, "__dict__")
