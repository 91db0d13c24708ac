"""Query router: from a statement's text, the session's shard key and the ring, to where it runs.

A pure module (no I/O), so every rule is testable without sockets. Work is split in two:

* ``Router.plan`` / ``Router.plan_simple`` parse a statement once (PostgreSQL's own grammar, through
  pglast) into a ``Plan``: what kind of statement it is, which tables it touches and where its shard
  key comes from. Plans are cached by text; simple-protocol texts are first turned into templates
  (literals become ``$n`` placeholders) so one plan serves every literal value.
* ``Router.route`` resolves a plan's key sources against one execution's literals, parameters and
  session key, and returns a ``Route``: one shard, any shard, every shard, a scatter, or an error.

Key rule: a statement has a shard key when every sharded table it reads or writes is *covered*. A
query level (a SELECT, INSERT, UPDATE, DELETE or MERGE, including each CTE and subquery) is covered
when its WHERE clause (or INNER JOIN condition, or MERGE ON condition) contains
``key = <literal | $n>`` joined to the rest by AND only, or, for INSERT, when every row gives the key
column a literal or parameter. A covered level covers everything nested in it (tables sharded on the
same key are assumed co-located), except data-modifying CTEs, which run in full and must cover
themselves. A level without a key of its own is covered only when it reads no sharded table directly
and all its nested queries are covered. Every key found in a covered statement must map to the same
shard.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal, NamedTuple

from pglast import parser as pg_parser

from shardproxy.routing._literals import normalise
from shardproxy.routing.keys import Key, ShardKeyError, canonical, number
from shardproxy.routing.ring import Ring

__all__ = [
    "Decision",
    "KeyRef",
    "Plan",
    "Route",
    "Router",
]

Kind = Literal[
    "read", "write", "ddl",
    "begin", "commit", "rollback", "savepoint", "release", "rollback_to",
    "prepare_transaction", "commit_prepared", "rollback_prepared",
    "set_shard_key", "reset_shard_key", "session", "utility",
]  # fmt: skip
Target = Literal["shard", "any", "all", "scatter", "error"]
Params = Callable[[int], object] | Sequence[object]

SHARD_KEY_SETTING = "shardproxy.shard_key"
DEFAULT_CACHE_SIZE = 10_000

_TRANSACTIONS: dict[str, Kind] = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to",
    "TRANS_STMT_PREPARE": "prepare_transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}
# Statements that change only the session of the server they run on.
_SESSION = frozenset({
    "VariableSetStmt", "DiscardStmt", "DeallocateStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt",
    "PrepareStmt", "FetchStmt", "ClosePortalStmt", "LoadStmt", "ConstraintsSetStmt",
})  # fmt: skip
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Grant", "Reassign")
_DDL = frozenset({
    "ClusterStmt", "CommentStmt", "CompositeTypeStmt", "DefineStmt", "ImportForeignSchemaStmt",
    "IndexStmt", "RefreshMatViewStmt", "ReindexStmt", "RenameStmt", "RuleStmt", "SecLabelStmt",
    "TruncateStmt", "VacuumStmt", "ViewStmt",
})  # fmt: skip
_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_QUERIES = _DML | {"SelectStmt"}
# Statements whose templates are shared: elsewhere (SET, EXPLAIN options, DDL) a literal may decide
# the plan itself, so those texts are planned as written.
_TEMPLATE_SAFE = _QUERIES | {"TransactionStmt"}
_VERBS = {"SelectStmt": "SELECT", "InsertStmt": "INSERT", "UpdateStmt": "UPDATE",
          "DeleteStmt": "DELETE", "MergeStmt": "MERGE"}  # fmt: skip
_CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_SEQUENCE_WRITERS = frozenset({"nextval", "setval"})
_FALSE_WORDS = frozenset({"false", "off", "no", "0"})
# Casts that change how a key value is spelled, and so which shard it hashes to.
_CASTS = {"int2": "int", "int4": "int", "int8": "int", "numeric": "int", "oid": "int",
          "uuid": "uuid", "text": "text", "varchar": "text", "bpchar": "text", "name": "text"}  # fmt: skip
# Multi-statement queries take the kind of their strongest statement.
_RANK = {"ddl": 4, "write": 3, "utility": 2, "read": 1}

_COMMENT = re.compile(r"/\*(.*?)\*/", re.DOTALL)
_COMMENT_KEY = re.compile(
    r"\bshard_key\s*[:=]\s*(?:'((?:[^']|'')*)'|\"([^\"]*)\"|([^\s,;'\"*]+))", re.IGNORECASE
)
_EXECUTE_ERROR = (
    "shardproxy: EXECUTE of an SQL prepared statement cannot be routed (the proxy does not see its statement); "
    "use the protocol's prepared statements, which are routed by their parameters, or a /* shard_key: ... */ comment"
)
_COMMENT_PRIMARY = re.compile(r"\btarget\s*[:=]\s*['\"]?primary\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Where one shard key value comes from.

    source: "value" (a constant in the planned text, in ``value``), "param" (the statement's
    parameter ``$index``) or "literal" (``literals[index]`` of ``plan_simple``).
    cast: "int", "uuid" or "text" when the SQL casts the value to such a type, which fixes its
    canonical spelling; None keeps the value as given. negate: written as ``-value``.
    """

    source: Literal["value", "param", "literal"]
    index: int = 0
    value: Key | None = None
    cast: str | None = None
    negate: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """What one statement text does, independent of its parameter and literal values.

    kind: the statement kind (see ``Kind``); for several statements, the strongest of them
        (ddl > write > utility > read > the rest).
    verb: the SQL command that decides the kind ("SELECT", "INSERT", "COPY", ...), for messages.
    tables: sharded tables touched anywhere, lower-case and unqualified.
    reference: a ``sharding.reference_tables`` table is touched.
    writes_reference: a reference table is written (INSERT/UPDATE/DELETE/MERGE target, COPY FROM).
    strong: a ``routing.strong_tables`` table is touched: reads go to the primary.
    keys: where the shard key comes from; every one must map to the same shard. Empty when some
        sharded table is not covered by a key (see the module docstring).
    unkeyed: the target when no key is known: "scatter" (a lone SELECT), "any" (EXPLAIN, or no
        sharded table) or "error" (with ``unkeyed_error`` as the message).
    unkeyed_error: the error message when ``unkeyed`` is "error".
    error: set when the statement can never be routed (the route is always this error).
    comment_key: the value of a ``/* shard_key: ... */`` comment; it overrides ``keys``.
    force_primary: a ``/* target: primary */`` comment.
    literal_base: the highest ``$n`` of the original text for templates from ``plan_simple``
        (``$n`` with n > literal_base stands for literal n-literal_base-1); None when the text was
        planned as written.
    read_only / isolation: ``BEGIN``/``START TRANSACTION`` options (isolation lower-case, e.g.
        "repeatable read").
    concurrently: CREATE INDEX / DROP INDEX / REINDEX ... CONCURRENTLY, which PostgreSQL refuses
        inside a transaction block, so a fan-out must not wrap it in one.
    clears_shard_key: RESET shardproxy.shard_key, RESET ALL or DISCARD ALL.
    shard_key_value: the value of ``SET shardproxy.shard_key`` (kind "set_shard_key").
    """

    kind: Kind
    verb: str = ""
    tables: frozenset[str] = frozenset()
    reference: bool = False
    writes_reference: bool = False
    strong: bool = False
    keys: tuple[KeyRef, ...] = ()
    unkeyed: Target = "any"
    unkeyed_error: str | None = None
    error: str | None = None
    comment_key: str | None = None
    force_primary: bool = False
    literal_base: int | None = None
    read_only: bool = False
    isolation: str | None = None
    concurrently: bool = False
    clears_shard_key: bool = False
    shard_key_value: Key | None = None

    @property
    def scatters(self) -> bool:
        """Whether, given no session key, the plan runs on every shard and merges the results."""
        return self.unkeyed == "scatter" and bool(self.tables) and not self.keys and self.comment_key is None


@dataclass(frozen=True, slots=True)
class Route:
    """Where one execution of a plan goes.

    target: "shard" (``shard`` is the ring index), "any" (one shard, whichever), "all" (every
    shard's primary), "scatter" (every shard, results merged) or "error" (``message`` starts with
    ``shardproxy:``; answer with SQLSTATE 0A000 and touch nothing).
    write: the statement needs a primary. force_primary: a target comment or a strong table asks for
    the primary even for a read. For kinds "set_shard_key"/"reset_shard_key" the proxy answers
    itself; transaction control and session statements run on the session's server.
    """

    target: Target
    kind: Kind
    shard: int | None = None
    write: bool = False
    force_primary: bool = False
    message: str | None = None
    # Whether a simple Query of it may be answered by the proxy between transactions (a BEGIN held, its end, the
    # session's shard key, a refusal): only then is routing._answer_locally asked (and inside a failed held one).
    local: bool = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "local", self.target == "error" or self.kind in _LOCAL_KINDS)


_LOCAL_KINDS = frozenset({"begin", "commit", "rollback", "set_shard_key", "reset_shard_key"})


class Decision(NamedTuple):
    """Where one statement goes, with the plan and text it was routed from (the data path makes one per routed
    statement, with tuple.__new__: a tuple, without the Python-level __new__ of a NamedTuple)."""

    route: Route
    plan: Plan | None
    sql: str


class _Cover(NamedTuple):
    """Whether a query level's sharded tables are all covered by keys, and the keys found in it."""

    covered: bool
    keys: list[KeyRef]


class _Scope:
    """One query level while it is walked."""

    __slots__ = ("children", "ctes", "own", "sharded")

    def __init__(self, ctes: frozenset[str]) -> None:
        self.ctes = ctes  # CTE names visible here: a FROM item with such a name is no table
        self.sharded = False  # a sharded table is read or written at this level itself
        self.own: list[KeyRef] = []  # key conditions of this level
        self.children: list[_Cover] = []  # nested query levels


class _Settings(NamedTuple):
    key: str
    reference: frozenset[str]
    strong: frozenset[str]


class Router:
    """Plans statements (cached) and routes them over the ring built from a config."""

    def __init__(self, config: Any, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.ring = Ring.from_config(config)
        self.key_column = config.sharding.key.lower()
        self._settings = _Settings(
            self.key_column,
            _table_names(config.sharding.reference_tables),
            _table_names(config.routing.strong_tables),
        )
        # Per-instance caches: a reloaded config gets a new Router and so fresh plans.
        self._plans = lru_cache(maxsize=cache_size)(self._plan_text)
        self._templates = lru_cache(maxsize=cache_size)(self._plan_template)
        # Routes are immutable and few (target x kind x shard x flags), so each is built once.
        self._routes: dict[tuple[Target, Kind, int | None, bool, bool], Route] = {}

    def plan(self, sql: str) -> Plan:
        """The plan of an extended-protocol statement text (``$n`` are its parameters)."""
        return self._plans(sql)

    def plan_simple(self, sql: str) -> tuple[Plan, list[int | str]]:
        """The plan of a simple-protocol text and the literal values to route it with.

        Literals become ``$n`` placeholders numbered after the text's highest ``$n``, so texts that
        differ only in literal values share one plan. Texts the normalisation cannot handle safely,
        or whose template does not parse, are planned as written (with no literals).
        """
        normalised = normalise(sql, number)  # the rules: _literals.pyx
        if normalised is None:
            return self._plans(sql), []
        template, base, literals = normalised
        plan = self._templates(template, base) if literals else None
        if plan is None:
            return self._plans(sql), []
        return plan, literals

    def route(
        self,
        plan: Plan,
        literals: Sequence[object] = (),
        params: Params | None = None,
        session_key: object = None,
    ) -> Route:
        """Route one execution of plan.

        literals: from ``plan_simple``. params: the statement's decoded parameter values, either a
        callable taking the 1-based parameter number or a sequence. session_key: the value of
        ``SET shardproxy.shard_key``, used when the statement has no key of its own.
        """
        kind = plan.kind
        if plan.error is not None:
            return Route("error", kind, message=plan.error)
        if kind == "ddl":
            return self._made("all", kind, None, True, plan.force_primary)
        if kind != "read" and kind != "write":
            return self._route_other(plan, session_key)
        write = kind == "write"
        force = plan.force_primary or plan.strong
        if write and plan.writes_reference:
            if plan.tables:
                message = f"shardproxy: {plan.verb} writes a reference table and sharded tables together"
                return Route("error", kind, message=message)
            return self._made("all", kind, None, True, force)
        try:
            shard = self._shard(plan, literals, params, session_key)
        except ShardKeyError as exc:
            return Route("error", kind, message=str(exc))
        if shard is not None:
            return self._made("shard", kind, shard, write, force)
        if not plan.tables:
            return self._made("any", kind, None, write, force)
        if plan.unkeyed == "error":
            return Route("error", kind, message=plan.unkeyed_error)
        return self._made(plan.unkeyed, kind, None, write, force)

    def _route_other(self, plan: Plan, session_key: object) -> Route:
        """Transaction control, session statements and utilities: the session's server, except that
        a utility (CALL, DO, ...) given a key by comment or session goes to that key's shard."""
        kind = plan.kind
        if kind == "utility":
            try:
                shard = self._explicit_shard(plan.comment_key, session_key)
            except ShardKeyError as exc:
                return Route("error", kind, message=str(exc))
            if shard is None and plan.verb == "EXECUTE" and len(self.ring.names) > 1:
                # Its statement (PREPARE'd on one shard) is out of sight: on any shard its rows would land astray.
                return Route("error", kind, message=_EXECUTE_ERROR)
            return self._made("any" if shard is None else "shard", kind, shard, True, plan.force_primary)
        write = kind == "begin" and not plan.read_only
        return self._made("any", kind, None, write, plan.force_primary)

    def _made(self, target: Target, kind: Kind, shard: int | None, write: bool, force: bool) -> Route:
        """The shared Route for these fields (error routes, which carry messages, are not shared)."""
        fields = (target, kind, shard, write, force)
        made = self._routes.get(fields)
        if made is None:
            made = self._routes[fields] = Route(*fields)
        return made

    def _shard(
        self, plan: Plan, literals: Sequence[object], params: Params | None, session_key: object
    ) -> int | None:
        """The shard of the plan's key: the comment's, else the statement's, else the session's."""
        if plan.comment_key is not None or not plan.keys:
            return self._explicit_shard(plan.comment_key, session_key)
        first_ref = plan.keys[0]
        first_key = _resolve(first_ref, literals, params)
        shard = self.ring.owner_index(first_key)
        for ref in plan.keys[1:]:
            key = _resolve(ref, literals, params)
            other = self.ring.owner_index(key)
            if other != shard:
                raise ShardKeyError(self._conflict(plan, first_key, shard, key, other))
        return shard

    def _explicit_shard(self, comment_key: str | None, session_key: object) -> int | None:
        key = comment_key if comment_key is not None else session_key
        return None if key is None else self.ring.owner_index(canonical(key, None, False))

    def _conflict(self, plan: Plan, key: Key, shard: int, other_key: Key, other: int) -> str:
        names = self.ring.names
        where = f"{self.key_column} {key!s} is on {names[shard]}, {other_key!s} on {names[other]}"
        if plan.verb == "INSERT":
            return f"shardproxy: INSERT rows belong to different shards ({where}); send one INSERT per shard"
        return f"shardproxy: {plan.verb or 'the query'} has shard keys on different shards ({where})"

    def _plan_text(self, sql: str) -> Plan:
        try:
            stmts = _parse(sql)
        except pg_parser.ParseError:
            # The server reports the syntax error (the text may also be newer than this parser).
            return Plan("utility", **_comments(sql))
        return _analyse(sql, stmts, self._settings, None)

    def _plan_template(self, template: str, base: int) -> Plan | None:
        """The shared plan of a normalised text, or None when it must be planned as written: it
        does not parse, has a statement outside _TEMPLATE_SAFE, or a placeholder took the place of
        a column position (ORDER BY 1)."""
        try:
            stmts = _parse(template)
        except pg_parser.ParseError:
            return None
        if any(next(iter(raw["stmt"])) not in _TEMPLATE_SAFE for raw in stmts):
            return None
        plan = _analyse(template, stmts, self._settings, base)
        if plan.scatters and _positional_placeholder(stmts[0]["stmt"]["SelectStmt"], base):
            return None
        return plan


def _table_names(names: Iterable[str]) -> frozenset[str]:
    """Config table names as compared: lower-case, unqualified."""
    return frozenset(name.rsplit(".", 1)[-1].lower() for name in names)


# ---------------------------------------------------------------------------------------------
# Planning


def _parse(sql: str) -> list[dict[str, Any]]:
    """The statements of sql as libpg_query's JSON tree; JSON is several times faster to get than
    pglast's typed tree. Raises pglast's ParseError."""
    stmts: list[dict[str, Any]] = json.loads(pg_parser.parse_sql_json(sql))["stmts"]
    return stmts


def _analyse(sql: str, stmts: list[dict[str, Any]], settings: _Settings, base: int | None) -> Plan:
    analyses = []
    for raw in stmts:
        ((name, body),) = raw["stmt"].items()
        analysis = _Analysis(settings, base)
        analysis.statement(name, body)
        analyses.append(analysis)
    return _combine(analyses, settings.key, base, _comments(sql))


def _comments(sql: str) -> dict[str, Any]:
    """Routing hints in /* */ comments (pglast drops comments, so they are read from the text)."""
    hints: dict[str, Any] = {}
    if "/*" not in sql:
        return hints
    for comment in _COMMENT.findall(sql):
        match = _COMMENT_KEY.search(comment)
        if match and "comment_key" not in hints:
            quoted, double, bare = match.groups()
            hints["comment_key"] = quoted.replace("''", "'") if quoted is not None else double or bare
        if _COMMENT_PRIMARY.search(comment):
            hints["force_primary"] = True
    return hints


def _positional_placeholder(select: dict[str, Any], base: int) -> bool:
    """Whether ORDER BY / GROUP BY / DISTINCT ON has a literal turned into a placeholder: there a
    number is a column position, which a shared template would lose."""
    nodes = [item["SortBy"].get("node", {}) for item in select.get("sortClause", ())]
    nodes += select.get("groupClause", ())
    nodes += select.get("distinctClause", ())
    return any(node and node.get("ParamRef", {}).get("number", 0) > base for node in nodes)


def _combine(analyses: list[_Analysis], key: str, base: int | None, hints: dict[str, Any]) -> Plan:
    """One plan for the statements of a text: the strongest kind, every key, every table."""
    if not analyses:
        return Plan("session", literal_base=base, **hints)
    main = max(analyses, key=lambda a: _RANK.get(a.kind, 0))
    tables = frozenset().union(*(a.tables for a in analyses))
    covered = all(a.covered for a in analyses)
    keys = tuple(ref for a in analyses for ref in a.keys) if covered else ()
    error = next((a.error for a in analyses if a.error), None)
    unkeyed, unkeyed_error = main.unkeyed, main.unkeyed_error
    if len(analyses) > 1:
        error = error or _multi_statement_error(analyses, main)
        if not covered:
            unkeyed = "error"
            unkeyed_error = (
                "shardproxy: a query of several statements on sharded tables needs "
                f"{key} = <value> in each of them, or a /* shard_key: ... */ comment"
            )
    return Plan(
        kind=main.kind,
        verb=main.verb,
        tables=tables,
        reference=any(a.reference for a in analyses),
        writes_reference=any(a.writes_reference for a in analyses),
        strong=any(a.strong for a in analyses),
        keys=keys,
        unkeyed=unkeyed,
        unkeyed_error=unkeyed_error,
        error=error,
        literal_base=base,
        read_only=any(a.read_only for a in analyses),
        isolation=next((a.isolation for a in analyses if a.isolation), None),
        concurrently=any(a.concurrently for a in analyses),
        clears_shard_key=any(a.clears_shard_key for a in analyses),
        shard_key_value=main.shard_key_value,
        **hints,
    )


def _multi_statement_error(analyses: list[_Analysis], main: _Analysis) -> str | None:
    if any(a.kind in ("set_shard_key", "reset_shard_key") for a in analyses):
        return f"shardproxy: SET/RESET {SHARD_KEY_SETTING} must be sent as a query of its own"
    if main.kind == "ddl" and any(a.tables and a.kind in ("read", "write") for a in analyses):
        # DDL runs on every shard, which would repeat the sharded statements on each of them.
        return "shardproxy: DDL cannot share a query with statements on sharded tables"
    return None


class _Analysis:
    """What one statement does, gathered while walking its JSON parse tree."""

    def __init__(self, settings: _Settings, base: int | None) -> None:
        self.settings = settings
        self.base = base  # placeholders above it are literals of a plan_simple template
        self.kind: Kind = "utility"
        self.verb = ""
        self.tables: set[str] = set()
        self.written: str | None = None  # first sharded table written, for messages
        self.reference = False
        self.writes_reference = False
        self.strong = False
        self.write = False
        self.covered = True
        self.keys: list[KeyRef] = []
        self.unkeyed: Target = "any"
        self.unkeyed_error: str | None = None
        self.error: str | None = None
        self.read_only = False
        self.isolation: str | None = None
        self.concurrently = False
        self.clears_shard_key = False
        self.shard_key_value: Key | None = None

    # -- statements --------------------------------------------------------------------------

    def statement(self, name: str, body: dict[str, Any]) -> None:
        if name in _QUERIES:
            self._query(name, body)
        elif name == "ExplainStmt":
            self._explain(body)
        elif name == "CopyStmt":
            self._copy(body)
        elif name == "DeclareCursorStmt":
            self._query_of("DECLARE", body["query"])
        elif name == "ExecuteStmt":
            self.verb = "EXECUTE"
        elif name == "VariableShowStmt":
            self.kind, self.verb = "read", "SHOW"
        elif name == "TransactionStmt":
            self._transaction(body)
        elif name == "VariableSetStmt":
            self._set(body)
        elif name in _SESSION:
            self.kind = "session"
            self.clears_shard_key = name == "DiscardStmt" and body.get("target") == "DISCARD_ALL"
        elif name in _DDL or name.startswith(_DDL_PREFIXES):
            self.kind = "ddl"
            self.concurrently = _concurrent(name, body)
        if self.kind in ("read", "write"):
            self._finish()

    def _query(self, name: str, body: dict[str, Any]) -> None:
        cover = self._level(name, body, frozenset())
        self.kind = "write" if self.write else "read"
        self.verb = _VERBS[name]
        self.covered, self.keys = cover
        if self.kind == "read" and name == "SelectStmt":
            self.unkeyed = "scatter"

    def _query_of(self, verb: str, node: dict[str, Any]) -> None:
        """A statement wrapping a query (DECLARE, COPY (query)): the query's kind, tables and keys."""
        ((name, body),) = node.items()
        self._query(name, body)
        self.verb, self.unkeyed = verb, "error"

    def _explain(self, body: dict[str, Any]) -> None:
        analyze = any(
            option["DefElem"]["defname"] == "analyze" and _option_is_true(option["DefElem"])
            for option in body.get("options", ())
        )
        ((name, inner),) = body["query"].items()
        self.statement(name, inner)
        if not analyze:
            self.kind = "read"  # nothing is executed
        if self.kind == "read":
            self.unkeyed = "any"  # a plan from any shard shows how each one runs the query
        self.verb = "EXPLAIN"

    def _copy(self, body: dict[str, Any]) -> None:
        if "query" in body:
            self._query_of("COPY", body["query"])
            return
        scope = _Scope(frozenset())
        writes = bool(body.get("is_from"))
        self._relation(body["relation"], scope, written=writes)
        self.kind, self.verb, self.unkeyed = ("write" if writes else "read"), "COPY", "error"
        self.covered = not scope.sharded

    def _transaction(self, body: dict[str, Any]) -> None:
        self.kind = _TRANSACTIONS.get(body["kind"], "utility")
        for option in body.get("options", ()):
            element = option["DefElem"]
            value = _const(element.get("arg", {}))
            if element["defname"] == "transaction_read_only":
                self.read_only = bool(value)
            elif element["defname"] == "transaction_isolation" and isinstance(value, str):
                self.isolation = value

    def _set(self, body: dict[str, Any]) -> None:
        kind = body["kind"]
        self.kind = "session"
        if kind == "VAR_RESET_ALL":
            self.clears_shard_key = True
        if body.get("name", "").lower() != SHARD_KEY_SETTING:
            return
        if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
            self.kind, self.clears_shard_key = "reset_shard_key", True
            return
        self.kind = "set_shard_key"
        args = body.get("args", ())
        value = _const(args[0]) if len(args) == 1 else None
        if value is None or isinstance(value, bool):
            self.error = f"shardproxy: SET {SHARD_KEY_SETTING} takes one number or string"
        else:
            self.shard_key_value = value

    def _finish(self) -> None:
        """Keys matter only for sharded tables; without full cover none of them decides."""
        if not self.tables or not self.covered:
            self.keys = []
        if self.kind == "write" or (self.tables and self.unkeyed == "error"):
            self.unkeyed = "error"
            self.unkeyed_error = self._needs_key_message()

    def _needs_key_message(self) -> str:
        key = self.settings.key
        hints = {
            "INSERT": f"{key} in its column list with a literal or parameter in every row",
            "MERGE": f"{key} = <value> in its ON condition",
            "COPY": "a shard key",
            "DECLARE": f"{key} = <value> in its query",
        }
        hint = hints.get(self.verb, f"{key} = <value> in its WHERE clause")
        table = self.written or min(self.tables, default="")
        return (
            f"shardproxy: {self.verb} on sharded table {table} needs {hint} "
            f"(or a /* shard_key: ... */ comment, or SET {SHARD_KEY_SETTING})"
        )

    # -- query levels ------------------------------------------------------------------------

    def _level(self, name: str, body: dict[str, Any], ctes: frozenset[str]) -> _Cover:
        """Walk one query level; see the module docstring for when it is covered."""
        scope = _Scope(ctes)
        dml_ctes = self._ctes(body.get("withClause"), scope)
        done = {"withClause"}
        sharded = False
        if name in _DML:
            self.write = True
            sharded = self._relation(body["relation"], scope, written=True)
            done.add("relation")
        if name == "SelectStmt":
            self._select(body, scope)
            done |= {"intoClause", "larg", "rarg", "lockingClause"}
        elif name == "InsertStmt":
            self._insert(body, scope)
            done.add("selectStmt")
        elif name == "MergeStmt":
            self._conjuncts(body.get("joinCondition"), scope.own)
        else:
            self._conjuncts(body.get("whereClause"), scope.own)
        if name == "UpdateStmt" and sharded and self._sets_key(body):
            self.error = (
                f"shardproxy: UPDATE cannot change the shard key {self.settings.key} "
                "(a row cannot move to another shard); delete and insert it instead"
            )
        for field, value in body.items():
            if field not in done:
                self._scan(value, scope)
        children = scope.children
        covered = bool(scope.own) or (not scope.sharded and all(c.covered for c in children))
        covered = covered and all(c.covered for c in dml_ctes)
        keys = scope.own + [ref for c in (*children, *dml_ctes) for ref in c.keys]
        return _Cover(covered, keys)

    def _ctes(self, with_clause: dict[str, Any] | None, scope: _Scope) -> list[_Cover]:
        """Analyse a WITH list into scope; returns the covers of data-modifying CTEs, which run in
        full whatever reads them and so must be covered by keys of their own."""
        if not with_clause:
            return []
        ctes = [item["CommonTableExpr"] for item in with_clause["ctes"]]
        scope.ctes = scope.ctes | {cte["ctename"].lower() for cte in ctes}
        dml_covers: list[_Cover] = []
        for cte in ctes:
            ((name, body),) = cte["ctequery"].items()
            cover = self._level(name, body, scope.ctes)
            (dml_covers if name in _DML else scope.children).append(cover)
        return dml_covers

    def _select(self, body: dict[str, Any], scope: _Scope) -> None:
        if body.get("lockingClause"):
            self.write = True  # FOR UPDATE / SHARE lock rows, which only a primary can
        into = body.get("intoClause")
        if into is not None:
            self.write = True
            self._relation(into["rel"], scope, written=True)
        for side in ("larg", "rarg"):  # the branches of UNION / INTERSECT / EXCEPT
            if side in body:
                scope.children.append(self._level("SelectStmt", body[side], scope.ctes))
        self._conjuncts(body.get("whereClause"), scope.own)

    def _insert(self, body: dict[str, Any], scope: _Scope) -> None:
        columns = [col["ResTarget"]["name"].lower() for col in body.get("cols", ())]
        position = columns.index(self.settings.key) if self.settings.key in columns else None
        select = body.get("selectStmt", {}).get("SelectStmt")
        if select is None:
            return  # DEFAULT VALUES: no key
        rows = select.get("valuesLists")
        if rows:
            refs = [self._value(_item(row["List"]["items"], position)) for row in rows]
            if None not in refs:
                scope.own.extend(ref for ref in refs if ref is not None)
            self._scan(rows, scope)
            return
        cover = self._level("SelectStmt", select, scope.ctes)
        target = _target_at(select, position)
        constant = self._value(target)
        passes_key = position is None or self._is_key_column(target) or _has_star(select)
        values = None if constant is not None else self._values_keys(select, target)
        if cover.covered and constant is not None:
            scope.own.extend([constant, *cover.keys])
        elif cover.covered and values:
            scope.own.extend([*values, *cover.keys])
        elif cover.covered and passes_key:
            scope.own.extend(cover.keys)  # assumes the SELECT passes its key column through
        else:
            scope.children.append(cover)

    def _values_keys(self, select: dict[str, Any], target: dict[str, Any] | None) -> list[KeyRef] | None:
        """The key of every row of ``INSERT ... SELECT v.c[::type], ... FROM (VALUES ...) AS v(c, ...)``, the
        form SQLAlchemy's ORM sends several rows in; None unless each row has a literal or parameter there."""
        cast = target.get("TypeCast") if target else None
        if cast is not None:
            target = cast.get("arg")
        column = target.get("ColumnRef") if target else None
        sources = select.get("fromClause", ())
        if column is None or len(sources) != 1 or "RangeSubselect" not in sources[0]:
            return None
        subquery = sources[0]["RangeSubselect"]
        rows = subquery.get("subquery", {}).get("SelectStmt", {}).get("valuesLists")
        names = [name["String"]["sval"].lower() for name in subquery.get("alias", {}).get("colnames", ())]
        field = column["fields"][-1].get("String")
        if not rows or field is None or field["sval"].lower() not in names:
            return None
        index = names.index(field["sval"].lower())
        found = [self._value(_item(row["List"]["items"], index)) for row in rows]
        refs = [ref for ref in found if ref is not None]
        if len(refs) < len(found):
            return None
        if cast is None:
            return refs
        if "arrayBounds" in cast["typeName"]:
            return None
        return [replace(ref, cast=_CASTS.get(_name(cast["typeName"]["names"]))) for ref in refs if ref is not None]

    def _sets_key(self, body: dict[str, Any]) -> bool:
        return any(
            item["ResTarget"].get("name", "").lower() == self.settings.key
            for item in body.get("targetList", ())
        )

    def _scan(self, value: Any, scope: _Scope) -> None:
        """Walk any part of a level: tables, nested queries, sequence calls, inner-join keys."""
        if isinstance(value, list):
            for item in value:
                self._scan(item, scope)
            return
        if not isinstance(value, dict):
            return
        for name, body in value.items():
            if name in _QUERIES:
                scope.children.append(self._level(name, body, scope.ctes))
            elif name == "RangeVar":
                self._relation(body, scope)
            else:
                if name == "FuncCall" and _name(body["funcname"]) in _SEQUENCE_WRITERS:
                    self.write = True
                elif name == "JoinExpr" and body.get("jointype") == "JOIN_INNER":
                    self._conjuncts(body.get("quals"), scope.own)
                self._scan(body, scope)

    def _relation(self, relation: dict[str, Any], scope: _Scope, written: bool = False) -> bool:
        """Record a table reference; returns whether it is a sharded table."""
        name = relation["relname"].lower()
        schema = relation.get("schemaname", "").lower()
        if not schema and name in scope.ctes:
            return False
        if schema in _CATALOG_SCHEMAS or name.startswith("pg_"):
            return False
        if name in self.settings.strong:
            self.strong = True
        if name in self.settings.reference:
            self.reference = True
            self.writes_reference |= written
            return False
        self.tables.add(name)
        scope.sharded = True
        if written and self.written is None:
            self.written = name
        return True

    # -- keys --------------------------------------------------------------------------------

    def _conjuncts(self, expr: dict[str, Any] | None, out: list[KeyRef]) -> None:
        """Key conditions of expr's top-level AND chain; nothing under OR or NOT counts."""
        if not expr:
            return
        boolean = expr.get("BoolExpr")
        if boolean is not None:
            if boolean["boolop"] == "AND_EXPR":
                for arg in boolean["args"]:
                    self._conjuncts(arg, out)
            return
        operation = expr.get("A_Expr")
        if operation is None or _name(operation["name"]) != "=":
            return
        left, right = operation.get("lexpr"), operation.get("rexpr")
        if operation["kind"] == "AEXPR_IN":
            items = right.get("List", {}).get("items", []) if right else []
            if len(items) == 1 and self._is_key_column(left):
                self._add(self._value(items[0]), out)
        elif operation["kind"] == "AEXPR_OP":
            if self._is_key_column(left):
                self._add(self._value(right), out)
            elif self._is_key_column(right):
                self._add(self._value(left), out)

    @staticmethod
    def _add(ref: KeyRef | None, out: list[KeyRef]) -> None:
        if ref is not None:
            out.append(ref)

    def _is_key_column(self, expr: dict[str, Any] | None) -> bool:
        column = expr.get("ColumnRef") if expr else None
        if column is None:
            return False
        last = column["fields"][-1].get("String")
        return last is not None and last["sval"].lower() == self.settings.key

    def _value(self, expr: dict[str, Any] | None) -> KeyRef | None:
        """A key value expression: a constant, $n, a cast of one, or a negated one."""
        if not expr:
            return None
        if "A_Const" in expr:
            value = _const(expr)
            if value is None or isinstance(value, bool):
                return None
            return KeyRef("value", value=value)
        param = expr.get("ParamRef")
        if param is not None:
            number = param.get("number", 0)
            if self.base is not None and number > self.base:
                return KeyRef("literal", number - self.base - 1)
            return KeyRef("param", number)
        cast = expr.get("TypeCast")
        if cast is not None:
            ref = self._value(cast.get("arg"))
            type_name = cast["typeName"]
            if ref is None or "arrayBounds" in type_name:
                return None
            return replace(ref, cast=_CASTS.get(_name(type_name["names"])))
        operation = expr.get("A_Expr")
        if operation is not None and "lexpr" not in operation and _name(operation["name"]) == "-":
            ref = self._value(operation.get("rexpr"))
            return None if ref is None else replace(ref, negate=not ref.negate)
        return None


def _name(names: list[dict[str, Any]]) -> str:
    """Last part of a qualified name list (function, operator, type), lower-case."""
    last = names[-1].get("String")
    return last["sval"].lower() if last else ""


def _item(items: list[dict[str, Any]], position: int | None) -> dict[str, Any] | None:
    if position is None or position >= len(items):
        return None
    return items[position]


def _target_at(select: dict[str, Any], position: int | None) -> dict[str, Any] | None:
    target = _item(select.get("targetList", []), position)
    return target["ResTarget"].get("val") if target else None


def _has_star(select: dict[str, Any]) -> bool:
    return any(
        "A_Star" in field
        for target in select.get("targetList", ())
        for field in target["ResTarget"].get("val", {}).get("ColumnRef", {}).get("fields", ())
    )


def _concurrent(name: str, body: dict[str, Any]) -> bool:
    if name == "ReindexStmt":
        return any(
            option["DefElem"]["defname"] == "concurrently" and _option_is_true(option["DefElem"])
            for option in body.get("params", ())
        )
    return name in ("IndexStmt", "DropStmt") and bool(body.get("concurrent"))


def _option_is_true(element: dict[str, Any]) -> bool:
    """A boolean option (EXPLAIN (ANALYZE off)); a bare option name means true."""
    if "arg" not in element:
        return True
    return str(_const(element["arg"])).lower() not in _FALSE_WORDS


_CONST_FIELDS: dict[str, Any] = {"ival": 0, "fval": "0", "sval": "", "boolval": False}
_BARE_CONSTS = {"Integer": "ival", "Float": "fval", "String": "sval", "Boolean": "boolval"}


def _const(node: dict[str, Any]) -> Key | bool | None:
    """Value of an A_Const or a bare Integer/Float/String/Boolean node; None for NULL and bit
    strings. The JSON leaves out zero, false and empty values, hence the defaults."""
    const = node.get("A_Const")
    if const is not None:
        for field, default in _CONST_FIELDS.items():
            if field in const:
                return _scalar(field, const[field].get(field, default))
        return None
    for name, field in _BARE_CONSTS.items():
        if name in node:
            return _scalar(field, node[name].get(field, _CONST_FIELDS[field]))
    return None


def _scalar(field: str, value: Any) -> Key | bool:
    return number(value) if field == "fval" else value


# ---------------------------------------------------------------------------------------------
# Routing-time key values


def _resolve(ref: KeyRef, literals: Sequence[object], params: Params | None) -> Key:
    if ref.source == "value":
        raw: object = ref.value
    elif ref.source == "literal":
        if ref.index >= len(literals):
            raise ShardKeyError("shardproxy: the shard key literal is missing")
        raw = literals[ref.index]
    else:
        raw = _param(params, ref.index)
    return canonical(raw, ref.cast, ref.negate)


def _param(params: Params | None, number: int) -> object:
    try:
        if callable(params):
            return params(number)
        if params is not None and number >= 1:
            return params[number - 1]
    except (IndexError, KeyError):
        pass
    raise ShardKeyError(f"shardproxy: no value for shard key parameter ${number}")
