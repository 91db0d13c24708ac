"""A client connection: startup and authentication, then the request half of the data path.

After login every message the client sends is framed (the loop is compiled: _wire.pyx), recorded in the linked
server connection's `pending` queue (see server.py) and forwarded as the bytes it arrived in. Only named
prepared statements (Parse/Bind/Describe/Close), and a few session-level statements in simple queries, are
rewritten or answered by the proxy. Between transactions the client takes a server connection from a pool and
gives it back after; in sharded configurations its routing half (routing.py) says which shard and node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING

from shardproxy import params as session_params
from shardproxy import protocol as pg
from shardproxy.admin import ADMIN_DATABASE
from shardproxy.auth import (
    ProvenKey, ScramException, ScramServerExchange, is_scram_verifier, md5_answer, parse_sasl_initial,
)
from shardproxy._wire import (
    CLOSE, DESCRIBE, FORWARD, PARSE, QUERY, QUERY_REQ, SYNTH, ClientCore, is_session_statement, well_formed,
)
from shardproxy.connection import Connection
from shardproxy.routing import Routing
from shardproxy.server import ServerConnection
from shardproxy.statements import Statement, deallocate_target, is_discard_all

if TYPE_CHECKING:
    from shardproxy.pool import Pool
    from shardproxy.proxy import Proxy

log = logging.getLogger("shardproxy.client")

_S, _P, _C, _p = b"SPCp"
_UNPACK = pg.INT32.unpack_from
_DEALLOCATE_DONE = (QUERY, SYNTH, pg.command_complete("DEALLOCATE"))
_DEALLOCATE_ALL_DONE = (QUERY, SYNTH, pg.command_complete("DEALLOCATE ALL"))
_SSL_YES = b"S"


class ClientConnection(ClientCore, Routing, Connection):
    # ClientCore's `kind`: what its transactions count as in queries_total (fanout legs); None: by node role.

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
        self.params = session_params.shared({})  # reported parameters as the client set them, a shared dict
        self.param_sql: dict[str, str] = {}  # unreported parameters: the client's last SET of each
        self.pid = 0
        self.secret = 0
        self.connected_at = time.time()
        self.wait_started = 0.0
        self.admitted = False  # counted against max_client_conn
        self.transaction_pooling = proxy.config.pool.mode == "transaction"  # as when the client connected
        self.on_server_ready = self._server_ready if self.transaction_pooling else None  # see ClientCore
        self.gives_back = self.transaction_pooling
        self.init_routing(proxy)
        self.mid_batch = False  # an Execute was forwarded and no Sync yet
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
        except Exception as exc:  # a bug must cost this login, not leave the connection open without a timeout
            log.exception("client %d %s: login failed", self.id, self.address)
            self._fatal(pg.PostgresError(pg.INTERNAL_ERROR, f"shardproxy: internal error: {exc}"))

    async def _startup(self) -> dict[str, str] | None:
        """Read the startup packet, answering an SSLRequest with S and TLS when tls.mode allows it, else
        (and GSSENCRequests always) with N; None for a CancelRequest."""
        while True:
            _, body = await self.read_message()
            (code,) = pg.INT32.unpack_from(body, 0)
            if code == pg.SSL_REQUEST and self.proxy.client_ssl is not None and not self.encrypted:
                if self.buf or self._inbox:  # as PostgreSQL: nothing may come between the request and TLS
                    raise pg.ProtocolError("received unencrypted data after SSL request")
                self.write(_SSL_YES)
                await self._start_tls(self.proxy.client_ssl)
            elif code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST) and not self.encrypted:
                self.write(pg.SSL_NO)
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
            self.write(pg.auth_request(5, salt))
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
        self.write(pg.AUTH_OK)

    async def _scram(self, exchange: ScramServerExchange) -> bool:
        """Whether the client proved its password; a malformed exchange raises (08P01), counted as a failure."""
        self.write(pg.auth_request(10, b"SCRAM-SHA-256\0\0"))
        try:
            mechanism, client_first = parse_sasl_initial(await self._password_message())
            if mechanism != "SCRAM-SHA-256":
                raise pg.PostgresError(pg.PROTOCOL_VIOLATION, f"unsupported SASL mechanism {mechanism}")
            self.write(pg.auth_request(11, exchange.first(client_first)))
            final = exchange.final(await self._password_message())
        except ScramException:
            return False
        except (pg.PostgresError, pg.ProtocolError):
            self.proxy.auth_failed(self)
            raise
        self.write(pg.auth_request(12, final))
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
        self.params = session_params.shared({k: v for k, v in defaults.items() if k in session_params.REPORTED} | values)
        self.pid, self.secret = self.proxy.register(self)
        self.home = self.id % len(self.proxy.config.shards)
        shown = defaults | values
        self.write(b"".join(pg.parameter_status(k, v) for k, v in shown.items())
                             + pg.backend_key_data(self.pid, self.secret) + pg.READY[pg.IDLE])
        log.info("client %d %s connected: user=%s database=%s", self.id, self.address, self.user, self.database,
                 extra={"event": "connect", "client": self.id, "user": self.user})
        self.end_login()

    # -- the request half of the data path ------------------------------------------------------------
    # on_data, _dispatch (between transactions), link, _forward and _server_ready are ClientCore's (_wire.pyx).

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
            if end > n or end <= pos + 4 or not well_formed(buf, pos, end):  # malformed: the framing refuses it
                break
            if t == _P and buf[pos + 5]:
                name, body_start = pg.read_cstring(buf, pos + 5)
                statement = self.proxy.statements.known(bytes(buf[body_start:end]))
                if statement is None:
                    break
                self.statements[name] = statement
                replies.append(pg.PARSE_COMPLETE)
                if is_session_statement(buf, body_start, end):
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
            self.write(b"".join(replies[:replied]))
            del buf[:answered]
        return n - answered >= 5

    # -- named prepared statements --------------------------------------------------------------------
    def _parse(self, buf, pos: int, end: int, out: list) -> None:
        name, body_start = pg.read_cstring(buf, pos + 5)
        statement = self.proxy.statements.get(bytes(buf[body_start:end]))
        undo = self._name(name, statement)
        server = self.server
        if server.reuse_prepared(statement.name):
            server.enqueue_synthetic((PARSE, SYNTH, pg.PARSE_COMPLETE, undo))
        else:
            out.append(statement.parse)
            server.pending.append((PARSE, FORWARD, statement, undo))
            server.remember_prepared(statement.name, self.proxy.config.pool.prepared_statements_per_server, out)

    def _name(self, name: bytes, statement: Statement | None) -> tuple:
        """Give one of the client's statement names to a statement (None: the name goes). Returns the call that
        takes it back, for the server to make should it skip the message that did it (see _skip_to_sync)."""
        undo = (self._name, name, self.statements.get(name))
        if statement is None:
            self.statements.pop(name, None)
        else:
            self.statements[name] = statement
        return undo

    # _bind and _ensure_prepared are ClientCore's (_wire.pyx): they run for each Bind of a named statement.

    def _statement_message(self, t: int, name: bytes, out: list) -> None:
        """Describe or Close of a named statement."""
        server = self.server
        if t == _C:  # the server keeps it for whoever prepares it next
            server.enqueue_synthetic((CLOSE, SYNTH, pg.CLOSE_COMPLETE, self._name(name, None)))
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

    def parameter_changed(self, name: str, value: str) -> None:
        """The linked server reported a new value of a parameter that follows the client."""
        self.params = session_params.with_value(self.params, name, value)

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
            self.write(error.to_message("FATAL"))
            self.reason = self.reason or error.message
        self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.on_server_ready = None  # the bound method would keep this object in a cycle
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
