"""A leg's answers as its server sends them, for a scatter read that merges rows while they arrive.

The leg's server connection writes into a LegStream as into a client's socket. The stream holds what the merge has
not taken yet, and pauses reading from the server while that is more than its bound, so a shard sends only as fast
as its rows are needed: the proxy holds a few hundred kilobytes per shard however large the result. Once the merge
needs nothing more from a shard, its stream drops what still comes until the server is done.
"""

from __future__ import annotations

import asyncio

from shardproxy.datapath._core import data_rows_end
from shardproxy.datapath.fanout.legs import Leg, Message
from shardproxy.wire import protocol as pg

STREAM_BOUND = 256 * 1024  # bytes a leg's stream holds before its server's reading pauses


class Wakeup:
    """One waiter, woken by whichever leg has news (data, or its end)."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def __call__(self, *_: object) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter


class LegStream:
    """What one leg's server answers, buffered up to a bound, framed into messages as the merge takes them."""

    def __init__(self, leg: Leg, wakeup: Wakeup, bound: int = STREAM_BOUND) -> None:
        self.leg = leg
        self._wakeup = wakeup
        self._bound = bound
        self._buf = bytearray()
        self._pos = 0  # where the messages not yet taken start
        self._paused = False
        self._dropping = False
        self.answered: asyncio.Future[None] | None = None  # done once the server has answered the whole batch
        leg.transport = self  # the leg's "socket": ServerCore.on_data writes here

    def start(self, batch: bytes) -> None:
        self.answered = self.leg.start(batch)
        self.answered.add_done_callback(self._wakeup)

    @property
    def done(self) -> bool:
        """The leg has ended (its server answered everything, or it failed) and no complete message is left."""
        return self.answered is not None and self.answered.done() and self.peek() is None

    # -- the transport the leg's server writes to ------------------------------------------------------------
    def write(self, data: bytes | bytearray) -> None:
        if self._dropping:
            return
        self._buf += data
        if not self._paused and len(self._buf) - self._pos > self._bound:
            server = self.leg.server
            if server is not None and server.transport is not None:
                server.transport.pause_reading()
                server.reading_paused = self._paused = True  # (unlink resumes it, should the leg be given back)
        self._wakeup()

    def pause_reading(self) -> None:
        pass

    resume_reading = close = pause_reading

    # -- what the merge takes --------------------------------------------------------------------------------
    def peek(self) -> int | None:
        """The type of the next message once it is complete, else None."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5 or pos + 1 + pg.INT32.unpack_from(buf, pos + 1)[0] > len(buf):
            return None
        return buf[pos]

    def message(self) -> Message | None:
        """The next complete message, or None until more arrives."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return None
        end = pos + 1 + pg.INT32.unpack_from(buf, pos + 1)[0]
        if end > len(buf):
            return None
        message = (buf[pos], bytes(buf[pos + 5 : end]))
        self._taken(end)
        return message

    def rows(self) -> bytes:
        """The run of complete DataRow messages at the front, whole (b"" if the next message is another)."""
        end = data_rows_end(self._buf, self._pos)
        if end == self._pos:
            return b""
        rows = bytes(self._buf[self._pos : end])
        self._taken(end)
        return rows

    def failure(self) -> pg.PostgresError | None:
        """Why the leg ended before its server answered, if it did (its connection was lost)."""
        return self.leg.error

    def drop(self) -> None:
        """The merge needs nothing more: what is buffered and what still comes is dropped."""
        self._dropping = True
        self._buf = bytearray()
        self._pos = 0
        self._resume()

    def _taken(self, end: int) -> None:
        self._pos = end
        if end >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif end > self._bound:
            del self._buf[:end]
            self._pos = 0
        if self._paused and len(self._buf) - self._pos <= self._bound // 2:
            self._resume()

    def _resume(self) -> None:
        server = self.leg.server
        if self._paused and server is not None and server.reading_paused and server.transport is not None:
            server.reading_paused = False
            server.transport.resume_reading()
        self._paused = False

