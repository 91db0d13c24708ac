"""COPY across shards, one leg per shard (legs.py): a client's COPY FROM STDIN split row by row among the shards
that own the rows, and COPY TO STDOUT of every shard's rows as one.

COPY FROM: every leg runs the COPY (outside a transaction block inside one the proxy begins, so that it is all or
nothing), and the client gets one CopyInResponse. From then on the client's CopyData is split as it arrives
(routing/copy.py) and written straight to each leg's server: nothing is held beyond one read, and while a
server's socket is full the client's reading pauses (back-pressure). At CopyDone every leg ends its COPY, the
counts add up, and the proxy's transaction commits, in two phases when two or more shards got rows. Any error (a
row the proxy cannot route, a row a server rejects, the client's CopyFail, the client gone) ends the COPY on every
other leg with CopyFail and rolls back: no shard keeps a row. Into a reference table every leg gets every row.

COPY TO: the legs run it one after another, each shard's data streamed to the client as it comes, as one COPY:
one CopyOutResponse, one csv header line, one binary header and trailer, the total in CommandComplete.

In the extended protocol the client's Parse, Bind and Describe are answered here and the legs run the statement
as a simple query, which COPY can be (it takes no parameters).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

from shardproxy.config import Config
from shardproxy.datapath._core import ProxyCore
from shardproxy.datapath.fanout.legs import Collector, Leg, Message, run_legs, split_messages
from shardproxy.datapath.fanout.twophase import commit, error_of
from shardproxy.datapath.params import literal
from shardproxy.routing.copy import BINARY_HEADER, BINARY_TRAILER, CopyError, CopySpec, RowSplitter, copy_spec
from shardproxy.routing.merge import Unmergeable, plan_scatter
from shardproxy.routing.router import Decision, Router
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend, Frontend

if TYPE_CHECKING:
    from shardproxy.datapath.server import ServerConnection

_BEGIN = pg.query("BEGIN")
_ROLLBACK = pg.query("ROLLBACK")
_COPY_DONE = pg.message(b"c")
_COPY_MESSAGES = frozenset({Frontend.COPY_DATA, Frontend.COPY_DONE, Frontend.COPY_FAIL})
_IGNORED_IN_COPY = frozenset({Frontend.FLUSH, Frontend.SYNC})  # as a server in COPY FROM STDIN ignores them
_PACK = pg.INT32.pack
_UNPACK = pg.INT32.unpack_from
_CACHED_TABLES = 1000  # tables whose columns are remembered, before the cache starts afresh
_COLUMNS_SQL = (
    "SELECT a.attname, CASE t.typtype WHEN 'd' THEN t.typbasetype ELSE a.atttypid END::int "
    "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
    "WHERE a.attrelid = {}::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' "
    "ORDER BY a.attnum"
)


class CopyProxy(Protocol):
    """What COPY needs of the proxy."""

    config: Config
    router: Router
    copy_columns: Columns

    def rows_copied(self, shard: str, rows: int) -> None: ...  # shardproxy_copy_rows_total


class CopyClient(Protocol):
    """What COPY needs of the client connection (placement.py's)."""

    proxy: CopyProxy
    core: ProxyCore  # (its two_phase_key)
    buf: bytearray
    copy_feed: Callable[[], None] | None
    closed: bool
    peer: object
    database: object
    param_sql: dict
    transport: asyncio.Transport | None
    max_message_size: int

    def write(self, data: bytes) -> None: ...
    def _dispatch(self) -> None: ...


class Columns:
    """The columns (name, type oid) of tables COPY writes without a column list or by key type, learnt from the
    catalog once per database, search_path and table name, and forgotten when DDL runs through the proxy."""

    def __init__(self) -> None:
        self._tables: dict[tuple[object, str, str], list[tuple[str, int]]] = {}

    async def of(self, leg: Leg, client: CopyClient, table: str) -> list[tuple[str, int]]:
        """Raises PostgresError with the server's own error (say, the table does not exist)."""
        key = (client.database, str(client.param_sql.get("search_path", "")), table)
        columns = self._tables.get(key)
        if columns is None:
            answers = await leg.run(pg.query(_COLUMNS_SQL.format(literal(table))))
            failed = error_of(answers)
            if failed is not None:
                raise failed
            columns = [_row(body) for t, body in answers if t == Backend.DATA_ROW]
            if len(self._tables) >= _CACHED_TABLES:
                self._tables.clear()
            self._tables[key] = columns
        return columns

    def clear(self) -> None:
        self._tables.clear()


def _row(body: bytes) -> tuple[str, int]:
    """A row (name, oid) of _COLUMNS_SQL, in the text format."""
    (length,) = _UNPACK(body, 2)
    name = body[6:6 + length].decode()
    (size,) = _UNPACK(body, 6 + length)
    return name, int(body[10 + length:10 + length + size])


async def run(client: CopyClient, legs: list[Leg], decision: Decision, batch: bytes,
              in_transaction: bool) -> tuple[bytes, bool]:
    """A COPY on every shard's leg. The client's reply (after what was streamed to it), and whether the
    transaction the proxy began committed in two phases."""
    try:
        spec = copy_spec(decision.sql)
    except CopyError as exc:
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    if not spec.stream:
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: COPY with a server's file or program needs "
                               "a shard key (a /* shard_key: ... */ comment)")
    extended = batch[0] != Frontend.QUERY
    before, synced = _extended_replies(batch) if extended else (b"", True)
    status = pg.IN_TRANSACTION if in_transaction else pg.IDLE
    if spec.into:
        return await _copy_in(client, legs, spec, decision, before, in_transaction, extended)
    return await _copy_out(client, legs, spec, decision.sql, before, status if synced else None), False


def _extended_replies(batch: bytes) -> tuple[bytes, bool]:
    """The answers to an extended-protocol COPY's messages before its Execute, and whether a Sync follows it."""
    out = []
    synced = False
    for t, body in split_messages(batch):
        if t == Frontend.PARSE:
            out.append(pg.PARSE_COMPLETE)
        elif t == Frontend.BIND:
            out.append(pg.BIND_COMPLETE)
        elif t == Frontend.DESCRIBE:
            if body[:1] == b"S":  # a statement: its (no) parameters, then its (no) rows
                out.append(pg.message(b"t", b"\0\0"))
            out.append(pg.NO_DATA)
        elif t == Frontend.SYNC:
            synced = True
    return b"".join(out), synced


# -- COPY FROM STDIN ----------------------------------------------------------------------------------------------
async def _copy_in(client: CopyClient, legs: list[Leg], spec: CopySpec, decision: Decision, before: bytes,
                   in_transaction: bool, extended: bool) -> tuple[bytes, bool]:
    if not in_transaction:
        await run_legs(legs, [_BEGIN] * len(legs))
    splitter = None
    try:
        if decision.plan is not None and decision.plan.tables:  # a sharded table (else a reference table)
            splitter = await _splitter(client, legs[0], spec)
    except pg.PostgresError as error:
        if not in_transaction:
            await run_legs(legs, [_ROLLBACK] * len(legs))
        return before + _failed(error, in_transaction, ready=True), False
    copy = CopyIn(client, legs, splitter)
    error = await copy.run(pg.query(decision.sql), before)
    two_phase = False
    if error is None and not in_transaction:
        outcome = await commit(legs, client.core.two_phase_key)
        error, two_phase = outcome.error, outcome.two_phase
    elif error is not None and not in_transaction:
        await run_legs(legs, [_ROLLBACK] * len(legs))
    if error is not None:  # (once the client is in COPY, in the extended protocol its Sync gets ReadyForQuery)
        ready = not (extended and copy.streamed)
        return (b"" if copy.streamed else before) + _failed(error, in_transaction, ready), two_phase
    for leg, rows in zip(legs, copy.counts):
        client.proxy.rows_copied(leg.pool.node.shard, rows)
    total = sum(copy.counts) if splitter is not None else max(copy.counts, default=0)
    reply = pg.command_complete(f"COPY {total}")
    return reply if extended else reply + pg.READY[pg.IN_TRANSACTION if in_transaction else pg.IDLE], two_phase


async def _splitter(client: CopyClient, leg: Leg, spec: CopySpec) -> RowSplitter:
    """The splitter of a sharded table's rows: its key's place among the columns the data has, and its type."""
    proxy = client.proxy
    key = proxy.router.key_column
    assert spec.table is not None
    columns = await proxy.copy_columns.of(leg, client, spec.table)
    names = list(spec.columns) if spec.columns is not None else [name for name, _ in columns]
    types = dict(columns)
    if key not in names:
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, f"shardproxy: COPY into sharded table {spec.table} needs "
                               f"the shard key {key} among its columns, to send each row to its shard")
    return RowSplitter(spec.format, names.index(key), types.get(key, 0), proxy.router.ring, spec.table, key)


def _failed(error: pg.PostgresError, in_transaction: bool, ready: bool) -> bytes:
    """The error, then ReadyForQuery if the client's Sync (or Query) has not had one yet."""
    message = error.to_message()
    return message + pg.READY[pg.FAILED_TRANSACTION if in_transaction else pg.IDLE] if ready else message


class _Gate:
    """Each leg server's peer during COPY FROM (see Connection.pause_writing): the client's reading pauses while
    any server's socket is full, and resumes once every one has room."""

    def __init__(self, client: CopyClient) -> None:
        self.client = client
        self.transport = self
        self.closed = False
        self.reading_paused = False
        self.full = 0  # servers whose sockets are full

    def pause_reading(self) -> None:
        self.full += 1
        if self.full == 1:
            _reading(self.client, pause=True)

    def resume_reading(self) -> None:
        if self.full > 0:  # (none after open())
            self.full -= 1
            if self.full == 0:
                _reading(self.client, pause=False)

    def open(self) -> None:
        """The COPY is over: the client reads again, whatever the servers' state."""
        if self.full > 0:
            self.full = 0
            _reading(self.client, pause=False)


def _reading(client: CopyClient, pause: bool) -> None:
    transport = client.transport
    if transport is None or client.closed:
        return
    if pause:
        transport.pause_reading()
    else:
        transport.resume_reading()


class _Answers:
    """A leg's socket while it runs COPY: each server message goes to `on_message` as it comes."""

    def __init__(self, on_message: Callable[[int, bytes], None]) -> None:
        self.on_message = on_message

    def write(self, data: bytes | bytearray) -> None:
        for t, body in split_messages(bytes(data)):
            self.on_message(t, body)

    def pause_reading(self) -> None:
        pass

    resume_reading = close = pause_reading

    def take(self) -> list[Message]:
        return []


class CopyIn:
    """One COPY FROM STDIN on every leg: the client's data in, split (or copied to every leg without a splitter)."""

    def __init__(self, client: CopyClient, legs: list[Leg], splitter: RowSplitter | None) -> None:
        loop = asyncio.get_running_loop()
        self.client = client
        self.legs = legs
        self.splitter = splitter
        self.began: list[asyncio.Future[bytes | None]] = [loop.create_future() for _ in legs]
        self.copying = [False] * len(legs)  # the leg's server is in COPY, reading data
        self.over: asyncio.Future[None] = loop.create_future()  # the client's data ended, or the COPY failed
        self.error: pg.PostgresError | None = None
        self.counts = [0] * len(legs)
        self.gate = _Gate(client)
        self.streamed = False  # the client got the CopyInResponse: it is in COPY
        self._servers: list[ServerConnection | None] = []

    async def run(self, statement: bytes, before: bytes) -> pg.PostgresError | None:
        """Begin the COPY on every leg, feed it the client's data, end it; the error that failed it, if any. The
        client's data flows once every leg is in its COPY (or failed to begin it)."""
        for i, leg in enumerate(self.legs):
            leg.transport = _Answers(partial(self._answer, i))
        runs = [asyncio.ensure_future(leg.run(statement)) for leg in self.legs]
        for began, leg_run in zip(self.began, runs):  # a leg whose COPY ended (or its server) began none
            leg_run.add_done_callback(partial(_settle, began))
        try:
            response = (await asyncio.gather(*self.began))[0]
            if self.error is None and response is not None:
                self._stream(before + pg.message(b"G", response))
                await self.over
            self._end()
            for result in await asyncio.gather(*runs, return_exceptions=True):
                if isinstance(result, pg.PostgresError):
                    self._fail(result)
        finally:
            self._close()
        return self.error

    def _stream(self, response: bytes) -> None:
        """The client may send its data: from now on it is fed as it comes."""
        client = self.client
        self._servers = [leg.server for leg in self.legs]
        for server in self._servers:
            if server is not None:
                server.peer = self.gate
        client.write(response)
        self.streamed = True
        client.copy_feed = self.feed
        self.feed()  # (what came with the COPY statement)

    def _end(self) -> None:
        """Every leg ends its COPY: CopyDone if the client's data all went well, else CopyFail."""
        if self.error is None and self.splitter is not None:
            self._send(self.splitter.end())
        ending = _COPY_DONE if self.error is None else pg.message(b"f", b"shardproxy: the COPY failed\0")
        for leg, copying in zip(self.legs, self.copying):
            if leg.server is not None and copying:
                leg._forward(ending)

    def _close(self) -> None:
        """The legs collect their answers again, and the client's reading and data go back to the data path. After
        an error the client's leftover copy messages are dropped, as PostgreSQL drops them outside COPY."""
        for leg, server in zip(self.legs, self._servers):
            leg.transport = Collector()
            if server is not None:
                server.peer = leg
        self.gate.open()
        if self.client.copy_feed is not None:
            self.client.copy_feed = self._discard
            self._discard()

    # -- the client's data ------------------------------------------------------------------------------------
    def feed(self) -> None:
        """The client's messages in its buffer: copy data to the legs, up to its CopyDone or CopyFail."""
        client = self.client
        if client.closed:
            self._fail(pg.PostgresError(pg.CONNECTION_FAILURE, "shardproxy: the client left during COPY"))
            return
        buf = client.buf
        n, pos = len(buf), 0
        pieces = []
        while n - pos >= 5 and not self.over.done():
            t = buf[pos]
            (length,) = _UNPACK(buf, pos + 1)
            end = pos + 1 + length
            if length < 4 or length > client.max_message_size:
                self._fail(pg.PostgresError(pg.PROTOCOL_VIOLATION, "invalid message length"))
                break
            if end > n:
                break
            if t == Frontend.COPY_DATA:
                pieces.append(buf[pos + 5:end])
            elif t == Frontend.COPY_DONE:
                client.copy_feed = None  # what follows waits for the COPY's end (the data path dispatches it)
                self.over.set_result(None)
            elif t == Frontend.COPY_FAIL:
                reason = bytes(buf[pos + 5:end - 1]).decode(errors="replace")
                self._fail(pg.PostgresError(pg.QUERY_CANCELED, f"COPY from stdin failed: {reason}"))
            elif t not in _IGNORED_IN_COPY:
                self._fail(pg.PostgresError(pg.PROTOCOL_VIOLATION,
                                            f"unexpected message type 0x{t:02X} during COPY from stdin"))
            pos = end
        del buf[:pos]
        if pieces and self.error is None:
            self._route(b"".join(pieces))

    def _route(self, data: bytes) -> None:
        if self.splitter is None:
            self._send([data] * len(self.legs))
            return
        try:
            self._send(self.splitter.feed(data))
        except CopyError as exc:
            self._fail(pg.PostgresError(exc.sqlstate, exc.message))

    def _send(self, parts: list[bytes]) -> None:
        for leg, part in zip(self.legs, parts):
            server = leg.server
            if part and server is not None:
                server.write(b"d" + _PACK(len(part) + 4) + part)

    def _discard(self) -> None:
        """After the COPY failed: drop the client's copy messages up to its next other one."""
        client = self.client
        buf = client.buf
        pos = 0
        while len(buf) - pos >= 5 and buf[pos] in _COPY_MESSAGES:
            end = pos + 1 + _UNPACK(buf, pos + 1)[0]
            if end > len(buf):
                break
            pos = end
        del buf[:pos]
        if buf and buf[0] not in _COPY_MESSAGES:
            client.copy_feed = None
            client._dispatch()

    # -- the servers' answers ---------------------------------------------------------------------------------
    def _answer(self, i: int, t: int, body: bytes) -> None:
        if t == Backend.COPY_IN_RESPONSE:
            self.copying[i] = True
            if not self.began[i].done():
                self.began[i].set_result(body)
        elif t == Backend.ERROR_RESPONSE:  # (which ends the server's COPY)
            self.copying[i] = False
            self._fail(_server_error(body))
        elif t == Backend.COMMAND_COMPLETE:
            self.counts[i] = _count(body)

    def _fail(self, error: pg.PostgresError) -> None:
        """The first error ends the COPY everywhere."""
        if self.error is None:
            self.error = error
        if not self.over.done():
            self.over.set_result(None)
        self.gate.open()


def _settle(future: asyncio.Future[bytes | None], _: object) -> None:
    if not future.done():
        future.set_result(None)


def _server_error(body: bytes) -> pg.PostgresError:
    fields = pg.parse_fields(body)
    return pg.PostgresError(fields.get("C", pg.INTERNAL_ERROR), fields.get("M", ""), fields.get("S", "ERROR"), fields)


def _count(body: bytes) -> int:
    """The row count of a CommandComplete body (`COPY 42\\0`)."""
    tag = body.rstrip(b"\0").split()
    return int(tag[-1]) if tag and tag[-1].isdigit() else 0


# -- COPY TO STDOUT -----------------------------------------------------------------------------------------------
async def _copy_out(client: CopyClient, legs: list[Leg], spec: CopySpec, sql: str, before: bytes,
                    status: int | None) -> bytes:
    """Each leg's COPY in turn, streamed to the client. status: the client's ReadyForQuery, or None when its Sync
    is yet to come."""
    if spec.query is not None:
        _check_concatenates(spec.query)
    out = CopyOut(client, legs, spec)
    if before:
        client.write(before)
    statement = pg.query(sql)
    for i, leg in enumerate(legs):
        leg.transport = _Answers(partial(out.answer, i))
        try:
            await leg.run(statement)
        except pg.PostgresError as exc:
            out.error = out.error or exc
        finally:
            out.leg_done(leg)
        if out.error is not None:
            break
    if out.error is not None:
        failed = pg.FAILED_TRANSACTION if status == pg.IN_TRANSACTION else status
        return out.error.to_message() + (pg.READY[failed] if failed is not None else b"")
    for leg, rows in zip(legs, out.counts):
        client.proxy.rows_copied(leg.pool.node.shard, rows)
    return out.finish() + pg.command_complete(f"COPY {sum(out.counts)}") + (pg.READY[status] if status is not None
                                                                             else b"")


def _check_concatenates(query: str) -> None:
    """COPY (query) TO of every shard's rows is exact only when the rows just add up: no ORDER BY, LIMIT,
    DISTINCT, GROUP BY or aggregate."""
    try:
        plan = plan_scatter(query)
    except Unmergeable as exc:
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    if not plan.streaming or plan.hidden or plan.aggregates:
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: COPY (query) TO STDOUT without a shard key "
                               "joins every shard's rows, so its query cannot sort, limit, de-duplicate or "
                               "aggregate; give it a key, or run the query as a SELECT")


class CopyOut:
    """Every leg's COPY TO data, as one COPY to the client."""

    def __init__(self, client: CopyClient, legs: list[Leg], spec: CopySpec) -> None:
        self.client = client
        self.legs = legs
        self.binary = spec.format.binary
        self.header = spec.format.header and not self.binary
        self.counts: list[int] = []
        self.error: pg.PostgresError | None = None
        self.started = False  # the client got the CopyOutResponse
        self._skip_header = False  # the leg's next data starts with its header (the client has one already)
        self._header_due = self.binary  # the client's binary header goes before the first row

    def answer(self, i: int, t: int, body: bytes) -> None:
        if t == Backend.COPY_OUT_RESPONSE:
            self._began(i, body)
        elif t == Backend.COPY_DATA:
            self._data(body)
        elif t == Backend.COMMAND_COMPLETE:
            self.counts.append(_count(body))
        elif t == Backend.ERROR_RESPONSE:
            self.error = self.error or _server_error(body)

    def _began(self, i: int, body: bytes) -> None:
        """A leg's CopyOutResponse: the client gets the first; while the client's socket is full the leg's server
        is not read (Connection.pause_writing pauses the client's peer)."""
        self.client.peer = self.legs[i].server
        if not self.started:
            self.started = True
            self.client.write(pg.message(b"H", body))
        self._skip_header = self.binary or self.header and i > 0

    def _data(self, body: bytes) -> None:
        """A leg's CopyData, which PostgreSQL sends a row at a time (clients such as psycopg rely on it): a
        binary stream's header comes with its first row, and its trailer alone."""
        if self._skip_header:
            self._skip_header = False
            if not self.binary:  # the csv header line of a shard after the first
                return
            body = body[len(BINARY_HEADER):]
        if self.binary and body == BINARY_TRAILER:
            return
        if self._header_due:
            self._header_due = False
            body = BINARY_HEADER + body
        self.client.write(_copy_data(body))

    def leg_done(self, leg: Leg) -> None:
        leg.transport = Collector()
        self.client.peer = None
        server = leg.server
        if server is not None and server.reading_paused and server.transport is not None:
            server.reading_paused = False
            server.transport.resume_reading()

    def finish(self) -> bytes:
        """The end of the client's COPY: the binary trailer, then CopyDone (or, with no leg's data, nothing)."""
        if not self.started:
            return b""
        if not self.binary:
            return _COPY_DONE
        return _copy_data((BINARY_HEADER if self._header_due else b"") + BINARY_TRAILER) + _COPY_DONE


def _copy_data(data: bytes) -> bytes:
    return b"d" + _PACK(len(data) + 4) + data
