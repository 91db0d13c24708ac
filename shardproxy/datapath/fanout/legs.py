"""The legs of a statement on several shards: one per shard, each a session on a pooled server connection.

A Leg is a ClientSession that stands in for the real client on one shard: it borrows a server connection and
runs batches of the client's messages on it through the same data path (its named statements and session
parameters are the client's), collecting the responses instead of sending them, so that what the client sees can
be built from every shard's answers (scatter.py, everywhere.py). `exchange` sends a batch to each of several legs
at once and waits once for all their answers (the rounds of a commit across shards, twophase.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from shardproxy.datapath._core import ClientCore, ProxyCore, split_messages
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


def join_messages(messages: list[Message]) -> bytes:
    return b"".join(pg.message(bytes([t]), body) for t, body in messages)


class Leg(ClientSession):
    """One shard's part of a multi-shard statement, on behalf of `client`."""

    def __init__(self, client: ClientSession, pool: Pool, kind: str | None = None,
                 parked: ServerConnection | None = None):
        """kind: what its transaction counts as in queries_total: the statement's kind, not the node's role.
        parked: a server connection of the client's transaction, which the leg's first batch links (else the
        first batch takes one from the pool)."""
        super().__init__(client.core, client.id, client.user, client.database, kind, client)  # logs name the client
        self.transport = Collector()
        self.max_message_size = _LIMITLESS
        self.pool = pool
        self.client = client
        self.parked = parked
        self.unnamed = client.unnamed
        self.error: pg.PostgresError | None = None
        self.follow = False  # read-your-writes: its commit learns where it ends in the WAL (twophase.py)
        self.committed_at: int | None = None  # where it ended, once learnt
        self._waiting: Waiting | None = None  # what hears that the batch sent last is answered
        self.on_server_ready = self._ready  # what its server calls once the batch is answered

    @classmethod
    def for_proxy(cls, core: ProxyCore, pool: Pool) -> Leg:
        """A leg for the proxy's own statements, as the pool's user in its database."""
        return cls(ClientSession(core, 0, pool.key.user, pool.key.database), pool)

    def parameter_changed(self, name: str, value: str) -> None:
        super().parameter_changed(name, value)
        self.client.parameter_changed(name, value)  # the session is the client's

    async def run(self, batch: bytes) -> list[Message]:
        """Send a batch and wait for every response to it; raises the leg's error if it failed."""
        answers = (await exchange([self], [batch]))[0]
        if self.error is not None:
            raise self.error
        return answers

    def start(self, batch: bytes) -> asyncio.Future[None]:
        """Send a batch; the future is done when every response to it has come, or the leg failed. The responses go
        to the leg's transport as they arrive."""
        answered = asyncio.get_running_loop().create_future()
        self.send(batch, Waiting(answered, 1))
        return answered

    def send(self, batch: bytes, waiting: Waiting) -> None:
        """Send a batch (once a server connection is linked); `waiting` hears when it is answered, or the leg
        failed."""
        self._waiting = waiting
        if self.server is not None:
            self._forward(batch)
            return
        self.buf = bytearray(batch)
        self._attach()

    def _attach(self) -> None:
        """Link a server connection, which sends what buf holds: the parked one, else one from the pool."""
        parked, self.parked = self.parked, None
        if parked is None:
            self.pool.acquire(self)
        elif parked.closed:
            self.fail(_lost())
        else:
            ClientCore.link(self, parked)

    @property
    def connection(self) -> ServerConnection | None:
        """The server connection it is linked to, or the parked one its first batch links."""
        return self.server or self.parked

    async def settled(self) -> None:
        """Wait until the server has answered all it was sent and no cancel of the proxy's is still on its way
        to it (one that landed later could cancel the connection's next statement). A parked connection is linked
        first."""
        if self.server is None and self.parked is not None:
            self._attach()  # (buf is empty: it sends nothing)
        while self.server is not None and (self.server.pending or self.server.cancels):
            answered = asyncio.get_running_loop().create_future()
            self._waiting = Waiting(answered, 1)
            await answered

    def stop_waiting(self, error: pg.PostgresError) -> None:
        """Leave the pool's queue before a server connection was handed over: the batch never runs, and the leg
        fails with `error`."""
        if self.server is None:
            self.pool.cancel_waiting(self)
            self.fail(error)

    def _ready(self, server: ServerConnection | None) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.arrived()

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
            self.fail(_lost())

    def _fatal(self, error: pg.PostgresError) -> None:
        self.fail(error)


def _lost() -> pg.PostgresError:
    return pg.PostgresError(pg.CONNECTION_FAILURE, "shardproxy: server connection lost")


class Waiting:
    """The legs yet to answer a batch sent to each, and the future done once none is left."""

    __slots__ = ("future", "left")

    def __init__(self, future: asyncio.Future[None], left: int):
        self.future = future
        self.left = left

    def arrived(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.future.done():
            self.future.set_result(None)


async def exchange(legs: list[Leg], batches: list[bytes]) -> list[list[Message]]:
    """Send each leg its batch at once and wait once for all their answers. A leg that failed (its connection
    lost, say) answers with its error, as an ErrorResponse after whatever came before it; one that had failed
    before is sent nothing."""
    answered = asyncio.get_running_loop().create_future()
    waiting = Waiting(answered, len(legs))
    counted = []
    for leg, batch in zip(legs, batches):
        server = leg.connection
        counted.append(server.commands if server is not None else 0)
        if leg.error is None:
            leg.send(batch, waiting)
        else:
            waiting.arrived()
    if waiting.left > 0:
        await answered
    answers = []
    for leg, commands in zip(legs, counted):
        if leg.server is not None:  # in queries_total: a shard's part of a statement is one, the proxy's own none
            leg.server.commands = 1 if leg.kind is not None else commands
        messages = leg.transport.take()
        if leg.error is not None:
            messages.append((Backend.ERROR_RESPONSE, leg.error.to_message()[5:]))
        answers.append(messages)
    return answers


async def run_legs(legs: list[Leg], batches: list[bytes]) -> list[list[Message]]:
    """Each leg's answers to its batch, sent to all at once; raises the first failed leg's error."""
    answers = await exchange(legs, batches)
    failed = next((leg.error for leg in legs if leg.error is not None), None)
    if failed is not None:
        raise failed
    return answers


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
