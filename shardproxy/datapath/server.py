"""A pooled connection to one PostgreSQL server: login, and the response half of the data path.

The response loop is compiled (ServerCore.on_data in _core.pyx): it frames what the server sends, pops the
requests each response completes from `pending` (see pending.py), hides or synthesises answers, and forwards the
rest to the linked client. What is left here is the login, what a server says outside any request, and cancels.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from shardproxy.cluster.topology import NodeState
from shardproxy.datapath import params as session_params
from shardproxy.datapath._core import ServerCore
from shardproxy.datapath.connection import Connection
from shardproxy.datapath.statements import SERVER_NAME
from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg
from shardproxy.wire.auth import ProvenKey, ServerAuthPolicy, ServerLogin
from shardproxy.wire.dial import Dialer
from shardproxy.wire.protocol import Backend

log = logging.getLogger("shardproxy.server")

CANCEL_TIMEOUT = 10.0  # seconds for a cancel request to reach the server
_SESSION_ENDINGS = frozenset(("FATAL", "PANIC"))  # the severities after which a server closes the connection


class ServerPool(Protocol):
    """The pool a server connection belongs to (pool.py), as the connection uses it."""

    node: NodeState
    node_label: str
    dialer: Dialer

    def discard(self, server: ServerConnection) -> None: ...
    def lost(self, server: ServerConnection) -> None: ...


class ServerConnection(ServerCore, Connection):
    pool: ServerPool

    def __init__(self, pool: ServerPool):
        Connection.__init__(self)
        self.pool = pool
        self.params: dict[str, str] = {}  # reported parameters, as ParameterStatus last said
        self.reported = session_params.shared({})  # those of them that follow clients (params.REPORTED)
        self.poller: select.poll | None = None  # for the check that an idle connection is still alive (pool.py)
        self.param_sql: dict[str, str] = {}  # unreported parameters: the statement that last set each
        self.pid = 0
        self.secret = 0
        self.prepared: OrderedDict[bytes, None] = OrderedDict()  # server-side statement names, LRU first
        self.created = self.last_used = time.monotonic()
        self.linked_at = 0.0  # when the current client got it, for transaction times (see Pool)
        self.cancels = 0  # cancel requests in flight: the connection is not reused until they land
        self.prepared_transactions: int | None = None  # max_prepared_transactions, once a commit asked (twophase.py)
        # Called whenever every request sent has been answered; whoever holds the connection decides.
        self.on_ready: Callable[[ServerConnection], None] | None = None
        # The client's and our param_sql before a SET in the current transaction, restored if it rolls back.
        self.settings_before: tuple[dict[str, str], dict[str, str]] | None = None
        # After an error the server skips every message up to the client's next Sync: the connection is kept.
        self.ignoring = False
        self.error_as: bytes | None = None  # the ErrorResponse that replaces the next one (see cancel_running)
        # The FATAL error the server ended its session with, passed on to the linked client (who was told why).
        self.ended: pg.PostgresError | None = None

    # -- login --------------------------------------------------------------------------------------
    async def login(self, user: str, password: str | None, database: str, proven: ProvenKey | None,
                    policy: ServerAuthPolicy) -> None:
        """Start up and authenticate as `policy` allows; raises PostgresError with the server's own error if
        refused, or with the proxy's when the server asks for what the policy refuses."""
        self.write(pg.startup_message({"user": user, "database": database}))
        answerer = ServerLogin(user, password, proven, policy)
        while True:
            kind, body = await self.read_message()
            if kind == Backend.AUTHENTICATION:
                reply = answerer.answer(body)
                if reply is not None:
                    self.write(reply)
            elif kind == Backend.PARAMETER_STATUS:
                self._record_parameter(body)
            elif kind == Backend.BACKEND_KEY_DATA:
                self.pid, self.secret = pg.INT32_PAIR.unpack_from(body, 0)
            elif kind == Backend.ERROR_RESPONSE:
                raise pg.PostgresError.from_body(body)
            elif kind == Backend.READY_FOR_QUERY:
                self.end_login()
                return

    # -- the response half of the data path: ServerCore.on_data, and this hook ---------------------------
    def _unsolicited(self, t: int, buf: bytes | bytearray, pos: int, end: int) -> bool:
        """A message outside any request: notices, notifications, parameter changes, a FATAL error.
        Returns whether to forward it to the client."""
        if t == Backend.PARAMETER_STATUS:
            self._record_parameter(buf[pos + 5 : end])
        elif t == Backend.ERROR_RESPONSE:
            error = pg.PostgresError.from_body(bytes(buf[pos + 5 : end]))
            log.warning("server %s: %s", self.pool.node_label, error.message)
            if self.client is not None and error.fields.get("V", error.severity) in _SESSION_ENDINGS:
                # It ends the session of the linked client (idle_in_transaction_session_timeout, idle_session_timeout,
                # a terminated backend): the client hears the server's own words, and goes when the server closes.
                self.ended = error
                return True
            self.pool.discard(self)
            return False
        return self.client is not None

    def _request_failed(self, body: bytes) -> None:
        """An extended-protocol request failed. A statement the books say is prepared here, which the server
        says does not exist, went by other means (a DEALLOCATE ALL among other statements, or one run by a
        function): forgotten, it is prepared again at its next use."""
        fields = pg.parse_fields(body)
        if fields.get("C") != pg.UNDEFINED_PSTATEMENT:
            return
        for name in SERVER_NAME.findall(fields.get("M", "").encode()):
            if name in self.prepared:
                del self.prepared[name]
                if self.newest == name:
                    self.newest = None
                log.warning("server %s: prepared statement %s was dropped behind the proxy's back",
                            self.pool.node_label, name.decode())

    # -- life cycle -----------------------------------------------------------------------------------
    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.pool.lost(self)

    def cancel_running(self, error: pg.PostgresError | None = None) -> None:
        """Forward a client's CancelRequest; hold this connection back from reuse until it has landed. The
        proxy's own cancels say why in `error`, which the client gets in place of the server's 57014."""
        if error is not None:
            self.error_as = error.to_message()
        self.cancels += 1
        spawn(self._send_cancel())

    async def _send_cancel(self) -> None:
        node = self.pool.node
        try:  # encrypted as the pool's connections are: the cancel key is a credential
            await asyncio.wait_for(self.pool.dialer.cancel(node.host, node.port, pg.cancel_request(self.pid,
                                                                                               self.secret)),
                                   CANCEL_TIMEOUT)
        except (TimeoutError, OSError, pg.PostgresError) as exc:
            log.warning("cancel request to %s failed: %s", self.pool.node_label, exc or "timeout")
        finally:
            self.cancels -= 1
            if self.cancels == 0 and not self.pending and self.on_ready is not None:
                self.on_ready(self)
