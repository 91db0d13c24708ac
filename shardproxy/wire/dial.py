"""Reaching PostgreSQL servers: TCP, then TLS as `server_tls.mode` says, for pooled connections and cancel
requests alike (PostgreSQL takes an SSLRequest before a CancelRequest, so a cancel key never crosses the network
in the clear when TLS is on). A server's SSLRequest is answered with one byte, `S` or `N`, before TLS starts.
A connection comes with what its server may ask for at login (server_auth): a cleartext password, by default,
only where TLS verified the server.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from shardproxy.wire import protocol as pg
from shardproxy.wire.auth import ANY_AUTH, ServerAuthPolicy

log = logging.getLogger("shardproxy.tls")

SSL_REQUEST_PACKET = pg.INT32.pack(8) + pg.INT32.pack(pg.SSL_REQUEST)
SSL_YES = b"S"


class Dialer:
    """How this proxy reaches servers, as the config says now: a (re)load makes a new one."""

    def __init__(self, mode: str, context: ssl.SSLContext | None, auth_methods: frozenset[str] = ANY_AUTH,
                 cleartext_anywhere: bool = False):
        """mode: server_tls.mode; context: the server TLS context (None when mode is disable); auth_methods and
        cleartext_anywhere: server_auth's methods and not its cleartext_needs_verified_tls."""
        self.mode = mode
        self.context = context
        self.auth_methods = auth_methods
        self.cleartext_anywhere = cleartext_anywhere
        self.verifies = context is not None and context.verify_mode == ssl.CERT_REQUIRED

    async def connect(self, protocol: asyncio.Protocol, host: str, port: int) -> ServerAuthPolicy:
        """Open a connection to a server for `protocol`; once this returns, `protocol.connection_made` has been
        called with the transport to use. Returns what the server may ask for at login on it. Raises OSError when
        the server cannot be reached, PostgresError (08006) when TLS cannot be set up."""
        loop = asyncio.get_running_loop()
        address = f"{host}:{port}"
        if self.context is None:
            await loop.create_connection(lambda: protocol, host, port)
            return self._policy(address, verified=False)
        transport, probe = await loop.create_connection(_SslAnswer, host, port)
        try:
            transport.write(SSL_REQUEST_PACKET)
            answer = await probe.answer
            if answer == SSL_YES:
                try:
                    secure = await loop.start_tls(transport, protocol, self.context, server_hostname=host)
                except ssl.SSLError as exc:
                    reason = exc.reason or str(exc)
                    if isinstance(exc, ssl.SSLCertVerificationError):
                        reason = f"certificate verify failed: {exc.verify_message}"
                    log.warning("SSL connection to server %s failed: %s", address, reason)
                    message = f"shardproxy: SSL connection to server {address} failed: {reason}"
                    raise pg.PostgresError(pg.CONNECTION_FAILURE, message) from None
                assert secure is not None  # None only for a transport that is closing
                protocol.connection_made(secure)
                return self._policy(address, verified=self.verifies)
            if answer == pg.SSL_NO and self.mode == "prefer":
                transport.set_protocol(protocol)
                protocol.connection_made(transport)
                return self._policy(address, verified=False)
            if answer == pg.SSL_NO:
                log.warning("server %s does not support SSL (server_tls.mode is %s)", address, self.mode)
                raise pg.PostgresError(pg.CONNECTION_FAILURE, f"shardproxy: server {address} does not support SSL")
            # more than the one byte (data injected before the handshake), or an error message
            raise pg.PostgresError(pg.CONNECTION_FAILURE,
                                   f"shardproxy: server {address} sent an invalid answer to the SSL request")
        except BaseException:
            transport.close()
            raise

    def _policy(self, address: str, verified: bool) -> ServerAuthPolicy:
        return ServerAuthPolicy(self.auth_methods, verified or self.cleartext_anywhere, address)

    async def cancel(self, host: str, port: int, packet: bytes) -> None:
        """Deliver a CancelRequest; returns once the server has closed the connection, which it does after
        signalling the backend. Raises as `connect` does."""
        cancel = _Cancel(packet)
        try:
            await self.connect(cancel, host, port)
            await cancel.closed
        finally:
            if cancel.transport is not None:
                cancel.transport.close()


class _SslAnswer(asyncio.Protocol):
    """Holds a fresh server connection until the server has answered the SSLRequest."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(bytes(data))

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionResetError("server closed the connection during SSL negotiation"))


class _Cancel(asyncio.Protocol):
    """Sends a CancelRequest as soon as the connection is up, then waits for the server to close it."""

    def __init__(self, packet: bytes) -> None:
        self.packet = packet
        self.transport: asyncio.BaseTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.packet)  # type: ignore[attr-defined]

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
