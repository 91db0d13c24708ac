"""Scatter merging: plan rewrites and refusals, and a differential test against real PostgreSQL.

The differential test splits one table over three servers (by id % 3) and keeps every row on a fourth, the
reference. Each query's shard_sql runs on the three shards, through a raw protocol client so the merger gets
the exact RowDescription/DataRow bodies, in text and in binary; the merged bytes must equal what the reference
server sends for the original query.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from shardproxy.devtools.sandbox import Node, Sandbox
from shardproxy.routing.merge import Merger, ScatterPlan, StreamMerge, Unmergeable, plan_scatter
from shardproxy.wire.protocol import HEADER, SYNC, PostgresError, cstring, message, startup_message

SHARDS = 3
TEXT, BINARY = 0, 1
# Offsets change with daylight saving time here, so timestamptz text carries different offsets.
SESSION = {"TimeZone": "America/New_York", "DateStyle": "ISO, MDY", "extra_float_digits": "1"}

ITEMS = """
CREATE TABLE items (
    id int PRIMARY KEY, grp text, cat int, qty int, big bigint, small smallint, price numeric(10,2),
    tiny numeric, huge numeric, ratio float8, real4 real, name varchar(20), code char(4), flag bool,
    created timestamp, created_tz timestamptz, day date, uid uuid, span interval, label text COLLATE "und-x-icu");
INSERT INTO items SELECT * FROM (SELECT g AS id,
    CASE WHEN g % 11 = 0 THEN NULL ELSE 'grp' || g % 5 END,
    g % 7,
    CASE WHEN g % 13 = 0 THEN NULL ELSE g * 37 % 101 - 50 END,
    g * 1000000007::bigint,
    (g % 300 - 100)::smallint,
    CASE WHEN g % 17 = 0 THEN NULL ELSE round((g * 7919 % 100000) / 100.0 - 300, 2) END,
    g * 0.000001,
    g * 10::numeric ^ 20 + 0.5,
    CASE WHEN g % 19 = 0 THEN NULL ELSE (g % 40) * 0.25 - 5 END,
    (g % 9) * 0.5,
    CASE WHEN g % 23 = 0 THEN 'Ärger' || g WHEN g % 29 = 0 THEN 'Zebra' || g
        ELSE substr(md5(g::text), 1, 1 + g % 8) END,
    chr(65 + g % 26) || g % 3,
    g % 4 = 0,
    timestamp '2024-03-01' + g * interval '5 hours 17 minutes 3.25 seconds',
    timestamptz '2024-03-01 00:00:00+00' + g * interval '1 hour 3 minutes 0.5 seconds',
    CASE g WHEN 7 THEN '-infinity' WHEN 8 THEN '0044-03-15 BC' WHEN 9 THEN 'infinity'
        ELSE date '2023-12-25' + g % 50 END,
    md5(g::text)::uuid,
    g * interval '1 minute',
    CASE WHEN g % 2 = 0 THEN 'a' ELSE 'B' END || g % 4
FROM generate_series(1, 600) g) r WHERE {where};
CREATE TABLE fl (id int, f float8);
INSERT INTO fl SELECT id, f FROM (
    SELECT row_number() OVER () AS id, v::float8 AS f FROM unnest(ARRAY[
        '0', '-0', '1e14', '1e15', '1e16', '123456789012345.6', '1234567890123456', '0.0001', '0.00001',
        '0.00012345', '1e22', '100', '5e-324', '1.7976931348623157e308', '-2.5e-300', '0.1', 'Infinity',
        '-Infinity', 'NaN', '12345678901234.5', '3.0000000000000004', '-99999.99999']) v
    UNION ALL
    SELECT 100 + g, (g * 1.2345678901234567) ^ (g % 23 - 11) / 3.3 FROM generate_series(1, 90) g
    UNION ALL
    SELECT 1000 + g, (g * 0.7234567891)::float8 ^ (g % 61 - 30) FROM generate_series(1, 1500) g
    UNION ALL
    SELECT 3000 + g, 2::float8 ^ (g * 7 % 2000 - 1000) * (g % 5 + 1) FROM generate_series(1, 500) g
) f WHERE {where};
CREATE TABLE nm (id int, grp int, v numeric);
INSERT INTO nm SELECT id, id % 4, v::numeric FROM (
    SELECT row_number() OVER () AS id, v FROM unnest(ARRAY[
        'NaN', 'Infinity', '-Infinity', '1.5', '-1.5', '0.000000001', '99999999999999999999.99', '7', '-3.25',
        '12.125', '0', '1e-20', '400', '-0.5', '10000.0001', '3']) v) n WHERE {where};
INSERT INTO nm SELECT id, 9, v::numeric FROM (
    SELECT row_number() OVER () + 100 AS id, v FROM unnest(ARRAY['Infinity', '5', '-Infinity', '2']) v) n
    WHERE {where};
"""

# Queries whose output order is fully determined: compared byte for byte, row for row.
EXACT = [
    "SELECT id, name FROM items ORDER BY id LIMIT 10 OFFSET 5",
    "SELECT id, price FROM items ORDER BY price DESC, id LIMIT 20",
    "SELECT id, price FROM items ORDER BY price NULLS FIRST, id DESC LIMIT 25 OFFSET 3",
    "SELECT * FROM items ORDER BY created_tz DESC, id LIMIT 15",
    "SELECT name, id FROM items ORDER BY 1, 2",
    "SELECT id, ratio FROM items ORDER BY ratio DESC NULLS LAST, id OFFSET 580",
    "SELECT id, code FROM items ORDER BY code DESC, id LIMIT 30",
    "SELECT id, day FROM items ORDER BY day, id LIMIT 12",
    "SELECT id, day FROM items ORDER BY day DESC, id LIMIT 3",
    "SELECT id, uid FROM items ORDER BY uid LIMIT 9",
    "SELECT id, flag, small FROM items ORDER BY flag DESC, small, id LIMIT 40",
    "SELECT id FROM items ORDER BY big DESC LIMIT 5",
    "SELECT id, created FROM items ORDER BY created LIMIT 10 OFFSET 100",
    "SELECT id, real4, tiny FROM items ORDER BY real4 DESC, tiny LIMIT 10",
    "SELECT id AS k, qty FROM items ORDER BY k DESC FETCH FIRST 6 ROWS ONLY",
    "SELECT id, qty FROM items ORDER BY qty * 2 DESC NULLS LAST, id LIMIT 10",
    "SELECT id, huge FROM items ORDER BY huge DESC LIMIT 4",
    "SELECT DISTINCT grp FROM items ORDER BY grp",
    "SELECT DISTINCT code FROM items ORDER BY code DESC LIMIT 5 OFFSET 2",
    "SELECT v FROM nm ORDER BY v DESC, id LIMIT 8",
    "SELECT count(*), count(price), sum(qty), sum(big), sum(small), sum(price), min(name), max(name), avg(qty),"
    " avg(price), avg(big), avg(small), min(created_tz), max(day), min(day), max(created), sum(ratio), avg(ratio),"
    " min(real4), max(code), min(flag::int), max(huge), avg(huge), avg(tiny) FROM items",
    "SELECT grp, count(*), sum(price), avg(price), min(price), max(price) FROM items GROUP BY grp"
    " ORDER BY grp NULLS FIRST",
    "SELECT count(*), sum(qty), avg(qty), min(name), max(price), avg(ratio) FROM items WHERE id < 0",
    "SELECT cat, sum(qty) FROM items GROUP BY cat ORDER BY sum(qty) DESC, cat LIMIT 3",
    "SELECT count(*) FROM items GROUP BY cat ORDER BY cat",
    "SELECT cat FROM items GROUP BY 1 ORDER BY max(price) DESC NULLS LAST, cat LIMIT 4",
    "SELECT cat FROM items GROUP BY cat ORDER BY avg(qty), cat",
    "SELECT cat, avg(qty) FROM items GROUP BY cat ORDER BY sum(qty), cat",
    "SELECT qty AS id, id AS qty FROM items ORDER BY qty DESC LIMIT 5",
    "SELECT flag, avg(ratio), sum(ratio), count(ratio) FROM items GROUP BY flag ORDER BY 1",
    "SELECT day, count(*) FROM items GROUP BY day ORDER BY day DESC LIMIT 5",
    "SELECT code, count(*) FROM items GROUP BY code ORDER BY 2 DESC, 1 LIMIT 5",
    "SELECT date_trunc('day', created_tz) AS d, count(*) FROM items GROUP BY 1 ORDER BY d LIMIT 10 OFFSET 2",
    "SELECT count(*) FILTER (WHERE flag), avg(qty) FILTER (WHERE cat > 2) FROM items",
    "SELECT avg(qty) AS mean, avg(price) FROM items GROUP BY cat ORDER BY mean DESC",
    "SELECT id, sum(f), min(f), max(f), avg(f) FROM fl GROUP BY id ORDER BY id",
    "SELECT sum(v), avg(v), min(v), max(v) FROM nm",
    "SELECT grp, sum(v), avg(v), min(v), max(v), count(v) FROM nm GROUP BY grp ORDER BY grp",
    "SELECT id, name FROM items WHERE grp IN (SELECT grp FROM items WHERE cat = 2) ORDER BY id LIMIT 7",
    # GROUP BY an output column's alias (no input column has that name): grouped by the output column
    "SELECT date_trunc('month', created) AS m, count(*), sum(qty) FROM items GROUP BY m ORDER BY m",
    "SELECT grp AS g, cat % 3 AS c, count(*), avg(price) FROM items GROUP BY g, c ORDER BY g NULLS FIRST, c",
    "SELECT upper(code), count(*) FROM items GROUP BY upper ORDER BY upper LIMIT 5",
]

# Queries whose order PostgreSQL leaves open: compared as multisets of rows.
UNORDERED = [
    "SELECT * FROM items",
    "SELECT id, name FROM items WHERE cat = 3",
    "SELECT DISTINCT cat, flag FROM items",
    "SELECT cat, grp, count(*) AS n, avg(tiny), avg(huge), avg(small), sum(tiny) FROM items GROUP BY cat, grp",
    "SELECT grp, count(*) FROM items WHERE id < 0 GROUP BY grp",
    "SELECT DISTINCT count(*) FROM items GROUP BY cat",
    "SELECT id FROM items OFFSET 0",
    # GROUP BY a name that is an input column too: PostgreSQL groups by the input column
    "SELECT cat % 2 AS cat, count(*) FROM items GROUP BY cat",
    "SELECT lower(grp) AS grp, max(qty) FROM items GROUP BY grp",
]

# Planned fine, refused once the shard results show a type the proxy cannot compare or combine.
REFUSED_AT_MERGE = {
    "SELECT id FROM items ORDER BY span LIMIT 3": r'sort by column "shardproxy_hidden_1" .*\(oid 1186\)',
    "SELECT sum(real4) FROM items": r'sum\(\) of column "sum" \(type oid 700\)',
    "SELECT avg(real4) FROM items": r'avg\(\) of column "avg" \(type oid 700\)',
    "SELECT sum(span) FROM items": 'add up column "sum"',
    "SELECT min(span) FROM items": r'take min\(\) of column "min"',
    "SELECT span, count(*) FROM items GROUP BY span": 'group by column "span"',
    # A column collated by ICU: the shards sort 'a…' before 'B…', which byte order would not.
    "SELECT id, label FROM items ORDER BY label, id": "sorted its rows differently",
}


class RawClient:
    """A minimal protocol client that keeps RowDescription and DataRow bodies as raw bytes.

    psycopg hands out decoded cells, but the merger works on the bytes servers send.
    """

    def __init__(self, node: Node) -> None:
        self.sock = socket.create_connection((node.host, node.port), timeout=10)
        self.sock.sendall(startup_message({"user": "postgres", "database": "postgres", **SESSION}))
        self._replies()

    def close(self) -> None:
        self.sock.close()

    def query(self, sql: str, formats: list[int]) -> tuple[bytes, list[bytes]]:
        """Run sql with the extended protocol and these result formats; its RowDescription and DataRows."""
        codes = struct.pack(f"!h{len(formats)}h", len(formats), *formats)
        self.sock.sendall(
            message(b"P", b"\0" + cstring(sql) + b"\0\0")
            + message(b"B", b"\0\0" + b"\0\0" + b"\0\0" + codes)
            + message(b"D", b"P\0")
            + message(b"E", b"\0" + b"\0\0\0\0")
            + SYNC
        )
        replies = self._replies()
        description = next(body for kind, body in replies if kind == b"T")
        return description, [body for kind, body in replies if kind == b"D"]

    def _replies(self) -> list[tuple[bytes, bytes]]:
        """Messages up to ReadyForQuery; an ErrorResponse among them is raised once the server is ready."""
        replies = []
        while True:
            kind, length = HEADER.unpack(self._exactly(HEADER.size))
            body = self._exactly(length - 4)
            if kind == b"Z":
                break
            replies.append((kind, body))
        for kind, body in replies:
            if kind == b"E":
                raise PostgresError.from_body(body)
        return replies

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data


class Servers:
    """Raw clients to the shards and to the reference server."""

    def __init__(self, shards: list[RawClient], reference: RawClient) -> None:
        self.shards = shards
        self.reference = reference

    def merged(self, sql: str, formats: list[int]) -> tuple[ScatterPlan, tuple[bytes, list[bytes], str]]:
        plan = plan_scatter(sql)
        merger = Merger(plan)
        for shard in self.shards:
            merger.add_shard_result(*shard.query(plan.shard_sql, plan.result_formats(formats)))
        return plan, merger.result()


@pytest.fixture(scope="module")
def servers(sandbox: Sandbox) -> Iterator[Servers]:
    nodes = [sandbox.cluster(f"merge{i}").primary for i in range(SHARDS)]
    reference = sandbox.cluster("merge-reference").primary
    for i, node in enumerate(nodes):
        node.sql(ITEMS.format(where=f"id % {SHARDS} = {i}"))
    reference.sql(ITEMS.format(where="true"))
    clients = Servers([RawClient(node) for node in nodes], RawClient(reference))
    yield clients
    for client in [*clients.shards, clients.reference]:
        client.close()


def _fields(description: bytes) -> list[tuple[bytes, ...]]:
    """RowDescription fields without table OIDs, which differ from server to server."""
    count = struct.unpack_from("!h", description)[0]
    fields, offset = [], 2
    for _ in range(count):
        end = description.index(b"\0", offset)
        name = description[offset:end]
        _, attnum, type_oid, typlen, typmod, fmt = struct.unpack_from("!IhIhih", description, end + 1)
        fields.append((name, attnum, type_oid, typlen, typmod, fmt))
        offset = end + 1 + 18
    return fields


def _check(servers: Servers, sql: str, formats: list[int], ordered: bool) -> None:
    _, (description, rows, tag) = servers.merged(sql, formats)
    expected_description, expected_rows = servers.reference.query(sql, formats)
    assert _fields(description) == _fields(expected_description)
    assert tag == f"SELECT {len(expected_rows)}"
    if ordered:
        assert rows == expected_rows
    else:
        assert sorted(rows) == sorted(expected_rows)
    assert len(expected_rows) > 0 or "id < 0" in sql, "a query meant to return rows returned none"


@pytest.mark.parametrize("fmt", [TEXT, BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("sql", EXACT)
def test_ordered_results_match_one_server(servers: Servers, sql: str, fmt: int) -> None:
    _check(servers, sql, [fmt], ordered=True)


@pytest.mark.parametrize("fmt", [TEXT, BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("sql", UNORDERED)
def test_unordered_results_match_one_server(servers: Servers, sql: str, fmt: int) -> None:
    _check(servers, sql, [fmt], ordered=False)


def test_per_column_formats(servers: Servers) -> None:
    sql = "SELECT grp, count(*), avg(price), max(created) FROM items GROUP BY grp ORDER BY 3 DESC NULLS LAST"
    _check(servers, sql, [BINARY, TEXT, BINARY, TEXT], ordered=True)


def test_limit_without_order_takes_any_rows(servers: Servers) -> None:
    _, (_, rows, tag) = servers.merged("SELECT id, grp FROM items LIMIT 7 OFFSET 2", [TEXT])
    _, everything = servers.reference.query("SELECT id, grp FROM items", [TEXT])
    assert tag == "SELECT 7" and len(set(rows)) == 7 and set(rows) <= set(everything)


def test_plain_select_streams(servers: Servers) -> None:
    plan = plan_scatter("SELECT id, name FROM items WHERE flag")
    assert plan.streaming and plan.shard_sql == "SELECT id, name FROM items WHERE flag"
    results = [shard.query(plan.shard_sql, [BINARY]) for shard in servers.shards]
    _, expected = servers.reference.query("SELECT id, name FROM items WHERE flag", [BINARY])
    assert sorted(row for _, rows in results for row in rows) == sorted(expected)
    assert all(plan.describe(description) == description for description, _ in results)


def test_describe_matches_the_merged_description(servers: Servers) -> None:
    sql = "SELECT cat, avg(qty) FROM items GROUP BY cat ORDER BY max(id)"
    plan, (description, _, _) = servers.merged(sql, [TEXT])
    shard_description, _ = servers.shards[0].query(plan.shard_sql, [TEXT])
    assert plan.describe(shard_description) == description


def test_group_by_a_name_of_both_columns_is_refused(servers: Servers) -> None:
    """The output column reads no input column of its name, yet the FROM clause has one: PostgreSQL groups by the
    input column, the proxy by the output one. The shards' probe finds out, and the proxy refuses."""
    sql = "SELECT id % 3 AS cat, count(*) FROM items GROUP BY cat"
    plan = plan_scatter(sql)
    assert plan.probed == ("cat",)
    with pytest.raises(PostgresError) as failed:
        servers.shards[0].query(plan.shard_sql, [TEXT])
    with pytest.raises(Unmergeable, match=r"GROUP BY cat names an input column as well as an output column"):
        plan.check_shard_error(failed.value.fields)
    plan.check_shard_error({"C": "42702", "M": 'column reference "id" is ambiguous'})  # the query's own error


@pytest.mark.parametrize("sql", list(REFUSED_AT_MERGE))
def test_refused_at_merge(servers: Servers, sql: str) -> None:
    with pytest.raises(Unmergeable, match=REFUSED_AT_MERGE[sql]) as refused:
        servers.merged(sql, [TEXT])
    assert refused.value.message.startswith("shardproxy:") and refused.value.sqlstate == "0A000"


# --- planning, without servers --------------------------------------------------------------------------------

REWRITES = {
    "SELECT * FROM t": "SELECT * FROM t",
    "SELECT * FROM t ORDER BY created DESC LIMIT 10 OFFSET 5":
        "SELECT *, created AS shardproxy_hidden_1 FROM t ORDER BY created DESC LIMIT 15",
    "SELECT a, b AS x FROM t ORDER BY x, 1 DESC NULLS LAST LIMIT 3":
        "SELECT a, b AS x FROM t ORDER BY x, 1 DESC NULLS LAST LIMIT 3",
    "SELECT a FROM t FETCH FIRST 3 ROWS ONLY": "SELECT a FROM t LIMIT 3",
    "SELECT a FROM t OFFSET 3": "SELECT a FROM t",
    "SELECT g, count(*), avg(p) FROM t GROUP BY g ORDER BY 3 DESC LIMIT 2":
        "SELECT g, count(*) AS count, sum(p) AS avg, count(p) AS shardproxy_hidden_1 FROM t GROUP BY g",
    "SELECT count(*) FROM t GROUP BY a ORDER BY a":
        "SELECT count(*) AS count, a AS shardproxy_hidden_1 FROM t GROUP BY a",
    "SELECT DISTINCT a FROM t ORDER BY a LIMIT 4": "SELECT DISTINCT a FROM t ORDER BY a LIMIT 4",
    "SELECT DISTINCT a, count(*) FROM t GROUP BY a ORDER BY a LIMIT 4":
        "SELECT a, count(*) AS count FROM t GROUP BY a",
    "SELECT a FROM t LIMIT ALL": "SELECT a FROM t",
    "SELECT a FROM t ORDER BY a LIMIT 10000000000 OFFSET 1": "SELECT a FROM t ORDER BY a LIMIT 10000000001",
    "SELECT a AS b, count(*) FROM t GROUP BY b":
        "SELECT a AS b, count(*) AS count FROM t, (SELECT NULL AS b) AS shardproxy_hidden_probe GROUP BY b, 1",
    "SELECT x, f(a) AS b, count(*) FROM t JOIN u USING (k) GROUP BY x, b ORDER BY b":
        "SELECT x, f(a) AS b, count(*) AS count FROM t INNER JOIN u USING (k), (SELECT NULL AS b) AS "
        "shardproxy_hidden_probe GROUP BY x, b, 2",
    "SELECT a % 2 AS a, count(*) FROM t GROUP BY a":
        "SELECT a % 2 AS a, count(*) AS count, a AS shardproxy_hidden_1 FROM t GROUP BY a",
    "SELECT a AS b, b + 1, count(*) FROM t GROUP BY b":
        "SELECT a AS b, b + 1, count(*) AS count, b AS shardproxy_hidden_1 FROM t GROUP BY b",
    "SELECT u.k, count(*) FROM t JOIN u USING (k) GROUP BY k":
        "SELECT u.k, count(*) AS count, k AS shardproxy_hidden_1 FROM t INNER JOIN u USING (k) GROUP BY k",
}  # fmt: skip


@pytest.mark.parametrize("sql", list(REWRITES))
def test_shard_sql(sql: str) -> None:
    assert plan_scatter(sql).shard_sql == REWRITES[sql]


def test_plan_for_order_by_limit() -> None:
    plan = plan_scatter("SELECT a, b AS x FROM t ORDER BY x, 1 DESC NULLS LAST, c DESC LIMIT 3 OFFSET 2")
    assert [(k.column, k.descending, k.nulls_first) for k in plan.sort] == [
        (1, False, False), (0, True, False), (-1, True, True)]  # fmt: skip
    assert (plan.offset, plan.limit, plan.hidden, plan.streaming) == (2, 3, 1, False)


def test_order_by_resolution() -> None:
    """A bare name is an output column's name first; avg's rewrite to sum does not capture ORDER BY sum()."""
    assert plan_scatter("SELECT x AS y, z AS x FROM t ORDER BY x").sort[0].column == 1
    plan = plan_scatter("SELECT g, avg(x) FROM t GROUP BY g ORDER BY sum(x)")
    assert plan.sort[0].column < 0 and plan.sort[0].column != plan.aggregates[0].count_column


def test_bind_formats_cover_hidden_columns() -> None:
    plan = plan_scatter("SELECT a, avg(b) FROM t GROUP BY a")
    assert plan.result_formats([1, 1]) == [1, 1, 0]
    assert plan.result_formats([1]) == [1] and plan.result_formats([]) == []


REFUSED = {
    "SELECT a FROM t UNION SELECT a FROM u": "UNION/INTERSECT/EXCEPT",
    "SELECT a FROM t UNION ALL SELECT a FROM u": "UNION/INTERSECT/EXCEPT",
    "SELECT DISTINCT ON (a) a, b FROM t": "DISTINCT ON",
    "SELECT DISTINCT a FROM t ORDER BY b": "ORDER BY expression written in the select list",
    "SELECT a FROM t ORDER BY b + $1": "parameter",
    "SELECT count(DISTINCT a) FROM t": r"count\(DISTINCT",
    "SELECT string_agg(a, ',') FROM t": r"aggregate string_agg\(\)",
    "SELECT array_agg(a) FROM t": r"aggregate array_agg\(\)",
    "SELECT stddev(a) FROM t": r"aggregate stddev\(\)",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t": r"percentile_cont\(\)",
    "SELECT sum(a) + 1 FROM t": "aggregate inside an expression",
    "SELECT sum(a)::int FROM t": "aggregate inside an expression",
    "SELECT a, row_number() OVER () FROM t": "window function",
    "SELECT a FROM t WINDOW w AS (ORDER BY a)": "window function",
    "SELECT a FROM t ORDER BY rank() OVER (ORDER BY b)": "window function",
    "SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1": "HAVING",
    "SELECT a FROM t GROUP BY ROLLUP (a)": "GROUPING SETS/ROLLUP/CUBE",
    "SELECT a, b FROM t GROUP BY GROUPING SETS ((a), (b))": "GROUPING SETS/ROLLUP/CUBE",
    "SELECT a FROM t FOR UPDATE": "FOR UPDATE/SHARE",
    "SELECT a FROM t FOR SHARE": "FOR UPDATE/SHARE",
    "SELECT a INTO u FROM t": "SELECT INTO",
    "SELECT a FROM t ORDER BY a FETCH FIRST 3 ROWS WITH TIES": "WITH TIES",
    "SELECT a FROM t LIMIT $1": r"LIMIT with a parameter",
    "SELECT a FROM t ORDER BY a OFFSET $2": r"OFFSET with a parameter",
    "SELECT a FROM t LIMIT 2 + 3": "integer constant",
    "SELECT a FROM t LIMIT -1": "must not be negative",
    "SELECT (SELECT max(b) FROM u) FROM t": "subquery that aggregates",
    "SELECT a FROM t WHERE b > (SELECT avg(b) FROM t)": "subquery that aggregates",
    "SELECT count(*) FROM (SELECT a FROM t LIMIT 3) s": "subquery that aggregates",
    "SELECT count(*) FROM (SELECT DISTINCT a FROM t) s": "subquery that aggregates",
    "SELECT * FROM (SELECT a FROM t UNION ALL SELECT a FROM u) s": "subquery that aggregates",
    "WITH c AS (SELECT a, count(*) FROM t GROUP BY a) SELECT * FROM c": "subquery that aggregates",
    "WITH RECURSIVE r AS (SELECT 1 AS n) SELECT * FROM r, t": "WITH RECURSIVE",
    "WITH d AS (DELETE FROM t RETURNING a) SELECT * FROM d, u": "data-modifying WITH",
    "SELECT a AS b, c AS b, count(*) FROM t GROUP BY b": "GROUP BY b, the name of several output columns",
    "SELECT *, count(*) FROM t GROUP BY a": r"SELECT \* with GROUP BY",
    "SELECT a, count(*) FROM t GROUP BY 2": "aggregate functions are not allowed in GROUP BY",
    "SELECT a FROM t ORDER BY 3": "ORDER BY position 3 is not in select list",
    "SELECT a, count(*) FROM t GROUP BY a ORDER BY b": "neither an output column",
    "SELECT a FROM t ORDER BY a USING <": "USING",
    'SELECT a FROM t ORDER BY a COLLATE "en-x-icu"': 'COLLATE "en-x-icu"',
    'SELECT a COLLATE "de_DE" AS x FROM t ORDER BY x': 'COLLATE "de_DE"',
    'SELECT min(a COLLATE "en-x-icu") FROM t': 'COLLATE "en-x-icu"',
    "SELECT 1": "reads no table",
    "VALUES (1), (2)": "reads no table",
    "SELECT a FROM t; SELECT b FROM u": "single SELECT",
    "UPDATE t SET a = 1": "single SELECT",
    "SELEC a FROM t": "cannot parse",
}


@pytest.mark.parametrize("sql", list(REFUSED))
def test_refused_when_planning(sql: str) -> None:
    with pytest.raises(Unmergeable, match=REFUSED[sql]) as refused:
        plan_scatter(sql)
    assert refused.value.message.startswith("shardproxy:") and refused.value.sqlstate == "0A000"


# --- merging crafted wire messages ----------------------------------------------------------------------------


def _description(*columns: tuple[str, int, int]) -> bytes:
    """A RowDescription body for (name, type oid, format) columns."""
    body = struct.pack("!h", len(columns))
    for name, type_oid, fmt in columns:
        body += cstring(name) + struct.pack("!IhIhih", 0, 0, type_oid, -1, -1, fmt)
    return body


def _row(*cells: bytes | None) -> bytes:
    body = struct.pack("!h", len(cells))
    for cell in cells:
        body += struct.pack("!i", -1) if cell is None else struct.pack("!i", len(cell)) + cell
    return body


def test_out_of_order_shard_rows_are_refused() -> None:
    merger = Merger(plan_scatter("SELECT name FROM t ORDER BY name"))
    merger.add_shard_result(_description(("name", 25, TEXT)), [_row(b"a"), _row(b"B")])
    with pytest.raises(Unmergeable, match="sorted its rows differently"):
        merger.result()


def test_non_iso_datestyle_is_refused() -> None:
    merger = Merger(plan_scatter("SELECT ts FROM t ORDER BY ts"))
    merger.add_shard_result(_description(("ts", 1114, TEXT)), [_row(b"01.03.2024 10:00:00")])
    with pytest.raises(Unmergeable, match="DateStyle"):
        merger.result()


def test_bigint_sum_overflow_is_an_error() -> None:
    merger = Merger(plan_scatter("SELECT sum(a) FROM t"))
    for _ in range(2):
        merger.add_shard_result(_description(("sum", 20, BINARY)), [_row(struct.pack("!q", 2**62))])
    with pytest.raises(Unmergeable, match="bigint out of range") as refused:
        merger.result()
    assert refused.value.sqlstate == "22003"


def test_shards_disagreeing_on_columns_are_refused() -> None:
    merger = Merger(plan_scatter("SELECT a FROM t"))
    merger.add_shard_result(_description(("a", 23, TEXT)), [])
    with pytest.raises(Unmergeable, match="different column types"):
        merger.add_shard_result(_description(("a", 25, TEXT)), [])


def test_group_keys_compare_by_value() -> None:
    """1.0 and 1.00, 'x ' and 'x' (char(n)), -0 and 0: one group each, as PostgreSQL groups them."""
    merger = Merger(plan_scatter("SELECT n, c, f, count(*) FROM t GROUP BY n, c, f"))
    description = _description(("n", 1700, TEXT), ("c", 1042, TEXT), ("f", 701, TEXT), ("count", 20, TEXT))
    merger.add_shard_result(description, [_row(b"1.0", b"x ", b"-0", b"2"), _row(b"NaN", b"y", b"NaN", b"1")])
    merger.add_shard_result(description, [_row(b"1.00", b"x", b"0", b"3"), _row(b"NaN", b"y", b"NaN", b"4")])
    _, rows, tag = merger.result()
    assert tag == "SELECT 2"
    assert rows == [_row(b"1.0", b"x ", b"-0", b"5"), _row(b"NaN", b"y", b"NaN", b"5")]


def test_sorted_rows_come_out_while_shards_still_send() -> None:
    """A k-way merge gives out a row as soon as every shard still sending has offered its next one, so it holds
    one row per shard, and asks for the shard whose row it gave out."""
    description = _description(("a", 23, TEXT))
    merge = StreamMerge(plan_scatter("SELECT a FROM t ORDER BY a"), [description, description])
    merge.add(0, _row(b"1"))
    assert merge.take(None) == [] and merge.wanted() == 1
    merge.add(1, _row(b"2"))
    assert merge.take(None) == [_row(b"1")] and merge.wanted() == 0
    merge.add(0, _row(b"3"))
    assert merge.take(None) == [_row(b"2")] and merge.wanted() == 1
    merge.end(1)
    assert merge.take(None) == [_row(b"3")] and merge.wanted() == 0
    merge.end(0)
    assert merge.finished and merge.wanted() is None and merge.tag == "SELECT 3"


def test_concatenated_rows_and_limits_come_out_at_once() -> None:
    description = _description(("a", 23, TEXT))
    merge = StreamMerge(plan_scatter("SELECT a FROM t LIMIT 2 OFFSET 1"), [description, description])
    merge.add(1, _row(b"9"))
    merge.add(0, _row(b"8"))
    assert merge.take(None) == [_row(b"8")] and not merge.finished
    merge.add(0, _row(b"7"))
    assert merge.take(None) == [_row(b"7")]
    assert merge.finished and merge.wanted() is None  # the rest of either shard is not needed


def test_what_a_merge_must_hold_is_limited() -> None:
    """Groups are held until every shard has ended: past the byte limit, 54000 (program_limit_exceeded)."""
    description = _description(("g", 23, TEXT), ("count", 20, TEXT))
    merge = StreamMerge(plan_scatter("SELECT g, count(*) FROM t GROUP BY g"), [description], memory_limit=10_000)
    with pytest.raises(Unmergeable, match="scatter_memory_limit") as refused:
        for group in range(1000):
            merge.add(0, _row(str(group).encode(), b"1"))
    assert refused.value.sqlstate == "54000"
    assert 10 < group < 100
    merge = StreamMerge(plan_scatter("SELECT DISTINCT g FROM t"), [_description(("g", 23, TEXT))], memory_limit=10_000)
    for _ in range(1000):  # one value, held once
        merge.add(0, _row(b"1"))
    assert merge.take(None) == [_row(b"1")]
