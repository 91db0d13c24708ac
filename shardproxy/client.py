"""A client connection: startup and authentication, then the request half of the data path.

After login every message the client sends is framed here, recorded in the linked server connection's
`pending` queue (see server.py) and forwarded as the bytes it arrived in. Only named prepared statements
(Parse/Bind/Describe/Close), and a few session-level statements in simple queries, are rewritten or answered
by the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING, NamedTuple

from shardproxy import params as session_params
from shardproxy import protocol as pg
from shardproxy.admin import ADMIN_DATABASE
from shardproxy.auth import (
    ProvenKey, ScramException, ScramServerExchange, is_scram_verifier, md5_answer, parse_sasl_initial,
)
from shardproxy.connection import Connection
from shardproxy.router import Plan, Route, bind_parameter, decode_key
from shardproxy._wire import (
    BIND_REQ, CLOSE, DESCRIBE, FORWARD, HIDDEN_QUERY, HIDE, PARSE, QUERY, QUERY_REQ, SYNTH, forward_requests,
)
from shardproxy.server import ServerConnection
from shardproxy.statements import Statement, deallocate_target, is_discard_all
from shardproxy.topology import parse_lsn

if TYPE_CHECKING:
    from shardproxy.pool import Pool
    from shardproxy.proxy import Proxy

log = logging.getLogger("shardproxy.client")

_H, _B, _S, _Q, _P, _D, _C, _F, _X, _p = b"HBSQPDCFXp"
_UNPACK = pg.INT32.unpack_from
_SESSION_PREFIXES = (b"set ", b"rese", b"deal", b"disc")
_DEALLOCATE_DONE = (QUERY, SYNTH, pg.command_complete("DEALLOCATE"))
_DEALLOCATE_ALL_DONE = (QUERY, SYNTH, pg.command_complete("DEALLOCATE ALL"))
_CLOSE_DONE = (CLOSE, SYNTH, pg.CLOSE_COMPLETE)
_PARSE_DONE = (PARSE, SYNTH, pg.PARSE_COMPLETE)
_COMMIT_LSN = pg.query("SELECT pg_current_wal_insert_lsn()")
_SET_DONE = (QUERY, SYNTH, pg.command_complete("SET"))
_RESET_DONE = (QUERY, SYNTH, pg.command_complete("RESET"))
_GO, _STOP, _REFUSE = range(3)
_COMMITTED_ALREADY = pg.notice(pg.WARNING, "shardproxy: this statement ran on every shard and is committed there "
                               "already; a ROLLBACK of the transaction will not undo it")
_SSL_YES = b"S"


class Decision(NamedTuple):
    """Where a statement goes, with the plan and text it was routed from."""

    route: Route
    plan: Plan | None
    sql: str


def _batch_end(buf, pos: int) -> int:
    """Just past the Sync that ends the batch going on at pos, or the end of what has arrived."""
    n = len(buf)
    while n - pos >= 5:
        end = pos + 1 + _UNPACK(buf, pos + 1)[0]
        if end > n:
            break
        t, pos = buf[pos], end
        if t == _S:
            break
    return pos


class ClientConnection(Connection):
    def __init__(self, proxy: Proxy):
        super().__init__()
        self.proxy = proxy
        self.id = proxy.next_client_id()
        self.address = ""
        self.encrypted = False  # TLS since the SSLRequest
        self.user = ""
        self.database = ""
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        self.statements: dict[bytes, Statement] = {}  # the client's statement names
        self.params: dict[str, str] = {}  # reported parameters as the client set them
        self.param_sql: dict[str, str] = {}  # unreported parameters: the client's last SET of each
        self.pid = 0
        self.secret = 0
        self.connected_at = time.time()
        self.wait_started = 0.0
        self.admitted = False  # counted against max_client_conn
        self.transaction_pooling = proxy.config.pool.mode == "transaction"  # as when the client connected
        # Routing state (sharded configurations only).
        self.routes = proxy.sharded  # whether this connection's statements are routed one by one
        self.home = 0  # the shard for statements that name none
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
        self.mid_batch = False  # an Execute was forwarded and no Sync yet
        self.decided: tuple[Decision, int, int, bool] | None = None  # the routing of the batch being linked
        self._refusal = ""  # the message of the statement to refuse, or "" to answer it with _local_reply
        self._local_reply = _SET_DONE
        self.max_message_size = proxy.config.pool.max_message_size
        self.reason = ""  # why the connection ended, for the log; "" until the proxy ends it

    # -- connection set-up ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.expect_startup_packet()
        asyncio.get_running_loop().create_task(self._login(self.proxy.admit(self)))

    async def _login(self, admitted: bool) -> None:
        try:
            async with asyncio.timeout(self.proxy.config.pool.client_login_timeout):
                startup = await self._startup()
                if startup is None:
                    return
                if not admitted:  # refused only now, as PostgreSQL does: after the SSL answer, and not cancels
                    raise pg.PostgresError(pg.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
                await self._authenticate()
                await self._welcome(startup)
        except pg.PostgresError as exc:
            self._fatal(exc)
        except pg.ProtocolError as exc:
            self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, str(exc)))
        except asyncio.TimeoutError:
            self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, "client_login_timeout"))
        except ConnectionError:
            self.close()

    async def _startup(self) -> dict[str, str] | None:
        """Read the startup packet, answering an SSLRequest with S and TLS when tls.mode allows it, else
        (and GSSENCRequests always) with N; None for a CancelRequest."""
        while True:
            _, body = await self.read_message()
            (code,) = pg.INT32.unpack_from(body, 0)
            if code == pg.SSL_REQUEST and self.proxy.client_ssl is not None and not self.encrypted:
                if self.buf or self._inbox:  # as PostgreSQL: nothing may come between the request and TLS
                    raise pg.ProtocolError("received unencrypted data after SSL request")
                self.transport.write(_SSL_YES)
                self.expect_startup_packet()
                await self._start_tls(self.proxy.client_ssl)
            elif code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST) and not self.encrypted:
                self.transport.write(pg.SSL_NO)
                self.expect_startup_packet()
            elif code == pg.CANCEL_REQUEST and len(body) == 12:
                self.proxy.cancel(*pg.INT32_PAIR.unpack_from(body, 4))
                self.close()
                return None
            elif code == pg.PROTOCOL_3_0:
                startup = pg.parse_startup_params(body[4:])
                self.user = startup.get("user", "")
                self.database = startup.get("database") or self.user
                if not self.user:
                    raise pg.PostgresError(pg.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
                if not self.encrypted and self.proxy.config.tls.mode == "require":
                    raise pg.PostgresError(pg.INVALID_AUTHORIZATION,
                                           "shardproxy: SSL required: connections without encryption are refused")
                return startup
            else:
                raise pg.PostgresError(pg.PROTOCOL_VIOLATION, f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """Switch to TLS right after the S: the client sends nothing more before its ClientHello."""
        plain = self.transport
        try:
            self.transport = await asyncio.get_running_loop().start_tls(plain, self, context, server_side=True)
        except BaseException as exc:
            self.closed = True  # nothing more in plaintext: the client expects a handshake
            plain.close()
            if isinstance(exc, OSError):  # the handshake failed (SSLError) or the client left
                log.info("client %d %s: TLS handshake failed: %s", self.id, self.address, exc)
                raise ConnectionResetError("TLS handshake failed") from None
            raise
        self.encrypted = True

    async def _authenticate(self) -> None:
        user = self.proxy.config.user(self.user)
        failed = pg.PostgresError(pg.INVALID_PASSWORD, f'password authentication failed for user "{self.user}"')
        if user is None:
            self.proxy.auth_failed(self)
            raise failed
        if user.auth == "md5":
            salt = os.urandom(4)
            self.transport.write(pg.auth_request(5, salt))
            answer = await self._password_message()
            ok = answer.rstrip(b"\0") == md5_answer(self.user, user.password or "", salt)
        elif user.auth == "scram-sha-256":
            exchange = ScramServerExchange(self.proxy.scram_secret(user))
            ok = await self._scram(exchange)
            if ok and is_scram_verifier(user.password or ""):  # the key that logs this user in to servers
                self.proxy.proven_keys[user.name] = ProvenKey(exchange.client_key, exchange.secret)
        else:
            ok = True
        if not ok:
            self.proxy.auth_failed(self)
            raise failed
        self.transport.write(pg.AUTH_OK)

    async def _scram(self, exchange: ScramServerExchange) -> bool:
        """Whether the client proved its password; a malformed exchange raises (08P01), counted as a failure."""
        self.transport.write(pg.auth_request(10, b"SCRAM-SHA-256\0\0"))
        try:
            mechanism, client_first = parse_sasl_initial(await self._password_message())
            if mechanism != "SCRAM-SHA-256":
                raise pg.PostgresError(pg.PROTOCOL_VIOLATION, f"unsupported SASL mechanism {mechanism}")
            self.transport.write(pg.auth_request(11, exchange.first(client_first)))
            final = exchange.final(await self._password_message())
        except ScramException:
            return False
        except (pg.PostgresError, pg.ProtocolError):
            self.proxy.auth_failed(self)
            raise
        self.transport.write(pg.auth_request(12, final))
        return True

    async def _password_message(self) -> bytes:
        kind, body = await self.read_message()
        if kind != _p:
            raise pg.PostgresError(pg.PROTOCOL_VIOLATION, f"expected password response, got message type {chr(kind)!r}")
        return body

    async def _welcome(self, startup: dict[str, str]) -> None:
        """Tell the client the server's parameters and its cancel key, then open the data path."""
        if self.database == ADMIN_DATABASE:  # the admin console: commands, not a server session
            self.proxy.admin.open_session(self)
            log.info("client %d %s connected to the admin console: user=%s", self.id, self.address, self.user,
                     extra={"event": "connect", "client": self.id, "user": self.user})
            return
        self.pool, defaults = await self.proxy.login(self.database, self.user)
        values, self.param_sql = session_params.startup_values(startup)
        self.params = {k: v for k, v in defaults.items() if k in session_params.REPORTED} | values
        self.pid, self.secret = self.proxy.register(self)
        self.home = self.id % len(self.proxy.config.shards)
        shown = defaults | values
        self.transport.write(b"".join(pg.parameter_status(k, v) for k, v in shown.items())
                             + pg.backend_key_data(self.pid, self.secret) + pg.READY[pg.IDLE])
        log.info("client %d %s connected: user=%s database=%s", self.id, self.address, self.user, self.database,
                 extra={"event": "connect", "client": self.id, "user": self.user})
        self.end_login()

    # -- the request half of the data path ------------------------------------------------------------
    def on_data(self, data: bytes | bytearray) -> None:
        if self.server is not None:
            if self.stopped:  # what follows a statement for another connection waits for this one to end
                self.buf += data
                return
            self._forward(self.take_input(data) if self.buf else data)
            return
        self.buf += data
        self._dispatch()

    def _dispatch(self) -> None:
        """Between transactions: start the next one on the server connection its first statement needs."""
        while self.server is None and not (self.busy or self.wait_started or self.closed):
            if len(self.buf) < 5:
                return
            length = _UNPACK(self.buf, 1)[0]
            if length < 4 or length > self.max_message_size:  # refused now, not once it all arrived
                self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, "invalid message length"))
                return
            buf = self.buf
            first = buf[0]
            if first == _P and len(buf) > 5 and buf[5] or first == _C or first == _S:  # (what it may answer)
                if not self._answer_without_server():
                    return
            if self.buf[0] == _X:
                self.reason = "client sent Terminate"
                self.close()
                return
            if self.routes != self.proxy.sharded and not self.held:  # a reload added or removed shards
                self.routes = self.proxy.sharded
            if not self.routes:  # one server: the pool found at login, unless a reload drained it
                pool = self.pool
                if pool.draining:
                    pool = self.proxy.pool_for(self.database, self.user, self.proxy.login_node())
                self._acquire(pool)
                return
            found = self._batch_route(self.buf, 0)
            if found is None:  # the statement that decides has not fully arrived
                return
            decision, batch_end, _, standalone = found
            if not (standalone and self._answer_locally(decision, batch_end)):
                # A whole batch is not routed twice: its decision serves the link's first check too.
                self.decided = found if standalone or self.buf[batch_end - 5] == _S else None
                self._start(decision, batch_end)

    def _answer_without_server(self) -> bool:
        """Outside a transaction, Parse (of a statement some server accepted already), Close of a statement
        and Sync need no server: answer them here. Clients that prepare synchronously (pgbench -M prepared)
        would otherwise wait for a connection that another of their own sessions holds.
        Returns whether messages that need a server remain."""
        buf = self.buf
        n = len(buf)
        pos = answered = replied = 0
        replies: list[bytes] = []
        while n - pos >= 5:
            t = buf[pos]
            end = pos + 1 + _UNPACK(buf, pos + 1)[0]
            if end > n or end <= pos + 4:
                break
            if t == _P and buf[pos + 5]:
                name, body_start = pg.read_cstring(buf, pos + 5)
                statement = self.proxy.statements.known(bytes(buf[body_start:end]))
                if statement is None:
                    break
                self.statements[name] = statement
                replies.append(pg.PARSE_COMPLETE)
                if bytes(buf[body_start:body_start + 4]).lower() in _SESSION_PREFIXES:
                    self._track_set(pg.read_cstring(buf, body_start)[0].decode(errors="replace"), None)
            elif t == _C and buf[pos + 5] == _S and buf[pos + 6]:
                self.statements.pop(bytes(buf[pos + 6:end - 1]), None)
                replies.append(pg.CLOSE_COMPLETE)
            elif t == _S:
                replies.append(pg.READY[pg.IDLE])
                answered, replied = end, len(replies)
            else:
                break
            pos = end
        if answered:
            self.transport.write(b"".join(replies[:replied]))
            del buf[:answered]
        return n - answered >= 5

    def link(self, server: ServerConnection) -> None:
        """Serve this client's messages on `server` until its transaction (or session) ends."""
        self.wait_started = 0.0
        self.server = server
        server.client = self
        server.peer = self
        self.peer = server
        if self.transaction_pooling:
            server.on_ready = self._server_ready
        server.transport.resume_reading()
        if self.params != server.reported or self.param_sql != server.param_sql:  # compared in C: the rule is equal
            statements = session_params.sync_statements(self.params, self.param_sql, server.params, server.param_sql)
            if statements:
                server.pending.append(HIDDEN_QUERY)
                server.write(pg.query("; ".join(statements)))
        if self.routes:
            self.on_primary = self.proxy.is_primary(server.pool.node)
            self.tx_open = bool(self.held)
            for replay in self.held:  # the transaction's BEGIN and SETs, now that it has a shard
                server.pending.append(HIDDEN_QUERY)
                server.write(replay)
        data, self.buf = self.buf, bytearray()
        self._forward(data)
        self.decided = None

    def _server_ready(self, server: ServerConnection) -> None:
        """Transaction pooling: once the transaction is over, the connection goes back to the pool."""
        if server.status != pg.IDLE or server.cancels or self.mid_batch or server.ignoring:
            return
        if self.wrote:  # read-your-writes: learn where this commit ends in the WAL before letting go
            self.wrote = False
            self.tx_open = False  # over: a statement for another shard arriving meanwhile waits, is not refused
            server.pending.append((QUERY, HIDE, self._committed_at))
            server.write(_COMMIT_LSN)
            return
        self.server = self.peer = None
        self.pool.release(server)
        self._transaction_ended()
        if self.proxy.shutting_down:
            self._fatal(pg.PostgresError(pg.ADMIN_SHUTDOWN, "shardproxy is shutting down"))
        elif self.buf and not self.closed:
            self.on_data(b"")

    # Frames what the client sent, records each request in the server's `pending` queue and forwards the
    # bytes unchanged; calls back the methods below for routing, named statements and session statements.
    _forward = forward_requests

    def _route_batch_here(self, buf, pos: int) -> tuple[int, int, int, bool]:
        """At the start of a batch on a linked connection: (where the next batch starts, the position of
        its deciding message or -1, the position of a statement to refuse or -1, whether the batch may run
        here at all). Every other Bind of the batch is checked as it is forwarded (see _batch_member)."""
        found = self.decided if pos == 0 and self.decided is not None else self._batch_route(buf, pos)
        if found is None:  # its deciding message has not arrived: it runs here
            return -1, -1, -1, True
        decision, batch_end, decider, standalone = found
        kind = decision.route.kind
        if standalone and kind in ("set_shard_key", "reset_shard_key"):
            self.session_key = decision.plan.shard_key_value if kind == "set_shard_key" else None
            self._refusal = ""
            self._local_reply = _SET_DONE if kind == "set_shard_key" else _RESET_DONE
            return batch_end, decider, decider, True
        verdict = self._check_route(decision)
        if verdict == _STOP:
            return -1, -1, -1, False
        if verdict == _REFUSE:
            route = decision.route
            self._refusal = route.message if route.target == "error" else self._cross_shard_message(route)
            return batch_end, decider, decider, True
        return batch_end, decider, -1, True

    def _batch_member(self, buf, pos: int, end: int) -> str:
        """A Bind of a batch that some other message decided: why it cannot run here, or "" if it can.
        Everything up to a Sync is one implicit transaction on one server, so a statement for another
        shard (or for every shard) cannot be sent anywhere else: it is refused, which aborts the batch."""
        decision = self._bind_decision(buf, pos, end, self.unnamed)
        if self._check_route(decision) == _GO:
            return ""
        route = decision.route
        if route.target == "error":
            return route.message or "shardproxy: cannot route"
        return self._cross_shard_message(route)

    # -- routing: which shard and node a transaction runs on ------------------------------------------
    def _batch_route(self, buf, start: int) -> tuple[Decision, int, int, bool] | None:
        """The routing decision for the batch at `start`: (decision, where the batch ends, where its
        deciding message is, whether it is one simple Query). A batch is a Query, or extended-protocol
        messages up to Sync, decided by its first Bind that names a shard (or every shard), else by its first
        Bind. None while the deciding message has not fully arrived."""
        n = len(buf)
        pos = start
        unnamed = self.unnamed
        first = None  # the first Bind's decision, when it names no shard (BEGIN, SET, SELECT 1)
        while n - pos >= 5:
            t = buf[pos]
            end = pos + 1 + _UNPACK(buf, pos + 1)[0]
            if end > n:
                return None
            if t == _Q:
                if pos > start:  # extended messages before a Query go first, on their own
                    return (first[0], pos, first[2], False) if first else (self.proxy.any_decision, pos, pos, False)
                return self._query_decision(buf, pos, end), end, pos, True
            if t == _P:
                name, body_start = pg.read_cstring(buf, pos + 5)
                statement = self.proxy.statements.get(bytes(buf[body_start:end]))
                if name:
                    self.statements[name] = statement
                else:
                    unnamed = self.unnamed = statement
            elif t == _B:
                decision = self._bind_decision(buf, pos, end, unnamed)
                if decision.route.target != "any":
                    return decision, _batch_end(buf, end), pos, False
                first = first or (decision, _batch_end(buf, end), pos, False)
            elif t == _S or t == _H or t == _F:
                return first or (self.proxy.any_decision, end, pos, False)
            pos = end
        return None

    def _query_decision(self, buf, pos: int, end: int) -> Decision:
        router = self.proxy.router
        sql = bytes(buf[pos + 5:end - 1]).decode(errors="replace")
        plan, literals = router.plan_simple(sql)
        return Decision(router.route(plan, literals, None, self.session_key), plan, sql)

    def _bind_decision(self, buf, pos: int, end: int, unnamed: Statement | None) -> Decision:
        portal_end = buf.index(0, pos + 5)
        name_end = buf.index(0, portal_end + 1)
        statement = self.statements.get(bytes(buf[portal_end + 1:name_end])) if name_end > portal_end + 1 else unnamed
        if statement is None:  # the server will say it does not exist
            return self.proxy.any_decision
        router = self.proxy.router
        if statement.plan is None:
            statement.plan = router.plan(statement.sql)
        body = bytes(buf[pos + 5:end])
        types = statement.param_types

        def parameter(number: int) -> object:
            value, fmt = bind_parameter(body, number)
            oid = types[number - 1] if number <= len(types) else 0
            return None if value is None else decode_key(value, fmt, oid)

        return Decision(router.route(statement.plan, (), parameter, self.session_key), statement.plan, statement.sql)

    def _cross_shard_message(self, route: Route) -> str:
        here = self.proxy.config.shards[self.shard].name
        if route.target == "shard" and route.shard == self.shard:
            return f"shardproxy: this transaction runs on a replica of shard {here}; a write cannot join it"
        if route.target == "shard":
            there = self.proxy.config.shards[route.shard].name
            return f"shardproxy: this transaction runs on shard {here}; a statement for shard {there} cannot join it"
        return f"shardproxy: a statement on every shard cannot run inside a transaction on shard {here}"

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
            reply = pg.error(pg.FEATURE_NOT_SUPPORTED, route.message or "shardproxy: cannot route") + \
                pg.READY[pg.FAILED_TRANSACTION if held else pg.IDLE]
        else:
            return False
        del self.buf[:end]
        self.transport.write(reply)
        return True

    def _start(self, decision: Decision, batch_end: int) -> None:
        """Open the transaction where the route says: one shard's node, or several shards at once."""
        route = decision.route
        if route.target in ("scatter", "all"):
            if self.buf[batch_end - 5] != _S and self.buf[0] != _Q:
                return  # a multi-shard batch runs whole: wait for its Sync
            batch = bytes(self.buf[:batch_end])
            del self.buf[:batch_end]
            self.busy = True
            asyncio.get_running_loop().create_task(self._run_on_shards(decision, batch))
            return
        # A refused extended-protocol batch goes to the home shard, whose server raises the refusal (_forward).
        shard = route.shard if route.target == "shard" else self.home
        if route.kind == "begin" and not self.held and self.buf[0] != _Q:
            # BEGIN in the extended protocol (psycopg's executemany, pipelines) runs at once on the home
            # shard: tentatively, as a held BEGIN would, and replayed where the transaction moves.
            self.begin_replay = pg.query(decision.sql)
            self.read_only = decision.plan.read_only
            self.tentative = True
        else:
            self.tentative = route.target != "shard" and bool(self.held)
        write = route.write or (bool(self.held) and not self.read_only)
        pool = self.proxy.node_pool(self, shard, write, route.force_primary)
        if pool is None:
            self._await_primary(shard)
            return
        self.shard = shard
        self.wrote = write and self.proxy.tracks_writes(shard)
        self._acquire(pool)

    def _acquire(self, pool: Pool) -> None:
        self.pool = pool
        pool.acquire(self)  # links now, or when a connection is free

    def _await_primary(self, shard: int) -> None:
        """No primary for the shard: hold the transaction (not fail it) while a failover may bring one."""
        self.busy = True
        asyncio.get_running_loop().create_task(self._held_for_failover(shard))

    async def _held_for_failover(self, shard: int) -> None:
        name = self.proxy.config.shards[shard].name
        timeout = self.proxy.config.routing.failover_timeout
        if name in self.proxy.admin.paused:  # its primary may be restarting under PAUSE: wait as PAUSE promises
            timeout = max(timeout, self.proxy.config.pool.query_wait_timeout)
        node = await self.proxy.health.wait_for_primary(name, timeout)
        self.busy = False
        if node is None:
            self._fatal(pg.PostgresError(pg.CANNOT_CONNECT_NOW, f"shardproxy: shard {name} has no primary"))
        else:
            self._dispatch()

    async def _run_on_shards(self, decision: Decision, batch: bytes) -> None:
        from shardproxy import fanout  # its legs are client connections: imported late, not circularly

        held = bool(self.held)
        status = pg.IN_TRANSACTION if held else pg.IDLE
        try:
            reply = await fanout.run(self, decision, batch, status)
        except pg.PostgresError as exc:
            reply = exc.to_message() + pg.READY[pg.FAILED_TRANSACTION if held else pg.IDLE]
        except Exception as exc:  # a bug must cost this statement, not the client's connection
            log.exception("client %d: statement on several shards failed", self.id)
            error = pg.PostgresError(pg.INTERNAL_ERROR, f"shardproxy: internal error: {exc}")
            reply = error.to_message() + pg.READY[pg.FAILED_TRANSACTION if held else pg.IDLE]
        if held and reply.endswith(pg.READY[pg.FAILED_TRANSACTION]):
            self.held_failed = True
        elif held and decision.route.target == "all":  # say so: a later ROLLBACK cannot undo it
            reply = _COMMITTED_ALREADY + reply
        self.busy = False
        if not self.closed:
            self.transport.write(reply)
            self._dispatch()

    def _check_route(self, decision: Decision) -> int:
        """Whether a statement met on a linked connection may run there (GO), must wait for the next
        transaction (STOP), or is refused by making the server raise the error (REFUSE)."""
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
            self.wrote = self.wrote or (route.write and self.proxy.tracks_writes(self.shard))
            return _GO
        if self.tentative or not in_transaction:
            return _STOP
        return _REFUSE

    def _committed_at(self, _: ServerConnection, t: int, body: bytes) -> None:
        """The answer to _COMMIT_LSN: this client's reads on the shard need a replica that has replayed it."""
        if t == _D and self.shard >= 0:
            (length,) = pg.INT32.unpack_from(body, 2)
            self.min_lsn[self.shard] = parse_lsn(bytes(body[6:6 + length]).decode())

    def _transaction_ended(self) -> None:
        self.mid_batch = self.stopped = False
        if self.routes:
            self._routed_transaction_ended()

    def _routed_transaction_ended(self) -> None:
        self.shard = -1
        self.tx_open = self.tentative = False
        self.avoid.clear()
        if self.switching:  # moving to another shard: the held BEGIN and SETs are replayed there
            self.switching = False
        else:
            self.held.clear()
            self.held_failed = self.read_only = False
            self.begin_replay = None

    def _refuse(self, message: str, buf, pos: int, end: int, out: list) -> None:
        """Make the linked server raise the refusal, so that it also aborts the transaction there."""
        sql = f"DO $shardproxy$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {session_params.literal(message)}; END $shardproxy$"
        if buf[pos] == _Q:
            out.append(pg.query(sql))
            self.server.pending.append(QUERY_REQ)
            return
        portal_end = buf.index(0, pos + 5)  # a Bind: bind the client's portal to the raising statement
        out.append(pg.message(b"P", b"\0" + pg.cstring(sql) + b"\0\0"))
        self.server.pending.append((PARSE, HIDE, None))
        out.append(pg.message(b"B", bytes(buf[pos + 5:portal_end + 1]) + b"\0" + b"\0" * 6))
        self.server.pending.append(BIND_REQ)

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

    # -- named prepared statements --------------------------------------------------------------------
    def _parse(self, buf, pos: int, end: int, out: list) -> None:
        name, body_start = pg.read_cstring(buf, pos + 5)
        statement = self.proxy.statements.get(bytes(buf[body_start:end]))
        self.statements[name] = statement
        server = self.server
        if statement.name in server.prepared:
            server.prepared.move_to_end(statement.name)
            server.enqueue_synthetic(_PARSE_DONE)
        else:
            out.append(statement.parse)
            server.pending.append((PARSE, FORWARD, statement))
            server.remember_prepared(statement.name, self.proxy.config.pool.prepared_statements_per_server, out)

    def _ensure_prepared(self, statement: Statement, out: list) -> None:
        """Prepare the statement on the linked server first if it lacks it, hiding the ParseComplete."""
        server = self.server
        if statement.name in server.prepared:
            server.prepared.move_to_end(statement.name)
        else:
            out.append(statement.parse)
            server.pending.append((PARSE, HIDE, statement))
            server.remember_prepared(statement.name, self.proxy.config.pool.prepared_statements_per_server, out)

    def _bind(self, buf, pos: int, portal_end: int, end: int, out: list) -> None:
        name_end = buf.index(0, portal_end + 1)
        statement = self.statements.get(bytes(buf[portal_end + 1:name_end]))
        if statement is None:  # unknown to us: let the server say so, in its own words
            out.append(buf[pos:end])
            return
        self._ensure_prepared(statement, out)
        rest = buf[name_end + 1:end]
        portal = buf[pos + 5:portal_end + 1]
        out.append(pg.message(b"B", bytes(portal) + statement.bind_prefix + bytes(rest)))

    def _statement_message(self, t: int, name: bytes, out: list) -> None:
        """Describe or Close of a named statement."""
        server = self.server
        if t == _C:
            self.statements.pop(name, None)  # the server keeps it for whoever prepares it next
            server.enqueue_synthetic(_CLOSE_DONE)
            return
        statement = self.statements.get(name)
        if statement is None:
            out.append(pg.message(b"D", b"S" + name + b"\0"))
        else:
            self._ensure_prepared(statement, out)
            out.append(pg.message(b"D", b"S" + statement.bind_prefix))
        server.pending.append((DESCRIBE, FORWARD, statement))

    # -- session statements in simple queries ---------------------------------------------------------
    def _session_statement(self, message: bytes, out: list) -> None:
        """SET/RESET of tracked parameters, DEALLOCATE and DISCARD ALL: the proxy keeps its books straight."""
        server = self.server
        sql = message[5:-1].decode(errors="replace")
        target = deallocate_target(sql)
        if target == "" or (target is not None and target.encode() in self.statements):
            if target:
                self.statements.pop(target.encode())
            else:
                self.statements.clear()
            server.enqueue_synthetic(_DEALLOCATE_DONE if target else _DEALLOCATE_ALL_DONE)
            return
        out.append(message)
        if is_discard_all(sql):
            server.pending.append((QUERY, FORWARD, self._discarded))
            return
        server.pending.append(QUERY_REQ)
        self._track_set(sql, server)

    def _track_set(self, sql: str, server: ServerConnection | None) -> None:
        """Note a SET/RESET of an unreported parameter (or RESET ALL) as the client's and the server's.
        The server undoes it if the transaction rolls back: so does the proxy (see ServerConnection)."""
        tracked = session_params.tracked_set(sql)
        reset_all = tracked is None and session_params.is_reset_all(sql)
        if tracked is None and not reset_all:
            return
        owners = [self.param_sql]
        if server is not None:
            if server.settings_before is None:
                server.settings_before = (dict(self.param_sql), dict(server.param_sql))
            owners.append(server.param_sql)
        for owner in owners:
            if reset_all:
                owner.clear()
            elif tracked[1] is None:
                owner.pop(tracked[0], None)
            else:
                owner[tracked[0]] = tracked[1]

    def _discarded(self, server: ServerConnection, _: int, tag: bytes) -> None:
        if tag == b"DISCARD ALL":
            server.prepared.clear()
            server.param_sql.clear()
            self.statements.clear()
            self.param_sql.clear()

    # -- endings ----------------------------------------------------------------------------------------
    def server_lost(self, server: ServerConnection) -> None:
        """The linked server connection broke: the client's transaction is gone, and so is the client."""
        if self.server is server:
            self.server = self.peer = None
            self._fatal(pg.PostgresError(pg.CONNECTION_FAILURE, "shardproxy: server connection lost"))

    def fail(self, error: pg.PostgresError) -> None:
        """Waiting for a server connection failed (timeout, server down). Before any byte of the
        transaction reached a server, a read moves on to the next node and a write waits for a failover."""
        self.wait_started = 0.0
        pool, shard = self.pool, self.shard
        if error.code != pg.CONNECTION_FAILURE or not self.routes or shard < 0 or self.closed:
            self._fatal(error)
        elif self.proxy.is_primary(pool.node) or self.held:
            self.shard = -1
            self._await_primary(shard)
        else:
            self.avoid.add(pool.node.address)
            self.shard = -1
            self._dispatch()

    def _fatal(self, error: pg.PostgresError) -> None:
        if not self.closed and self.transport is not None:
            self.proxy.metrics.client_error(error)
            self.transport.write(error.to_message("FATAL"))
            self.reason = self.reason or error.message
        self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.proxy.forget(self)
        if self.user:  # a login was attempted: not a cancel request, nor a probe of the port
            reason = self.reason or (f"connection lost: {exc}" if exc else "client closed the connection")
            seconds = round(time.time() - self.connected_at, 3)
            log.info("client %d %s disconnected after %.3fs: %s", self.id, self.address, seconds, reason,
                     extra={"event": "disconnect", "client": self.id, "user": self.user, "seconds": seconds,
                            "reason": reason})
        if self.pool is not None and self.wait_started:
            self.pool.cancel_waiting(self)
        server, self.server = self.server, None
        if server is None:
            return
        self.pool.unlink(server)
        if server.pending or server.status != pg.IDLE or self.mid_batch or server.ignoring:
            self.pool.discard(server)  # mid-transaction: closing is the sure way to roll it back
        elif not self.transaction_pooling:
            self.pool.reset_and_release(server)
        else:
            self.pool.release(server)
