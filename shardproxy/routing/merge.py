"""Merging a scatter SELECT: the statement each shard runs, and combining the shards' rows into one answer.

`plan_scatter` reads a SELECT with pglast and decides what every shard runs (`ScatterPlan.shard_sql`) and how
the pieces combine. Whatever cannot be combined into exactly the answer one server holding all the rows would
give raises `Unmergeable`, whose message (starting `shardproxy:`) the data path sends as an ErrorResponse.

What combines:
- a plain SELECT: concatenation, which the data path may stream (`ScatterPlan.streaming`);
- ORDER BY (by position, output name, an expression equal to an output column, or any other expression, which
  shards return in a hidden column) with ASC/DESC and NULLS FIRST/LAST: a k-way merge of the sorted shard rows;
- LIMIT/OFFSET as integer constants: shards run LIMIT limit+offset and no OFFSET, the proxy cuts;
- count, sum, min, max and avg (avg runs as sum and count, then divides as PostgreSQL divides), FILTER allowed,
  with or without GROUP BY (keys outside the select list travel in hidden columns); ORDER BY, DISTINCT and
  LIMIT/OFFSET then apply to the combined groups. A GROUP BY name is an input column first, as PostgreSQL has
  it, else an output column's name: when no part of the query reads a column of that name, shards group by the
  output column and also read a one-row probe with a column of that name, which makes them fail (and the proxy
  refuse the query) if the FROM clause has such a column after all;
- DISTINCT, by de-duplicating the merged rows.
Refused: DISTINCT ON, HAVING, window functions, other aggregates and aggregate(DISTINCT ...), aggregates inside
expressions, GROUPING SETS/ROLLUP/CUBE, GROUP BY the name of several output columns, set operations, FOR
UPDATE/SHARE, SELECT INTO, WITH RECURSIVE or data-modifying WITH, subqueries that aggregate, de-duplicate or
limit, LIMIT/OFFSET with `$n` parameters (the plan would depend on Bind), non-C COLLATE in sort or group keys,
and at merge time any type the proxy cannot compare or add (see TYPES and ADDERS).

`StreamMerge` combines the shards' rows as they arrive (the data path feeds it the rows it asks for and passes on
what it gives out), holding only what the plan needs: one row per shard for a sorted merge, the groups, the rows
DISTINCT has seen; that much is counted against a byte limit (SQLSTATE 54000 past it). `Merger` runs it over
results that are all there already. Both work on raw wire message bodies (RowDescription, DataRow) in text or
binary format, decoding values by type OID only where they must compare or add them; every other cell is passed
through as the shard sent it.

Caveats:
- Text compares by its bytes, which is PostgreSQL's "C" collation for UTF-8 data (the sandbox's servers use C).
  Explicit non-C COLLATE clauses are refused; a column declared with another collation is caught only when a
  shard's rows arrive out of the proxy's order.
- Date/time text output is read in DateStyle ISO (the default); anything else is refused, never misread.
- Re-encoded float8 text assumes extra_float_digits > 0 (the default, and what drivers set): shortest exact.
  Float sums add the shards' partial sums, so like PostgreSQL's own parallel aggregation the last bits may
  depend on the order of additions.
- A user-defined aggregate looks like a plain function to the parser and would be concatenated per shard.
- Subqueries and joins see only their shard's rows: the router scatters only queries whose sharded tables are
  co-located on the shard key (its co-location rule); other tables are reference tables, catalogs or functions.
"""

from __future__ import annotations

import copy
import heapq
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from functools import partial
from typing import Any, TypeGuard

import pglast
from pglast import ast
from pglast.enums.nodes import LimitOption
from pglast.enums.parsenodes import SetOperation, SortByDir, SortByNulls
from pglast.stream import RawStream

from shardproxy.wire.protocol import FEATURE_NOT_SUPPORTED, read_cstring

NUMERIC_OUT_OF_RANGE = "22003"
# Collations whose order is byte order, the order the proxy compares text in.
BYTE_ORDER_COLLATIONS = {"c", "posix", "ucs_basic"}
MERGEABLE_AGGREGATES = {"count", "sum", "min", "max", "avg"}
# Built-in aggregates, to tell them from plain functions when a subquery or expression hides one.
KNOWN_AGGREGATES = MERGEABLE_AGGREGATES | {
    "array_agg", "string_agg", "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "xmlagg",
    "bool_and", "bool_or", "every", "bit_and", "bit_or", "bit_xor", "any_value", "range_agg",
    "range_intersect_agg", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr",
    "covar_pop", "covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2",
    "regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "percentile_cont", "percentile_disc", "mode",
}  # fmt: skip
HIDDEN_PREFIX = "shardproxy_hidden_"
PROBE = f"{HIDDEN_PREFIX}probe"
AMBIGUOUS_COLUMN = "42702"

INT8 = struct.Struct("!q")
FLOAT4 = struct.Struct("!f")
FLOAT8 = struct.Struct("!d")
NUMERIC_HEADER = struct.Struct("!hhHH")
INT16 = struct.Struct("!h")
INT32 = struct.Struct("!i")
FIELD = struct.Struct("!IhIhih")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NUMERIC_NAN, NUMERIC_POSITIVE_INFINITY, NUMERIC_NEGATIVE_INFINITY, NUMERIC_NEGATIVE = 0xC000, 0xD000, 0xF000, 0x4000
INFINITY_SCALE = 32
# PostgreSQL's numeric division keeps at least this many significant digits (NUMERIC_MIN_SIG_DIGITS).
MIN_SIGNIFICANT_DIGITS = 16
MAX_DISPLAY_SCALE = 1000
DAY_MICROSECONDS = 86_400_000_000
DAYS_1970_TO_2000 = 10_957
OID_INT8, OID_FLOAT4, OID_FLOAT8, OID_NUMERIC = 20, 700, 701, 1700
# Exact decimal arithmetic: sums of numerics never round.
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)

Cell = bytes | None
Row = list[Cell]


class Unmergeable(Exception):
    """A scatter query whose shard results cannot be combined exactly; the message starts with `shardproxy:`."""

    def __init__(self, message: str, sqlstate: str = FEATURE_NOT_SUPPORTED) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY item: a column of the shard row (negative: a hidden one, counted from the end)."""

    column: int
    descending: bool = False
    nulls_first: bool = False


@dataclass(frozen=True)
class Aggregate:
    """An aggregate column to combine across shards; avg's shard column holds sum(x), count_column count(x)."""

    column: int
    kind: str
    count_column: int | None = None


@dataclass(frozen=True)
class ScatterPlan:
    """What each shard runs and how the proxy combines the shard rows.

    Shard rows carry `hidden` helper columns at their end (sort keys, group keys, avg's counts), stripped
    before the client sees them. When `grouped`, shard rows are partial aggregates combined per group of
    `group_columns`; DISTINCT, ORDER BY, OFFSET and LIMIT then apply, in that order, to the combined rows.
    """

    shard_sql: str
    hidden: int = 0
    grouped: bool = False
    group_columns: tuple[int, ...] = ()
    aggregates: tuple[Aggregate, ...] = ()
    distinct: bool = False
    sort: tuple[SortKey, ...] = ()
    offset: int = 0
    limit: int | None = None
    probed: tuple[str, ...] = ()  # GROUP BY names taken for output columns, which an input column would make ambiguous

    @property
    def streaming(self) -> bool:
        """Whether the data path may just forward every shard's DataRows as they come, summing the row counts."""
        return not (self.grouped or self.distinct or self.sort or self.offset or self.limit is not None)

    def describe(self, row_description: bytes) -> bytes:
        """The RowDescription the client expects, from one a shard sent for `shard_sql`."""
        return _encode_row_description(self._client_fields(_parse_row_description(row_description)))

    def check_shard_error(self, error: dict[str, str]) -> None:
        """Raise the proxy's refusal if a shard's error (its fields) is the probe finding an input column of a
        probed name; other errors are the client's to see as they are."""
        name = error.get("M", "").removeprefix('column reference "').removesuffix('" is ambiguous')
        if error.get("C") == AMBIGUOUS_COLUMN and name in self.probed:
            raise Unmergeable(
                f"shardproxy: GROUP BY {name} names an input column as well as an output column (PostgreSQL "
                f"takes the input column); across shards write it qualified (table.{name}) or write the "
                "output column's expression"
            )

    def result_formats(self, codes: list[int]) -> list[int]:
        """The Bind result-format codes for `shard_sql`, from the client's: hidden columns come back as text."""
        return codes + [0] * self.hidden if len(codes) > 1 else codes

    def _output_fields(self, fields: list[_Field]) -> list[_Field]:
        """Shard fields as they are after combining: an avg column holds a numeric (or float8) average."""
        out = list(fields)
        for aggregate in self.aggregates:
            if aggregate.kind == "avg":
                out[aggregate.column] = _average_field(out[aggregate.column])
        return out

    def _client_fields(self, fields: list[_Field]) -> list[_Field]:
        return self._output_fields(fields)[: len(fields) - self.hidden]


def plan_scatter(sql: str) -> ScatterPlan:
    """Plan a SELECT with no shard key to run on every shard; raise Unmergeable if it cannot be merged exactly."""
    return _Planner(_single_select(sql)).plan()


class Merger:
    """Collects each shard's whole result for one ScatterPlan, then produces the client's result (StreamMerge over
    rows that are all there already)."""

    def __init__(self, plan: ScatterPlan) -> None:
        self.plan = plan
        self._descriptions: list[bytes] = []
        self._shards: list[list[bytes]] = []

    def add_shard_result(self, row_description: bytes, data_rows: list[bytes]) -> None:
        """One shard's RowDescription body and DataRow bodies, as they came off the wire."""
        if self._descriptions:
            _same_columns(_parse_row_description(self._descriptions[0]), _parse_row_description(row_description))
        self._descriptions.append(row_description)
        self._shards.append(data_rows)

    def result(self) -> tuple[bytes, list[bytes], str]:
        """The client's RowDescription body, DataRow bodies and CommandComplete tag."""
        if not self._descriptions:
            raise ValueError("no shard result was added")
        merge = StreamMerge(self.plan, self._descriptions)
        rows = [iter(shard) for shard in self._shards]
        bodies: list[bytes] = []
        while (shard := merge.wanted()) is not None:
            body = next(rows[shard], None)
            if body is None:
                merge.end(shard)
            else:
                merge.add(shard, body)
            bodies += merge.take(None)
        bodies += merge.take(None)
        return merge.description, bodies, merge.tag


class StreamMerge:
    """Combines the shards' rows for one ScatterPlan as they arrive, and gives out the client's rows as soon as
    they are known: concatenated rows at once; sorted rows once every shard still sending has offered its next
    row (a k-way merge that holds one row per shard); groups once every shard has ended. Rows cut by OFFSET, or
    repeated under DISTINCT, are dropped on the way.

    What it must hold (the groups, the rows DISTINCT has seen) counts against `memory_limit` bytes, past which
    `add` raises Unmergeable with SQLSTATE 54000.
    """

    def __init__(self, plan: ScatterPlan, row_descriptions: list[bytes], memory_limit: int | None = None) -> None:
        """row_descriptions: every shard's RowDescription body, in shard order."""
        fields = _parse_row_description(row_descriptions[0])
        for other in row_descriptions[1:]:
            _same_columns(fields, _parse_row_description(other))
        self.plan = plan
        self._fields = fields
        output = plan._output_fields(fields)
        self._visible = len(fields) - plan.hidden
        self.description = _encode_row_description(output[: self._visible])
        self._memory = _Memory(memory_limit)
        self._live = set(range(len(row_descriptions)))  # shards that may still send rows
        self._skip = plan.offset
        self._left = plan.limit  # rows the client may still get; None: no LIMIT
        self._ready: list[bytes] = []  # the client's next DataRow bodies
        self._tail: Iterator[Row] | None = None  # the combined groups, given out once every shard has ended
        self.rows = 0  # rows given to the client so far
        self._groups = _Groups(plan, fields, self._memory) if plan.grouped else None
        self._seen: set[tuple[Any, ...]] = set()
        self._distinct = [_Column(output, i, "de-duplicate") for i in range(self._visible)] if plan.distinct else []
        self._sorted = bool(plan.sort) and not plan.grouped
        self._key = _sort_key(plan.sort, output) if plan.sort else None
        self._heads: list[tuple[_Ordered, int, Row, bytes]] = []  # each shard's next row, when merging sorted rows
        self._last: dict[int, _Ordered] = {}  # per shard: the key of the row it offered last
        self._needed = set(self._live) if self._sorted else set()  # shards whose next row the merge waits for

    @property
    def tag(self) -> str:
        return f"SELECT {self.rows}"

    @property
    def finished(self) -> bool:
        """Nothing more can reach the client: LIMIT is met, or every row has been given out."""
        return self._left == 0 or (not self._live and not self._ready and not self._heads and self._tail is None)

    def wanted(self) -> int | None:
        """The shard whose next row (or end) the merge needs before it can give out more; None once finished.
        Sorted rows need a particular shard's; otherwise any live shard may offer (the first is named)."""
        if self._left == 0 or not self._live:
            return None
        if self._sorted:
            return min(self._needed) if self._needed else None
        return min(self._live)

    @property
    def any_shard(self) -> bool:
        """Whether rows may come from any live shard, in any order (not a sorted merge)."""
        return not self._sorted

    def add(self, shard: int, data_row: bytes) -> None:
        """A DataRow body from a shard."""
        if self._left == 0:
            return
        if self._groups is not None:
            self._groups.add(_parse_data_row(data_row))
        elif self._sorted:
            self._offer(shard, _parse_data_row(data_row), data_row)
        else:
            self._give(data_row, None)

    def end(self, shard: int) -> None:
        """A shard has sent all its rows."""
        self._live.discard(shard)
        self._needed.discard(shard)
        if self._sorted:
            self._merge_heads()
        elif not self._live and self._groups is not None:
            groups = self._groups.rows()
            self._tail = iter(sorted(groups, key=self._key) if self._key is not None else groups)

    def take(self, count: int | None) -> list[bytes]:
        """Up to `count` (None: all) of the client's next DataRow bodies."""
        while self._tail is not None and (count is None or len(self._ready) < count) and self._left != 0:
            row = next(self._tail, None)
            if row is None:
                self._tail = None
            else:
                self._give(None, row)
        if count is None or count >= len(self._ready):
            taken, self._ready = self._ready, []
        else:
            taken, self._ready = self._ready[:count], self._ready[count:]
        return taken

    def _offer(self, shard: int, row: Row, data_row: bytes) -> None:
        assert self._key is not None
        key = self._key(row)
        last = self._last.get(shard)
        if last is not None and key < last:
            raise Unmergeable(
                "shardproxy: a shard sorted its rows differently from the proxy's byte-order comparison "
                "(a column with a non-C collation?); this ORDER BY cannot be merged across shards"
            )
        self._last[shard] = key
        heapq.heappush(self._heads, (key, shard, row, data_row))
        self._needed.discard(shard)
        self._merge_heads()

    def _merge_heads(self) -> None:
        """Give out the smallest head while every live shard has offered one."""
        while self._heads and not self._needed and self._left != 0:
            _, shard, row, data_row = heapq.heappop(self._heads)
            if shard in self._live:
                self._needed.add(shard)
            self._give(data_row, row)
        if self._left == 0:
            self._heads.clear()

    def _give(self, data_row: bytes | None, row: Row | None) -> None:
        """One row for the client, in order (as a DataRow body, or parsed): past DISTINCT, OFFSET and LIMIT."""
        if self._distinct:
            if row is None:
                assert data_row is not None
                row = _parse_data_row(data_row)
            values = tuple(column.key(row[column.index]) for column in self._distinct)
            if values in self._seen:
                return
            self._seen.add(values)
            self._memory.hold(_row_bytes(row))
        if self._skip:
            self._skip -= 1
            return
        if self._left is not None:
            self._left -= 1
        if data_row is None or self.plan.hidden:
            assert row is not None
            data_row = _encode_data_row(row[: self._visible])
        self._ready.append(data_row)
        self.rows += 1


def _same_columns(fields: list[_Field], other: list[_Field]) -> None:
    if [(f.type_oid, f.format) for f in fields] != [(f.type_oid, f.format) for f in other]:
        raise Unmergeable("shardproxy: shards returned different column types for the same query")


PROGRAM_LIMIT_EXCEEDED = "54000"
CELL_OVERHEAD = 64  # bytes the proxy spends on a held value besides its own bytes (its object, its key)
ROW_OVERHEAD = 128  # and on a held row (its list, its place in a dict or set)


def _row_bytes(row: Row) -> int:
    """About what holding a row costs the proxy."""
    return ROW_OVERHEAD + sum(CELL_OVERHEAD + (len(cell) if cell is not None else 0) for cell in row)


class _Memory:
    """What a merge holds, against its limit (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0

    def hold(self, size: int) -> None:
        self.held += size
        if self.limit is not None and self.held > self.limit:
            raise Unmergeable(
                f"shardproxy: this query across shards holds more than routing.scatter_memory_limit "
                f"({self.limit} bytes) in the proxy: its groups or DISTINCT rows must be held until every shard "
                "has answered; add a shard key, or group or de-duplicate less",
                PROGRAM_LIMIT_EXCEEDED,
            )


# --- planning -------------------------------------------------------------------------------------------------


def _single_select(sql: str) -> ast.SelectStmt:
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError as exc:
        raise Unmergeable(f"shardproxy: cannot parse the query to merge it across shards: {exc}") from None
    if len(statements) != 1 or not isinstance(statements[0].stmt, ast.SelectStmt):
        raise Unmergeable("shardproxy: only a single SELECT can run across shards")
    return statements[0].stmt


def _refuse(construct: str) -> Unmergeable:
    return Unmergeable(f"shardproxy: {construct} across shards is not supported")


def _check_clauses(stmt: ast.SelectStmt) -> None:
    """Refuse the top-level clauses that no combination of shard results can answer."""
    if stmt.op != SetOperation.SETOP_NONE:
        raise _refuse("UNION/INTERSECT/EXCEPT")
    if stmt.valuesLists or not stmt.fromClause:
        # Concatenating it from every shard would repeat its rows once per shard.
        raise Unmergeable("shardproxy: a SELECT that reads no table must run on one shard, not across shards")
    if stmt.intoClause is not None:
        raise _refuse("SELECT INTO")
    if stmt.lockingClause:
        raise _refuse("FOR UPDATE/SHARE")
    if stmt.distinctClause and stmt.distinctClause != (None,):
        raise _refuse("DISTINCT ON")
    if stmt.havingClause is not None:
        raise _refuse("HAVING")
    if stmt.windowClause:
        raise _refuse("a window function")
    if stmt.limitOption == LimitOption.LIMIT_OPTION_WITH_TIES:
        raise _refuse("FETCH FIRST ... WITH TIES")
    if stmt.withClause is not None and stmt.withClause.recursive:
        raise _refuse("WITH RECURSIVE")


def _check_subqueries(stmt: ast.SelectStmt) -> None:
    """Refuse subqueries whose answer on one shard differs from their answer over all rows.

    Row-by-row subqueries (filters, projections) are fine: they see the same rows a single server would pair
    with each of this shard's rows. Aggregating, de-duplicating or limiting ones are not.
    """
    for node in _walk(stmt, into_subqueries=True):
        if isinstance(node, ast.CommonTableExpr) and not isinstance(node.ctequery, ast.SelectStmt):
            raise _refuse("a data-modifying WITH")
        if node is stmt or not isinstance(node, ast.SelectStmt):
            continue
        if (node.op != SetOperation.SETOP_NONE or node.distinctClause or node.groupClause or node.havingClause
                or node.windowClause or node.limitCount is not None or node.limitOffset is not None
                or any(_is_aggregate(n) or _is_window(n) for n in _walk(node))):  # fmt: skip
            raise Unmergeable(
                "shardproxy: a subquery that aggregates, de-duplicates, limits or combines sets cannot run "
                "across shards"
            )


class _Planner:
    """Turns one parsed SELECT into a ScatterPlan, rewriting the statement into the shards' query."""

    def __init__(self, stmt: ast.SelectStmt) -> None:
        _check_clauses(stmt)
        _check_subqueries(stmt)
        self.stmt = stmt
        self.targets: list[ast.ResTarget] = list(stmt.targetList or ())
        # Keys are matched against the select list as written, before avg(x) becomes sum(x).
        self.written = [_expression(target) for target in self.targets]
        self.hidden: list[ast.ResTarget] = []
        self.probed: dict[str, int] = {}  # GROUP BY names taken for output columns, with their target index
        self.aggregates: list[Aggregate] = []
        self.distinct = bool(stmt.distinctClause)
        top_level = self.written + [_expression(item) for item in stmt.sortClause or ()]
        if any(_is_window(node) for expr in top_level for node in _walk(expr)):
            raise _refuse("a window function")
        self.grouped = bool(stmt.groupClause) or any(_is_aggregate(n) for e in top_level for n in _walk(e))

    def plan(self) -> ScatterPlan:
        stmt = self.stmt
        offset = _count(stmt.limitOffset, "OFFSET") or 0
        limit = _count(stmt.limitCount, "LIMIT")
        group_columns: tuple[int, ...] = ()
        if self.grouped:
            self._plan_aggregates()
            group_columns = tuple(self._group_column(item) for item in stmt.groupClause or ())
            self._probe()
        sort = tuple(self._sort_key(item) for item in stmt.sortClause or ())
        if self.grouped:
            # Shards return every partial group; de-duplication, order and limit apply to the combined groups.
            stmt.distinctClause = stmt.sortClause = stmt.limitCount = stmt.limitOffset = None
            stmt.limitOption = LimitOption.LIMIT_OPTION_DEFAULT
        else:
            # The first offset+limit rows of the whole are among the first offset+limit rows of some shard.
            stmt.limitOffset = None
            stmt.limitCount = None if limit is None else ast.A_Const(val=ast.Integer(offset + limit))
            stmt.limitOption = LimitOption.LIMIT_OPTION_DEFAULT if limit is None else LimitOption.LIMIT_OPTION_COUNT
        # Hidden columns go at the end in reverse, so hidden column i is row[-1 - i] however wide `*` expands.
        stmt.targetList = tuple(self.targets + self.hidden[::-1])
        return ScatterPlan(
            shard_sql=RawStream()(stmt),
            hidden=len(self.hidden),
            grouped=self.grouped,
            group_columns=group_columns,
            aggregates=tuple(self.aggregates),
            distinct=self.distinct,
            sort=sort,
            offset=offset,
            limit=limit,
            probed=tuple(self.probed),
        )

    def _hide(self, expr: ast.Node) -> int:
        """Have shards also return expr, in a hidden column; its (negative) index."""
        if self.distinct and not self.grouped:
            # An extra column would change which rows the shards' DISTINCT keeps.
            raise Unmergeable("shardproxy: SELECT DISTINCT across shards needs every ORDER BY expression written "
                              "in the select list")  # fmt: skip
        if any(isinstance(node, ast.ParamRef) for node in _walk(expr)):
            # A second use of $n could change the type PostgreSQL infers for it.
            raise _refuse("ORDER BY or GROUP BY an expression with a parameter that is not in the select list")
        for i, target in enumerate(self.hidden):
            if target.val == expr:
                return -1 - i
        self.hidden.append(ast.ResTarget(name=f"{HIDDEN_PREFIX}{len(self.hidden) + 1}", val=copy.deepcopy(expr)))
        return -len(self.hidden)

    def _has_star(self) -> bool:
        return any(_is_star(_expression(target)) for target in self.targets)

    def _target_column(self, i: int) -> int:
        """The shard-row column of target i; behind a `*` its position is unknown, so it is fetched again."""
        if any(_is_star(_expression(target)) for target in self.targets[:i]):
            return self._hide(_expression(self.targets[i]))
        return i

    def _position(self, expr: ast.Node, clause: str) -> int | None:
        """The 0-based column an integer constant (`ORDER BY 2`) names, or None if expr is not one."""
        position = _integer(expr)
        if position is None:
            return None
        if position < 1 or (not self._has_star() and position > len(self.targets)):
            raise Unmergeable(f"shardproxy: {clause} position {position} is not in select list")
        return position - 1

    def _plan_aggregates(self) -> None:
        for i, target in enumerate(self.targets):
            expr = _expression(target)
            if _is_star(expr):
                raise _refuse("SELECT * with GROUP BY or aggregates")
            if _is_aggregate(expr):
                # The shards' column may be renamed (avg becomes sum), so name it as the client expects.
                target.name = target.name or _output_name(target)
                self._aggregate(expr, partial(self._replace_target, i))
            elif any(_is_aggregate(node) for node in _walk(expr)):
                raise _refuse("an aggregate inside an expression")

    def _replace_target(self, i: int, expr: ast.Node) -> int:
        self.targets[i].val = expr
        return i

    def _aggregate(self, call: ast.FuncCall, place: Callable[[ast.Node], int]) -> int:
        """Register a mergeable aggregate; place(expr) puts the shards' expression in a column and says which."""
        kind = _mergeable_kind(call)
        if kind in ("min", "max"):
            _check_collations(call)
        count_column = None
        if kind == "avg":
            # Exact: avg is sum(x)/count(x) over all rows, divided as PostgreSQL divides.
            column = place(_renamed(call, "sum"))
            count_column = self._hide(_renamed(call, "count"))
        else:
            column = place(call)
        self.aggregates.append(Aggregate(column, kind, count_column))
        return column

    def _group_column(self, expr: ast.Node) -> int:
        if isinstance(expr, ast.GroupingSet):
            raise _refuse("GROUPING SETS/ROLLUP/CUBE")
        position = self._position(expr, "GROUP BY")
        if position is not None:
            return self._checked_key(position, "GROUP BY")
        if expr in self.written:
            return self._checked_key(self.written.index(expr), "GROUP BY")
        name = _bare_name(expr)
        outputs = [i for i, target in enumerate(self.targets) if _output_name(target) == name]
        if name is not None and outputs and not self._reads_column(name):
            return self._output_group(name, outputs)
        _check_collations(expr)
        return self._hide(expr)  # an input column (read elsewhere, so it exists), or an expression

    def _reads_column(self, name: str) -> bool:
        """Whether the query reads a column of that name (other than by a bare name in GROUP BY or ORDER BY,
        which may name an output column): then its FROM clause has one, which GROUP BY name means."""
        stmt = self.stmt
        bare = {id(node) for node in (*(stmt.groupClause or ()), *(item.node for item in stmt.sortClause or ()))
                if _bare_name(node) == name}  # fmt: skip
        return any(
            isinstance(node, ast.ColumnRef) and id(node) not in bare and _expression_name(node) == name
            for node in _walk(stmt, into_subqueries=True)
        )

    def _output_group(self, name: str, outputs: list[int]) -> int:
        """GROUP BY the name of an output column, when nothing shows an input column of that name (_probe)."""
        if len(outputs) > 1:
            raise _refuse(f"GROUP BY {name}, the name of several output columns,")
        self.probed[name] = outputs[0]
        return self._checked_key(outputs[0], "GROUP BY")

    def _probe(self) -> None:
        """Shards group by the probed output columns (by position) and read a one-row probe whose columns bear
        their names: an input column of such a name makes GROUP BY name ambiguous there (SQLSTATE 42702, which
        ScatterPlan.check_shard_error makes a refusal); without one, GROUP BY name reads the probe's NULL."""
        if not self.probed:
            return
        stmt = self.stmt
        positions = [ast.A_Const(val=ast.Integer(index + 1)) for index in self.probed.values()]
        stmt.groupClause = (*(stmt.groupClause or ()), *positions)
        columns = tuple(ast.ResTarget(name=name, val=ast.A_Const(isnull=True)) for name in self.probed)
        probe = ast.SelectStmt(targetList=columns, op=SetOperation.SETOP_NONE)
        item = ast.RangeSubselect(lateral=False, subquery=probe, alias=ast.Alias(aliasname=PROBE))
        stmt.fromClause = (*(stmt.fromClause or ()), item)

    def _checked_key(self, i: int, clause: str) -> int:
        """Target i as a sort or group key: not an aggregate for GROUP BY, and compared in byte order."""
        if clause == "GROUP BY" and any(aggregate.column == i for aggregate in self.aggregates):
            raise Unmergeable("shardproxy: aggregate functions are not allowed in GROUP BY")
        _check_collations(_expression(self.targets[i]))
        return i

    def _sort_key(self, item: ast.SortBy) -> SortKey:
        if item.sortby_dir == SortByDir.SORTBY_USING:
            raise _refuse("ORDER BY ... USING")
        descending = item.sortby_dir == SortByDir.SORTBY_DESC
        nulls = item.sortby_nulls
        nulls_first = nulls == SortByNulls.SORTBY_NULLS_FIRST or (nulls == SortByNulls.SORTBY_NULLS_DEFAULT
                                                                   and descending)  # fmt: skip
        return SortKey(self._sort_column(_expression(item)), descending, nulls_first)

    def _sort_column(self, expr: ast.Node) -> int:
        position = self._position(expr, "ORDER BY")
        if position is not None and self._has_star():
            return position  # a column of the expanded `*`, already where shards put it
        if position is not None:
            return self._checked_key(position, "ORDER BY")
        # ORDER BY takes a bare name for an output column's name first, then an expression for an equal one.
        names = [_output_name(target) for target in self.targets]
        name = _bare_name(expr)
        match = names.index(name) if name is not None and name in names else None
        if match is None and expr in self.written:
            match = self.written.index(expr)
        if match is not None:
            _check_collations(self.written[match])
            return self._target_column(match)
        _check_collations(expr)
        if not self.grouped:
            return self._hide(expr)
        for group in self.stmt.groupClause or ():
            if group == expr:
                return self._group_column(group)
        if _is_aggregate(expr):
            return self._aggregate(expr, self._hide)
        raise _refuse("ORDER BY an expression that is neither an output column, a GROUP BY key nor an aggregate")


def _walk(node: object, into_subqueries: bool = False) -> Iterator[ast.Node]:
    """Every node under node, itself included; a nested SELECT is entered only with into_subqueries."""
    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _walk(item, into_subqueries)
        return
    if not isinstance(node, ast.Node):
        return
    yield node
    for name in node:  # a node iterates over its attribute names
        child = getattr(node, name, None)
        if isinstance(child, ast.SelectStmt) and not into_subqueries:
            continue
        yield from _walk(child, into_subqueries)


def _function_name(call: ast.FuncCall) -> tuple[str | None, str]:
    """Schema (or None) and name of a function call."""
    names = [part.sval for part in call.funcname or ()]
    return (names[-2] if len(names) > 1 else None), names[-1]


def _is_window(node: ast.Node) -> bool:
    return isinstance(node, ast.FuncCall) and node.over is not None


def _is_aggregate(node: ast.Node) -> TypeGuard[ast.FuncCall]:
    if not isinstance(node, ast.FuncCall) or node.over is not None:
        return False
    schema, name = _function_name(node)
    aggregate_syntax = node.agg_star or node.agg_distinct or node.agg_order or node.agg_filter is not None
    return bool(aggregate_syntax or node.agg_within_group) or (schema in (None, "pg_catalog")
                                                               and name in KNOWN_AGGREGATES)  # fmt: skip


def _mergeable_kind(call: ast.FuncCall) -> str:
    schema, name = _function_name(call)
    if schema not in (None, "pg_catalog") or name not in MERGEABLE_AGGREGATES or call.agg_within_group:
        raise _refuse(f"aggregate {name}()")
    if call.agg_distinct:
        raise _refuse(f"{name}(DISTINCT ...)")
    arguments = len(call.args or ())
    if call.func_variadic or arguments != (0 if call.agg_star else 1) or (call.agg_star and name != "count"):
        raise _refuse(f"this form of {name}()")
    if any(_is_aggregate(node) for node in _walk(call.args)):
        raise _refuse("an aggregate inside an expression")
    return name


def _renamed(call: ast.FuncCall, name: str) -> ast.FuncCall:
    renamed = copy.deepcopy(call)
    renamed.funcname = (ast.String(sval=name),)
    return renamed


def _check_collations(expr: ast.Node) -> None:
    for node in _walk(expr):
        if isinstance(node, ast.CollateClause):
            name = _last(node.collname).sval
            if name.lower() not in BYTE_ORDER_COLLATIONS:
                raise Unmergeable(
                    f'shardproxy: COLLATE "{name}" in a sort, group or min/max key is not supported '
                    "across shards: the proxy compares text in byte order, as the C collation does"
                )


def _expression(item: ast.ResTarget | ast.SortBy) -> ast.Node:
    """The expression of a select-list or ORDER BY item, which the parser always sets (pglast types it Optional)."""
    expr = item.val if isinstance(item, ast.ResTarget) else item.node
    if expr is None:
        raise Unmergeable("shardproxy: a select-list or ORDER BY item without an expression cannot run across shards")
    return expr


def _last(items: tuple[Any, ...] | None) -> Any:
    """The last item of a parse-tree list (a qualified name's last part, a column reference's last field), or None."""
    return items[-1] if items else None


def _integer(expr: ast.Node) -> int | None:
    """The value of an integer constant that fits int4 (`2`), or None if expr is not one."""
    value = expr.val if isinstance(expr, ast.A_Const) else None
    return value.ival if isinstance(value, ast.Integer) else None


def _is_star(expr: ast.Node) -> bool:
    return isinstance(expr, ast.ColumnRef) and isinstance(_last(expr.fields), ast.A_Star)


def _bare_name(expr: ast.Node) -> str | None:
    """The name of an unqualified column reference, or None."""
    fields = expr.fields if isinstance(expr, ast.ColumnRef) else None
    if fields and len(fields) == 1 and isinstance(fields[0], ast.String):
        return str(fields[0].sval)
    return None


def _output_name(target: ast.ResTarget) -> str | None:
    """The column name PostgreSQL gives a select-list item (FigureColname), for the common kinds of item."""
    if target.name:
        return str(target.name)
    return _expression_name(target.val)


def _expression_name(expr: ast.Node | None) -> str | None:
    if isinstance(expr, ast.ColumnRef):
        last = _last(expr.fields)
        return str(last.sval) if isinstance(last, ast.String) else None
    if isinstance(expr, ast.FuncCall):
        return _function_name(expr)[1]
    if isinstance(expr, ast.TypeCast) and expr.typeName is not None:
        return _expression_name(expr.arg) or str(_last(expr.typeName.names).sval)
    if isinstance(expr, ast.A_Indirection) and isinstance(_last(expr.indirection), ast.String):
        return str(_last(expr.indirection).sval)
    if isinstance(expr, ast.CaseExpr):
        return "case"
    return None


def _count(node: ast.Node | None, clause: str) -> int | None:
    """The value of a LIMIT or OFFSET clause; None when absent, ALL or NULL."""
    if node is None or (isinstance(node, ast.A_Const) and node.isnull):
        return None
    if isinstance(node, ast.ParamRef):
        raise _refuse(f"{clause} with a parameter")
    value = node.val if isinstance(node, ast.A_Const) else None
    count = _integer(node)
    # Integer constants beyond int4 reach the parse tree as Float nodes holding their digits.
    if isinstance(value, ast.Float) and value.fval is not None and value.fval.isdigit():
        count = int(value.fval)
    if count is None:
        raise Unmergeable(f"shardproxy: {clause} across shards must be an integer constant")
    if count < 0:
        raise Unmergeable(f"shardproxy: {clause} must not be negative")
    return count


# --- combining rows -------------------------------------------------------------------------------------------


class _Groups:
    """One row per group, folded as shard rows arrive: aggregates combined, other columns as the first shard row
    of the group had them."""

    def __init__(self, plan: ScatterPlan, fields: list[_Field], memory: _Memory) -> None:
        self._plan, self._fields, self._memory = plan, fields, memory
        self._keys = [_Column(fields, i, "group by") for i in plan.group_columns]
        self._combiners = [combiner for aggregate in plan.aggregates for combiner in _combiners(aggregate, fields)]
        self._groups: dict[tuple[Any, ...], Row] = {}

    def add(self, row: Row) -> None:
        group = tuple(key.key(row[key.index]) for key in self._keys)
        merged = self._groups.get(group)
        if merged is None:
            self._memory.hold(2 * _row_bytes(row))  # the row, and its key
            self._groups[group] = row
            return
        for column, combine in self._combiners:
            a, b = merged[column], row[column]
            merged[column] = a if b is None else b if a is None else combine(a, b)

    def rows(self) -> list[Row]:
        """The combined groups, avg columns divided out."""
        groups = list(self._groups.values())
        self._groups = {}
        averages = [aggregate for aggregate in self._plan.aggregates if aggregate.kind == "avg"]
        for merged in groups:
            for aggregate in averages:
                merged[aggregate.column] = _average(self._fields, aggregate, merged)
        return groups


def _combiners(aggregate: Aggregate, fields: list[_Field]) -> list[tuple[int, Callable[[bytes, bytes], bytes]]]:
    """How two shards' non-NULL partial values combine, per column the aggregate uses (NULL: no rows)."""
    if aggregate.kind in ("min", "max"):
        column = _Column(fields, aggregate.column, f"take {aggregate.kind}() of")
    else:
        column = _Column(fields, aggregate.column, "add up")
    if aggregate.kind == "min":
        return [(column.index, lambda a, b: b if column.key(b) < column.key(a) else a)]
    if aggregate.kind == "max":
        return [(column.index, lambda a, b: b if column.key(a) < column.key(b) else a)]
    combiners = [(column.index, _adder(column, aggregate.kind))]
    if aggregate.count_column is not None:
        count = _Column(fields, aggregate.count_column, "add up")
        combiners.append((count.index, _adder(count, "count")))
    return combiners


def _adder(column: _Column, kind: str) -> Callable[[bytes, bytes], bytes]:
    add = ADDERS.get(column.field.type_oid)
    if add is None:
        raise _unsupported_aggregate(kind, column.field)
    return lambda a, b: column.encode(add(column.decode(a), column.decode(b)))


def _average(fields: list[_Field], aggregate: Aggregate, row: Row) -> Cell:
    """avg from the combined sum and count, computed as PostgreSQL computes it."""
    assert aggregate.count_column is not None
    total_cell, count_cell = row[aggregate.column], row[aggregate.count_column]
    count = 0 if count_cell is None else _Column(fields, aggregate.count_column, "add up").decode(count_cell)
    if total_cell is None or count == 0:
        return None
    total = _Column(fields, aggregate.column, "add up").decode(total_cell)
    out = _Column([_average_field(fields[aggregate.column])], 0, "add up")
    if isinstance(total, float):
        # PostgreSQL's float avg adds up from +0, so an all -0 sum averages to 0.
        return out.encode((0.0 + total) / count)
    return out.encode(_numeric_divide(Decimal(total), count))


def _average_field(field_: _Field) -> _Field:
    """The field avg(x) has, given the field sum(x) had: numeric for integers and numerics, float8 for float8."""
    if field_.type_oid in (OID_INT8, OID_NUMERIC):
        return _Field(field_.name, 0, 0, OID_NUMERIC, -1, -1, field_.format)
    if field_.type_oid == OID_FLOAT8:
        return field_
    raise _unsupported_aggregate("avg", field_)


def _unsupported_aggregate(kind: str, field_: _Field) -> Unmergeable:
    name = field_.name.decode(errors="replace")
    return _refuse(f'{kind}() of column "{name}" (type oid {field_.type_oid})')


def _sort_key(keys: tuple[SortKey, ...], fields: list[_Field]) -> Callable[[Row], _Ordered]:
    columns = [_Column(fields, key.column, "sort by") for key in keys]
    return lambda row: _Ordered([column.key(row[column.index]) for column in columns], keys)


class _Ordered:
    """A row's ORDER BY values, ordered as the ORDER BY clause orders them."""

    __slots__ = ("keys", "values")

    def __init__(self, values: list[Any], keys: tuple[SortKey, ...]) -> None:
        self.values = values
        self.keys = keys

    def __lt__(self, other: _Ordered) -> bool:
        for a, b, key in zip(self.values, other.values, self.keys, strict=True):
            if a == b:
                continue
            if a is None or b is None:
                return (a is None) == key.nulls_first
            return bool(b < a) if key.descending else bool(a < b)
        return False


# --- wire messages --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """One column of a RowDescription."""

    name: bytes
    table_oid: int
    attnum: int
    type_oid: int
    typlen: int
    typmod: int
    format: int


def _parse_row_description(body: bytes) -> list[_Field]:
    count = INT16.unpack_from(body)[0]
    fields, offset = [], 2
    for _ in range(count):
        name, offset = read_cstring(body, offset)
        fields.append(_Field(name, *FIELD.unpack_from(body, offset)))
        offset += FIELD.size
    return fields


def _encode_row_description(fields: list[_Field]) -> bytes:
    parts = [INT16.pack(len(fields))]
    for f in fields:
        parts += [f.name, b"\0", FIELD.pack(f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, f.format)]
    return b"".join(parts)


def _parse_data_row(body: bytes) -> Row:
    count = INT16.unpack_from(body)[0]
    cells: Row = []
    offset = 2
    for _ in range(count):
        length = INT32.unpack_from(body, offset)[0]
        offset += 4
        if length < 0:
            cells.append(None)
        else:
            cells.append(bytes(body[offset : offset + length]))
            offset += length
    return cells


def _encode_data_row(cells: Row) -> bytes:
    parts = [INT16.pack(len(cells))]
    for cell in cells:
        parts += [INT32.pack(-1)] if cell is None else [INT32.pack(len(cell)), cell]
    return b"".join(parts)


# --- values ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Type:
    """How the proxy reads (and, for aggregate results, writes) one PostgreSQL type."""

    from_text: Callable[[bytes], Any]
    from_binary: Callable[[bytes], Any]
    # A value to Python's terms: ordered, equal and hashed as PostgreSQL orders and equates the type.
    key: Callable[[Any], Any] = lambda value: value
    to_text: Callable[[Any], bytes] | None = None
    to_binary: Callable[[Any], bytes] | None = None


class _Column:
    """Column `index` of a shard row, with the codec its type and format need; purpose names it in errors."""

    def __init__(self, fields: list[_Field], index: int, purpose: str) -> None:
        self.index = index
        self.field = fields[index]
        known = TYPES.get(self.field.type_oid)
        if known is None:
            raise Unmergeable(
                f'shardproxy: cannot {purpose} column "{self.name}" across shards: '
                f"the proxy does not compare values of its type (oid {self.field.type_oid})"
            )
        self.type = known

    @property
    def name(self) -> str:
        return self.field.name.decode(errors="replace")

    def decode(self, cell: bytes) -> Any:
        return self.type.from_binary(cell) if self.field.format else self.type.from_text(cell)

    def key(self, cell: Cell) -> Any:
        return None if cell is None else self.type.key(self.decode(cell))

    def encode(self, value: Any) -> bytes:
        encode = self.type.to_binary if self.field.format else self.type.to_text
        assert encode is not None, "only int8, numeric and float8 results are re-encoded"
        return encode(value)


def _signed(data: bytes) -> int:
    return int.from_bytes(data, "big", signed=True)


def _int8_bytes(value: int) -> bytes:
    return INT8.pack(_in_int8_range(value))


def _int8_text(value: int) -> bytes:
    return str(_in_int8_range(value)).encode()


def _in_int8_range(value: int) -> int:
    """A combined bigint, or the error PostgreSQL raises when a sum leaves bigint's range."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise Unmergeable("shardproxy: bigint out of range", NUMERIC_OUT_OF_RANGE)
    return value


def _float_key(value: float) -> tuple[int, float]:
    """PostgreSQL orders NaN above every other float and equal to itself; -0 equals 0 in both."""
    return (1, 0.0) if math.isnan(value) else (0, value)


def _float8_add(a: float, b: float) -> float:
    total = a + b
    if math.isinf(total) and not (math.isinf(a) or math.isinf(b)):
        raise Unmergeable("shardproxy: value out of range: overflow", NUMERIC_OUT_OF_RANGE)
    return total


def _float8_text(value: float) -> bytes:
    """float8 as PostgreSQL prints it: shortest exact digits, exponent form outside 1e-4 <= |x| < 1e15."""
    if math.isnan(value):
        return b"NaN"
    if math.isinf(value):
        return b"Infinity" if value > 0 else b"-Infinity"
    if value == 0:
        return b"-0" if math.copysign(1, value) < 0 else b"0"
    _, digits, exponent = _shortest_decimal(abs(value)).as_tuple()
    assert isinstance(exponent, int)
    point = len(digits) + exponent - 1  # the decimal exponent of the first digit
    significant = "".join(map(str, digits)).rstrip("0")
    prefix = "-" if value < 0 else ""
    if -4 <= point < 15:
        fixed = Decimal((0, tuple(map(int, significant)), point - len(significant) + 1))
        return f"{prefix}{fixed:f}".encode()
    mantissa = significant[0] + ("." + significant[1:] if len(significant) > 1 else "")
    return f"{prefix}{mantissa}e{'+' if point >= 0 else '-'}{abs(point):02d}".encode()


def _shortest_decimal(value: float) -> Decimal:
    """The shortest decimal strictly inside value's rounding interval, closest to it: what Ryu gives PostgreSQL.

    Python's repr is the same except that it may return a decimal exactly on the interval's edge (which reads
    back as value by round-half-even); PostgreSQL's Ryu excludes the edges and prints more digits instead.
    """
    exact = Decimal(value)
    edges = {EXACT.multiply(EXACT.add(exact, Decimal(math.nextafter(value, side))), Decimal("0.5"))
             for side in (-math.inf, math.inf)}  # fmt: skip
    candidate = Decimal(repr(value))
    precision = len(candidate.as_tuple().digits)
    while candidate in edges:
        candidate = Decimal(f"{value:.{precision}e}")  # one more significant digit each round
        precision += 1
    return candidate


def _numeric_from_text(text: bytes) -> Decimal:
    # PostgreSQL prints numerics without exponents, so the exponent Decimal keeps is minus the display scale.
    return Decimal(text.decode())


def _numeric_from_binary(data: bytes) -> Decimal:
    ndigits, weight, sign, scale = NUMERIC_HEADER.unpack_from(data)
    specials = {NUMERIC_NAN: "NaN", NUMERIC_POSITIVE_INFINITY: "Infinity", NUMERIC_NEGATIVE_INFINITY: "-Infinity"}
    if sign in specials:
        return Decimal(specials[sign])
    digits = 0
    for digit in struct.unpack_from(f"!{ndigits}h", data, NUMERIC_HEADER.size):
        digits = digits * 10000 + digit
    shift = 4 * (weight - ndigits + 1) + scale  # value * 10**scale == digits * 10**shift
    scaled = digits * 10**shift if shift >= 0 else digits // 10**-shift
    value = Decimal(scaled).scaleb(-scale, EXACT)
    return value.copy_negate() if sign == NUMERIC_NEGATIVE else value


def _numeric_text(value: Decimal) -> bytes:
    if value.is_nan():
        return b"NaN"
    if value.is_infinite():
        return b"Infinity" if value > 0 else b"-Infinity"
    return f"{value:f}".encode()


def _numeric_binary(value: Decimal) -> bytes:
    """numeric_send's layout: base-10000 digits without leading or trailing zero digits, and the display scale."""
    if value.is_nan():
        return NUMERIC_HEADER.pack(0, 0, NUMERIC_NAN, 0)
    if value.is_infinite():
        # numeric_send reads the scale out of the special value's header bits, which say 32 for infinities.
        sign = NUMERIC_POSITIVE_INFINITY if value > 0 else NUMERIC_NEGATIVE_INFINITY
        return NUMERIC_HEADER.pack(0, 0, sign, INFINITY_SCALE)
    sign, _, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    scale = max(0, -exponent)
    groups = -(-scale // 4)  # base-10000 digits after the point
    scaled = int(value.copy_abs().scaleb(4 * groups, EXACT))
    digits: list[int] = []
    while scaled:
        scaled, digit = divmod(scaled, 10000)
        digits.insert(0, digit)
    weight = len(digits) - 1 - groups if digits else 0
    while digits and digits[-1] == 0:
        digits.pop()
    header = NUMERIC_HEADER.pack(len(digits), weight, NUMERIC_NEGATIVE if sign and digits else 0, scale)
    return header + struct.pack(f"!{len(digits)}h", *digits)


def _numeric_key(value: Decimal) -> tuple[int, Decimal]:
    """PostgreSQL orders numeric NaN above everything, Infinity included, and equal to itself."""
    return (1, Decimal(0)) if value.is_nan() else (0, value)


def _numeric_add(a: Decimal, b: Decimal) -> Decimal:
    if a.is_nan() or b.is_nan() or (a.is_infinite() and b.is_infinite() and a != b):
        return Decimal("NaN")
    return EXACT.add(a, b)


def _base10000(value: Decimal) -> tuple[int, int]:
    """Weight and leading digit of a numeric in PostgreSQL's base-10000 form; (0, 0) for zero."""
    if value.is_zero():
        return 0, 0
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    weight = value.adjusted() // 4
    coefficient = int("".join(map(str, digits)))
    shift = exponent - 4 * weight
    return weight, coefficient * 10**shift if shift >= 0 else coefficient // 10**-shift


def _numeric_divide(total: Decimal, count: int) -> Decimal:
    """total / count as PostgreSQL's numeric division gives it (select_div_scale, then round half away)."""
    if total.is_nan() or total.is_infinite():
        return total
    weight1, first1 = _base10000(total)
    weight2, first2 = _base10000(Decimal(count))
    quotient_weight = weight1 - weight2 - (1 if first1 <= first2 else 0)
    scale1 = max(0, -int(total.as_tuple().exponent))
    scale = min(max(MIN_SIGNIFICANT_DIGITS - quotient_weight * 4, scale1, 0), MAX_DISPLAY_SCALE)
    sign, digits, exponent = total.as_tuple()
    assert isinstance(exponent, int)
    numerator, denominator = int("".join(map(str, digits))), count
    shift = exponent + scale
    if shift >= 0:
        numerator *= 10**shift
    else:
        denominator *= 10**-shift
    quotient, remainder = divmod(numerator, denominator)
    quotient += 2 * remainder >= denominator
    return Decimal((sign if quotient else 0, tuple(int(d) for d in str(quotient)), -scale))


DATETIME = re.compile(
    rb"(\d{4,})-(\d\d)-(\d\d)(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
    rb"(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?( BC)?"
)


def _days_since_2000(year: int, month: int, day: int) -> int:
    """Days from 2000-01-01 to a proleptic Gregorian date (astronomical year numbers: 0 is 1 BC)."""
    shifted = year - (month <= 2)  # count years from March, so the leap day ends a year
    era = shifted // 400
    year_of_era = shifted - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468 - DAYS_1970_TO_2000


def _timestamp_from_text(text: bytes) -> int:
    """Microseconds since 2000-01-01 (UTC when an offset is shown), from DateStyle ISO output."""
    if text in (b"infinity", b"-infinity"):
        return INT64_MAX if text == b"infinity" else INT64_MIN
    match = DATETIME.fullmatch(text)
    if match is None:
        raise Unmergeable(f"shardproxy: cannot read the date/time {text.decode(errors='replace')!r} across "
                          "shards; set DateStyle to ISO")  # fmt: skip
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m, off_s, bc = match.groups()
    days = _days_since_2000(1 - int(year) if bc else int(year), int(month), int(day))
    seconds = days * 86400 + int(hour or 0) * 3600 + int(minute or 0) * 60 + int(second or 0)
    if sign:
        offset = int(off_h) * 3600 + int(off_m or 0) * 60 + int(off_s or 0)
        seconds -= offset if sign == b"+" else -offset
    return seconds * 1_000_000 + int((fraction or b"0").ljust(6, b"0"))


def _date_from_text(text: bytes) -> int:
    """Days since 2000-01-01, the binary format's numbering; infinities as its sentinels."""
    if text in (b"infinity", b"-infinity"):
        return INT32_MAX if text == b"infinity" else INT32_MIN
    return _timestamp_from_text(text) // DAY_MICROSECONDS


def _bytes(data: bytes) -> bytes:
    return data


INTEGER = _Type(int, _signed)
TEXT = _Type(_bytes, _bytes)
FLOAT = _Type(float, lambda data: FLOAT8.unpack(data)[0] if len(data) == 8 else FLOAT4.unpack(data)[0],
              key=_float_key)  # fmt: skip
TIMESTAMP = _Type(_timestamp_from_text, _signed)
TYPES: dict[int, _Type] = {
    16: _Type(lambda text: text == b"t", lambda data: data == b"\x01"),  # bool
    18: TEXT,  # "char"
    19: TEXT,  # name
    OID_INT8: _Type(int, _signed, to_text=_int8_text, to_binary=_int8_bytes),
    21: INTEGER,  # int2
    23: INTEGER,  # int4
    25: TEXT,  # text
    OID_FLOAT4: FLOAT,
    OID_FLOAT8: _Type(FLOAT.from_text, FLOAT.from_binary, _float_key, _float8_text, FLOAT8.pack),
    1042: _Type(_bytes, _bytes, key=lambda value: value.rstrip(b" ")),  # bpchar: trailing blanks are insignificant
    1043: TEXT,  # varchar
    1082: _Type(_date_from_text, _signed),  # date
    1114: TIMESTAMP,
    1184: TIMESTAMP,  # timestamptz
    OID_NUMERIC: _Type(_numeric_from_text, _numeric_from_binary, _numeric_key, _numeric_text, _numeric_binary),
    2950: _Type(lambda text: bytes.fromhex(text.decode().replace("-", "")), _bytes),  # uuid
}
# How sum() partials of each result type add up: sum(int2/int4) is int8, sum(int8/numeric) numeric.
ADDERS: dict[int, Callable[[Any, Any], Any]] = {
    OID_INT8: lambda a, b: a + b,
    OID_NUMERIC: _numeric_add,
    OID_FLOAT8: _float8_add,
}
