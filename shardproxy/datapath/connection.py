"""The socket layer shared by client and server connections: a receive buffer, and during login an
awaitable `read_message()`; after login each side frames messages itself on its hot path, and writes on a plain
socket go straight to it (Endpoint.write, in _core.pyx), the transport taking only what the socket cannot.
"""

from __future__ import annotations

import asyncio
from collections import deque

from shardproxy.datapath._core import Endpoint
from shardproxy.wire import protocol as pg

_ENCRYPTION_REQUESTS = (pg.SSL_REQUEST, pg.GSSENC_REQUEST)


class Connection(Endpoint, asyncio.Protocol):
    """An asyncio Protocol with a receive buffer and back-pressure towards a peer connection (the fields are
    Endpoint's, compiled, as the data path reads them)."""

    max_message_size = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Connection | None = None  # whose reading pauses while our socket cannot take more
        self._inbox: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future | None = None
        self._startup_phase = False
        self._logging_in = True
        self._lost: BaseException | None = None

    # -- asyncio callbacks ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.__dict__.pop("data_received", None)  # the bound method would keep this object in a cycle
        self.closed = True
        self._lost = exc or ConnectionResetError("connection closed")
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._logging_in:
            self.buf += data
            self._frame_login_messages()
        else:
            self.on_data(data)

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()
            peer.reading_paused = True

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.resume_reading()
            peer.reading_paused = False

    # -- the hot path is the compiled subclass's: on_data frames and handles what arrived --------------------
    def end_login(self) -> None:
        """From now on data goes to on_data(); what arrived early is processed at once.
        Raises the ProtocolError of a bad message that came with the login and was never read."""
        if isinstance(self._lost, pg.ProtocolError):
            raise self._lost
        self._logging_in = False
        # From now on the transport calls on_data itself, skipping data_received's login check (uvloop binds
        # the method once, when the protocol is set). The instance attribute goes again in connection_lost.
        self.data_received = self.on_data  # type: ignore[method-assign]
        if self.transport is not None:
            self.transport.set_protocol(self)
            self.send_directly()
        early = b"".join(bytes([t]) + pg.INT32.pack(len(b) + 4) + b for t, b in self._inbox)
        self._inbox.clear()
        rest, self.buf = early + bytes(self.buf), bytearray()
        if rest:
            self.on_data(rest)

    # -- login phase ------------------------------------------------------------------------------
    async def read_message(self) -> tuple[int, bytes]:
        """The next message as (type byte, body); type 0 for a startup-phase packet."""
        while not self._inbox:
            if isinstance(self._lost, pg.ProtocolError):
                raise self._lost
            if self._lost is not None:
                raise ConnectionResetError("connection closed")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._inbox.popleft()

    def expect_startup_packet(self) -> None:
        self._startup_phase = True

    def _frame_login_messages(self) -> None:
        buf = self.buf
        while True:
            if self._startup_phase:
                if len(buf) < 4:
                    break
                (length,) = pg.INT32.unpack_from(buf, 0)
                if length < 8 or length > pg.MAX_STARTUP_SIZE:
                    self._protocol_violation("invalid length of startup packet")
                    return
                if len(buf) < length:
                    break
                self._inbox.append((0, bytes(buf[4:length])))
                # After an SSL or GSS encryption request, whatever its answer, a startup packet comes next: a
                # client may send it before reading the answer.
                self._startup_phase = pg.INT32.unpack_from(buf, 4)[0] in _ENCRYPTION_REQUESTS
                del buf[:length]
            else:
                if len(buf) < 5:
                    break
                (length,) = pg.INT32.unpack_from(buf, 1)
                if length < 4 or length > self.max_message_size:
                    self._protocol_violation("invalid message length")
                    return
                if len(buf) < length + 1:
                    break
                self._inbox.append((buf[0], bytes(buf[5 : length + 1])))
                del buf[: length + 1]
        self._wake()

    def _protocol_violation(self, text: str) -> None:
        self._lost = pg.ProtocolError(text)
        self.buf.clear()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
