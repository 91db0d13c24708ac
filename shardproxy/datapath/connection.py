"""The socket layer shared by client and server connections: a receive buffer, and during login an
awaitable `read_message()`; after login each side frames messages itself on its hot path, and writes on a plain
socket go straight to it (Endpoint.write, in _core.pyx), the transport taking only what the socket cannot.

During login a message is framed only when it is read, against the size limit of that moment (a client's is small
until it has authenticated), and a peer that sends more than the login reads is paused: what a connection
holds before it logs in is bounded, whatever it announces or sends.
"""

from __future__ import annotations

import asyncio

from shardproxy.datapath._core import Endpoint
from shardproxy.wire import protocol as pg

_ENCRYPTION_REQUESTS = (pg.SSL_REQUEST, pg.GSSENC_REQUEST)
LOGIN_BUFFER = 64 * 1024  # bytes a connection may hold unread during login before its reading pauses


class Connection(Endpoint, asyncio.Protocol):
    """An asyncio Protocol with a receive buffer and back-pressure towards a peer connection (the fields are
    Endpoint's, compiled, as the data path reads them)."""

    max_message_size = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Connection | None = None  # whose reading pauses while our socket cannot take more
        self._waiter: asyncio.Future | None = None
        self._startup_phase = False
        self._logging_in = True
        self._login_paused = False  # the login reads slower than the peer sends
        self._lost: BaseException | None = None
        self.writing_paused = False  # the transport's buffer is over its high-water mark
        self._writer: asyncio.Future[None] | None = None  # drained() waits on it

    # -- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.__dict__.pop("data_received", None)  # the bound method would keep this object in a cycle
        self.closed = True
        self._lost = exc or ConnectionResetError("connection closed")
        self._wake()
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        if self._logging_in:
            self.buf += data
            if len(self.buf) > LOGIN_BUFFER and self.transport is not None:
                self.transport.pause_reading()
                self._login_paused = True
            self._wake()
        else:
            self.on_data(data)

    def pause_writing(self) -> None:
        self.writing_paused = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()
            peer.reading_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.resume_reading()
            peer.reading_paused = False

    async def drained(self) -> None:
        """Wait while the transport holds more than it takes unsent (writes the proxy makes itself, with no peer
        to pause: a scatter read's merged rows)."""
        while self.writing_paused and not self.closed:
            self._writer = asyncio.get_running_loop().create_future()
            await self._writer

    def _wake_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.set_result(None)

    # -- the hot path is the compiled subclass's: on_data frames and handles what arrived --------------------
    def end_login(self) -> None:
        """From now on data goes to on_data(); what arrived early is processed at once (a bad message among it
        is refused there)."""
        self._logging_in = False
        # From now on the transport calls on_data itself, skipping data_received's login check (uvloop binds
        # the method once, when the protocol is set). The instance attribute goes again in connection_lost.
        self.data_received = self.on_data  # type: ignore[method-assign]
        if self.transport is not None:
            self.transport.set_protocol(self)
            self.send_directly()
            self._resume_login_reading()
        rest, self.buf = bytes(self.buf), bytearray()
        if rest:
            self.on_data(rest)

    # -- login phase ------------------------------------------------------------------------------
    async def read_message(self) -> tuple[int, bytes]:
        """The next message as (type byte, body); type 0 for a startup-phase packet. Raises ProtocolError for a
        length past the limit, as soon as the length has arrived."""
        while True:
            message = self._next_login_message()
            if message is not None:
                return message
            if self._lost is not None:
                raise ConnectionResetError("connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def expect_startup_packet(self) -> None:
        self._startup_phase = True

    def _next_login_message(self) -> tuple[int, bytes] | None:
        buf = self.buf
        if self._startup_phase:
            if len(buf) < 4:
                return None
            (length,) = pg.INT32.unpack_from(buf, 0)
            if length < 8 or length > pg.MAX_STARTUP_SIZE:
                raise pg.ProtocolError("invalid length of startup packet")
            if len(buf) < length:
                return None
            message = (0, bytes(buf[4:length]))
            # After an SSL or GSS encryption request, whatever its answer, a startup packet comes next: a client
            # may send it before reading the answer.
            self._startup_phase = pg.INT32.unpack_from(buf, 4)[0] in _ENCRYPTION_REQUESTS
        else:
            if len(buf) < 5:
                return None
            (length,) = pg.INT32.unpack_from(buf, 1)
            if length < 4 or length > self.max_message_size:
                raise pg.ProtocolError("invalid message length")
            length += 1
            if len(buf) < length:
                return None
            message = (buf[0], bytes(buf[5:length]))
        del buf[:length]
        if len(buf) <= LOGIN_BUFFER:
            self._resume_login_reading()
        return message

    def _resume_login_reading(self) -> None:
        if self._login_paused and self.transport is not None and not self.closed:
            self._login_paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
