"""Reads on every shard, merged into one answer as the shards' rows arrive (the merge itself is planned and done by
routing.merge).

Each leg's answers flow into a LegStream (streams.py), which holds a bounded amount before its server's reading
pauses. Rows go on to the client as soon as the merge knows them, in slices between which the event loop serves
other clients, and only while the client's socket takes them: a slow client holds the shards back rather than
filling the proxy. Concatenated rows pass through as the shards sent them; a sorted merge holds one row per shard;
groups and DISTINCT hold what they must, within routing.scatter_memory_limit. Whatever ends the read early (an
error on a shard, the limit, the client's cancel or departure) cancels the shards still running, and every leg is
drained to its ReadyForQuery before it goes back, clean.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from shardproxy.config import Config
from shardproxy.datapath.fanout.legs import Leg, Message, join_messages, split_messages
from shardproxy.datapath.fanout.streams import LegStream, Wakeup
from shardproxy.routing.merge import ScatterPlan, StreamMerge, Unmergeable, plan_scatter
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend, Frontend

if TYPE_CHECKING:
    from shardproxy.datapath.statements import Statement

SLICE_ROWS = 500  # merged rows between two turns of the event loop (a few milliseconds)
SLICE_BYTES = 256 * 1024  # concatenated rows passed on between two turns of the event loop
DRAIN_TIMEOUT = 10.0  # seconds for a leg to finish its answer (or take a cancel) before its connection is closed
_HEAD_ENDS = frozenset((Backend.DATA_ROW, Backend.COMMAND_COMPLETE, Backend.EMPTY_QUERY_RESPONSE,
                        Backend.READY_FOR_QUERY))
_CANCELED = "canceling statement due to user request"  # PostgreSQL's words


class _HasConfig(Protocol):
    config: Config


class ScatterClient(Protocol):
    """The client connection a scatter read answers (client.py), as the read uses it."""

    proxy: _HasConfig
    statements: dict[bytes, Statement]
    unnamed: Statement | None
    closed: bool
    writing_paused: bool
    interrupt: Callable[[], None] | None  # what a CancelRequest of the client calls while the proxy runs a read

    def write(self, data: bytes) -> None: ...
    async def drained(self) -> None: ...


class _ShardFailed(Exception):
    """A shard answered with an ErrorResponse (its body)."""

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body


class _ClientGone(Exception):
    """The client left during the read."""


async def scatter(client: ScatterClient, legs: list[Leg], plan: ScatterPlan, batch: bytes, status: int) -> bytes:
    """Run a read on every shard's leg (the plan's rewritten SQL), streaming the merged answer to the client;
    returns the rest of the client's reply. Inside a transaction an error aborts it: the reply's ReadyForQuery
    says so."""
    client_messages = split_messages(batch)
    run = _Run(legs, _scatter_batch(client, plan, client_messages))
    client.interrupt = run.interrupt
    clean = False
    try:
        tag = await _stream(client, run, plan, client_messages)
        clean = True
        return join_messages(_scatter_reply(client_messages, run.heads[0], plan, b"", tag, status)[1])
    except _ShardFailed as failed:
        try:
            plan.check_shard_error(pg.parse_fields(failed.body))
        except Unmergeable as exc:  # found in the shards' answers: refused as what is found in the query is
            raise pg.PostgresError(exc.sqlstate, exc.message) from None
        return pg.message(b"E", failed.body) + pg.READY[_failed(status)]
    except Unmergeable as exc:
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    except _ClientGone:
        return b""
    finally:
        client.interrupt = None
        await run.finish(cancel=not clean)


async def _stream(client: ScatterClient, run: _Run, plan: ScatterPlan, client_messages: list[Message]) -> str:
    """Send the reply up to the merged rows, then the rows; the CommandComplete tag."""
    for stream in run.streams:
        run.heads.append(await run.head(stream))
    descriptions = [next((body for t, body in reversed(head) if t == Backend.ROW_DESCRIPTION), b"")
                    for head in run.heads]  # the portal's description, with the result formats, is the last one
    merge = StreamMerge(plan, descriptions, client.proxy.config.routing.scatter_memory_limit)
    head = _scatter_reply(client_messages, run.heads[0], plan, merge.description, "", 0)[0]
    client.write(join_messages(head))
    if not any(t == Frontend.QUERY or t == Frontend.EXECUTE for t, _ in client_messages):
        return ""  # a batch that only describes: the shards' rows are drained unseen
    if plan.streaming:
        return f"SELECT {await run.concatenate(client)}"
    await run.merge(merge, client)
    return merge.tag


def _failed(status: int) -> int:
    """The client's transaction status after an error."""
    return pg.FAILED_TRANSACTION if status != pg.IDLE else pg.IDLE


class _Run:
    """The legs of one scatter read, each answering into its stream."""

    def __init__(self, legs: list[Leg], batch: bytes) -> None:
        self.wakeup = Wakeup()
        self.streams = [LegStream(leg, self.wakeup) for leg in legs]
        self.heads: list[list[Message]] = []  # per shard: its answers before the rows
        self.cancelled = False
        for stream in self.streams:
            stream.start(batch)

    def interrupt(self) -> None:
        """The client's CancelRequest: every shard still running cancels its part (and says so)."""
        self.cancelled = True
        for stream in self.streams:
            _cancel(stream.leg, pg.PostgresError(pg.QUERY_CANCELED, _CANCELED))

    async def head(self, stream: LegStream) -> list[Message]:
        """A shard's answers before its first row (or its end)."""
        head: list[Message] = []
        while True:
            t = stream.peek()
            if t is None:
                self._check_ended(stream)
                await self.wakeup.wait()
                continue
            if t in _HEAD_ENDS:
                return head
            message = stream.message()
            assert message is not None
            if t == Backend.ERROR_RESPONSE:
                raise _ShardFailed(message[1])
            head.append(message)

    async def concatenate(self, client: ScatterClient) -> int:
        """Pass every shard's rows on as they come, interleaved; the number of rows."""
        count = 0
        live = list(self.streams)
        while live:
            out: list[bytes] = []
            size = 0
            for stream in list(live):
                rows = stream.rows()
                out.append(rows)
                size += len(rows)
                message = stream.message()
                if message is not None:
                    count += self._ended_rows(message, stream, live)
                if size >= SLICE_BYTES:
                    break
            if size:
                client.write(b"".join(out))
                await _flow(client)
            elif live and all(stream.peek() is None for stream in live):
                for stream in live:
                    self._check_ended(stream)
                await self.wakeup.wait()
        return count

    def _ended_rows(self, message: Message, stream: LegStream, live: list[LegStream]) -> int:
        """A message after a shard's rows: its row count once it is their end."""
        t, body = message
        if t == Backend.ERROR_RESPONSE:
            raise _ShardFailed(body)
        if t != Backend.COMMAND_COMPLETE:
            return 0  # a notice
        live.remove(stream)
        return int(body[:-1].rpartition(b" ")[2] or 0)

    async def merge(self, merge: StreamMerge, client: ScatterClient) -> None:
        """Feed the merge the rows it needs, and pass on what it gives out, a slice at a time."""
        live = set(range(len(self.streams)))
        while True:
            rows = merge.take(SLICE_ROWS)
            if rows:
                client.write(b"".join(pg.message(b"D", row) for row in rows))
                await _flow(client)
            if merge.finished:
                return
            if not rows:
                await self._feed(merge, live)

    async def _feed(self, merge: StreamMerge, live: set[int]) -> None:
        """Up to a slice of shard messages into the merge; waits only while it has none to give."""
        fed = 0
        while fed < SLICE_ROWS and (wanted := merge.wanted()) is not None:
            shard = wanted if not merge.any_shard else next(
                (i for i in sorted(live) if self.streams[i].peek() is not None), wanted)
            stream = self.streams[shard]
            message = stream.message()
            if message is None:
                if fed:
                    return
                self._check_ended(stream)
                await self.wakeup.wait()
                continue
            fed += 1
            t, body = message
            if t == Backend.DATA_ROW:
                merge.add(shard, body)
            elif t == Backend.COMMAND_COMPLETE:
                live.discard(shard)
                merge.end(shard)
            elif t == Backend.ERROR_RESPONSE:
                raise _ShardFailed(body)

    def _check_ended(self, stream: LegStream) -> None:
        """A leg whose server has answered everything, with nothing left to take, ended before its rows did."""
        if stream.done:
            failure = stream.failure()
            if failure is None and self.cancelled:
                failure = pg.PostgresError(pg.QUERY_CANCELED, _CANCELED)
            raise failure or pg.PostgresError(pg.PROTOCOL_VIOLATION, "shardproxy: a shard's answer ended early")

    async def finish(self, cancel: bool) -> None:
        """Every leg done with the read: those still running cancelled (unless the read succeeded and only needs
        their rest), the rest of their answers dropped, and their connections settled; a leg that does not
        settle in time loses its connection."""
        stop = pg.PostgresError(pg.QUERY_CANCELED, "shardproxy: the read across shards stopped")
        for stream in self.streams:
            leg = stream.leg
            if leg.server is None:
                leg.stop_waiting(stop)
            elif cancel:
                _cancel(leg, stop)
            stream.drop()
        results = await asyncio.gather(*(asyncio.wait_for(stream.leg.settled(), DRAIN_TIMEOUT)
                                         for stream in self.streams), return_exceptions=True)
        for stream, result in zip(self.streams, results):
            server = stream.leg.server
            if isinstance(result, TimeoutError) and server is not None:
                stream.leg.pool.discard(server)


def _cancel(leg: Leg, error: pg.PostgresError) -> None:
    """Stop a leg's part of the read: cancelled on its server if that runs it, never started if it waits."""
    server = leg.server
    if server is None:
        leg.stop_waiting(error)
    elif server.pending and not server.cancels:
        server.cancel_running()


async def _flow(client: ScatterClient) -> None:
    """Between slices: let the event loop serve others, and wait while the client's socket takes no more."""
    if client.writing_paused:
        await client.drained()
    else:
        await asyncio.sleep(0)
    if client.closed:
        raise _ClientGone


def _scatter_batch(client: ScatterClient, plan: ScatterPlan, messages: list[Message]) -> bytes:
    """What each shard runs: the rewritten query, simple or extended like the client's own."""
    if messages[0][0] == Frontend.QUERY:
        return pg.query(plan.shard_sql)
    bind = next(body for t, body in messages if t == Frontend.BIND)
    portal_end = bind.index(0)
    name_end = bind.index(0, portal_end + 1)
    statement = client.statements.get(bind[portal_end + 1 : name_end]) if name_end > portal_end + 1 else client.unnamed
    types = statement.param_types if statement is not None else []
    params, result_formats = _bind_sections(bind, name_end + 1)
    parse = b"\0" + pg.cstring(plan.shard_sql) + pg.INT16.pack(len(types)) + b"".join(pg.INT32.pack(t) for t in types)
    formats = plan.result_formats(result_formats) if len(result_formats) > 1 else result_formats
    bind_body = b"\0\0" + params + pg.INT16.pack(len(formats)) + b"".join(pg.INT16.pack(f) for f in formats)
    return (pg.message(b"P", parse) + pg.message(b"D", b"S\0") + pg.message(b"B", bind_body)
            + pg.message(b"D", b"P\0") + pg.message(b"E", b"\0" + pg.INT32.pack(0)) + pg.SYNC)


def _bind_sections(bind: bytes, pos: int) -> tuple[bytes, list[int]]:
    """A Bind body's parameter section (formats and values, as sent) and its result format codes."""
    start = pos
    (count,) = pg.INT16.unpack_from(bind, pos)
    pos += 2 + 2 * count
    (count,) = pg.INT16.unpack_from(bind, pos)
    pos += 2
    for _ in range(count):
        (length,) = pg.INT32.unpack_from(bind, pos)
        pos += 4 + (length if length != 0xFFFFFFFF else 0)
    (count,) = pg.INT16.unpack_from(bind, pos)
    return bind[start:pos], [pg.INT16.unpack_from(bind, pos + 2 + 2 * i)[0] for i in range(count)]


def _scatter_reply(client_messages: list[Message], shard_head: list[Message], plan: ScatterPlan,
                   description: bytes, tag: str, status: int) -> tuple[list[Message], list[Message]]:
    """The replies the client expects for its messages, with the merged rows in place of one shard's: those that
    go before the rows, and those after them."""
    if client_messages[0][0] == Frontend.QUERY:
        return [(Backend.ROW_DESCRIPTION, description)], [(Backend.COMMAND_COMPLETE, pg.cstring(tag)),
                                                          (Backend.READY_FOR_QUERY, bytes([status]))]
    parameters = next((body for t, body in shard_head if t == Backend.PARAMETER_DESCRIPTION), pg.INT16.pack(0))
    statement_description = next((body for t, body in shard_head if t == Backend.ROW_DESCRIPTION), b"")
    before: list[Message] = []
    after: list[Message] = []
    reply = before
    for t, body in client_messages:
        if t == Frontend.PARSE:
            reply.append((Backend.PARSE_COMPLETE, b""))
        elif t == Frontend.BIND:
            reply.append((Backend.BIND_COMPLETE, b""))
        elif t == Frontend.DESCRIBE:
            if body[:1] == b"S":
                reply.extend([(Backend.PARAMETER_DESCRIPTION, parameters),
                              (Backend.ROW_DESCRIPTION, plan.describe(statement_description))])
            else:
                reply.append((Backend.ROW_DESCRIPTION, description))
        elif t == Frontend.EXECUTE:
            reply = after
            reply.append((Backend.COMMAND_COMPLETE, pg.cstring(tag)))
        elif t == Frontend.SYNC:
            reply.append((Backend.READY_FOR_QUERY, bytes([status])))
    return before, after


@functools.lru_cache(maxsize=1024)
def scatter_plan(sql: str) -> ScatterPlan:
    return plan_scatter(sql)
