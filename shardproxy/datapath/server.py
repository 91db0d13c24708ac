"""A pooled connection to one PostgreSQL server: login, and the response half of the data path.

While a client is linked, every request forwarded to the server is recorded in `pending` as a
(kind, action, arg) tuple, and every response that completes a request pops it. That queue is what lets the
proxy hide the replies to requests it injected (a Parse for a statement this server lacks, a SET that brings
the session in line with the client's), answer requests it handled itself in their proper place (SYNTH), and
know when the server is free again: nothing pending and ReadyForQuery said idle. A request that changed the
proxy's books on statements (a client's name given or closed, a statement closed here to make room) carries a
fourth item: the call that takes the change back, made if the server skips the request after an error.
"""

from __future__ import annotations

import asyncio
import logging
import select
import sys
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

from shardproxy import protocol as pg
from shardproxy._wire import CLOSE, HIDE, PARSE, QUERY, SYNC, SYNTH, ServerCore
from shardproxy.auth import ProvenKey, ServerLogin
from shardproxy.connection import Connection
from shardproxy.params import REPORTED, shared, with_value
from shardproxy.tls import send_cancel

if TYPE_CHECKING:
    from shardproxy.client import ClientConnection
    from shardproxy.pool import Pool

log = logging.getLogger("shardproxy.server")

# The request kinds and actions of `pending`, and the loop that handles responses, are compiled (_wire.pyx).
Request = tuple[Any, ...]  # (kind, action, arg), and for a change to the books the call that undoes it


_S, _E, _Z = b"SEZ"


class ServerConnection(ServerCore, Connection):
    def __init__(self, pool: Pool):
        super().__init__()
        self.pool = pool
        self.params: dict[str, str] = {}  # reported parameters, as ParameterStatus last said
        self.reported = shared({})  # those of them that follow clients (params.REPORTED), a shared dict
        self.poller: select.poll | None = None  # for the check that an idle connection is still alive (pool.py)
        self.param_sql: dict[str, str] = {}  # unreported parameters: the statement that last set each
        self.pid = 0
        self.secret = 0
        self.status = pg.IDLE
        self.prepared: OrderedDict[bytes, None] = OrderedDict()  # server-side statement names, LRU first
        self.client: ClientConnection | None = None
        self.created = self.last_used = time.monotonic()
        self.linked_at = 0.0  # when the current client got it, for transaction times (see Pool)
        self.cancels = 0  # cancel requests in flight: the connection is not reused until they land
        # Called whenever every request sent has been answered; whoever holds the connection decides.
        self.on_ready: Callable[[ServerConnection], None] | None = None
        # The client's and our param_sql before a SET in the current transaction, restored if it rolls back.
        self.settings_before: tuple[dict[str, str], dict[str, str]] | None = None
        self.settings_undone = False  # an error or ROLLBACK since the last ReadyForQuery
        # After an error the server skips every message up to the client's next Sync: the connection is kept.
        self.ignoring = False

    # -- login --------------------------------------------------------------------------------------
    async def login(self, user: str, password: str | None, database: str, proven: ProvenKey | None = None) -> None:
        """Start up and authenticate; raises PostgresError with the server's own error if refused."""
        self.write(pg.startup_message({"user": user, "database": database}))
        answerer = ServerLogin(user, password, proven)
        while True:
            kind, body = await self.read_message()
            if kind == ord("R"):
                reply = answerer.answer(body)
                if reply is not None:
                    self.write(reply)
            elif kind == _S:
                self._record_parameter(body)
            elif kind == ord("K"):
                self.pid, self.secret = pg.INT32_PAIR.unpack_from(body, 0)
            elif kind == _E:
                raise pg.PostgresError.from_body(body)
            elif kind == _Z:
                self.end_login()
                return

    def _record_parameter(self, body: bytes) -> None:
        """A ParameterStatus: the server's value, and its linked client's too if the parameter follows clients
        (even for a hidden SET: the server's spelling is kept)."""
        name, offset = pg.read_cstring(body, 0)
        value, _ = pg.read_cstring(body, offset)
        # Interned: when two dicts of equal values are not the one shared dict, comparing them is identity checks.
        name, value = sys.intern(name.decode()), sys.intern(value.decode())
        self.params[name] = value
        if name in REPORTED:
            self.reported = with_value(self.reported, name, value)
            if self.client is not None:
                self.client.parameter_changed(name, value)

    # -- the response half of the data path ----------------------------------------------------------
    # on_data is ServerCore's (_wire.pyx): it frames what the server sent, pops the requests each response
    # completes, hides or synthesises, forwards the rest to the linked client, and calls on_ready once nothing
    # is pending. It calls the methods below for the unusual.

    def _skip_to_sync(self) -> None:
        """After an error the server skips every extended-protocol message up to the next Sync."""
        pending = self.pending
        undo = []
        while pending and pending[0][0] != SYNC:
            request = pending.popleft()  # a request the proxy answers itself goes unanswered too
            kind, action, arg = request[0], request[1], request[2]
            if kind == PARSE and action != SYNTH and arg is not None:
                self.prepared.pop(arg.name, None)  # the statement did not get prepared after all
            if len(request) > 3:
                undo.append(request[3])
        for call, *args in reversed(undo):  # the books as they were before the skipped requests
            call(*args)

    def _synthesize(self, out: list) -> None:
        """Answer, in their place in the stream, the requests the proxy handled itself."""
        pending = self.pending
        while pending and pending[0][1] == SYNTH:
            request = pending.popleft()
            kind, reply = request[0], request[2]
            out.append(reply + pg.READY[self.status] if kind == QUERY else reply)

    def _unsolicited(self, t: int, buf, pos: int, end: int) -> bool:
        """A message outside any request: notices, notifications, parameter changes, a FATAL error.
        Returns whether to forward it to the client."""
        if t == _S:
            self._record_parameter(buf[pos + 5 : end])
        elif t == _E:
            log.warning("server %s: %s", self.pool.node_label, pg.parse_fields(buf[pos + 5 : end]).get("M", ""))
            self.pool.discard(self)
            return False
        return self.client is not None

    def enqueue_synthetic(self, request: Request) -> None:
        """Record a request the proxy answers itself; with nothing ahead of it, answer at once."""
        self.pending.append(request)
        if len(self.pending) == 1 and self.client is not None:
            out: list = []
            self._synthesize(out)
            self.client.write(b"".join(out))

    def remember_prepared(self, name: bytes, limit: int, out: list) -> None:
        """Note a statement as prepared here; past the limit, close the least recently used one."""
        self.prepared[name] = None
        self.newest = name
        if len(self.prepared) > limit:
            old, _ = self.prepared.popitem(last=False)
            out.append(pg.message(b"C", b"S" + old + b"\0"))
            self.pending.append((CLOSE, HIDE, None, (self.prepared.__setitem__, old, None)))

    # -- life cycle -----------------------------------------------------------------------------------
    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.pool.lost(self)

    def cancel_running(self) -> None:
        """Forward a client's CancelRequest; hold this connection back from reuse until it has landed."""
        self.cancels += 1
        asyncio.get_running_loop().create_task(self._send_cancel())

    async def _send_cancel(self) -> None:
        node, proxy = self.pool.node, self.pool.proxy
        packet = pg.cancel_request(self.pid, self.secret)
        try:  # encrypted as the pool's connections are: the cancel key is a credential
            await asyncio.wait_for(send_cancel(node.host, node.port, proxy.config.server_tls.mode, proxy.server_ssl,
                                               packet), 10)
        except (OSError, asyncio.TimeoutError, pg.PostgresError) as exc:
            log.warning("cancel request to %s failed: %s", self.pool.node_label, exc or "timeout")
        finally:
            self.cancels -= 1
            if self.cancels == 0 and not self.pending and self.on_ready is not None:
                self.on_ready(self)
