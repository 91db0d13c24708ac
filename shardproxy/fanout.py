"""Statements that run on several shards at once: scatter reads, and writes or DDL on every shard.

Each shard is served by a `Leg`: a stand-in client that borrows a pooled server connection and runs
batches of the real client's messages on it through the same data path (named statements, session
parameters), collecting the responses instead of sending them. What the real client then sees is built
from those responses here.

Writes on every shard are all-or-nothing: each leg runs the batch inside a transaction, then all prepare
(PREPARE TRANSACTION) and all commit, or all roll back. The first shard (the decider) prepares before the
others and commits before them, and rolls back after them, so that a commit left in doubt can be resolved
from the decider's state alone (shardproxy.recovery). Servers without prepared transactions
(max_prepared_transactions = 0) get a plain COMMIT on each shard, after every shard has succeeded.
Statements that PostgreSQL refuses inside a transaction block (CREATE INDEX CONCURRENTLY, VACUUM, ...)
cannot be all-or-nothing: each shard runs them on its own, and a failure names the shards they took effect on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from typing import TYPE_CHECKING

from shardproxy import protocol as pg
from shardproxy.client import ClientConnection
from shardproxy.merge import Merger, ScatterPlan, Unmergeable, plan_scatter
from shardproxy.params import literal
from shardproxy.routing import Decision

if TYPE_CHECKING:
    from shardproxy.pool import Pool
    from shardproxy.proxy import Proxy
    from shardproxy.server import ServerConnection

log = logging.getLogger("shardproxy.fanout")

Message = tuple[int, bytes]
_E, _Z, _C, _D = b"EZCD"


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


class Leg(ClientConnection):
    """One shard's part of a multi-shard statement, on behalf of `client`."""

    def __init__(self, client: ClientConnection, pool: Pool, kind: str | None = None):
        super().__init__(client.proxy)
        self.kind = kind  # what its transaction counts as: the statement's kind, not the node's role
        self.id = client.id  # logs name the client, as SHOW CLIENTS does
        self.transport = Collector()  # type: ignore[assignment]
        self.routes = False  # the batch was routed already: it runs on this leg's shard as it is
        self.user, self.database, self.pool = client.user, client.database, pool
        self.client = client
        self.statements, self.params, self.param_sql = client.statements, client.params, client.param_sql
        self.error: pg.PostgresError | None = None
        self._answered: asyncio.Future | None = None
        self.on_server_ready = self._ready  # what its server calls once the batch is answered
        self.gives_back = False

    def parameter_changed(self, name: str, value: str) -> None:
        super().parameter_changed(name, value)
        self.client.parameter_changed(name, value)  # the session is the client's

    @classmethod
    def for_proxy(cls, proxy: Proxy, pool: Pool) -> Leg:
        """A leg for the proxy's own statements, as the pool's user in its database."""
        stand_in = ClientConnection(proxy)
        stand_in.user, stand_in.database = pool.key.user, pool.key.database
        return cls(stand_in, pool)

    async def run(self, batch: bytes) -> list[Message]:
        """Send a batch and wait for every response to it."""
        self._answered = asyncio.get_running_loop().create_future()
        if self.server is None:
            self.buf = bytearray(batch)
            self.pool.acquire(self)
        else:
            self._forward(batch)
        await self._answered
        if self.error is not None:
            raise self.error
        return self.transport.take()

    def _ready(self, server: ServerConnection) -> None:
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(None)

    def release(self) -> None:
        self.on_server_ready = None  # the bound method would keep this object in a cycle
        server, self.server = self.server, None
        if server is not None:
            self.pool.unlink(server)
            if server.status == pg.IDLE and not server.pending:
                self.pool.release(server)
            else:
                self.pool.discard(server)

    def fail(self, error: pg.PostgresError) -> None:
        self.error = error
        self._ready(None)  # type: ignore[arg-type]

    def server_lost(self, server: ServerConnection) -> None:
        if self.server is server:
            self.server = None
            self.fail(pg.PostgresError(pg.CONNECTION_FAILURE, "shardproxy: server connection lost"))

    def _fatal(self, error: pg.PostgresError) -> None:
        self.fail(error)

    def close(self) -> None:
        self.closed = True


async def run_legs(legs: list[Leg], batches: list[bytes]) -> list[list[Message]]:
    return list(await asyncio.gather(*(leg.run(batch) for leg, batch in zip(legs, batches))))


def first_error(responses: list[list[Message]]) -> list[Message] | None:
    for messages in responses:
        if any(t == _E for t, _ in messages):
            return messages
    return None


def with_status(messages: list[Message], status: int) -> list[Message]:
    """The responses as the client must see them: its own transaction status in every ReadyForQuery."""
    return [(t, bytes([status]) if t == _Z else body) for t, body in messages]


class NotTransactional(Exception):
    """The batch cannot run inside a transaction block (SQLSTATE 25001): nothing of it ran."""


async def run_everywhere(client: ClientConnection, pools: list[Pool], batch: bytes, status: int, kind: str) -> bytes:
    """Run a write batch on every shard's primary, all-or-nothing; the client's response."""
    legs = [Leg(client, pool, kind) for pool in pools]
    try:
        begin = pg.query("BEGIN")
        setting = pg.query("SHOW max_prepared_transactions")
        responses = [_middle(r) for r in await run_legs(legs, [begin + batch + setting] * len(legs))]
        failed = first_error([answers for answers, _ in responses])
        if failed is not None:
            await run_legs(legs, [pg.query("ROLLBACK")] * len(legs))
            if status == pg.IDLE and _error_fields(failed).get("C") == ACTIVE_SQL_TRANSACTION:
                raise NotTransactional  # VACUUM and the like: run without a transaction, once the legs are back
            return join_messages(with_status(failed, status))
        await _commit(legs, two_phase=all(setting != "0" for _, setting in responses))
        return join_messages(with_status(responses[0][0], status))
    finally:
        for leg in legs:
            leg.release()


async def run_alone_everywhere(client: ClientConnection, pools: list[Pool], batch: bytes, status: int,
                               kind: str) -> bytes:
    """Run a batch that cannot be inside a transaction block on every shard's primary at once, each on its
    own. Nothing can be undone afterwards, so if some shards fail, the client's error says which shards
    have it done (and PostgreSQL's SQLSTATE and detail of the first failure)."""
    if status != pg.IDLE:  # as PostgreSQL answers it inside a transaction block
        raise pg.PostgresError(ACTIVE_SQL_TRANSACTION, "shardproxy: this statement cannot run inside a "
                               "transaction block (it runs on every shard without one)")
    legs = [Leg(client, pool, kind) for pool in pools]
    try:
        responses = await run_legs(legs, [batch] * len(legs))
    finally:
        for leg in legs:
            leg.release()
    names = [shard.name for shard in client.proxy.config.shards]
    failed = [i for i, answers in enumerate(responses) if first_error([answers]) is not None]
    if not failed:
        return join_messages(with_status(responses[0], status))
    fields = _error_fields(responses[failed[0]])
    done = [name for i, name in enumerate(names) if i not in failed]
    outcome = (f"it took effect on {_shards(done)}, where it stays (it cannot run inside a transaction, "
               "so it is not all-or-nothing)" if done else "it took effect on no shard")
    fields["M"] = f"shardproxy: failed on {_shards([names[i] for i in failed])}: {fields.get('M', '')}; {outcome}"
    error = pg.PostgresError(fields.get("C", pg.INTERNAL_ERROR), fields["M"], fields=fields).to_message()
    return join_messages(with_status([(t, error[5:] if t == _E else body) for t, body in responses[failed[0]]],
                                     status))


def _shards(names: list[str]) -> str:
    return f"shard{'s' if len(names) > 1 else ''} {', '.join(names)}"


def _error_fields(messages: list[Message]) -> dict[str, str]:
    return pg.parse_fields(next(body for t, body in messages if t == _E))


def _middle(messages: list[Message]) -> tuple[list[Message], str]:
    """Split `BEGIN; <batch>; SHOW max_prepared_transactions` responses: the batch's, and the setting."""
    ready = [i for i, (t, _) in enumerate(messages) if t == _Z]
    setting = messages[ready[-2] + 1 : ready[-1]]
    return messages[ready[0] + 1 : ready[-2] + 1], (_data_value(setting[1]) if len(setting) > 1 else "")


PREPARE_FAILED = "shardproxy: PREPARE TRANSACTION failed on a shard; rolled back"
GID_PREFIX = "shardproxy:"


def new_gid(decider: str) -> str:
    """A two-phase commit's name: it names its first participant, whose state decides it (see recovery.py)."""
    return f"{GID_PREFIX}{decider}:{uuid.uuid4().hex}"


def decider_of(gid: str) -> str:
    return gid.removeprefix(GID_PREFIX).rpartition(":")[0]


async def _commit(legs: list[Leg], two_phase: bool) -> None:
    """Two-phase commit where every server allows it, else one COMMIT per shard."""
    if not two_phase:
        await run_legs(legs, [pg.query("COMMIT")] * len(legs))
        return
    decider, others = legs[0], legs[1:]
    gid = literal(new_gid(decider.pool.node.shard))
    if first_error([await decider.run(pg.query(f"PREPARE TRANSACTION {gid}"))]) is not None:
        await run_legs(others, [pg.query("ROLLBACK")] * len(others))
        raise pg.PostgresError(pg.INTERNAL_ERROR, PREPARE_FAILED)
    prepared = await run_legs(others, [pg.query(f"PREPARE TRANSACTION {gid}")] * len(others))
    if first_error(prepared) is not None:
        await _roll_back(decider, [leg for leg, answers in zip(others, prepared) if first_error([answers]) is None],
                         gid)
        raise pg.PostgresError(pg.INTERNAL_ERROR, PREPARE_FAILED)
    if first_error([await decider.run(pg.query(f"COMMIT PREPARED {gid}"))]) is not None:
        raise pg.PostgresError(pg.INTERNAL_ERROR, "shardproxy: COMMIT PREPARED failed on the first shard; in-doubt "
                               "recovery commits or rolls back every shard as that shard decided")
    # Committed on the first shard: decided. A shard that fails now gets the commit from in-doubt recovery.
    answers = await asyncio.gather(*(leg.run(pg.query(f"COMMIT PREPARED {gid}")) for leg in others),
                                   return_exceptions=True)
    failed = [leg.pool.node.address for leg, answer in zip(others, answers)
              if isinstance(answer, BaseException) or first_error([answer]) is not None]
    if failed:
        log.warning("COMMIT PREPARED %s failed on %s: committed on the first shard, in-doubt recovery finishes it",
                    gid, ", ".join(failed))


async def _roll_back(decider: Leg, prepared: list[Leg], gid: str) -> None:
    """The decider last, and only once every other leg has rolled back: while it holds the transaction
    prepared, recovery (shardproxy.recovery) rolls back whatever is left."""
    undone = await run_legs(prepared, [pg.query(f"ROLLBACK PREPARED {gid}")] * len(prepared))
    if first_error(undone) is None:
        await decider.run(pg.query(f"ROLLBACK PREPARED {gid}"))


def _data_value(message: Message) -> str:
    """The first column of a one-column DataRow, as text."""
    t, body = message
    if t != _D:
        return ""
    (length,) = pg.INT32.unpack_from(body, 2)
    return body[6 : 6 + length].decode()


_P, _B, _DESCRIBE, _EXECUTE, _SYNC, _QUERY, _T, _PARAMS = b"PBDESQTt"
ACTIVE_SQL_TRANSACTION = "25001"  # "... cannot run inside a transaction block"


async def scatter(client: ClientConnection, pools: list[Pool], plan: ScatterPlan, batch: bytes, status: int) -> bytes:
    """Run a read on every shard (the plan's rewritten SQL) and merge the answers into the client's reply."""
    client_messages = split_messages(batch)
    leg_batch = _scatter_batch(client, plan, client_messages)
    legs = [Leg(client, pool, "scatter") for pool in pools]
    try:
        responses = await run_legs(legs, [leg_batch] * len(legs))
    finally:
        for leg in legs:
            leg.release()
    failed = first_error(responses)
    try:
        if failed is not None:
            plan.check_shard_error(_error_fields(failed))
            return join_messages(with_status([m for m in failed if m[0] in (_E, _Z)], status))
        description, rows, tag = _merged(plan, responses)
    except Unmergeable as exc:  # found in the shards' answers: refused as what is found in the query is
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    return join_messages(_scatter_reply(client_messages, responses[0], plan, description, rows, tag, status))


def _merged(plan: ScatterPlan, responses: list[list[Message]]) -> tuple[bytes, list[bytes], str]:
    merger = Merger(plan)
    for answers in responses:
        descriptions = [body for t, body in answers if t == _T]  # the portal's, with the result formats, last
        merger.add_shard_result(descriptions[-1] if descriptions else b"", [body for t, body in answers if t == _D])
    return merger.result()


def _scatter_batch(client: ClientConnection, plan: ScatterPlan, messages: list[Message]) -> bytes:
    """What each shard runs: the rewritten query, simple or extended like the client's own."""
    if messages[0][0] == _QUERY:
        return pg.query(plan.shard_sql)
    bind = next(body for t, body in messages if t == _B)
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


def _scatter_reply(client_messages: list[Message], shard_answers: list[Message], plan: ScatterPlan,
                   description: bytes, rows: list[bytes], tag: str, status: int) -> list[Message]:
    """The replies the client expects for its messages, with the merged rows in place of one shard's."""
    if client_messages[0][0] == _QUERY:
        return [(_T, description), *((_D, row) for row in rows), (_C, pg.cstring(tag)), (_Z, bytes([status]))]
    parameters = next((body for t, body in shard_answers if t == _PARAMS), pg.INT16.pack(0))
    statement_description = next((body for t, body in shard_answers if t == _T), b"")
    reply: list[Message] = []
    for t, body in client_messages:
        if t == _P:
            reply.append((ord("1"), b""))
        elif t == _B:
            reply.append((ord("2"), b""))
        elif t == _DESCRIBE:
            if body[:1] == b"S":
                reply.extend([(_PARAMS, parameters), (_T, plan.describe(statement_description))])
            else:
                reply.append((_T, description))
        elif t == _EXECUTE:
            reply.extend((_D, row) for row in rows)
            reply.append((_C, pg.cstring(tag)))
        elif t == _SYNC:
            reply.append((_Z, bytes([status])))
    return reply


@functools.lru_cache(maxsize=1024)
def _scatter_plan(sql: str) -> ScatterPlan:
    return plan_scatter(sql)


async def run(client: ClientConnection, decision: Decision, batch: bytes, status: int) -> bytes:
    """A statement for every shard: writes and DDL all-or-nothing on the primaries, reads merged."""
    proxy = client.proxy
    route = decision.route
    write = route.target == "all"
    pools = [proxy.node_pool(client, i, write, route.force_primary) for i in range(len(proxy.config.shards))]
    if None in pools:
        raise pg.PostgresError(pg.CANNOT_CONNECT_NOW, "shardproxy: a shard has no primary")
    if batch[0] != _QUERY and sum(t == _B for t, _ in split_messages(batch)) > 1:
        # Each shard would run the batch's other statements too, and the reply is built for one statement.
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: a statement that runs on every shard "
                               "must be the only one in its batch (send a Sync before and after it)")
    if write:
        kind = "ddl" if route.kind == "ddl" else "write"  # as shardproxy_queries_total counts it
        if decision.plan is not None and decision.plan.concurrently:
            return await run_alone_everywhere(client, pools, batch, status, kind)
        try:
            return await run_everywhere(client, pools, batch, status, kind)
        except NotTransactional:
            return await run_alone_everywhere(client, pools, batch, status, kind)
    try:
        plan = _scatter_plan(decision.sql)
    except Unmergeable as exc:
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    return await scatter(client, pools, plan, batch, status)
