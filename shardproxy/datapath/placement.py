"""Where a client's transactions run, in sharded configurations: the routing half of a client connection.

A batch (a simple Query, or extended-protocol messages up to Sync) is routed by the router's pure decision
for its deciding statement. Between transactions (`_batch_route`, `_answer_locally`, `_start`) the decision
picks the pool; a BEGIN is held until a statement names its shard, and a transaction whose statements name
none runs tentatively on the client's home shard, to move once one does. On a linked connection each new
batch is checked (`_route_batch_here`, `_check_route`): it runs there, waits for the next transaction, or is
refused by making the server raise the error, so that the transaction aborts there as PostgreSQL's would.
Statements on several shards run through the fanout package.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, NamedTuple, Protocol

from shardproxy.cluster.topology import NodeState, parse_lsn
from shardproxy.config import Config
from shardproxy.datapath import fanout
from shardproxy.datapath._core import batch_end, bind_parameter, bind_statement, text, well_formed
from shardproxy.datapath.pending import HIDDEN_QUERY, Action, Kind, Request
from shardproxy.routing.keys import decode_key
from shardproxy.routing.router import Decision, Route, Router
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
_COMMITTED_ALREADY = pg.notice(pg.WARNING, "shardproxy: this statement ran on every shard and is committed there "
                               "already; a ROLLBACK of the transaction will not undo it")


class PlacementHost(Protocol):
    """What routing needs of the proxy."""

    config: Config
    router: Router
    any_decision: Decision  # for batches that name no statement
    pools: Pools

    async def wait_for_primary(self, shard: str, timeout: float) -> NodeState | None: ...
    def client_error(self, error: pg.PostgresError) -> None: ...  # counts an error the proxy sent a client


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
    """Whether a statement met on a linked connection may run there."""

    GO = "go"  # it runs there
    STOP = "stop"  # it waits for the next transaction
    REFUSE = "refuse"  # the server raises the refusal, which aborts the transaction there


# Made without the Python-level __new__ of a NamedTuple (a third of the cost): one per routed statement.
_new_decision = partial(tuple.__new__, Decision)
_new_batch_route = partial(tuple.__new__, BatchRoute)
_new_here = partial(tuple.__new__, HereVerdict)
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
        self.shard = -1  # the shard of the linked server connection
        self.on_primary = False  # whether the linked server connection is its shard's primary
        self.session_key: object = None  # SET shardproxy.shard_key
        self.held: list[bytes] = []  # BEGIN and SETs of a transaction that has not named its shard yet
        self.held_failed = False  # an error inside a held transaction: only ROLLBACK/COMMIT ends it
        self.tentative = False  # the transaction runs on the home shard until a statement names one
        self.begin_replay: bytes | None = None  # a tentative transaction's extended-protocol BEGIN, as a Query
        self.switching = False  # leaving the home shard: the tentative transaction is being rolled back
        self.stopped = False  # forwarding stopped at a statement for another connection (see _stopped)
        self.tx_open = False  # a BEGIN went to the linked server connection in this link
        self.busy = False  # a statement on several shards is running
        self.unnamed: Statement | None = None  # the unnamed statement, for the Bind that follows its Parse
        self.read_only = False  # the held transaction began READ ONLY
        self.wrote = False  # the linked transaction wrote on a shard that has replicas (read-your-writes)
        self.min_lsn: dict[int, int] = {}  # per shard: the WAL position of this client's last commit there
        self.avoid: set[str] = set()  # nodes that just refused a connection, for this transaction
        self.decided: BatchRoute | None = None  # the routing of the batch being linked
        self._refusal = ""  # the message of the statement to refuse, or "" to answer it with _local_reply
        self._local_reply = _SET_DONE

    # -- between transactions: where the next one starts ------------------------------------------------
    def _batch_route(self, buf, start: int) -> BatchRoute | None:
        """The routing of the batch at `start`, decided by its first Bind that names a shard (or every shard),
        else by its first Bind. None while the deciding message has not fully arrived."""
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
                return first or _new_batch_route((self.proxy.any_decision, end, pos, False))
            if t == Frontend.QUERY:
                if pos > start:  # extended messages before a Query go first, on their own
                    if first is not None:
                        return _new_batch_route((first.decision, pos, first.decider, False))
                    return _new_batch_route((self.proxy.any_decision, pos, pos, False))
                return _new_batch_route((self._query_decision(buf, pos, end), end, pos, True))
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
                    return _new_batch_route((decision, batch_end(buf, end), pos, False))
                first = first or _new_batch_route((decision, batch_end(buf, end), pos, False))
            elif t == Frontend.SYNC or t == Frontend.FLUSH or t == Frontend.FUNCTION_CALL:
                return first or _new_batch_route((self.proxy.any_decision, end, pos, False))
            pos = end
        return None

    def _query_decision(self, buf, pos: int, end: int) -> Decision:
        router = self.proxy.router
        sql = text(buf, pos + 5, end - 1)
        plan, literals = router.plan_simple(sql)
        return _new_decision((router.route(plan, literals, None, self.session_key), plan, sql))

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

        return _new_decision((router.route(plan, (), parameter, self.session_key), plan, statement.sql))

    def _answer_locally(self, decision: Decision, end: int) -> bool:
        """Simple queries the proxy answers itself between transactions: a BEGIN it holds until the
        transaction names its shard, the end of such a transaction, the session's shard key, refusals."""
        route, plan = decision.route, decision.plan
        kind = route.kind
        held = bool(self.held)
        if self.held_failed and kind not in ("commit", "rollback"):
            reply = pg.error(pg.IN_FAILED_TRANSACTION, "current transaction is aborted, commands ignored until "
                             "end of transaction block") + pg.READY[pg.FAILED_TRANSACTION]
        elif kind == "begin" and not held:
            self.held.append(bytes(self.buf[:end]))
            self.read_only = plan.read_only
            reply = pg.command_complete("BEGIN") + pg.READY[pg.IN_TRANSACTION]
        elif kind in ("commit", "rollback") and held:
            self.held.clear()
            self.held_failed = self.read_only = False
            reply = pg.command_complete(kind.upper()) + pg.READY[pg.IDLE]
        elif kind in ("set_shard_key", "reset_shard_key"):
            self.session_key = plan.shard_key_value if kind == "set_shard_key" else None
            tag = "SET" if kind == "set_shard_key" else "RESET"
            reply = pg.command_complete(tag) + pg.READY[pg.IN_TRANSACTION if held else pg.IDLE]
        elif route.target == "error":
            self.held_failed = held
            refusal = pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, route.message or "shardproxy: cannot route")
            self.proxy.client_error(refusal)
            reply = refusal.to_message() + pg.READY[pg.FAILED_TRANSACTION if held else pg.IDLE]
        else:
            return False
        del self.buf[:end]
        self.write(reply)
        return True

    def _start(self, decision: Decision, batch_end: int) -> None:
        """Open the transaction where the route says: one shard's node, or several shards at once."""
        route = decision.route
        if route.target in ("scatter", "all"):
            if self.buf[batch_end - 5] != Frontend.SYNC and self.buf[0] != Frontend.QUERY:
                return  # a multi-shard batch runs whole: wait for its Sync
            batch = bytes(self.buf[:batch_end])
            del self.buf[:batch_end]
            self.busy = True
            asyncio.get_running_loop().create_task(self._run_on_shards(decision, batch))
            return
        # A refused extended-protocol batch goes to the home shard, whose server raises the refusal (_forward).
        shard = route.shard if route.target == "shard" else self.home
        if route.kind == "begin" and not self.held and self.buf[0] != Frontend.QUERY:
            # BEGIN in the extended protocol (psycopg's executemany, pipelines) runs at once on the home
            # shard: tentatively, as a held BEGIN would, and replayed where the transaction moves.
            self.begin_replay = pg.query(decision.sql)
            self.read_only = decision.plan.read_only
            self.tentative = True
        else:
            self.tentative = route.target != "shard" and bool(self.held)
        write = route.write or (bool(self.held) and not self.read_only)
        pool = self._pool_on(shard, write, route.force_primary)
        if pool is None:
            self._await_primary(shard)
            return
        self.shard = shard
        self.wrote = write and self.proxy.pools.tracks_writes(shard)
        self._acquire(pool)

    def _pool_on(self, shard: int, write: bool, force_primary: bool) -> Pool | None:
        """The pool for a statement on a shard; None while the shard has no primary to write to."""
        return self.proxy.pools.node_pool(self.database, self.user, shard, write, force_primary,
                                          self.min_lsn.get(shard), self.avoid)

    def _await_primary(self, shard: int) -> None:
        """No primary for the shard: hold the transaction (not fail it) while a failover may bring one."""
        self.busy = True
        asyncio.get_running_loop().create_task(self._held_for_failover(shard))

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

    async def _run_on_shards(self, decision: Decision, batch: bytes) -> None:
        held = bool(self.held)
        status = pg.IN_TRANSACTION if held else pg.IDLE
        try:
            route = decision.route
            pools = [self._pool_on(shard, route.target == "all", route.force_primary)
                     for shard in range(len(self.proxy.config.shards))]
            reply = await fanout.run(self, pools, decision, batch, status)
        except pg.PostgresError as exc:  # the proxy's own: the servers' errors are part of the reply
            self.proxy.client_error(exc)
            reply = exc.to_message() + pg.READY[pg.FAILED_TRANSACTION if held else pg.IDLE]
        except Exception as exc:  # a bug must cost this statement, not the client's connection
            log.exception("client %d: statement on several shards failed", self.id)
            error = pg.PostgresError(pg.INTERNAL_ERROR, f"shardproxy: internal error: {exc}")
            self.proxy.client_error(error)
            reply = error.to_message() + pg.READY[pg.FAILED_TRANSACTION if held else pg.IDLE]
        if held and reply.endswith(pg.READY[pg.FAILED_TRANSACTION]):
            self.held_failed = True
        elif held and decision.route.target == "all":  # say so: a later ROLLBACK cannot undo it
            reply = _COMMITTED_ALREADY + reply
        self.busy = False
        if not self.closed:
            self.write(reply)
            self._dispatch()

    # -- on a linked connection: may the next batch run here? -----------------------------------------
    def _route_batch_here(self, buf, pos: int) -> HereVerdict:
        """At the start of a batch on a linked connection: where it may run. Every other Bind of the batch is
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
            return _new_here((batch_end, decider, decider, True))
        verdict = self._check_route(decision)
        if verdict is _STOP:
            return _STOPS_HERE
        if verdict is _REFUSE:
            route = decision.route
            self._refusal = route.message if route.target == "error" else self._cross_shard_message(route)
            return _new_here((batch_end, decider, decider, True))
        return _new_here((batch_end, decider, -1, True))

    def _batch_member(self, buf, pos: int, end: int) -> str:
        """A Bind of a batch that some other message decided: why it cannot run here, or "" if it can.
        Everything up to a Sync is one implicit transaction on one server, so a statement for another
        shard (or for every shard) cannot be sent anywhere else: it is refused, which aborts the batch."""
        decision = self._bind_decision(buf, pos, end, self.unnamed)
        if self._check_route(decision) is _GO:
            return ""
        route = decision.route
        if route.target == "error":
            return route.message or "shardproxy: cannot route"
        return self._cross_shard_message(route)

    def _check_route(self, decision: Decision) -> Verdict:
        """Whether a statement met on a linked connection may run there."""
        route = decision.route
        target = route.target
        if route.kind == "begin":
            self.tx_open = True
        if target == "error":
            return _REFUSE
        if target == "any":
            if self.tentative and route.kind == "session":
                self.held.append(pg.query(decision.sql))
            return _GO
        in_transaction = self.tx_open or self.server.status != pg.IDLE
        if target == "shard" and route.shard == self.shard and (self.on_primary or not route.write or in_transaction):
            self.tentative = False
            self.wrote = self.wrote or (route.write and self.proxy.pools.tracks_writes(self.shard))
            return _GO
        if self.tentative or not in_transaction:
            return _STOP
        return _REFUSE

    def _refuse(self, message: str, buf, pos: int, end: int, out: list) -> None:
        """Make the linked server raise the refusal, so that it also aborts the transaction there."""
        self.proxy.client_error(pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, message))
        self._raise(pg.FEATURE_NOT_SUPPORTED, message, buf, pos, end, out)

    def _stopped(self, server: ServerConnection, out: list) -> None:
        """Forwarding stopped at a statement for another connection: let this transaction end first."""
        if self.tentative:  # nothing of value ran on the home shard: roll it back and move
            out.append(pg.query("ROLLBACK"))
            server.pending.append(HIDDEN_QUERY)
            self.tentative = False
            self.switching = True
            if self.begin_replay is not None:
                self.held.insert(0, self.begin_replay)
                self.begin_replay = None

    def _cross_shard_message(self, route: Route) -> str:
        here = self.proxy.config.shards[self.shard].name
        if route.target == "shard" and route.shard == self.shard:
            return f"shardproxy: this transaction runs on a replica of shard {here}; a write cannot join it"
        if route.target == "shard":
            there = self.proxy.config.shards[route.shard].name
            return f"shardproxy: this transaction runs on shard {here}; a statement for shard {there} cannot join it"
        return f"shardproxy: a statement on every shard cannot run inside a transaction on shard {here}"

    # -- transaction ends -------------------------------------------------------------------------------
    def _linked_on_shard(self, server: ServerConnection) -> None:
        """A routed transaction got its server connection: replay the BEGIN and SETs held for it."""
        self.on_primary = self.proxy.pools.is_primary(server.pool.node)
        self.tx_open = bool(self.held)
        for replay in self.held:
            server.pending.append(HIDDEN_QUERY)
            server.write(replay)

    def _follow_commit(self, server: ServerConnection) -> None:
        """Read-your-writes: learn where this client's commit ends in the WAL before the connection goes."""
        self.wrote = False
        self.tx_open = False  # over: a statement for another shard arriving meanwhile waits, is not refused
        server.pending.append(Request(Kind.QUERY, Action.HIDE, self._committed_at))
        server.write(_COMMIT_LSN)

    def _committed_at(self, _: ServerConnection, t: int, body: bytes) -> None:
        """The answer to _COMMIT_LSN: this client's reads on the shard need a replica that has replayed it."""
        if t == Backend.DATA_ROW and self.shard >= 0:
            (length,) = pg.INT32.unpack_from(body, 2)
            self.min_lsn[self.shard] = parse_lsn(bytes(body[6:6 + length]).decode())

    def _routed_transaction_ended(self) -> None:
        if self.shard >= 0:  # statements that name no shard (say, a Parse on its own) follow the last one, so
            self.home = self.shard  # that a client at work on one shard never waits on another's nodes
        self.shard = -1
        self.tx_open = self.tentative = False
        self.avoid.clear()
        if self.switching:  # moving to another shard: the held BEGIN and SETs are replayed there
            self.switching = False
        else:
            self.held.clear()
            self.held_failed = self.read_only = False
            self.begin_replay = None
