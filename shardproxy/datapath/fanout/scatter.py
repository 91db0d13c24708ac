"""Reads on every shard, merged into one answer (the merge itself is planned and done by routing.merge)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from shardproxy.datapath.fanout.legs import (
    Leg,
    Message,
    error_fields,
    first_error,
    join_messages,
    run_legs,
    split_messages,
    with_status,
)
from shardproxy.datapath.session import ClientSession
from shardproxy.routing.merge import Merger, ScatterPlan, Unmergeable, plan_scatter
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend, Frontend

if TYPE_CHECKING:
    pass


async def scatter(client: ClientSession, legs: list[Leg], plan: ScatterPlan, batch: bytes, status: int) -> bytes:
    """Run a read on every shard's leg (the plan's rewritten SQL) and merge the answers into the client's reply.
    Inside a transaction an error aborts it: the reply's ReadyForQuery says so."""
    client_messages = split_messages(batch)
    leg_batch = _scatter_batch(client, plan, client_messages)
    responses = await run_legs(legs, [leg_batch] * len(legs))
    failed = first_error(responses)
    try:
        if failed is not None:
            plan.check_shard_error(error_fields(failed))
            ends = (Backend.ERROR_RESPONSE, Backend.READY_FOR_QUERY)
            return join_messages(with_status([m for m in failed if m[0] in ends], _failed(status)))
        description, rows, tag = _merged(plan, responses)
    except Unmergeable as exc:  # found in the shards' answers: refused as what is found in the query is
        raise pg.PostgresError(exc.sqlstate, exc.message) from None
    return join_messages(_scatter_reply(client_messages, responses[0], plan, description, rows, tag, status))


def _failed(status: int) -> int:
    """The client's transaction status after an error."""
    return pg.FAILED_TRANSACTION if status != pg.IDLE else pg.IDLE


def _merged(plan: ScatterPlan, responses: list[list[Message]]) -> tuple[bytes, list[bytes], str]:
    merger = Merger(plan)
    for answers in responses:
        # The portal's description, with the result formats, is the last one.
        descriptions = [body for t, body in answers if t == Backend.ROW_DESCRIPTION]
        rows = [body for t, body in answers if t == Backend.DATA_ROW]
        merger.add_shard_result(descriptions[-1] if descriptions else b"", rows)
    return merger.result()


def _scatter_batch(client: ClientSession, plan: ScatterPlan, messages: list[Message]) -> bytes:
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


def _scatter_reply(client_messages: list[Message], shard_answers: list[Message], plan: ScatterPlan,
                   description: bytes, rows: list[bytes], tag: str, status: int) -> list[Message]:
    """The replies the client expects for its messages, with the merged rows in place of one shard's."""
    if client_messages[0][0] == Frontend.QUERY:
        return [(Backend.ROW_DESCRIPTION, description), *((Backend.DATA_ROW, row) for row in rows),
                (Backend.COMMAND_COMPLETE, pg.cstring(tag)), (Backend.READY_FOR_QUERY, bytes([status]))]
    parameters = next((body for t, body in shard_answers if t == Backend.PARAMETER_DESCRIPTION), pg.INT16.pack(0))
    statement_description = next((body for t, body in shard_answers if t == Backend.ROW_DESCRIPTION), b"")
    reply: list[Message] = []
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
            reply.extend((Backend.DATA_ROW, row) for row in rows)
            reply.append((Backend.COMMAND_COMPLETE, pg.cstring(tag)))
        elif t == Frontend.SYNC:
            reply.append((Backend.READY_FOR_QUERY, bytes([status])))
    return reply


@functools.lru_cache(maxsize=1024)
def scatter_plan(sql: str) -> ScatterPlan:
    return plan_scatter(sql)
