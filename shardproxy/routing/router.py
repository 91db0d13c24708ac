"""Query router: from a statement's text, the session's shard key and the ring, to where it runs.

A pure module (no I/O), so every rule is testable without sockets. Work is split in two:

* ``Router.plan`` / ``Router.plan_simple`` parse a statement once (PostgreSQL's own grammar, through
  pglast) into a ``Plan``: what kind of statement it is, which tables it touches and where its shard
  key comes from. Plans are cached by text; simple-protocol texts are first turned into templates
  (literals become ``$n`` placeholders) so one plan serves every literal value.
* ``Router.route`` resolves a plan's key sources against one execution's literals, parameters and
  session key, and returns a ``Route``: one shard, any shard, every shard, a scatter, or an error.

Each reference to a sharded table (in FROM, a subquery, a CTE at each place it is read, a DML target) is
an *instance*; reference tables, catalogs, functions and VALUES are on every shard and combine with anything.
Only conditions in the top-level AND chain of a WHERE, JOIN ... ON or MERGE ... ON count, and only where they
filter the instance's rows: a WHERE filters its level's instances (and those of its FROM subqueries, through
the columns that pass their key on), an inner join's ON both sides, an outer join's ON its nullable side.

Pinning rule: a statement runs on one shard when every instance is *pinned*: by ``key = <literal | $n>``
(or ``key IN (<one>)``, or for INSERT a literal or parameter in every row), or by ``key = other.key`` (also
``USING (key)``, ``key IN (SELECT key ...)``, or a correlated subquery's ``key = outer.key``) to instances
that are all pinned. Every pinning value must map to the same shard. A data-modifying CTE runs in full
whatever reads it, so only conditions of its own pin it.

Co-location rule (exact or 0A000, never a wrong answer): rows of two sharded instances may be combined on one
shard only when that shard holds every pair that can match. So when not every instance is pinned, all of them
must be *co-located*: linked, transitively, by key equalities anywhere (an outer join's ON and a correlated
subquery's WHERE included). Then a read runs on every shard and is merged (merge.py refuses what it cannot
combine exactly); otherwise the statement is refused with a message that says how to join or key it. A
subquery's column carries its key only when the subquery gives the same rows run per shard: not under LIMIT,
OFFSET, DISTINCT ON, window functions or set operations. A ``/* shard_key */`` comment or the session's key
runs a statement on that key's shard as the client says.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

from pglast import parser as pg_parser

from shardproxy.routing._literals import normalise
from shardproxy.routing.cache import SizedLru
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
Target = Literal["shard", "any", "all", "each", "split", "scatter", "copy", "error", "held"]
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


class KeyHeld(Exception):
    """A key whose rows are moving to another shard (Router.held): its statement waits for the cut-over."""


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
        sharded table reference is not pinned by a key (see the module docstring).
    unkeyed: the target when no key is known: "scatter" (a lone SELECT), "each" (an UPDATE or DELETE that
        ``routing.keyless_writes`` lets run on every shard), "copy" (COPY to or from the client), "any" (EXPLAIN,
        or no sharded table) or "error" (with ``unkeyed_error`` as the message).
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
    replays: every statement is a SET, RESET or SET CONSTRAINTS: inside a transaction on several shards it
        applies on each of them (the data path replays it where the transaction goes next).
    shard_key_value: the value of ``SET shardproxy.shard_key`` (kind "set_shard_key").
    rows: the key of each row of a multi-row ``INSERT ... VALUES`` (or ``INSERT ... SELECT ... FROM (VALUES ...)``)
        whose rows may be split by shard: one statement, no WITH, its target the only sharded table in it.
    copies: a COPY whose data comes from or goes to the client (STDIN, STDOUT): without a key it runs on every
        shard, its rows split or joined by the data path.
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
    replays: bool = False
    shard_key_value: Key | None = None
    rows: tuple[KeyRef, ...] = ()
    copies: bool = False
    # Its one key, when nothing else decides the route: a read or write of sharded tables whose key is a literal
    # or a parameter taken as written (Router.route's shortcut for the usual statement); else None.
    direct: KeyRef | None = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        ref = self.keys[0] if len(self.keys) == 1 else None
        plain = (ref is not None and ref.source != "value" and ref.cast in (None, "int") and not ref.negate
                 and (self.kind == "read" or self.kind == "write") and self.error is None
                 and not self.writes_reference and self.comment_key is None)
        object.__setattr__(self, "direct", ref if plain else None)

    @property
    def scatters(self) -> bool:
        """Whether, given no session key, the plan runs on every shard and merges the results."""
        return self.unkeyed == "scatter" and bool(self.tables) and not self.keys and self.comment_key is None


@dataclass(frozen=True, slots=True)
class Route:
    """Where one execution of a plan goes.

    target: "shard" (``shard`` is the ring index), "any" (one shard, whichever), "all" (every
    target: "shard" (``shard`` is the ring index), "any" (one shard, whichever), "all" (every
    shard's primary, each shard's answer standing for all: DDL, reference-table writes), "each" (every
    shard's primary, each writing its own rows: row counts summed, RETURNING rows of all), "split" (an INSERT's
    rows split by shard: ``rows`` has each row's shard), "scatter" (every shard, results merged), "copy" (a COPY
    on every shard, its rows split or joined), "error" (``message`` starts with ``shardproxy:``; answer with
    SQLSTATE 0A000 and touch nothing) or "held" (rows it writes are moving to another shard, or may be: wait for
    RESHARD's cut-over, then route again).
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
    rows: tuple[int, ...] = ()
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


Term = frozenset[int]  # the relation instances (see _Placement) whose shard key a column's value is


class _Source(NamedTuple):
    """What one FROM item offers the column references that name it (or name no FROM item)."""

    columns: dict[str, Term | None]  # columns known by name: the instances whose key each carries, if any
    opaque: bool  # it may have other columns, of unknown names (a table's, a function's)


_OPAQUE = _Source({}, True)


class _Item(NamedTuple):
    """A FROM item once walked: what an unqualified column may name in it, and the instances in it."""

    bare: list[_Source]
    tree: frozenset[int]


class _Out(NamedTuple):
    """What a query level gives the one that reads it (as a FROM item, CTE or IN list).

    columns: (name, key term) of each output column, a `*` standing for the columns it is known to bring; None
    when its rows are not the same computed on each shard's part (LIMIT, DISTINCT ON, windows, set operations,
    RETURNING), so that no column may be relied on to carry a key.
    star: a `*` leaves the number and order of the columns unknown.
    tree: the instances in its FROM tree, whose rows its output rows are.
    """

    columns: list[tuple[str | None, Term | None]] | None
    star: bool
    tree: frozenset[int]


class _Cte(NamedTuple):
    """A WITH query as defined: walked afresh at each reference, since each one reads its rows anew."""

    kind: str
    body: dict[str, Any]
    outer: _Level | None
    ctes: dict[str, _Cte]
    colnames: list[str]


class _Level:
    """One query level while it is walked: the names its FROM items bind, for the column references in it."""

    __slots__ = ("bare", "ctes", "names", "outer", "tree")

    def __init__(self, outer: _Level | None, ctes: dict[str, _Cte]) -> None:
        self.outer = outer  # the level a correlated reference reaches (of a subquery, LATERAL item or CTE)
        self.ctes = ctes  # WITH queries visible here: a FROM item of such a name is no table
        self.names: dict[str, _Source] = {}  # FROM items by alias (or table name)
        self.bare: list[_Source] = []  # what an unqualified column may name
        self.tree: set[int] = set()  # instances in its FROM tree, whose rows its conditions restrict


class _Placement:
    """Where the rows a statement combines live: the pinning and co-location rules of the module docstring.

    Each sharded table reference is an instance. A condition in a position that filters an instance's rows
    (the WHERE of its level, an inner join's ON, the ON of an outer join for its nullable side) restricts it:
    `key = value` pins it; `key = other.key` makes it follow the other (its rows that matter have the other's
    key). Any key equality, restricting or not (a correlated subquery's, an outer join's), co-locates the two.
    """

    def __init__(self) -> None:
        self.labels: list[str] = []  # per instance: its table and alias, for messages
        self.names: list[str] = []  # per instance: the name its columns are qualified by, for hints
        self.pins: list[KeyRef] = []  # the values that pin some instance: all must be on one shard
        self._parent: list[int] = []  # co-location classes, as a union-find forest
        self._pinned: set[int] = set()
        self._follows: list[tuple[int, Term]] = []

    def add(self, label: str, name: str) -> int:
        self.labels.append(label)
        self.names.append(name)
        self._parent.append(len(self._parent))
        return len(self._parent) - 1

    def seen_as(self, tree: frozenset[int], name: str, label: str | None = None) -> None:
        """The instances of a subquery or WITH reference, as the level reading it names them."""
        for node in tree:
            self.names[node] = name
            if label is not None:
                self.labels[node] = label

    def pin(self, term: Term | None, ref: KeyRef | None, restricted: frozenset[int] | set[int]) -> None:
        """term = ref, where the condition restricts the instances in restricted."""
        hit = term & restricted if term and ref is not None else None
        if hit:
            self._pinned |= hit
            self.pins.append(ref)  # type: ignore[arg-type]

    def equal(self, a: Term, b: Term, restricted: frozenset[int] | set[int]) -> None:
        """a = b, where the condition restricts the instances in restricted."""
        first = next(iter(a))
        for node in a | b:
            self._parent[self._find(node)] = self._find(first)
        self._follows += [(node, b) for node in a & restricted] + [(node, a) for node in b & restricted]

    def pinned(self) -> set[int]:
        """The instances pinned: directly, or by following instances that all are."""
        pinned = set(self._pinned)
        grown = True
        while grown:
            grown = False
            for node, leaders in self._follows:
                if node not in pinned and leaders <= pinned:
                    pinned.add(node)
                    grown = True
        return pinned

    def apart(self) -> tuple[int, int] | None:
        """Two instances of different co-location classes, if there are any."""
        roots: dict[int, int] = {}
        for node in range(len(self.labels)):
            roots.setdefault(self._find(node), node)
        first, *others = roots.values() if roots else (0,)
        return (first, others[0]) if others else None

    def _find(self, node: int) -> int:
        parent = self._parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node


class _Settings(NamedTuple):
    key: str
    reference: frozenset[str]
    strong: frozenset[str]
    keyless_writes: bool  # an UPDATE or DELETE with no key runs on every shard (else it is refused)


class Router:
    """Plans statements (cached) and routes them over the ring built from a config."""

    def __init__(self, config: Any, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """cache_size: plans kept of each kind (by text, by template), within pool.statement_cache_bytes of
        their texts each."""
        self.ring = Ring.from_config(config)
        self.key_column = config.sharding.key.lower()
        self._settings = _Settings(
            self.key_column,
            _table_names(config.sharding.reference_tables),
            _table_names(config.routing.strong_tables),
            config.routing.keyless_writes == "all_shards",
        )
        # Per-instance caches: a reloaded config gets a new Router and so fresh plans.
        memory = config.pool.statement_cache_bytes
        self._plans: SizedLru[str, Plan] = SizedLru(cache_size, memory, len)
        self._templates: SizedLru[tuple[str, int], Plan | None] = SizedLru(cache_size, memory, _template_size)
        # RESHARD's cut-over: whether a key's transactions wait (its rows are moving), or None when none wait.
        # While set, writes to reference tables wait too.
        self.held: Callable[[Key], bool] | None = None
        # Routes are immutable and few (target x kind x shard x flags), so each is built once.
        self._routes: dict[tuple[Target, Kind, int | None, bool, bool], Route] = {}

    def plan(self, sql: str) -> Plan:
        """The plan of an extended-protocol statement text (``$n`` are its parameters)."""
        return self._plans.get(sql, self._plan_text)

    def plan_simple(self, sql: str) -> tuple[Plan, list[int | str]]:
        """The plan of a simple-protocol text and the literal values to route it with.

        Literals become ``$n`` placeholders numbered after the text's highest ``$n``, so texts that
        differ only in literal values share one plan. Texts the normalisation cannot handle safely,
        or whose template does not parse, are planned as written (with no literals).
        """
        normalised = normalise(sql, number)  # the rules: _literals.pyx
        if normalised is None:
            return self._plans.get(sql, self._plan_text), []
        template, base, literals = normalised
        plan = self._templates.get((template, base), self._plan_template) if literals else None
        if plan is None:
            return self._plans.get(sql, self._plan_text), []
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
        direct = plan.direct
        if direct is not None and self.held is None:  # the usual statement: one integer key
            try:
                if direct.source == "literal":
                    raw = literals[direct.index] if direct.index < len(literals) else None
                else:
                    raw = params(direct.index) if callable(params) else None
            except ShardKeyError:
                raw = None  # the full path below says why
            if type(raw) is int:
                return self._made("shard", kind, self.ring.owner_index(raw), kind == "write",
                                  plan.force_primary or plan.strong)
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
            if self.held is not None:  # RESHARD's cut-over: a new shard takes reference rows from a slot
                return self._made("held", kind, None, True, force)
            return self._made("copy" if plan.copies else "all", kind, None, True, force)
        try:
            shard = self._shard(plan, literals, params, session_key)
        except ShardKeyError as exc:
            if plan.rows:
                return self._split(plan, literals, params, force)
            return Route("error", kind, message=str(exc))
        except KeyHeld:
            return self._made("held", kind, None, write, force)
        if shard is not None:
            return self._made("shard", kind, shard, write, force)
        if not plan.tables:
            return self._made("any", kind, None, write, force)
        if plan.unkeyed == "error":
            return Route("error", kind, message=plan.unkeyed_error)
        if write and self.held is not None:  # a write on every shard may touch moving rows: it waits the cut-over
            return self._made("held", kind, None, write, force)
        return self._made(plan.unkeyed, kind, None, write, force)

    def _split(self, plan: Plan, literals: Sequence[object], params: Params | None, force: bool) -> Route:
        """An INSERT whose rows belong to several shards: each row's shard."""
        try:
            rows = tuple(self._owner(_resolve(ref, literals, params)) for ref in plan.rows)
        except ShardKeyError as exc:
            return Route("error", plan.kind, message=str(exc))
        except KeyHeld:
            return self._made("held", plan.kind, None, True, force)
        return Route("split", plan.kind, None, True, force, rows=rows)

    def _route_other(self, plan: Plan, session_key: object) -> Route:
        """Transaction control, session statements and utilities: the session's server, except that
        a utility (CALL, DO, ...) given a key by comment or session goes to that key's shard."""
        kind = plan.kind
        if kind == "utility":
            try:
                shard = self._explicit_shard(plan.comment_key, session_key)
            except ShardKeyError as exc:
                return Route("error", kind, message=str(exc))
            except KeyHeld:
                return self._made("held", kind, None, True, plan.force_primary)
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
        shard = self._owner(first_key)
        for ref in plan.keys[1:]:
            key = _resolve(ref, literals, params)
            other = self.ring.owner_index(key)
            if other != shard:
                raise ShardKeyError(self._conflict(plan, first_key, shard, key, other))
        return shard

    def _explicit_shard(self, comment_key: str | None, session_key: object) -> int | None:
        key = comment_key if comment_key is not None else session_key
        return None if key is None else self._owner(canonical(key, None, False))

    def _owner(self, key: Key) -> int:
        """The ring index of the key's shard; raises KeyHeld while its rows move to another shard."""
        if self.held is not None and self.held(key):
            raise KeyHeld(key)
        return self.ring.owner_index(key)

    def _conflict(self, plan: Plan, key: Key, shard: int, other_key: Key, other: int) -> str:
        names = self.ring.names
        where = f"{self.key_column} {key!s} is on {names[shard]}, {other_key!s} on {names[other]}"
        if plan.verb == "INSERT":
            return (f"shardproxy: INSERT rows belong to different shards ({where}); an INSERT is split by shard only "
                    "when its target is the only sharded table in it and it has no WITH: send one INSERT per shard")
        return f"shardproxy: {plan.verb or 'the query'} has shard keys on different shards ({where})"

    def _plan_text(self, sql: str) -> Plan:
        try:
            stmts = _parse(sql)
        except pg_parser.ParseError:
            # The server reports the syntax error (the text may also be newer than this parser).
            return Plan("utility", **_comments(sql))
        return _analyse(sql, stmts, self._settings, None)

    def _plan_template(self, key: tuple[str, int]) -> Plan | None:
        """The shared plan of a normalised text, or None when it must be planned as written: it
        does not parse, has a statement outside _TEMPLATE_SAFE, or a placeholder took the place of
        a column position (ORDER BY 1). The key: the template and the number its placeholders start after."""
        template, base = key
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


def _template_size(key: tuple[str, int]) -> int:
    return len(key[0])


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
            unkeyed_error = next((a.unkeyed_error for a in analyses if a.apart), None) or (
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
        replays=all(a.replays for a in analyses),
        shard_key_value=main.shard_key_value,
        rows=_split_rows(analyses),
        copies=any(a.copies for a in analyses),
        **hints,
    )


def _split_rows(analyses: list[_Analysis]) -> tuple[KeyRef, ...]:
    """The keys of an INSERT's rows, if it may be split by shard: one INSERT (not under EXPLAIN), its target the
    only sharded table in it."""
    if len(analyses) != 1 or analyses[0].verb != "INSERT" or len(analyses[0].placement.labels) != 1:
        return ()
    return tuple(analyses[0].rows)


class _TooLarge(Exception):
    """A statement with more query levels (WITH references included) than the router walks."""


_MAX_LEVELS = 1000
# Fields of a level that its walk visits in its own way; the others are expressions, scanned for subqueries.
_SELECT_PARTS = frozenset({"withClause", "fromClause", "whereClause", "larg", "rarg", "intoClause", "lockingClause"})
_DML_PARTS = frozenset({"withClause", "relation", "fromClause", "usingClause", "whereClause"})
_INSERT_PARTS = frozenset({"withClause", "relation", "selectStmt", "cols"})
_MERGE_PARTS = frozenset({"withClause", "relation", "sourceRelation", "joinCondition"})


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
        self.covered = True  # every sharded table reference is pinned by a key
        self.keys: list[KeyRef] = []
        self.apart: tuple[int, int] | None = None  # two references whose rows may not be combined on a shard
        self.placement = _Placement()
        self.unkeyed: Target = "any"
        self.unkeyed_error: str | None = None
        self.error: str | None = None
        self.read_only = False
        self.isolation: str | None = None
        self.concurrently = False
        self.clears_shard_key = False
        self.replays = False
        self.shard_key_value: Key | None = None
        self.copies = False
        self._handled: set[int] = set()  # IN subqueries walked as key conditions, by id
        self._expanding: set[int] = set()  # WITH queries being walked, by id: a reference inside is recursion
        self._levels = 0
        self._written_node: int | None = None  # the instance of the table written, if sharded
        self.unkeyed_write = False  # that instance is not pinned by a key
        self.rows: list[KeyRef] = []  # each row's key, of an INSERT whose rows may go to several shards

    # -- statements --------------------------------------------------------------------------

    def statement(self, name: str, body: dict[str, Any]) -> None:
        try:
            self._statement(name, body)
        except (_TooLarge, RecursionError):  # WITH queries referenced over and over, or nested too deep
            self.error = "shardproxy: the statement has too many, or too deeply nested, query levels to route"

    def _statement(self, name: str, body: dict[str, Any]) -> None:
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
            self.replays = name == "ConstraintsSetStmt"
        elif name in _DDL or name.startswith(_DDL_PREFIXES):
            self.kind = "ddl"
            self.concurrently = _concurrent(name, body)
        if self.kind in ("read", "write"):
            self._finish()

    def _query(self, name: str, body: dict[str, Any]) -> None:
        self._level(name, body, None, {})
        if name != "InsertStmt" or "withClause" in body:
            self.rows = []  # a data-modifying WITH query's rows are not the statement's
        self._place()
        self.kind = "write" if self.write else "read"
        self.verb = _VERBS[name]
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
        self._statement(name, inner)
        if not analyze:
            self.kind = "read"  # nothing is executed
        if self.kind == "read":
            self.unkeyed = "any"  # a plan from any shard shows how each one runs the query
            self.apart, self.unkeyed_write = None, False
        self.verb = "EXPLAIN"

    def _copy(self, body: dict[str, Any]) -> None:
        """COPY from or to the client runs on every shard without a key (the data path splits or joins its rows);
        COPY of a server's file or program needs a key."""
        self.copies = "filename" not in body and not body.get("is_program")
        if "query" in body:
            self._query_of("COPY", body["query"])
        else:
            writes = bool(body.get("is_from"))
            self._table(body["relation"], _Level(None, {}), written=writes)
            self.kind, self.verb = ("write" if writes else "read"), "COPY"
            self._place()
        self.unkeyed = "copy" if self.copies else "error"

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
        self.replays = True
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

    def _place(self) -> None:
        """The pinning and co-location rules (module docstring) over the references walked. A write whose
        own table is not pinned is told it needs a key, which it does first."""
        placement = self.placement
        pinned = placement.pinned()
        self.covered = len(pinned) == len(placement.labels)
        self.keys = placement.pins if self.covered else []
        self.unkeyed_write = self._written_node is not None and self._written_node not in pinned
        self.apart = None if self.covered else placement.apart()

    def _finish(self) -> None:
        """Keys matter only for sharded tables; unless every reference is pinned none of them decides. A write
        whose own table has no key is told it needs one first, unless it may run on every shard: an UPDATE or
        DELETE whose rows combine only on equal keys, so that each shard's part is exact."""
        if not self.tables or not self.covered:
            self.keys = []
        each = self.unkeyed_write and self.settings.keyless_writes and self.verb in ("UPDATE", "DELETE")
        if self.unkeyed_write and not each and not self.copies:
            self.unkeyed, self.unkeyed_error = "error", self._needs_key_message()
        elif self.apart is not None:
            self.unkeyed, self.unkeyed_error = "error", self._apart_message(*self.apart)
        elif each:
            self.unkeyed = "each"
        elif self.kind == "write" and not self.copies or (self.tables and self.unkeyed == "error"):
            self.unkeyed = "error"
            self.unkeyed_error = self._needs_key_message()

    def _apart_message(self, first: int, second: int) -> str:
        placement, key = self.placement, self.settings.key
        a, b = placement.labels[first], placement.labels[second]
        hint = f"{placement.names[first]}.{key} = {placement.names[second]}.{key}"
        return (
            f"shardproxy: {self.verb} combines rows of {a} and {b}, which can be on different shards; join "
            f"them on the shard key ({hint}), hold both to {key} = <value> on one shard, or name the shard "
            "with a /* shard_key: ... */ comment"
        )

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

    def _level(self, name: str, body: dict[str, Any], outer: _Level | None, ctes: dict[str, _Cte]) -> _Out:
        """Walk one query level: a statement, a subquery, a WITH query or a branch of a set operation."""
        self._levels += 1
        if self._levels > _MAX_LEVELS:
            raise _TooLarge  # each reference walks its WITH query: nested references would take exponential time
        level = _Level(outer, ctes)
        self._with(body.get("withClause"), level)
        if name == "SelectStmt":
            return self._select(body, level)
        self.write = True
        if name == "InsertStmt":
            self._insert(body, level)
        elif name == "UpdateStmt":
            self._update(body, level)
        elif name == "DeleteStmt":
            self._target(body["relation"], level)
            self._from_items(body.get("usingClause", ()), level)
            self._conditions(body.get("whereClause"), level, level.tree)
            self._scan_rest(body, level, _DML_PARTS)
        else:
            self._merge(body, level)
        return _Out(None, False, frozenset())  # RETURNING rows: nothing joins on them

    def _with(self, with_clause: dict[str, Any] | None, level: _Level) -> None:
        """Define a WITH list's queries for level. Data-modifying ones run once, in full, whatever reads
        them, so they are walked here, and must be pinned by keys of their own."""
        if not with_clause:
            return
        ctes = dict(level.ctes)
        for item in with_clause["ctes"]:
            cte = item["CommonTableExpr"]
            ((kind, body),) = cte["ctequery"].items()
            visible = ctes if with_clause.get("recursive") else dict(ctes)
            colnames = [name["String"]["sval"] for name in cte.get("aliascolnames", ())]
            ctes[cte["ctename"].lower()] = _Cte(kind, body, level.outer, visible, colnames)
            if kind in _DML:
                self._level(kind, body, level.outer, visible)
        level.ctes = ctes

    def _select(self, body: dict[str, Any], level: _Level) -> _Out:
        if body.get("lockingClause"):
            self.write = True  # FOR UPDATE / SHARE lock rows, which only a primary can
        into = body.get("intoClause")
        if into is not None:
            self.write = True
            self._relation(into["rel"], written=True)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":  # UNION / INTERSECT / EXCEPT
            for side in ("larg", "rarg"):
                self._level("SelectStmt", body[side], level.outer, level.ctes)
            self._scan_rest(body, level, _SELECT_PARTS)
            return _Out(None, False, frozenset())
        self._from_items(body.get("fromClause", ()), level)
        self._conditions(body.get("whereClause"), level, level.tree)
        self._scan_rest(body, level, _SELECT_PARTS)
        return self._output(body, level)

    def _update(self, body: dict[str, Any], level: _Level) -> None:
        target = self._target(body["relation"], level)
        if target.tree and self._sets_key(body):
            self.error = (
                f"shardproxy: UPDATE cannot change the shard key {self.settings.key} "
                "(a row cannot move to another shard); delete and insert it instead"
            )
        self._from_items(body.get("fromClause", ()), level)
        self._conditions(body.get("whereClause"), level, level.tree)
        self._scan_rest(body, level, _DML_PARTS)

    def _merge(self, body: dict[str, Any], level: _Level) -> None:
        """MERGE joins its target to its source on the ON condition, which filters the target's rows unless
        WHEN NOT MATCHED BY SOURCE acts on the others, and the source's unless WHEN NOT MATCHED does."""
        target = self._target(body["relation"], level)
        source = self._from_items([body["sourceRelation"]], level)
        kinds = {clause["MergeWhenClause"]["matchKind"] for clause in body.get("mergeWhenClauses", ())}
        restricted: set[int] = set()
        if "MERGE_WHEN_NOT_MATCHED_BY_SOURCE" not in kinds:
            restricted |= target.tree
        if "MERGE_WHEN_NOT_MATCHED_BY_TARGET" not in kinds:
            restricted |= source.tree
        self._conditions(body.get("joinCondition"), level, restricted)
        self._scan_rest(body, level, _MERGE_PARTS)

    def _insert(self, body: dict[str, Any], level: _Level) -> None:
        target = self._target(body["relation"], level)
        level.names["excluded"] = _Source({self.settings.key: target.tree or None}, True)  # ON CONFLICT's row
        self._inserted(body, level, target.tree)
        self._scan_rest(body, level, _INSERT_PARTS)

    def _inserted(self, body: dict[str, Any], level: _Level, target: frozenset[int]) -> None:
        """Where the inserted rows' keys come from: literals or parameters pin the target; a column of the
        SELECT that carries a key makes the target follow it."""
        columns = [col["ResTarget"]["name"].lower() for col in body.get("cols", ())]
        position = columns.index(self.settings.key) if self.settings.key in columns else None
        select = body.get("selectStmt", {}).get("SelectStmt")
        if select is None:
            return  # DEFAULT VALUES: no key
        rows = select.get("valuesLists")
        if rows:
            refs = [self._value(_item(row["List"]["items"], position)) for row in rows]
            keyed = [ref for ref in refs if ref is not None]
            if len(keyed) == len(refs):
                self.rows = keyed
                for ref in keyed:
                    self.placement.pin(target, ref, target)
            self._scan(rows, level)
            return
        out = self._level("SelectStmt", select, level.outer, level.ctes)
        value = _target_at(select, position)
        constant = self._value(value)
        given = [constant] if constant is not None else self._values_keys(select, value)
        if given and constant is None:
            self.rows = given
        if given:
            for ref in given:
                self.placement.pin(target, ref, target)
            return
        term = _inserted_key(out, position, self.settings.key)
        if target and term:
            self.placement.equal(target, term, target)

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

    def _output(self, body: dict[str, Any], level: _Level) -> _Out:
        """A SELECT level's output columns and the keys they carry (see _Out)."""
        tree = frozenset(level.tree)
        if not _same_per_shard(body):
            return _Out(None, False, tree)
        if "valuesLists" in body:
            width = len(body["valuesLists"][0]["List"]["items"])
            return _Out([(f"column{i + 1}", None) for i in range(width)], False, tree)
        columns: list[tuple[str | None, Term | None]] = []
        star = False
        for target in body.get("targetList", ()):
            result = target["ResTarget"]
            value = result.get("val", {})
            fields = value.get("ColumnRef", {}).get("fields")
            if fields and "A_Star" in fields[-1]:
                star = True
                columns += self._star(fields, level).columns.items()
            else:
                name = result.get("name") or _column_name(value)
                columns.append((name and self._canonical(name), self._term(value, level)))
        return _Out(columns, star, tree)

    def _source(self, out: _Out, colnames: list[str]) -> _Source:
        """What a FROM item reading out offers, its columns renamed to colnames (AS alias(colnames))."""
        columns = out.columns
        if columns is None or (colnames and out.star):
            return _OPAQUE
        if colnames:
            renamed = [(self._canonical(name), term) for name, (_, term) in zip(colnames, columns)]
            columns = renamed + columns[len(colnames) :]
        known: dict[str, Term | None] = {}
        for name, term in columns:
            if name is not None:
                known[name] = None if name in known else term  # a name twice is ambiguous
        return _Source(known, out.star)

    # -- FROM items --------------------------------------------------------------------------

    def _target(self, relation: dict[str, Any], level: _Level) -> _Item:
        """The table a DML statement writes (never a WITH query of that name)."""
        item = self._table(relation, level, written=True)
        level.bare += item.bare
        return item

    def _from_items(self, items: Iterable[dict[str, Any]], level: _Level) -> _Item:
        """Walk a FROM list into level, item after item (a LATERAL item sees those before it)."""
        bare: list[_Source] = []
        tree: frozenset[int] = frozenset()
        for node in items:
            item = self._from_item(node, level)
            level.bare += item.bare
            bare += item.bare
            tree |= item.tree
        return _Item(bare, tree)

    def _from_item(self, node: dict[str, Any], level: _Level) -> _Item:
        ((kind, body),) = node.items()
        if kind == "RangeVar":
            return self._table(body, level)
        if kind == "JoinExpr":
            return self._join(body, level)
        if kind == "RangeSubselect":
            ((name, query),) = body["subquery"].items()
            out = self._level(name, query, level if body.get("lateral") else level.outer, level.ctes)
            alias = body.get("alias", {})
            if "aliasname" in alias:
                self.placement.seen_as(out.tree, alias["aliasname"])
            return self._bind(level, alias.get("aliasname"), self._source(out, _colnames(alias)), out.tree)
        if kind == "RangeTableSample":
            self._scan(body.get("args"), level)
            return self._table(body["relation"]["RangeVar"], level)
        # Functions, XMLTABLE, JSON_TABLE: rows of no table, from arguments that may read some.
        self._scan(body, level)
        return self._bind(level, body.get("alias", {}).get("aliasname"), _OPAQUE, frozenset())

    def _table(self, relation: dict[str, Any], level: _Level, written: bool = False) -> _Item:
        """A table (or WITH query) reference; a sharded table becomes an instance."""
        name = relation["relname"].lower()
        alias = relation.get("alias", {})
        visible = alias.get("aliasname") or relation["relname"]
        label = name if visible == relation["relname"] else f"{name} {visible}"
        cte = None if written or "schemaname" in relation else level.ctes.get(name)
        if cte is not None:
            return self._cte(cte, level, (visible, label), _colnames(alias) or cte.colnames)
        if not self._relation(relation, written):
            return self._bind(level, visible, _OPAQUE, frozenset())
        node = self.placement.add(label, visible)
        if written and self._written_node is None:
            self._written_node = node
        # Column aliases rename the table's columns in order: which one is then the key is unknown.
        columns: dict[str, Term | None] = {} if "colnames" in alias else {self.settings.key: frozenset({node})}
        return self._bind(level, visible, _Source(columns, True), frozenset({node}))

    def _cte(self, cte: _Cte, level: _Level, names: tuple[str, str], colnames: list[str]) -> _Item:
        """A reference to a WITH query: its rows are read anew, so its tables are new instances."""
        visible, label = names
        if cte.kind in _DML or id(cte) in self._expanding:  # a data-modifying one, or recursion
            return self._bind(level, visible, _OPAQUE, frozenset())
        self._expanding.add(id(cte))
        out = self._level(cte.kind, cte.body, cte.outer, cte.ctes)
        self._expanding.discard(id(cte))
        self.placement.seen_as(out.tree, visible, label)
        return self._bind(level, visible, self._source(out, colnames), out.tree)

    def _bind(self, level: _Level, name: str | None, source: _Source, tree: frozenset[int]) -> _Item:
        if name:
            level.names[name] = source
        level.tree |= tree
        return _Item([source], tree)

    def _join(self, join: dict[str, Any], level: _Level) -> _Item:
        """JOIN: its ON condition restricts the instances of the sides it filters (both for an inner join,
        the nullable side of an outer one); USING (key) makes the sides' keys equal and one column."""
        mark = len(level.bare)
        left = self._from_item(join["larg"], level)
        level.bare += left.bare  # what a LATERAL item on the right sees
        right = self._from_item(join["rarg"], level)
        kind = join.get("jointype")
        restricted = (left.tree if kind in ("JOIN_INNER", "JOIN_RIGHT") else frozenset()) | (
            right.tree if kind in ("JOIN_INNER", "JOIN_LEFT") else frozenset()
        )
        bare = left.bare + right.bare
        using = [self._canonical(name["String"]["sval"]) for name in join.get("usingClause", ())]
        if using:  # each USING column is one column, equal on both sides, that hides theirs
            merged: dict[str, Term | None] = {}
            for name in using:
                terms = [term for term in (_bare(left.bare, name), _bare(right.bare, name)) if term]
                if len(terms) == 2:
                    self.placement.equal(terms[0], terms[1], restricted)
                merged[name] = frozenset().union(*terms) or None
            hidden = [_Source({k: v for k, v in s.columns.items() if k not in merged}, s.opaque) for s in bare]
            bare = [_Source(merged, False), *hidden]
        level.bare[mark:] = bare  # what the ON condition sees
        self._conditions(join.get("quals"), level, restricted)
        del level.bare[mark:]
        if "alias" in join:
            level.names[join["alias"]["aliasname"]] = _star_of(bare)
        return _Item(bare, left.tree | right.tree)

    # -- conditions --------------------------------------------------------------------------

    def _conditions(self, expr: dict[str, Any] | None, level: _Level, restricted: frozenset[int] | set[int]) -> None:
        """A WHERE or ON condition that filters the rows of the instances in restricted."""
        self._conjuncts(expr, level, restricted)
        self._scan(expr, level)

    def _conjuncts(self, expr: dict[str, Any] | None, level: _Level, restricted: frozenset[int] | set[int]) -> None:
        """Key conditions of expr's top-level AND chain (nothing under OR or NOT counts): key = value,
        key = key, key IN (value) and key IN (subquery)."""
        if not expr:
            return
        boolean = expr.get("BoolExpr")
        if boolean is not None:
            if boolean["boolop"] == "AND_EXPR":
                for arg in boolean["args"]:
                    self._conjuncts(arg, level, restricted)
            return
        if "SubLink" in expr:
            self._in_subquery(expr["SubLink"], level, restricted)
            return
        operation = expr.get("A_Expr")
        if operation is None or _name(operation["name"]) != "=":
            return
        left, right = operation.get("lexpr"), operation.get("rexpr")
        placement = self.placement
        if operation["kind"] == "AEXPR_IN":
            items = right.get("List", {}).get("items", []) if right else []
            if len(items) == 1:
                placement.pin(self._term(left, level), self._value(items[0]), restricted)
        elif operation["kind"] == "AEXPR_OP":
            left_term, right_term = self._term(left, level), self._term(right, level)
            if left_term and right_term:
                placement.equal(left_term, right_term, restricted)
            elif left_term:
                placement.pin(left_term, self._value(right), restricted)
            elif right_term:
                placement.pin(right_term, self._value(left), restricted)

    def _in_subquery(self, link: dict[str, Any], level: _Level, restricted: frozenset[int] | set[int]) -> None:
        """key IN (SELECT key ...): a semi-join on the key, which keeps rows of both sides with equal keys."""
        operator = _name(link["operName"]) if "operName" in link else "="
        term = self._term(link.get("testexpr"), level)
        if link["subLinkType"] != "ANY_SUBLINK" or operator != "=" or term is None:
            return
        self._handled.add(id(link))
        ((name, body),) = link["subselect"].items()
        out = self._level(name, body, level, level.ctes)
        first = out.columns[0][1] if out.columns and not out.star else None
        if first:
            self.placement.equal(term, first, set(restricted) | out.tree)

    # -- column references -------------------------------------------------------------------

    def _term(self, expr: dict[str, Any] | None, level: _Level) -> Term | None:
        """The instances whose key a column reference is, if it is one that carries a key."""
        column = expr.get("ColumnRef") if expr else None
        last = column["fields"][-1].get("String") if column else None
        if column is None or last is None:
            return None
        fields = column["fields"]
        name = self._canonical(last["sval"])
        if len(fields) == 1:
            return _bare_term(level, name)
        qualifier = fields[-2].get("String", {}).get("sval")
        scope: _Level | None = level
        while scope is not None:
            if qualifier in scope.names:
                return scope.names[qualifier].columns.get(name)
            scope = scope.outer
        return None

    def _canonical(self, name: str) -> str:
        """A column name as compared: the key column in any spelling (as routing always read it), others as
        PostgreSQL compares them."""
        return self.settings.key if name.lower() == self.settings.key else name

    @staticmethod
    def _star(fields: list[dict[str, Any]], level: _Level) -> _Source:
        """The columns `*` (or `alias.*`) is known to stand for."""
        if len(fields) == 1:
            return _star_of(level.bare)
        return level.names.get(fields[-2].get("String", {}).get("sval"), _OPAQUE)

    # -- anything else -----------------------------------------------------------------------

    def _scan_rest(self, body: dict[str, Any], level: _Level, done: frozenset[str]) -> None:
        for field, value in body.items():
            if field not in done:
                self._scan(value, level)

    def _scan(self, value: Any, level: _Level) -> None:
        """Walk expressions: their subqueries (levels of their own, whose correlated references reach this
        one) and sequence calls."""
        if isinstance(value, list):
            for item in value:
                self._scan(item, level)
            return
        if not isinstance(value, dict):
            return
        for name, body in value.items():
            if name in _QUERIES:
                self._level(name, body, level, level.ctes)
            elif name == "RangeVar":  # not expected outside FROM, but a table is never overlooked
                self._table(body, level)
            elif name != "SubLink" or id(body) not in self._handled:
                if name == "FuncCall" and _name(body["funcname"]) in _SEQUENCE_WRITERS:
                    self.write = True
                self._scan(body, level)

    def _relation(self, relation: dict[str, Any], written: bool = False) -> bool:
        """Record a table reference; returns whether it is a sharded table."""
        name = relation["relname"].lower()
        schema = relation.get("schemaname", "").lower()
        if schema in _CATALOG_SCHEMAS or name.startswith("pg_"):
            return False
        if name in self.settings.strong:
            self.strong = True
        if name in self.settings.reference:
            self.reference = True
            self.writes_reference |= written
            return False
        self.tables.add(name)
        if written and self.written is None:
            self.written = name
        return True

    # -- keys --------------------------------------------------------------------------------

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


def _inserted_key(out: _Out, position: int | None, key: str) -> Term | None:
    """The key of the SELECT column an INSERT puts in its key column; by name when its position is unknown."""
    if out.columns is None:
        return None
    if position is None or out.star:
        keyed = [term for name, term in out.columns if name == key]
        return keyed[0] if len(keyed) == 1 else None
    return out.columns[position][1] if position < len(out.columns) else None


def _same_per_shard(select: dict[str, Any]) -> bool:
    """Whether a SELECT level run on each shard's part of its rows gives, together, what it gives over all of
    them, so that its output rows are where their key says: not with LIMIT/OFFSET, DISTINCT ON, a window or
    grouping sets (whose total rows each shard would have)."""
    return not (
        "limitCount" in select
        or "limitOffset" in select
        or any(select.get("distinctClause", ()))
        or "windowClause" in select
        or _has_window(select.get("targetList"))
        or any("GroupingSet" in item for item in select.get("groupClause", ()))
    )


def _has_window(value: Any) -> bool:
    """Whether an expression (not its subqueries) calls a window function."""
    if isinstance(value, list):
        return any(_has_window(item) for item in value)
    if not isinstance(value, dict):
        return False
    return any(
        (name == "FuncCall" and "over" in body) or (name != "SubLink" and _has_window(body))
        for name, body in value.items()
    )


def _column_name(expr: dict[str, Any]) -> str | None:
    """The output name PostgreSQL gives a column reference, also cast; None for other expressions."""
    cast = expr.get("TypeCast")
    if cast is not None:
        return _column_name(cast.get("arg", {}))
    fields = expr.get("ColumnRef", {}).get("fields")
    last = fields[-1].get("String") if fields else None
    return last["sval"] if last else None


def _colnames(alias: dict[str, Any]) -> list[str]:
    return [name["String"]["sval"] for name in alias.get("colnames", ())]


def _bare(candidates: list[_Source], name: str) -> Term | None:
    """The key an unqualified column is among these FROM items: that of the only one known to carry a key
    under that name (had another such a column, PostgreSQL would call the reference ambiguous)."""
    keyed = [source.columns[name] for source in candidates if source.columns.get(name)]
    return keyed[0] if len(keyed) == 1 else None


def _bare_term(level: _Level, name: str) -> Term | None:
    """An unqualified column, looked up as PostgreSQL does: among the FROM items of the nearest level that
    may have it (an item of unknown columns at a level leaves it unknown, as it may be that item's)."""
    scope: _Level | None = level
    while scope is not None:
        if any(name in source.columns or source.opaque for source in scope.bare):
            return _bare(scope.bare, name)
        scope = scope.outer
    return None


def _star_of(candidates: list[_Source]) -> _Source:
    """What `*` over these FROM items (or an alias of their join) is known to bring."""
    names = {name for source in candidates for name in source.columns}
    opaque = any(source.opaque for source in candidates)
    return _Source({name: _bare(candidates, name) for name in names}, opaque)


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
