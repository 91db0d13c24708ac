"""Where a client's statements run, in sharded configurations: the routing half of a client connection.

A batch (a simple Query, or extended-protocol messages up to Sync) is routed by the router's pure decision for its
deciding statement (its first Bind that names a shard, or every shard); every other Bind of the batch is checked as
it is forwarded. A transaction holds one server connection, a leg, per shard it touched (transaction.py); the
client forwards to one of them, the active leg, and the others wait. When a statement needs another server
connection, forwarding stops before it; once the active leg has answered everything it was sent (`_drained`), the
client moves on: to another leg, to the pool for the next transaction, or to the end of the transaction on every
leg. A statement that names no shard runs where the client is, so it never decides where the transaction goes.

The states (columns), and what each kind of statement (rows) does in them; s is the shard a statement names:

| statement             | no transaction              | BEGIN held, no leg yet | legs (one is active)            |
|-----------------------|-----------------------------|------------------------|---------------------------------|
| BEGIN                 | simple: held, answered here | runs with the first    | runs on the active leg          |
|                       | extended: runs where it is  | statement              |                                 |
| names shard s         | runs on s; the connection   | joins s                | runs on s: s becomes the active |
|                       | goes back once it is over   |                        | leg (joining it if new)         |
| names no shard        | runs on the home shard      | joins the home shard   | runs on the active leg          |
| SET, SAVEPOINT,       | runs where it goes          | held with BEGIN        | runs on the active leg; logged  |
| RELEASE, ROLLBACK TO  |                             |                        | for the others' next use        |
| COMMIT, ROLLBACK      | PostgreSQL's warning        | answered here          | one leg: runs there; several:   |
|                       |                             |                        | ended on each by the proxy      |
|                       |                             |                        | (two phases if two wrote)       |
| a Bind for shard s in | the batch goes on on s; its | -                      | the batch goes on on s          |
| a batch on another    | implicit transaction spans  |                        |                                 |
|                       | both, ended at its Sync     |                        |                                 |
| on several shards     | fanout/ (writes all or      | fanout/, on a leg on   | fanout/, on the legs it needs   |
| (scatter, DDL, split  | nothing, in two phases)     | each shard it needs    | (joining those it lacks)        |
| INSERT, keyless write)|                             |                        |                                 |

After an error a leg's transaction is aborted: every statement goes to that leg, which answers as PostgreSQL does,
until the transaction ends. `routing.cross_shard_transactions: refuse` keeps a transaction on the first shard it
named: a statement for a second one gets 0A000 (legs that ran only statements naming no shard do not count).
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from shardproxy.cluster.topology import NodeState, parse_lsn
from shardproxy.config import Config
from shardproxy.datapath import fanout
from shardproxy.datapath._core import (
    ClientCore,
    batch_end,
    bind_parameter,
    bind_statement,
    named3,
    named4,
    text,
    well_formed,
)
from shardproxy.datapath.fanout import copy
from shardproxy.datapath.fanout.legs import Leg
from shardproxy.datapath.pending import HIDDEN_QUERY, Action, Kind, Request
from shardproxy.datapath.transaction import Transaction, committed_at, reply, statement_messages
from shardproxy.routing.keys import decode_key
from shardproxy.routing.router import Decision, Router
from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend, Frontend

if TYPE_CHECKING:
    from shardproxy.datapath.pool import Pool, Pools
    from shardproxy.datapath.server import ServerConnection
    from shardproxy.datapath.statements import Statement

log = logging.getLogger("shardproxy.client")  # the client connection's half: it logs as the client

_UNPACK = pg.INT32.unpack_from
_COMMIT_LSN = pg.query("SELECT pg_current_wal_insert_lsn()")
_SET_DONE = Request(Kind.QUERY, Action.SYNTH, pg.command_complete("SET"))
_RESET_DONE = Request(Kind.QUERY, Action.SYNTH, pg.command_complete("RESET"))
_BEGIN_BODY = b"BEGIN\0\0\0"  # a Parse's body: the text and no parameter types
_BEGIN = pg.query("BEGIN")
_HIDDEN_SYNC = Request(Kind.SYNC, Action.HIDE)
_HIDDEN_BIND = Request(Kind.BIND, Action.HIDE)
_HIDDEN_EXECUTE = Request(Kind.EXECUTE, Action.HIDE)
_EXECUTE_UNNAMED = pg.message(b"E", b"\0\0\0\0\0")
_ENDS = frozenset({"commit", "rollback"})
_EVERY_SHARD = frozenset({"scatter", "all", "each", "split", "copy"})  # route targets run on several shards by fanout/
_LOGGED = frozenset({"savepoint", "release", "rollback_to"})  # besides SET and friends (Plan.replays)
_PLAIN = frozenset({"read", "write"})


class PlacementHost(Protocol):
    """What routing needs of the proxy."""

    config: Config
    router: Router
    any_decision: Decision  # for batches that name no statement
    pools: Pools
    copy_columns: copy.Columns  # what COPY learnt of tables' columns

    async def wait_for_primary(self, shard: str, timeout: float) -> NodeState | None: ...
    async def cutover_passed(self) -> None: ...  # returns once RESHARD holds no key (router.held is None)
    def client_error(self, error: pg.PostgresError) -> None: ...  # counts an error the proxy sent a client
    def transaction_ended(self, two_phase: bool) -> None: ...
    def two_phase_took(self, seconds: float) -> None: ...
    def rows_copied(self, shard: str, rows: int) -> None: ...


class BatchRoute(NamedTuple):
    """The routing of one batch: a Query, or extended-protocol messages up to Sync."""

    decision: Decision
    end: int  # where the batch ends
    decider: int  # where its deciding message is
    standalone: bool  # it is one simple Query


class HereVerdict(NamedTuple):
    """What a linked connection does with the batch at hand (read by the compiled loop, ClientCore._forward)."""

    next_batch: int  # where the next batch starts, or -1: not known yet
    decider: int  # the position of its deciding message, or -1
    refuse: int  # the position of a statement to refuse (or answer locally), or -1
    go: bool  # the batch may run here at all


class Verdict(Enum):
    """What a statement met on the active leg does."""

    GO = "go"  # it runs there
    STOP = "stop"  # forwarding stops before it; once the leg is drained, it goes where it must (_drained)
    REFUSE = "refuse"  # the server raises the refusal, which aborts the transaction there


_GO, _STOP, _REFUSE = Verdict.GO, Verdict.STOP, Verdict.REFUSE  # module globals: read faster than Verdict.GO
_RUNS_HERE = HereVerdict(-1, -1, -1, True)
_STOPS_HERE = HereVerdict(-1, -1, -1, False)


class Placement:
    """Mixed into ClientConnection (before its ClientSession, whose hooks it fills in), whose buffer, server link,
    pool and proxy it uses."""

    proxy: PlacementHost

    def init_placement(self, sharded: bool) -> None:
        self.routes = sharded  # whether this connection's statements are routed one by one
        self.home = 0  # the shard for statements that name none: the last one used (set at login)
        self.shard = -1  # the active leg's shard
        self.on_primary = False  # whether the active leg is its shard's primary
        self.session_key: object = None  # SET shardproxy.shard_key
        self.tx = Transaction(self.replay)
        self.read_only = False  # the transaction began READ ONLY
        self.stopped = False  # forwarding stopped at a statement for another server connection (see _drained)
        self.busy = False  # the proxy runs something for the client on several shards
        self.fanout_legs: list[Leg] = []  # its legs meanwhile, which a cancel request reaches
        self.unnamed: Statement | None = None  # the unnamed statement, for the Bind that follows its Parse
        self.wrote = False  # the active leg's transaction wrote on a shard that has replicas (read-your-writes)
        self.min_lsn: dict[int, int] = {}  # per shard: the WAL position of this client's last commit there
        self.avoid: set[str] = set()  # nodes that just refused a connection, for this transaction
        self.decided: BatchRoute | None = None  # the routing of the batch being linked
        self._stopped_at: BatchRoute | None = None  # the routing of the batch forwarding stopped before
        self._refusal = ""  # the message of the statement to refuse, or "" to answer it with _local_reply
        self._local_reply = _SET_DONE
        self._left_batch = False  # forwarding stopped within a batch: the leg's part ended with a hidden Sync

    # -- routing a batch ----------------------------------------------------------------------------------
    def _batch_route(self, buf, start: int) -> BatchRoute | None:
        """The routing of the batch at `start`, decided by its first Bind that names a shard (or every shard),
        else by its first Bind. None while the deciding message has not fully arrived."""
        if start == 0 and self._stopped_at is not None:  # routed already, on the leg that stopped before it
            found, self._stopped_at = self._stopped_at, None
            return found
        n = len(buf)
        pos = start
        unnamed = self.unnamed
        first: BatchRoute | None = None  # the first Bind's decision, when it names no shard (BEGIN, SET, SELECT 1)
        while n - pos >= 5:
            t = buf[pos]
            end = pos + 1 + _UNPACK(buf, pos + 1)[0]
            if end > n:
                return None
            if not well_formed(buf, pos, end):  # the framing refuses it (08P01) once the batch is linked
                return first or named4(BatchRoute, self.proxy.any_decision, end, pos, False)
            if t == Frontend.QUERY:
                if pos > start:  # extended messages before a Query go first, on their own
                    if first is not None:
                        return named4(BatchRoute, first.decision, pos, first.decider, False)
                    return named4(BatchRoute, self.proxy.any_decision, pos, pos, False)
                return named4(BatchRoute, self._query_decision(buf, pos, end), end, pos, True)
            if t == Frontend.PARSE:
                name, body_start = pg.read_cstring(buf, pos + 5)
                statement = self.core.statements.get(bytes(buf[body_start:end]))
                if name:
                    self.statements[name] = statement
                else:
                    unnamed = self.unnamed = statement
            elif t == Frontend.BIND:
                decision = self._bind_decision(buf, pos, end, unnamed)
                if decision.route.target != "any":
                    return named4(BatchRoute, decision, batch_end(buf, end), pos, False)
                first = first or named4(BatchRoute, decision, batch_end(buf, end), pos, False)
            elif t == Frontend.SYNC or t == Frontend.FLUSH or t == Frontend.FUNCTION_CALL:
                return first or named4(BatchRoute, self.proxy.any_decision, end, pos, False)
            pos = end
        return None

    def _query_decision(self, buf, pos: int, end: int) -> Decision:
        router = self.proxy.router
        sql = text(buf, pos + 5, end - 1)
        plan, literals = router.plan_simple(sql)
        return named3(Decision, router.route(plan, literals, None, self.session_key), plan, sql)

    def _bind_decision(self, buf, pos: int, end: int, unnamed: Statement | None) -> Decision:
        name = bind_statement(buf, pos, end)
        if name is None:  # malformed: the framing refuses it (08P01)
            return self.proxy.any_decision
        statement = self.statements.get(name) if name else unnamed
        if statement is None:  # the server will say it does not exist
            return self.proxy.any_decision
        router = self.proxy.router
        plan = statement.plan
        if plan is None:
            plan = statement.plan = router.plan(statement.sql)
        types = statement.param_types

        def parameter(number: int) -> object:  # read from the Bind in place, before buf changes
            value, fmt = bind_parameter(buf, pos + 5, end, number)
            oid = types[number - 1] if number <= len(types) else 0
            return None if value is None else decode_key(value, fmt, oid)

        return named3(Decision, router.route(plan, (), parameter, self.session_key), plan, statement.sql)

    # -- without a leg: where the next transaction starts ---------------------------------------------------
    def _answer_locally(self, decision: Decision, end: int) -> bool:
        """Simple queries the proxy answers itself when the client holds no leg: a BEGIN it holds until the
        transaction names a shard, the end of such a transaction, the session's shard key, refusals."""
        route, plan = decision.route, decision.plan
        kind = route.kind
        held = bool(self.replay)
        if self.tx_failed and kind not in _ENDS:
            reply_ = pg.error(pg.IN_FAILED_TRANSACTION, "current transaction is aborted, commands ignored until "
                              "end of transaction block") + pg.READY[pg.FAILED_TRANSACTION]
        elif kind == "begin" and not held:
            self.replay.append(bytes(self.buf[:end]))
            self.read_only = plan.read_only
            reply_ = pg.command_complete("BEGIN") + pg.READY[pg.IN_TRANSACTION]
        elif kind in _ENDS and held and not self.tx.legs:
            self._transaction_over()
            reply_ = pg.command_complete(kind.upper()) + pg.READY[pg.IDLE]
        elif kind in ("set_shard_key", "reset_shard_key"):
            self.session_key = plan.shard_key_value if kind == "set_shard_key" else None
            tag = "SET" if kind == "set_shard_key" else "RESET"
            reply_ = pg.command_complete(tag) + pg.READY[pg.IN_TRANSACTION if held else pg.IDLE]
        elif route.target == "error":
            self.tx_failed = held
            refusal = pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, route.message or "shardproxy: cannot route")
            self.proxy.client_error(refusal)
            reply_ = refusal.to_message() + pg.READY[pg.FAILED_TRANSACTION if held else pg.IDLE]
        else:
            return False
        del self.buf[:end]
        self.write(reply_)
        return True

    def _start(self, decision: Decision, batch_end: int) -> None:
        """Open the transaction where the route says: one shard's node, or several shards at once. In a
        transaction that holds legs, none of them active: go on on the leg the statement needs."""
        route = decision.route
        if route.target == "held":
            self.busy = True
            spawn(self._held_for_cutover())
            return
        if self.tx.legs and route.kind in _ENDS:
            self._end(commit=route.kind == "commit" and not self._failed(), implicit=False)
            return
        if self.tx.legs and (route.target not in _EVERY_SHARD or self._failed_leg() is not None):
            failed = self._failed_leg()
            if failed is not None:  # it answers as PostgreSQL does, until the transaction ends
                self._activate(next(shard for shard, leg in self.tx.legs.items() if leg is failed))
            elif route.target == "shard":
                self._activate(route.shard)
            else:
                self._activate(self.home if self.home in self.tx.legs else min(self.tx.legs))
            return
        if route.target in _EVERY_SHARD:
            if self.buf[batch_end - 5] != Frontend.SYNC and self.buf[0] != Frontend.QUERY:
                return  # a multi-shard batch runs whole: wait for its Sync
            batch = bytes(self.buf[:batch_end])
            del self.buf[:batch_end]
            self.busy = True
            spawn(self._run_on_shards(decision, batch))
            return
        # A refused extended-protocol batch goes to the home shard, whose server raises the refusal (_forward).
        shard = route.shard if route.target == "shard" else self.home
        if route.kind == "begin" and not self.replay:  # an extended-protocol BEGIN: it runs in this batch
            self.replay.append(pg.query(decision.sql))
            self.tx.applied[shard] = 1
            self.read_only = decision.plan.read_only if decision.plan is not None else False
        write = route.write or (bool(self.replay) and not self.read_only)
        pool = self._pool_on(shard, write, route.force_primary)
        if pool is None:
            self._await_primary(shard)
            return
        self.shard = shard
        self.wrote = write and self.proxy.pools.followed[shard]
        self._acquire(pool)

    def _pool_on(self, shard: int, write: bool, force_primary: bool) -> Pool | None:
        """The pool for a statement on a shard; None while the shard has no primary to write to."""
        return self.proxy.pools.node_pool(self.database, self.user, shard, write, force_primary,
                                          self.min_lsn.get(shard), self.avoid)

    def _await_primary(self, shard: int) -> None:
        """No primary for the shard: hold the transaction (not fail it) while a failover may bring one."""
        self.busy = True
        spawn(self._held_for_failover(shard))

    async def _held_for_failover(self, shard: int) -> None:
        name = self.proxy.config.shards[shard].name
        timeout = self.proxy.config.routing.failover_timeout
        if name in self.proxy.pools.paused:  # its primary may be restarting under PAUSE: wait as PAUSE promises
            timeout = max(timeout, self.proxy.config.pool.query_wait_timeout)
        node = await self.proxy.wait_for_primary(name, timeout)
        self.busy = False
        if node is None:
            self._fatal(pg.PostgresError(pg.CANNOT_CONNECT_NOW, f"shardproxy: shard {name} has no primary"))
        else:
            self.avoid.discard(node.address)  # a check made since it refused confirms it
            self._dispatch()

    async def _held_for_cutover(self) -> None:
        """The key's rows are moving to another shard: route again once the ring has switched (or stayed)."""
        await self.proxy.cutover_passed()
        self.busy = False
        self._dispatch()

    async def _run_on_shards(self, decision: Decision, batch: bytes) -> None:
        """A statement for every shard (or an INSERT for the shards of its rows): outside a transaction on legs
        from the pools, given back after; inside one on the transaction's own legs (joining the shards it lacks),
        which it keeps."""
        in_transaction = bool(self.replay)
        route = decision.route
        kind = fanout.kind_of(decision)
        legs: list[Leg] = []
        two_phase = False
        raised: pg.PostgresError | None = None  # the proxy's own error
        shards = sorted(set(route.rows)) if route.rows else range(len(self.proxy.config.shards))
        try:
            if in_transaction:
                legs = await self.tx.every_leg(self, self._transaction_pool, shards, kind)
            else:
                write = route.write or route.target not in ("scatter", "copy")  # a COPY TO may read replicas
                pools = [self._pool_on(shard, write, route.force_primary) for shard in shards]
                if None in pools:
                    raise pg.PostgresError(pg.CANNOT_CONNECT_NOW, "shardproxy: a shard has no primary")
                legs = [Leg(self, pool, kind) for pool in pools if pool is not None]
                for shard, leg in zip(shards, legs):  # read-your-writes: each commit says where it ends
                    leg.follow = write and self.proxy.pools.followed[shard]
            self.fanout_legs = legs
            if route.target == "copy":
                reply_, two_phase = await copy.run(self, legs, decision, batch, in_transaction)
            else:
                reply_, two_phase = await fanout.run(self, legs, decision, batch, in_transaction)
            if route.kind == "ddl":  # tables' columns may have changed
                self.proxy.copy_columns.clear()
        except pg.PostgresError as exc:  # the proxy's own: the servers' errors are part of the reply
            raised = exc
        except Exception as exc:  # a bug must cost this statement, not the client's connection
            log.exception("client %d: statement on several shards failed", self.id)
            raised = pg.PostgresError(pg.INTERNAL_ERROR, f"shardproxy: internal error: {exc}")
        finally:
            self.fanout_legs = []
            if in_transaction:
                self.tx.detach(self, legs)
            else:
                self.min_lsn.update(committed_at(dict(zip(shards, legs))))
                for leg in legs:
                    leg.release()
        if raised is not None:
            self.proxy.client_error(raised)
            reply_ = raised.to_message() + pg.READY[pg.FAILED_TRANSACTION if in_transaction else pg.IDLE]
            if in_transaction and self.tx.legs and self._failed_leg() is None:
                await self._abort_legs(raised)
        if in_transaction:
            self.tx_failed = self.tx_failed or reply_.endswith(pg.READY[pg.FAILED_TRANSACTION])
        else:
            self.proxy.transaction_ended(two_phase)
        self.busy = False
        if self.closed:  # it left meanwhile: what its transaction holds goes, as when it leaves between statements
            self._leave_all()
        else:
            self.write(reply_)
            self._dispatch()

    async def _abort_legs(self, error: pg.PostgresError) -> None:
        try:
            await self.tx.abort(self, error)
        except Exception:  # (a leg that broke meanwhile: the client's next statement finds out)
            log.exception("client %d: aborting the transaction on its legs failed", self.id)

    def _transaction_pool(self, shard: int) -> Pool | None:
        """Where a shard joins the transaction: its primary, unless the transaction is READ ONLY."""
        return self._pool_on(shard, not self.read_only, False)

    # -- on the active leg: where does the next batch run? --------------------------------------------------
    def _route_batch_here(self, buf, pos: int) -> HereVerdict:
        """At the start of a batch on the active leg: whether it runs there. Every other Bind of the batch is
        checked as it is forwarded (see _batch_member)."""
        found = self.decided if pos == 0 and self.decided is not None else self._batch_route(buf, pos)
        if found is None:  # its deciding message has not arrived: it runs here
            return _RUNS_HERE
        decision, batch_end, decider, standalone = found
        kind = decision.route.kind
        if standalone and kind in ("set_shard_key", "reset_shard_key"):
            self.session_key = decision.plan.shard_key_value if kind == "set_shard_key" else None
            self._refusal = ""
            self._local_reply = _SET_DONE if kind == "set_shard_key" else _RESET_DONE
            return named4(HereVerdict, batch_end, decider, decider, True)
        verdict = self._verdict(decision, within_batch=False)
        if verdict is _STOP:  # the batch will start the client's buffer, where it goes next
            self._stopped_at = named4(BatchRoute, decision, batch_end - pos, decider - pos, standalone)
            return _STOPS_HERE
        if verdict is _REFUSE:
            return named4(HereVerdict, batch_end, decider, decider, True)
        return named4(HereVerdict, batch_end, decider, -1, True)

    def _batch_member(self, buf, pos: int, end: int) -> str | None:
        """A Bind of a batch that another message decided: "" if it runs on the active leg, None if the batch
        goes on on another leg from here, else why it is refused (which aborts the batch)."""
        verdict = self._verdict(self._bind_decision(buf, pos, end, self.unnamed), within_batch=True)
        if verdict is _GO:
            return ""
        if verdict is _STOP:
            self._left_batch = True
            return None
        return self._refusal

    def _verdict(self, decision: Decision, within_batch: bool) -> Verdict:
        """Whether a statement met on the active leg runs there; notes what it does to the transaction. A
        refusal's message is left in _refusal."""
        route = decision.route
        server = self.server
        if (route.shard == self.shard and route.target == "shard" and route.kind in _PLAIN
                and server.status != pg.FAILED_TRANSACTION and (self.on_primary or not route.write)):
            self.tx.data.add(self.shard)  # the usual case, first: a statement for the active leg's shard
            if route.write:
                self.tx.wrote_on(self.shard)
                if not self.wrote:
                    self.wrote = self.proxy.pools.followed[self.shard]
            return _GO
        kind, target = route.kind, route.target
        explicit = bool(self.replay)
        in_transaction = explicit or self.spanning or within_batch or server.status != pg.IDLE
        if server.status == pg.FAILED_TRANSACTION:  # it answers as PostgreSQL does, until the transaction ends
            if kind in _ENDS and len(self.tx.legs) > 1:
                return _STOP  # on every leg
            if kind == "rollback_to":  # the other legs roll back to the savepoint too, before their next use
                self._log(decision.sql)
            return _GO
        if target == "error":
            return self._refuse_with(route.message or "shardproxy: cannot route")
        if kind == "begin":
            if not explicit:  # it runs here: the other legs get it from the log
                self._log(decision.sql)
                self.read_only = decision.plan.read_only if decision.plan is not None else False
            return _GO
        if kind in _ENDS:
            return _GO if len(self.tx.legs) <= 1 and not self.spanning else _STOP
        if explicit and (kind in _LOGGED or (decision.plan is not None and decision.plan.replays)):
            self._log(decision.sql)
            return _GO
        if target == "any":
            return _GO
        if target == "held":
            return _STOP  # it waits in _start, then goes where the new ring says
        if target == "shard":
            if route.shard == self.shard:
                if route.write and not self.on_primary:
                    if not in_transaction:
                        return _STOP  # a write after reads on a replica: the next transaction, on the primary
                    return self._refuse_with(f"shardproxy: this transaction runs on a replica of shard "
                                             f"{self._shard_name(self.shard)}; a write cannot join it")
                self.tx.data.add(self.shard)
                if route.write:
                    self.tx.wrote_on(self.shard)
                    self.wrote = self.wrote or self.proxy.pools.followed[self.shard]
                return _GO
            if not in_transaction:
                return _STOP
            if self.proxy.config.routing.cross_shard_transactions == "refuse" and self.tx.data - {route.shard}:
                return self._refuse_with(f"shardproxy: this transaction runs on shard {self._shard_name(self.shard)}; "
                                         f"a statement for shard {self._shard_name(route.shard)} cannot join it")
            if within_batch and not self.on_primary:
                return self._refuse_with("shardproxy: a batch read from replicas cannot go on on another shard")
            return _STOP
        if within_batch:
            return self._refuse_with("shardproxy: a statement that runs on every shard must be the only one in "
                                     "its batch (send a Sync before and after it)")
        if in_transaction and self.proxy.config.routing.cross_shard_transactions == "refuse":
            return self._refuse_with(f"shardproxy: a statement on every shard cannot run inside a transaction on "
                                     f"shard {self._shard_name(self.shard)}")
        return _STOP

    def _log(self, sql: str) -> None:
        """A statement the active leg runs now, which every other leg runs before its next use."""
        self.replay.append(pg.query(sql))
        self.tx.applied[self.shard] = len(self.replay)

    def _refuse_with(self, message: str) -> Verdict:
        self._refusal = message
        return _REFUSE

    def _shard_name(self, shard: int) -> str:
        return self.proxy.config.shards[shard].name

    def _refuse(self, message: str, buf, pos: int, end: int, out: list) -> None:
        """Make the active leg raise the refusal, so that it also aborts the transaction there."""
        self.proxy.client_error(pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, message))
        self._raise(pg.FEATURE_NOT_SUPPORTED, message, buf, pos, end, out)

    # -- moving between legs ---------------------------------------------------------------------------------
    def _stopped(self, server: ServerConnection, out: list) -> None:
        """Forwarding stopped. Within a batch (at a Bind for another shard, or at the Sync of a batch that spans
        shards), the leg's part of the batch ends with a hidden Sync, after a BEGIN that turns its implicit
        transaction into one that ends with the others' (PostgreSQL allows BEGIN inside an implicit one)."""
        if not (self._left_batch or self.spanning):
            if server.pending:  # say a Parse sent on its own: the server answers it only once asked to flush
                out.append(pg.FLUSH)
            return
        self._left_batch = True  # (until _drained)
        if not self.replay and server.status == pg.IDLE and not server.ignoring:  # its first part of the batch
            statement = self.core.statements.get(_BEGIN_BODY)
            self._ensure_prepared(statement, out)
            out.append(pg.message(b"B", b"\0" + statement.bind_prefix + b"\0\0\0\0\0\0"))
            server.pending.append(_HIDDEN_BIND)
            out.append(_EXECUTE_UNNAMED)
            server.pending.append(_HIDDEN_EXECUTE)
            self.spanning = True
        out.append(pg.SYNC)
        server.pending.append(_HIDDEN_SYNC)

    def _drained(self, server: ServerConnection) -> None:
        """Forwarding stopped, and the active leg has answered all it was sent: move on where the client's next
        message must go."""
        self.stopped = False
        left_batch, self._left_batch = self._left_batch, False
        if self.closed:
            return
        if left_batch and server.status != pg.IN_TRANSACTION:  # its part of the batch failed (else its BEGIN or
            self.tx_failed = True  # the client's would leave it in the transaction)
            if not self.buf or self.buf[0] != Frontend.SYNC:  # as PostgreSQL does, this leg skips the rest of
                server.ignoring = True  # the batch, up to its Sync
                self.on_data(b"")
                return
        if self.spanning and self.buf and self.buf[0] == Frontend.SYNC:  # the end of a batch that spans legs
            self._end(commit=not self._failed(), implicit=True)
            return
        if not (self.replay or self.spanning or server.status != pg.IDLE):
            ClientCore._give_back(self, server)  # its transaction is over: the next one starts anew
            return
        self._park()
        self._dispatch()  # with legs and none active: _start goes on where the next statement must

    def _activate(self, shard: int) -> None:
        """Make the shard's leg the active one, joining the shard first if the transaction has no leg there. The
        leg the client leaves tells meanwhile whether it wrote (Transaction.park: asked once the client's
        statement is on its way, which waits on no answer of the left leg)."""
        left, left_shard = self.tx.legs.get(self.shard), self.shard
        self.shard = shard
        server = self.tx.legs.get(shard)
        if server is not None:
            self.link(server)
        else:
            pool = self._transaction_pool(shard)
            if pool is None:
                self._fatal(pg.PostgresError(pg.CANNOT_CONNECT_NOW,
                                             f"shardproxy: shard {self._shard_name(shard)} has no primary"))
                return
            self.tx.applied[shard] = 0
            self._acquire(pool)
        if left is not None and shard != left_shard:
            self.tx.park(left_shard, left)

    def _failed_leg(self) -> ServerConnection | None:
        """The leg whose error aborted the transaction, if any."""
        return next((leg for leg in self.tx.legs.values() if leg.status == pg.FAILED_TRANSACTION), None)

    def _failed(self) -> bool:
        return self.tx_failed or self._failed_leg() is not None

    def _park(self) -> None:
        """The active leg, if any, waits inside the transaction while the client is elsewhere."""
        server = self.server
        if server is None:
            return
        self.server = self.peer = None
        server.peer = None
        server.on_ready = None

    def _linked_on_shard(self, server: ServerConnection, out: list[bytes]) -> None:
        """A leg became the active one: it runs first (out: sent ahead of the client's messages) what it missed
        of the transaction's log (BEGIN, SETs, savepoints), and, within a batch, the batch's unnamed statement,
        which another leg parsed."""
        self.on_primary = self.proxy.pools.is_primary(server.pool.node)
        ahead = self.tx.join(self.shard, server)
        if self.spanning and not self.replay and server.status == pg.IDLE:  # an implicit transaction on several
            ahead = [_BEGIN, *ahead]  # shards: this leg's part runs in a block too (see _stopped), which holds its tag
        for query in ahead:
            server.pending.append(HIDDEN_QUERY)
            out.append(query)
        if self.mid_batch and self.unnamed is not None:
            server.pending.append(Request(Kind.PARSE, Action.HIDE))
            out.append(self.unnamed.unnamed_parse)

    # -- the end of a transaction on several legs --------------------------------------------------------------
    def _end(self, commit: bool, implicit: bool) -> None:
        """COMMIT or ROLLBACK (or the Sync of a batch that spans legs) on every leg, run by the proxy."""
        self._park()
        if implicit:
            messages, end = [(Frontend.SYNC, b"")], 5
        else:
            messages, end = statement_messages(self.buf)
        del self.buf[:end]
        self.busy = True
        spawn(self._end_on_legs(commit, implicit, messages))

    async def _end_on_legs(self, commit: bool, implicit: bool, messages: list) -> None:
        legs = len(self.tx.legs)
        follow = [shard for shard in self.tx.legs if commit and self.proxy.pools.followed[shard]]
        two_phase = False
        try:
            ending = await self.tx.end(self, commit, follow)
            error, two_phase = ending.error, ending.two_phase
            self.min_lsn.update(ending.committed_at)
            if two_phase:
                self.proxy.two_phase_took(ending.seconds)
        except Exception as exc:  # a bug must cost this transaction, not the client's connection
            log.exception("client %d: ending a transaction on several shards failed", self.id)
            error = pg.PostgresError(pg.INTERNAL_ERROR, f"shardproxy: internal error: {exc}")
        if legs > 1:
            self.proxy.transaction_ended(two_phase)
        tag = "COMMIT" if commit and error is None else "ROLLBACK"
        self._transaction_over()
        self.busy = False
        if self.closed:
            return
        if implicit:
            self.write((error.to_message() if error is not None else b"") + pg.READY[pg.IDLE])
        else:
            self.write(reply(messages, tag, error, pg.IDLE))
        self._dispatch()

    def _follow_commit(self, server: ServerConnection) -> None:
        """Read-your-writes: learn where this client's commit ends in the WAL before the connection goes. The
        transaction is over: a statement for another shard meanwhile starts the next one there."""
        self.wrote = False
        self.replay.clear()
        self.tx.data.clear()
        server.pending.append(Request(Kind.QUERY, Action.HIDE, self._committed_at))
        server.write(_COMMIT_LSN)

    def _committed_at(self, _: ServerConnection, t: int, body: bytes) -> None:
        """The answer to _COMMIT_LSN: this client's reads on the shard need a replica that has replayed it."""
        if t == Backend.DATA_ROW and self.shard >= 0:
            (length,) = pg.INT32.unpack_from(body, 2)
            self.min_lsn[self.shard] = parse_lsn(bytes(body[6:6 + length]).decode())

    def _transaction_over(self) -> None:
        if self.shard >= 0:  # statements that name no shard (say, a Parse on its own) follow the last one, so
            self.home = self.shard  # that a client at work on one shard never waits on another's nodes
        self.shard = -1
        self.tx.clear()
        self.replay.clear()
        self.tx_failed = self.read_only = self.spanning = self.mid_batch = False
        self.avoid.clear()

    # The active leg went back to its pool: the transaction is over (ClientCore._give_back counted it).
    _routed_transaction_ended = _transaction_over
