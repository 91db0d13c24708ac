"""A multi-row INSERT whose rows belong to several shards: each of those shards runs the statement with its own rows
only, all-or-nothing (two-phase outside a transaction, on the transaction's legs inside one), and the client gets
one answer, as one server would give it: the row count of all shards, and the RETURNING rows in the order of the
rows inserted (combine.py).

In the simple protocol each shard gets the text cut down to its rows (routing/split.py). In the extended protocol
each shard's batch mirrors the client's message for message, so that its answers are the client's: the unnamed
statement holds the shard's text (its parameters renumbered), the Bind carries the values of that shard's rows,
and Describe of the portal, Execute and Sync go as sent. A client's batch with no Parse gets one first, whose
ParseComplete the client does not see.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

from shardproxy.datapath.fanout.combine import combined
from shardproxy.datapath.fanout.everywhere import run_everywhere, run_in_transaction
from shardproxy.datapath.fanout.legs import Leg, Message, split_messages
from shardproxy.datapath.session import ClientSession
from shardproxy.routing.router import Decision
from shardproxy.routing.split import Part, Unsplittable, parts
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend, Frontend

_INT16, _INT32 = pg.INT16, pg.INT32
_NULL = 0xFFFFFFFF
_SENT_AS_IS = frozenset({Frontend.DESCRIBE, Frontend.EXECUTE, Frontend.SYNC})


async def run_split(client: ClientSession, legs: list[Leg], decision: Decision, batch: bytes,
                    in_transaction: bool) -> tuple[bytes, bool]:
    """legs: one on each shard that rows go to, in shard order. The client's reply, and whether it took a
    two-phase commit."""
    rows = decision.route.rows
    position = {shard: i for i, shard in enumerate(sorted(set(rows)))}
    order = [position[shard] for shard in rows]  # each row's leg
    subsets: list[list[int]] = [[] for _ in position]
    for row, leg in enumerate(order):
        subsets[leg].append(row)
    try:
        if batch[0] == Frontend.QUERY:
            batches = [pg.query(part.sql) for part in parts(decision.sql, subsets, len(rows))]
            added_parse = False
        else:
            batches, added_parse = _extended(client, split_messages(batch), subsets, len(rows))
    except Unsplittable:
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: the rows of this INSERT belong to different "
                               "shards and its text cannot be cut by row; send one INSERT per shard") from None

    def answer(responses: list[list[Message]]) -> list[Message]:
        return combined([_shown(r, added_parse) for r in responses], order)

    if in_transaction:
        return await run_in_transaction(legs, batches, answer), False
    return await run_everywhere(client, legs, batches, answer)


def _shown(answers: list[Message], added_parse: bool) -> list[Message]:
    """A leg's answers as the client's: without the ParseComplete of a Parse it did not send."""
    if not added_parse or not answers or answers[0][0] != Backend.PARSE_COMPLETE:
        return answers
    return answers[1:]


def _extended(client: ClientSession, messages: list[Message], subsets: list[list[int]],
              rows: int) -> tuple[list[bytes], bool]:
    """Each leg's batch, mirroring the client's; and whether a Parse was added before it."""
    bind = next(body for t, body in messages if t == Frontend.BIND)
    portal_end = bind.index(0)
    name_end = bind.index(0, portal_end + 1)
    name = bind[portal_end + 1 : name_end]
    statement = client.statements.get(name) if name else client.unnamed
    if statement is None:
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: the INSERT's statement is unknown")
    shard_parts = _parts(statement.sql, tuple(tuple(subset) for subset in subsets), rows)
    values = _bind_values(bind, name_end + 1)
    needed = max((n for part in shard_parts for n in part.params), default=0)
    if len(values.values) < needed or len(values.formats) not in (0, 1, len(values.values)):
        raise pg.PostgresError(pg.PROTOCOL_VIOLATION, f"bind message supplies {len(values.values)} parameters "
                               f"and {len(values.formats)} formats, but the statement requires {needed} parameters")
    added_parse = not any(t == Frontend.PARSE for t, _ in messages)
    batches = []
    for part in shard_parts:
        parse = pg.message(b"P", _parse_body(part, statement.param_types))
        out = [parse] if added_parse else []
        for t, body in messages:
            if t == Frontend.PARSE:
                _check_parse(body, name)
                out.append(parse)
            elif t == Frontend.BIND:
                out.append(pg.message(b"B", bind[: portal_end + 1] + b"\0" + _subset_values(values, part.params)))
            elif t in _SENT_AS_IS:
                _check(t, body)
                out.append(pg.message(bytes([t]), body))
            elif t != Frontend.FLUSH:
                raise _alone()
        batches.append(b"".join(out))
    return batches, added_parse


@functools.lru_cache(maxsize=64)
def _parts(sql: str, subsets: tuple[tuple[int, ...], ...], rows: int) -> list[Part]:
    """A prepared statement's text per shard, for one pattern of rows to shards (the same batch size and key
    spread repeat)."""
    return parts(sql, [list(subset) for subset in subsets], rows)


def _check_parse(body: bytes, bound: bytes) -> None:
    if body[: body.index(0)] != bound:
        raise _alone()


def _check(t: int, body: bytes) -> None:
    if t == Frontend.DESCRIBE and body[:1] == b"S":
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: an INSERT whose rows are split by shard "
                               "cannot be described as a statement in the same batch (describe it in a batch of "
                               "its own, or describe the portal)")
    if t == Frontend.EXECUTE and _INT32.unpack_from(body, body.index(0) + 1)[0] != 0:
        raise pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: an INSERT whose rows are split by shard "
                               "returns all its rows at once (Execute with no row limit)")


def _alone() -> pg.PostgresError:
    return pg.PostgresError(pg.FEATURE_NOT_SUPPORTED, "shardproxy: an INSERT whose rows are split by shard must "
                            "be the only statement in its batch (send a Sync before and after it)")


def _parse_body(part: Part, types: Sequence[int]) -> bytes:
    kept = [types[n - 1] if n <= len(types) else 0 for n in part.params]
    return b"\0" + pg.cstring(part.sql) + _INT16.pack(len(kept)) + b"".join(_INT32.pack(oid) for oid in kept)


class _Values(NamedTuple):
    """A Bind's parameters, as sent: format codes, values (None for NULL), then the result format section."""

    formats: list[bytes]
    values: list[bytes | None]
    results: bytes


def _bind_values(bind: bytes, pos: int) -> _Values:
    (count,) = _INT16.unpack_from(bind, pos)
    formats = [bind[pos + 2 + 2 * i : pos + 4 + 2 * i] for i in range(count)]
    pos += 2 + 2 * count
    (count,) = _INT16.unpack_from(bind, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(count):
        (length,) = _INT32.unpack_from(bind, pos)
        pos += 4
        if length == _NULL:
            values.append(None)
        else:
            values.append(bind[pos : pos + length])
            pos += length
    return _Values(formats, values, bind[pos:])


def _subset_values(bound: _Values, numbers: tuple[int, ...]) -> bytes:
    """The parameter and result sections of a Bind of the parameters `numbers` (1-based) only."""
    formats = bound.formats if len(bound.formats) <= 1 else [bound.formats[n - 1] for n in numbers]
    out = [_INT16.pack(len(formats)), *formats, _INT16.pack(len(numbers))]
    for n in numbers:
        value = bound.values[n - 1]
        out.append(_INT32.pack(_NULL) if value is None else _INT32.pack(len(value)) + value)
    out.append(bound.results)
    return b"".join(out)

