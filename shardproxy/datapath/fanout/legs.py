"""The legs of a statement on several shards: one per shard, each a session on a pooled server connection.

A Leg is a ClientSession that stands in for the real client on one shard: it borrows a server connection and
runs batches of the client's messages on it through the same data path (its named statements and session
parameters are the client's), collecting the responses instead of sending them, so that what the client sees can
be built from every shard's answers (scatter.py, everywhere.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from shardproxy.datapath._core import ProxyCore
from shardproxy.datapath.session import ClientSession
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend

if TYPE_CHECKING:
    from shardproxy.datapath.pool import Pool
    from shardproxy.datapath.server import ServerConnection

Message = tuple[int, bytes]
_LIMITLESS = 1 << 40  # a leg's messages passed the client's own framing


class Collector:
    """Where a leg's "socket" writes go."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes | bytearray) -> None:
        self.chunks.append(bytes(data))

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading
    close = pause_reading

    def take(self) -> list[Message]:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return split_messages(data)


def split_messages(data: bytes) -> list[Message]:
    messages = []
    pos = 0
    while pos + 5 <= len(data):
        (length,) = pg.INT32.unpack_from(data, pos + 1)
        messages.append((data[pos], data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages


def join_messages(messages: list[Message]) -> bytes:
    return b"".join(pg.message(bytes([t]), body) for t, body in messages)


class Leg(ClientSession):
    """One shard's part of a multi-shard statement, on behalf of `client`."""

    def __init__(self, client: ClientSession, pool: Pool, kind: str | None = None):
        """kind: what its transaction counts as in queries_total: the statement's kind, not the node's role."""
        super().__init__(client.core, client.id, client.user, client.database, kind)  # logs name the client
        self.transport = Collector()
        self.max_message_size = _LIMITLESS
        self.pool = pool
        self.client = client
        self.statements, self.params, self.param_sql = client.statements, client.params, client.param_sql
        self.unnamed = client.unnamed
        self.error: pg.PostgresError | None = None
        self._answered: asyncio.Future[None] | None = None
        self.on_server_ready = self._ready  # what its server calls once the batch is answered

    @classmethod
    def for_proxy(cls, core: ProxyCore, pool: Pool) -> Leg:
        """A leg for the proxy's own statements, as the pool's user in its database."""
        return cls(ClientSession(core, 0, pool.key.user, pool.key.database), pool)

    def parameter_changed(self, name: str, value: str) -> None:
        super().parameter_changed(name, value)
        self.client.parameter_changed(name, value)  # the session is the client's

    async def run(self, batch: bytes) -> list[Message]:
        """Send a batch and wait for every response to it."""
        counted = self.server.commands if self.server is not None else 0
        await self.start(batch)
        if self.server is not None:  # in queries_total: a shard's part of a statement is one, the proxy's own none
            self.server.commands = 1 if self.kind is not None else counted
        if self.error is not None:
            raise self.error
        return self.transport.take()

    def start(self, batch: bytes) -> asyncio.Future[None]:
        """Send a batch (once a server connection is linked); the future is done when every response to it has
        come, or the leg failed. The responses go to the leg's transport as they arrive."""
        self._answered = answered = asyncio.get_running_loop().create_future()
        if self.server is None:
            self.buf = bytearray(batch)
            self.pool.acquire(self)
        else:
            self._forward(batch)
        return answered

    async def settled(self) -> None:
        """Wait until the server has answered all it was sent and no cancel of the proxy's is still on its way
        to it (one that landed later could cancel the connection's next statement)."""
        while self.server is not None and (self.server.pending or self.server.cancels):
            self._answered = asyncio.get_running_loop().create_future()
            await self._answered

    def stop_waiting(self, error: pg.PostgresError) -> None:
        """Leave the pool's queue before a server connection was handed over: the batch never runs, and the leg
        fails with `error`."""
        if self.server is None:
            self.pool.cancel_waiting(self)
            self.fail(error)

    def _ready(self, server: ServerConnection | None) -> None:
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(None)

    def release(self) -> None:
        self.on_server_ready = None  # the bound method would keep this object in a cycle
        server, self.server = self.server, None
        if server is not None:
            self.pool.unlink(server)
            # (A cancel in flight would reach the next client's query.)
            if server.status == pg.IDLE and not server.pending and not server.cancels:
                self.pool.release(server)
            else:
                self.pool.discard(server)

    def fail(self, error: pg.PostgresError) -> None:
        self.error = error
        self._ready(None)

    def server_lost(self, server: ServerConnection) -> None:
        if self.server is server:
            self.server = None
            self.fail(pg.PostgresError(pg.CONNECTION_FAILURE, "shardproxy: server connection lost"))

    def _fatal(self, error: pg.PostgresError) -> None:
        self.fail(error)


async def run_legs(legs: list[Leg], batches: list[bytes]) -> list[list[Message]]:
    return list(await asyncio.gather(*(leg.run(batch) for leg, batch in zip(legs, batches))))


def first_error(responses: list[list[Message]]) -> list[Message] | None:
    for messages in responses:
        if any(t == Backend.ERROR_RESPONSE for t, _ in messages):
            return messages
    return None


def with_status(messages: list[Message], status: int) -> list[Message]:
    """The responses as the client must see them: its own transaction status in every ReadyForQuery."""
    return [(t, bytes([status]) if t == Backend.READY_FOR_QUERY else body) for t, body in messages]


def error_fields(messages: list[Message]) -> dict[str, str]:
    """The fields of the first ErrorResponse among the messages."""
    return pg.parse_fields(next(body for t, body in messages if t == Backend.ERROR_RESPONSE))
