"""A client connection: startup, TLS and authentication, then its session on the data path.

After login every message the client sends is framed (the loop is compiled: _core.pyx), recorded in the linked
server connection's `pending` queue (see pending.py) and forwarded as the bytes it arrived in; its session's books
(named statements, parameters) are ClientSession's (session.py). Between transactions the client takes a server
connection from a pool and gives it back after; in sharded configurations Placement (placement.py) says which
shard and node. Clients of the admin database are handed to the admin console after login.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from shardproxy.config import Config, UserSettings
from shardproxy.datapath import params as session_params
from shardproxy.datapath._core import ProxyCore
from shardproxy.datapath.connection import Connection
from shardproxy.datapath.placement import Placement, PlacementHost
from shardproxy.datapath.session import ClientSession
from shardproxy.tasks import spawn
from shardproxy.wire import protocol as pg
from shardproxy.wire.auth import (
    ProvenKey,
    ScramException,
    ScramSecret,
    ScramServerExchange,
    is_scram_verifier,
    md5_answer,
    parse_sasl_initial,
)
from shardproxy.wire.protocol import Frontend

if TYPE_CHECKING:
    from shardproxy.datapath.pool import Pool
    from shardproxy.datapath.server import ServerConnection

log = logging.getLogger("shardproxy.client")

_SSL_YES = b"S"
LINGER = 1.0  # seconds a connection ended over a bad message goes on reading (and dropping) what its client sends
# Before authentication a client sends a startup packet (PostgreSQL's limit: pg.MAX_STARTUP_SIZE) and password or
# SASL messages, whose bodies PostgreSQL limits to 65535 bytes (PG_MAX_AUTH_TOKEN_LENGTH); pool.max_message_size
# applies once the client has authenticated.
PRE_AUTH_MESSAGE_SIZE = 65535 + 4


class LoginSlots:
    """Connections still logging in (up to authentication): at most `limit` at once, so that logins cannot take
    the memory or the places of clients that are in. The others wait their turn, unread, in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._line: deque[asyncio.Future[None]] = deque()

    def free(self) -> bool:
        return self.taken < self.limit and not self._line

    async def take(self) -> None:
        if self.free():
            self.taken += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        try:
            await turn
        except asyncio.CancelledError:  # the login timed out, or the connection went
            if turn.done() and not turn.cancelled():  # handed a slot just then: pass it on
                self.give_back()
            elif turn in self._line:
                self._line.remove(turn)
            raise

    def give_back(self) -> None:
        """A slot goes to the next in line, if the limit (lowered by a reload?) allows, else it is freed."""
        while self._line and self.taken <= self.limit:
            turn = self._line.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.taken -= 1

    def resize(self, limit: int) -> None:
        """A reload's new limit: those in line get the slots it adds."""
        self.limit = limit
        while self._line and self.taken < limit:
            turn = self._line.popleft()
            if not turn.done():
                self.taken += 1
                turn.set_result(None)


@dataclass(slots=True)
class _Failures:
    """One address's failed logins."""

    count: int
    last: float  # when the last one failed
    next_turn: float  # when its next login may start


class FailedLogins:
    """Failed logins by client address. Past FREE_FAILURES, each within FORGET_AFTER seconds of the last, the
    address's logins take turns: each starts `delay` after the previous one started or failed (0: no turns), until
    the address has been quiet for FORGET_AFTER seconds. A password guesser is slowed however many connections it
    opens; other addresses are not."""

    FREE_FAILURES = 5
    FORGET_AFTER = 60.0
    MAX_ADDRESSES = 10_000  # past it, the oldest records go first

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()  # the most recent failure last

    def turn(self, address: str) -> float:
        """Seconds until this address's next login may start; the turn is taken."""
        failures = self._by_address.get(address)
        now = time.monotonic()
        if failures is None or failures.count < self.FREE_FAILURES or not self.delay:
            return 0.0
        if now - failures.last > self.FORGET_AFTER:
            del self._by_address[address]
            return 0.0
        start = max(now, failures.next_turn)
        failures.next_turn = start + self.delay
        return start - now

    def failed(self, address: str) -> None:
        now = time.monotonic()
        failures = self._by_address.pop(address, None)
        if failures is None or now - failures.last > self.FORGET_AFTER:
            failures = _Failures(0, now, now)
        failures.count += 1
        failures.last = now
        failures.next_turn = max(failures.next_turn, now + self.delay)
        self._by_address[address] = failures
        while self._by_address:
            oldest = next(iter(self._by_address.values()))
            if len(self._by_address) <= self.MAX_ADDRESSES and now - oldest.last <= self.FORGET_AFTER:
                break
            self._by_address.popitem(last=False)


class ClientHost(PlacementHost, Protocol):
    """What a client connection needs of the proxy that accepted it."""

    config: Config
    core: ProxyCore
    client_ssl: ssl.SSLContext | None
    proven_keys: dict[str, ProvenKey]
    login_slots: LoginSlots
    failed_logins: FailedLogins

    def next_client_id(self) -> int: ...
    def admit(self, client: ClientConnection) -> bool: ...
    def register(self, client: ClientConnection) -> tuple[int, int]: ...
    def forget(self, client: ClientConnection) -> None: ...
    def cancel(self, pid: int, secret: int) -> None: ...
    def auth_failed(self, client: ClientConnection) -> None: ...
    def scram_secret(self, user: UserSettings) -> ScramSecret: ...
    def mock_scram_secret(self, user: str) -> ScramSecret: ...
    def open_admin_session(self, client: ClientConnection) -> None: ...
    async def login(self, database: str, user: str) -> tuple[Pool, dict[str, str]]: ...


class ClientConnection(Placement, ClientSession, Connection):
    proxy: ClientHost

    def __init__(self, proxy: ClientHost):
        ClientSession.__init__(self, proxy.core, proxy.next_client_id(), "", "")
        Connection.__init__(self)
        self.proxy = proxy
        self.address = ""
        self.host = ""  # the address without the port: failed logins are counted by it
        self.encrypted = False  # TLS since the SSLRequest
        self.pid = 0
        self.secret = 0
        self.connected_at = time.time()
        self.admitted = False  # authenticated, and counted against max_client_conn
        self.transaction_pooling = proxy.config.pool.mode == "transaction"  # as when the client connected
        self.owns_server = not self.transaction_pooling
        self.on_server_ready = self._server_ready  # see ClientCore
        self.interrupt: Callable[[], None] | None = None  # cancels a read the proxy runs on several shards for it
        self.gives_back = True
        self.init_placement(proxy.core.sharded)
        self.max_message_size = PRE_AUTH_MESSAGE_SIZE
        # CPython 3.11 keeps few instance attributes in a dict whose keys the class shares, and for a subclass of a
        # compiled type its attribute caches then miss on every read: a dict of its own makes them hit (the routing
        # state is read and written per statement).
        self.__dict__ = dict(self.__dict__)

    # -- connection set-up ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if isinstance(peer, tuple) else "unix"
        self.address = f"{self.host}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.expect_startup_packet()
        spawn(self._login())

    async def _login(self) -> None:
        try:
            async with asyncio.timeout(self.proxy.config.pool.client_login_timeout):
                startup = await self._authenticated()
                if startup is None:
                    return
                if not self.proxy.admit(self):
                    raise pg.PostgresError(pg.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
                await self._welcome(startup)
        except pg.PostgresError as exc:
            self._fatal(exc)
        except pg.ProtocolError as exc:
            self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, str(exc)))
        except TimeoutError:
            self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, "client_login_timeout"))
        except ConnectionError:
            self.close()
        except Exception as exc:  # a bug must cost this login, not leave the connection open without a timeout
            log.exception("client %d %s: login failed", self.id, self.address)
            self._fatal(pg.PostgresError(pg.INTERNAL_ERROR, f"shardproxy: internal error: {exc}"))

    async def _authenticated(self) -> dict[str, str] | None:
        """The startup parameters of a client that has authenticated, or None for a CancelRequest; on a login
        slot, and after failed logins from its address in its turn, both waited for with the socket unread."""
        slots = self.proxy.login_slots
        delay = self.proxy.failed_logins.turn(self.host)
        must_wait = (delay > 0 or not slots.free()) and self.transport is not None
        if must_wait:
            self.transport.pause_reading()
        if delay:
            await asyncio.sleep(delay)
        await slots.take()
        try:
            if must_wait and self.transport is not None and not self.closed:
                self.transport.resume_reading()
            startup = await self._startup()
            if startup is not None:
                await self._authenticate()
                self.max_message_size = self.proxy.config.pool.max_message_size
            return startup
        finally:
            slots.give_back()

    async def _startup(self) -> dict[str, str] | None:
        """Read the startup packet, answering an SSLRequest with S and TLS when tls.mode allows it, else
        (and GSSENCRequests always) with N; None for a CancelRequest."""
        while True:
            _, body = await self.read_message()
            (code,) = pg.INT32.unpack_from(body, 0)
            if code == pg.SSL_REQUEST and self.proxy.client_ssl is not None and not self.encrypted:
                if self.buf:  # as PostgreSQL: nothing may come between the request and TLS
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
                    raise pg.PostgresError(pg.INVALID_AUTHORIZATION,
                                           "no PostgreSQL user name specified in startup packet")
                if not self.encrypted and self.proxy.config.tls.mode == "require":
                    raise pg.PostgresError(pg.INVALID_AUTHORIZATION,
                                           "shardproxy: SSL required: connections without encryption are refused")
                return startup
            else:
                raise pg.PostgresError(pg.PROTOCOL_VIOLATION,
                                       f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")

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
        if user is None:  # a SCRAM exchange that fails as a wrong password does: the name is not told apart
            await self._scram(ScramServerExchange(self.proxy.mock_scram_secret(self.user)))
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
        if kind != Frontend.PASSWORD:
            raise pg.PostgresError(pg.PROTOCOL_VIOLATION, f"expected password response, got message type {chr(kind)!r}")
        return body

    async def _welcome(self, startup: dict[str, str]) -> None:
        """Tell the client the server's parameters and its cancel key, then open the data path."""
        if self.database == self.proxy.config.admin.database:  # the admin console: commands, not a server session
            self.proxy.open_admin_session(self)
            log.info("client %d %s connected to the admin console: user=%s", self.id, self.address, self.user,
                     extra={"event": "connect", "client": self.id, "user": self.user})
            return
        self.pool, defaults = await self.proxy.login(self.database, self.user)
        values, self.param_sql = session_params.startup_values(startup)
        encoding = values.get("client_encoding")
        if encoding is not None and session_params.encoding_name(encoding) is None:  # refused as PostgreSQL does
            raise pg.PostgresError(pg.INVALID_PARAMETER_VALUE,
                                   f'invalid value for parameter "client_encoding": "{encoding}"')
        reported = {k: v for k, v in defaults.items() if k in session_params.REPORTED}
        self.params = session_params.shared(reported | values)
        self.pid, self.secret = self.proxy.register(self)
        self.home = self.id % len(self.proxy.config.shards)
        shown = defaults | values
        self.write(b"".join(pg.parameter_status(k, v) for k, v in shown.items())
                             + pg.backend_key_data(self.pid, self.secret) + pg.READY[pg.IDLE])
        log.info("client %d %s connected: user=%s database=%s", self.id, self.address, self.user, self.database,
                 extra={"event": "connect", "client": self.id, "user": self.user})
        self.end_login()

    # -- endings ----------------------------------------------------------------------------------------
    def server_lost(self, server: ServerConnection) -> None:
        """A server connection of the client's transaction broke: the transaction is gone, and so is the
        client. If the server ended the session with a FATAL error, the client has had it: it goes without
        another."""
        if self.server is server or server in self.tx.legs.values():
            if self.server is server:
                self.server = self.peer = None
            self.tx.legs = {shard: leg for shard, leg in self.tx.legs.items() if leg is not server}
            if server.ended is None:
                self._fatal(pg.PostgresError(pg.CONNECTION_FAILURE, "shardproxy: server connection lost"))
                return
            self.proxy.client_error(server.ended)
            self.reason = self.reason or f"the server ended the session: {server.ended.message}"
            self.close()

    def fail(self, error: pg.PostgresError) -> None:
        """Waiting for a server connection failed (timeout, server down). Before any byte of the
        transaction reached a server, it is routed again without that node: a read moves on to the next node
        that can serve it (from this region's primary to a replica, say), and a write waits for a failover."""
        self.wait_started = 0.0
        pool, shard = self.pool, self.shard
        if error.code != pg.CONNECTION_FAILURE or not self.routes or shard < 0 or self.closed or self.tx.legs:
            self._fatal(error)  # (in a transaction that holds legs already, there is no moving elsewhere)
        elif self.replay:
            self.shard = -1
            self._await_primary(shard)
        else:
            self.avoid.add(pool.node.address)
            self.shard = -1
            self._dispatch()

    def _unrouted_pool(self) -> Pool:
        """One server and no routing, and a reload drained the pool the client used last: the one server's."""
        return self.proxy.pools.pool_for(self.database, self.user, self.proxy.pools.first_node())

    def _fatal(self, error: pg.PostgresError) -> None:
        transport = self.transport
        if not self.closed and transport is not None:
            self.proxy.client_error(error)
            self.write(error.to_message("FATAL"))
            self.reason = self.reason or error.message
            # A message of the client's own refused (08P01): the rest of it may still be on its way.
            if error.code == pg.PROTOCOL_VIOLATION and not self._logging_in and transport.can_write_eof():
                self._linger(transport)
                return
        self.close()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close without losing the error just written. A client still sending (a message over the size limit,
        say) would get a reset for what it sent unread, and a reset can destroy the error on its way: so the
        proxy ends its side of the connection (the client reads the error, then the end), drops what still
        arrives, and closes once the client does, or after LINGER seconds."""
        self.closed = True
        self.data_received = _drop  # type: ignore[method-assign]
        transport.set_protocol(self)
        transport.resume_reading()
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER, transport.close)
        if not self.busy:  # (as when it leaves: its server connections go now)
            self._leave_all()

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
        if self.copy_feed is not None:  # a COPY on several shards learns that no more data comes
            self.copy_feed()
        if self.busy:  # the proxy runs something on the client's legs: it gives them back once done
            return
        self._leave_all()

    def _leave_all(self) -> None:
        """The client is gone: so are its server connections."""
        servers = {id(leg): leg for leg in [self.server, *self.tx.legs.values()] if leg is not None}
        self.server = None
        self.tx.clear()
        for server in servers.values():
            self._leave(server)

    def _leave(self, server: ServerConnection) -> None:
        """The client is gone: its server connection goes back to the pool, or is closed mid-transaction."""
        pool = server.pool
        server.client = self  # the hand-out is counted as this client's
        pool.unlink(server)
        if server.pending or server.status != pg.IDLE or self.mid_batch or server.ignoring:
            pool.discard(server)  # mid-transaction: closing is the sure way to roll it back
        elif not self.transaction_pooling:
            pool.reset_and_release(server)
        else:
            pool.release(server)


def _drop(data: bytes) -> None:
    """What a lingering connection does with what its client still sends."""
