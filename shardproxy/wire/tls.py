"""TLS on both sides of the proxy: the context clients are served with, the context servers are reached
with, and the SSLRequest negotiation that opens an encrypted connection to a PostgreSQL server.

Clients upgrade in `ClientConnection._startup` (an SSLRequest answered `S`, then `loop.start_tls`).
Servers are reached by `connect_server`: SSLRequest first, then TLS on `S`, per `server_tls.mode`.
Relative file names in the config are relative to the config file's directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

from shardproxy import protocol as pg
from shardproxy.config import Config, ConfigError, ServerTls, Tls

log = logging.getLogger("shardproxy.tls")

SSL_REQUEST_PACKET = pg.INT32.pack(8) + pg.INT32.pack(pg.SSL_REQUEST)
SSL_YES = b"S"


def client_context(config: Config) -> ssl.SSLContext | None:
    """The context clients are served with, or None when `tls.mode` is disable.
    Raises ConfigError when the certificate, key or CA cannot be loaded."""
    tls: Tls = config.tls
    if tls.mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # PostgreSQL's default ssl_min_protocol_version
    try:
        context.load_cert_chain(config_path(config, tls.cert), config_path(config, tls.key))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{config.path or '<config>'}: tls: cannot load cert/key: {_reason(exc)}"]) from None
    if tls.ca:
        try:
            context.load_verify_locations(cafile=config_path(config, tls.ca))
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{config.path or '<config>'}: tls.ca: cannot load: {_reason(exc)}"]) from None
        context.verify_mode = ssl.CERT_OPTIONAL  # a client certificate is checked if sent, never required
    return context


def server_context(config: Config) -> ssl.SSLContext | None:
    """The context servers are reached with, or None when `server_tls.mode` is disable.

    prefer encrypts without checking; require checks the server's chain against `server_tls.ca` when one is
    given (libpq's rule when a root certificate is present), as verify-ca always does; verify-full also checks
    the host name or address the node is configured with. Validation refuses verify-* without a ca."""
    tls: ServerTls = config.server_tls
    if tls.mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.mode == "verify-full"
    if tls.ca is None or tls.mode == "prefer":
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        context.load_verify_locations(cafile=config_path(config, tls.ca))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{config.path or '<config>'}: server_tls.ca: cannot load: {_reason(exc)}"]) from None
    return context


def config_path(config: Config, name: str | None) -> str:
    """A file named in the config: relative names are relative to the config file's directory."""
    assert name is not None  # validation requires cert and key unless TLS is off
    name = os.path.expanduser(name)
    if config.path and not os.path.isabs(name):
        return os.path.join(os.path.dirname(os.path.abspath(config.path)), name)
    return name


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


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


async def connect_server(protocol: asyncio.Protocol, host: str, port: int, mode: str,
                         context: ssl.SSLContext | None) -> None:
    """Open a connection to a server for `protocol`, encrypted as `server_tls.mode` says; once this returns,
    `protocol.connection_made` has been called with the transport to use.

    Raises OSError when the server cannot be reached, PostgresError (08006) when TLS cannot be set up."""
    loop = asyncio.get_running_loop()
    if context is None:
        await loop.create_connection(lambda: protocol, host, port)
        return
    transport, probe = await loop.create_connection(_SslAnswer, host, port)
    address = f"{host}:{port}"
    try:
        transport.write(SSL_REQUEST_PACKET)
        answer = await probe.answer
        if answer == SSL_YES:
            try:
                secure = await loop.start_tls(transport, protocol, context, server_hostname=host)
            except ssl.SSLError as exc:
                reason = exc.reason or str(exc)
                if isinstance(exc, ssl.SSLCertVerificationError):
                    reason = f"certificate verify failed: {exc.verify_message}"
                log.warning("SSL connection to server %s failed: %s", address, reason)
                raise pg.PostgresError(pg.CONNECTION_FAILURE,
                                       f"shardproxy: SSL connection to server {address} failed: {reason}") from None
            protocol.connection_made(secure)
        elif answer == pg.SSL_NO and mode == "prefer":
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
        elif answer == pg.SSL_NO:
            log.warning("server %s does not support SSL (server_tls.mode is %s)", address, mode)
            raise pg.PostgresError(pg.CONNECTION_FAILURE, f"shardproxy: server {address} does not support SSL")
        else:  # more than the one byte (data injected before the handshake), or an error message
            raise pg.PostgresError(pg.CONNECTION_FAILURE,
                                   f"shardproxy: server {address} sent an invalid answer to the SSL request")
    except BaseException:
        transport.close()
        raise


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


async def send_cancel(host: str, port: int, mode: str, context: ssl.SSLContext | None, packet: bytes) -> None:
    """Deliver a CancelRequest over the same kind of connection as `connect_server` opens (PostgreSQL takes
    an SSLRequest before a CancelRequest, so the key never crosses the network in the clear when TLS is on).

    Returns once the server has closed the connection, which it does after signalling the backend.
    Raises as `connect_server` does."""
    cancel = _Cancel(packet)
    try:
        await connect_server(cancel, host, port, mode, context)
        await cancel.closed
    finally:
        if cancel.transport is not None:
            cancel.transport.close()
