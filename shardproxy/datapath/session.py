"""A client's session as the data path keeps it: its names for prepared statements, and the session parameters
that follow it from one pooled server connection to the next.

ClientSession is what a real client connection (client.py) and a fanout leg (fanout/legs.py) have in common: the
compiled request loop (ClientCore) calls the hooks below for the messages that change the proxy's books, named
prepared statements (Parse/Bind/Describe/Close) and session statements in simple queries (SET/RESET, DEALLOCATE,
DISCARD ALL); everything else is forwarded as the bytes it arrived in.

A statement the client drops is retired (statements.py), so that its text parsed again is planned afresh, as on
PostgreSQL. When a server finds a statement's plan out of date (a table's columns changed, a type it names was
made again), the statement is retired too, and the client's batch runs again on a fresh one where the client
cannot tell (see _statement_failed); else the client gets the error, as a client that prepared the statement
before the change would from PostgreSQL.
"""

from __future__ import annotations

import logging
from typing import Any

from shardproxy.datapath import params as session_params
from shardproxy.datapath._core import (
    ClientCore,
    ProxyCore,
    ServerCore,
    batch_end,
    bind_statement,
    is_session_statement,
    well_formed,
)
from shardproxy.datapath.pending import BIND_REQ, EXECUTE_REQ, QUERY_REQ, Action, Kind, Request
from shardproxy.datapath.statements import Statement, deallocate_target
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Frontend

log = logging.getLogger("shardproxy.client")

_UNPACK = pg.INT32.unpack_from
_DEALLOCATE_DONE = Request(Kind.QUERY, Action.SYNTH, pg.command_complete("DEALLOCATE"))
_DEALLOCATE_ALL_DONE = Request(Kind.QUERY, Action.SYNTH, pg.command_complete("DEALLOCATE ALL"))
_EMPTY_BIND = pg.message(b"B", b"\0\0" + b"\0" * 6)  # the unnamed portal of the unnamed statement, no values
_EXECUTE_ALL = pg.message(b"E", b"\0" + b"\0" * 4)
_HIDDEN_SYNC = Request(Kind.SYNC, Action.HIDE)


def raising_statement(code: str, message: str) -> str:
    """A statement that makes the server raise this error: it then aborts the transaction, and skips to Sync,
    as for an error of its own."""
    return (f"DO $shardproxy$ BEGIN RAISE EXCEPTION USING ERRCODE = {session_params.literal(code)}, "
            f"MESSAGE = {session_params.literal(message)}; END $shardproxy$")


def out_of_date(error: dict[str, str]) -> bool:
    """Whether a server refused a prepared statement because its plan is older than the objects it names: the
    result columns changed (0A000), or a type it names was dropped (and perhaps made again)."""
    code, message = error.get("C"), error.get("M", "")
    return (code == pg.FEATURE_NOT_SUPPORTED and message == "cached plan must not change result type"
            or code == pg.INTERNAL_ERROR and message.startswith("cache lookup failed for type "))


class ClientSession(ClientCore):
    """Statement names and session parameters of one client, on whichever server connection serves it."""

    def __init__(self, core: ProxyCore, client_id: int, user: str, database: str, kind: str | None = None,
                 of: ClientSession | None = None):
        """kind: what its transactions count as in queries_total (a fanout leg's statement); None: by node role.
        of: the session whose statement names and parameters this one shares (a fanout leg's client)."""
        self.core = core
        self.id = client_id
        self.user, self.database, self.kind = user, database, kind
        self.statements: dict[bytes, Statement] = {} if of is None else of.statements  # the client's statement names
        self.described: set[bytes] = set()  # names whose result columns the client asked for (Describe)
        # The linked server serves this client alone (session pooling): statements it drops go from there too.
        self.owns_server = False
        # Reported parameters as the client set them, a shared dict; unreported ones: the client's last SET of each.
        self.params = session_params.shared({}) if of is None else of.params
        self.param_sql: dict[str, str] = {} if of is None else of.param_sql

    # -- named prepared statements --------------------------------------------------------------------
    def _parse(self, buf: Any, pos: int, end: int, out: list[bytes]) -> None:
        name, body_start = pg.read_cstring(buf, pos + 5)
        statement = self.core.statements.get(bytes(buf[body_start:end]))
        undo = self._name(name, statement)
        server = self.server
        if server.reuse_prepared(statement.name):
            server.enqueue_synthetic(Request(Kind.PARSE, Action.SYNTH, pg.PARSE_COMPLETE, undo))
        else:
            out.append(statement.parse)
            server.pending.append(Request(Kind.PARSE, Action.FORWARD, statement, undo))
            server.remember_prepared(statement.name, self.core.prepared_per_server, out)

    def _name(self, name: bytes, statement: Statement | None) -> tuple[Any, ...]:
        """Give one of the client's statement names to a statement (None: the name goes). Returns the call that
        takes it back, for the server to make should it skip the message that did it (see _skip_to_sync)."""
        undo = (self._name, name, self.statements.get(name))
        self.described.discard(name)
        if statement is None:
            self.statements.pop(name, None)
        else:
            self.statements[name] = statement
        return undo

    # _bind and _ensure_prepared are ClientCore's (_core.pyx): they run for each Bind of a named statement.

    def _statement_message(self, t: int, name: bytes, out: list[bytes]) -> None:
        """Describe or Close of a named statement."""
        server = self.server
        statement = self.statements.get(name)
        if t == Frontend.CLOSE:
            undo = self._name(name, None)
            if statement is not None:
                self._drop(statement, out)
            server.enqueue_synthetic(Request(Kind.CLOSE, Action.SYNTH, pg.CLOSE_COMPLETE, undo))
            return
        if statement is None:
            out.append(pg.message(b"D", b"S" + name + b"\0"))
        else:
            self._ensure_prepared(statement, out)
            out.append(pg.message(b"D", b"S" + statement.bind_prefix))
            self.described.add(name)
        server.pending.append(Request(Kind.DESCRIBE, Action.FORWARD, statement))

    def _drop(self, statement: Statement, out: list[bytes] | None) -> None:
        """The client dropped a statement: its text, parsed again, is planned afresh. A server connection that
        serves this client alone closes it too (unless another of the client's names holds it), so that
        pg_prepared_statements lists what the client holds; in transaction pooling the connection keeps it for
        the other clients that hold it. out: what goes to the linked server (None: none is linked)."""
        self.core.statements.retire(statement)
        server = self.server
        if out is None or server is None or not self.owns_server or statement in self.statements.values():
            return
        name = statement.name
        if name in server.prepared:
            del server.prepared[name]
            out.append(pg.message(b"C", b"S" + name + b"\0"))
            server.pending.append(Request(Kind.CLOSE, Action.HIDE, None, (server.prepared.__setitem__, name, None)))

    def _drop_all(self) -> None:
        for statement in self.statements.values():
            self.core.statements.retire(statement)
        self.statements.clear()
        self.described.clear()

    def _statements_dropped(self, discard: bool) -> None:
        """The server ran the client's DEALLOCATE ALL or DISCARD ALL (in either protocol)."""
        self._drop_all()
        if discard:
            self.param_sql.clear()

    # -- a statement whose plan is out of date -----------------------------------------------------------
    def _statement_failed(self, server: ServerCore, body: bytes | bytearray) -> bool:
        """The server refused a Bind or Describe of one of the client's statements (the oldest request in its
        queue). If it says the statement's plan is out of date, every server's copy of it is: its text is
        prepared afresh from now on. And if the client cannot have seen anything of the old plan, the batch runs
        again at once on a fresh statement, as PostgreSQL would have planned it for a client that prepared it
        after the change: the batch started outside a transaction block with nothing else of the client's in
        flight (so the error undid nothing it was told of), it is the last batch sent, and it starts with that
        Describe, or that Bind of a statement whose result columns the client never asked for. Returns whether
        it ran again (the error and the batch's first ReadyForQuery are then hidden)."""
        if not out_of_date(pg.parse_fields(body)):
            return False
        statement: Statement = server.pending[0][2]
        self.core.statements.retire(statement)
        batch = self._batch_to_retry(server, statement)
        if batch is None:
            return False
        name, data = batch
        server._skip_to_sync()
        if len(server.pending) != 1:  # more was sent after the batch: it would answer first
            return False
        server.pending.popleft()  # the batch's Sync, whose ReadyForQuery the client gets from the batch sent again
        server.pending.append(_HIDDEN_SYNC)
        self.statements[name] = self.core.statements.get(statement.body)
        log.info("client %d: statement %s out of date on server %s; prepared again as %s", self.id,
                 statement.name.decode(), server.pool.node_label, self.statements[name].name.decode())
        closing: list[bytes] = []
        self._drop(statement, closing)  # (from a server connection of the client's own, if no name holds it)
        if closing:
            server.write(b"".join(closing))
        ClientCore._forward(self, data)
        self.retry_buf = None  # at most once
        return True

    def _batch_to_retry(self, server: ServerCore, statement: Statement) -> tuple[bytes, bytes] | None:
        """The client's name for the statement and the batch that starts with the failed request, if it may run
        again (see _statement_failed)."""
        buf, pos = self.retry_buf, self.retry_pos
        self.retry_buf = None
        if (buf is None or self.retry_request != server.pending.popped or self.server is not server or self.routes
                or not self.gives_back):
            return None
        end = batch_end(buf, pos)
        first_end = pos + 1 + _UNPACK(buf, pos + 1)[0]
        if end - 5 < first_end or buf[end - 5 : end] != pg.SYNC:  # its Sync came in a later read
            return None
        if buf[pos] == Frontend.BIND:
            name = bind_statement(buf, pos, first_end)
            if name is None or name in self.described:  # the client knows the old plan's columns
                return None
        else:
            name = bytes(buf[pos + 6 : first_end - 1])
        if self.statements.get(name) is not statement:
            return None
        return name, bytes(buf[pos:end])

    def _answer_without_server(self) -> bool:
        """Outside a transaction, Parse (of a statement some server accepted already), Close of a statement
        and Sync need no server: answer them here. Clients that prepare synchronously (pgbench -M prepared)
        would otherwise wait for a connection that another of their own sessions holds.
        Returns whether messages that need a server remain. Inside a transaction every message goes to one of
        its server connections, which answers as PostgreSQL does (an aborted transaction refuses a Parse)."""
        if self.replay:
            return True
        buf = self.buf
        n = len(buf)
        pos = answered = replied = 0
        replies: list[bytes] = []
        while n - pos >= 5:
            t = buf[pos]
            end = pos + 1 + _UNPACK(buf, pos + 1)[0]
            if end > n or end <= pos + 4 or not well_formed(buf, pos, end):  # malformed: the framing refuses it
                break
            if t == Frontend.PARSE and buf[pos + 5]:
                name, body_start = pg.read_cstring(buf, pos + 5)
                statement = self.core.statements.known(bytes(buf[body_start:end]))
                if statement is None:
                    break
                self._name(name, statement)
                replies.append(pg.PARSE_COMPLETE)
                if is_session_statement(buf, body_start, end):
                    self._track_set(pg.read_cstring(buf, body_start)[0].decode(errors="replace"), None)
            elif t == Frontend.CLOSE and buf[pos + 5] == ord("S") and buf[pos + 6]:
                name = bytes(buf[pos + 6 : end - 1])
                statement = self.statements.get(name)
                self._name(name, None)
                if statement is not None:
                    self._drop(statement, None)
                replies.append(pg.CLOSE_COMPLETE)
            elif t == Frontend.SYNC:
                replies.append(pg.READY[pg.IDLE])
                answered, replied = end, len(replies)
            else:
                break
            pos = end
        if answered:
            self.write(b"".join(replies[:replied]))
            del buf[:answered]
        return n - answered >= 5

    def _names_proxy_statements(self, buf: Any, pos: int, end: int, out: list[bytes]) -> None:
        """A Query or Parse that names the proxy's server-side statements, which other clients run: refused."""
        prefix = self.core.statements.prefix.decode()
        self._raise(pg.INSUFFICIENT_PRIVILEGE, f'shardproxy: the prepared statements named "{prefix}..." are the '
                    "proxy's own: a client may not name them", buf, pos, end, out)

    def _raise(self, code: str, message: str, buf: Any, pos: int, end: int, out: list[bytes]) -> None:
        """Make the linked server raise this error in place of the Query, Parse or Bind at buf[pos:end]."""
        server = self.server
        sql = raising_statement(code, message)
        if buf[pos] == Frontend.QUERY:
            out.append(pg.query(sql))
            server.pending.append(QUERY_REQ)
            return
        out.append(pg.message(b"P", b"\0" + pg.cstring(sql) + b"\0\0"))
        server.pending.append(Request(Kind.PARSE, Action.HIDE))
        if buf[pos] == Frontend.BIND:  # the client's portal, bound to the raising statement: its Execute raises
            portal_end = buf.index(0, pos + 5)
            out.append(pg.message(b"B", bytes(buf[pos + 5 : portal_end + 1]) + b"\0" + b"\0" * 6))
            server.pending.append(BIND_REQ)
            return
        out.append(_EMPTY_BIND + _EXECUTE_ALL)  # a Parse: the error comes at once, in its place
        server.pending.append(Request(Kind.BIND, Action.HIDE))
        server.pending.append(EXECUTE_REQ)

    # -- session statements in simple queries ---------------------------------------------------------
    def _session_statement(self, message: bytes, out: list[bytes]) -> None:
        """SET/RESET of tracked parameters, DEALLOCATE and DISCARD ALL: the proxy keeps its books straight.
        A DEALLOCATE ALL or DISCARD ALL the server runs drops the client's statements (_statements_dropped)."""
        server = self.server
        sql = message[5:-1].decode(errors="replace")
        target = deallocate_target(sql)
        if target == "" and not self.owns_server:  # the server's statements serve other clients too
            self._drop_all()
            server.enqueue_synthetic(_DEALLOCATE_ALL_DONE)
            return
        statement = self.statements.get(target.encode()) if target else None
        if statement is not None:
            self._name(target.encode(), None)
            self._drop(statement, out)
            server.enqueue_synthetic(_DEALLOCATE_DONE)
            return
        out.append(message)
        server.pending.append(QUERY_REQ)
        self._track_set(sql, server)

    def _track_set(self, sql: str, server: ServerCore | None) -> None:
        """Note a SET/RESET of an unreported parameter (or RESET ALL) as the client's and the server's.
        The server undoes it if the transaction rolls back: so does the proxy (see ServerCore.on_data)."""
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
            elif tracked is not None and tracked[1] is None:
                owner.pop(tracked[0], None)
            elif tracked is not None:
                owner[tracked[0]] = tracked[1]
