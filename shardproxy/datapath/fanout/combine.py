"""The reply to a write that ran on several shards, each on its own rows (an UPDATE or DELETE with no key, an INSERT
whose rows were split by shard): the client sent one statement, so it gets one statement's answers, with the row
count of all shards together and the RETURNING rows of all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardproxy.datapath.fanout.legs import Message
from shardproxy.wire.protocol import Backend


def combined(responses: list[list[Message]], order: Sequence[int] = ()) -> list[Message]:
    """The first shard's answers, with every shard's rows in place of its own and the summed count in its
    CommandComplete. order: for each row the statement was given, the index of the response it went to; when
    every shard returned one row per row it was given, the rows come back in that order (else shard by shard).
    Given a failed shard's answers alone, they stand as they are."""
    if any(t == Backend.ERROR_RESPONSE for t, _ in responses[0]):
        return responses[0]
    rows = [[body for t, body in answers if t == Backend.DATA_ROW] for answers in responses]
    total = sum(_count(answers) for answers in responses)
    out: list[Message] = []
    for t, body in responses[0]:
        if t == Backend.COMMAND_COMPLETE:
            out.extend((Backend.DATA_ROW, row) for row in _ordered(rows, order))
            out.append((t, _with_count(body, total)))
        elif t != Backend.DATA_ROW:
            out.append((t, body))
    return out


def _ordered(rows: list[list[bytes]], order: Sequence[int]) -> list[bytes]:
    """The shards' rows interleaved as `order` says, when it fits them; else one shard's after another's."""
    if order and all(len(shard_rows) == order.count(i) for i, shard_rows in enumerate(rows)):
        taken = [iter(shard_rows) for shard_rows in rows]
        return [next(taken[i]) for i in order]
    return [row for shard_rows in rows for row in shard_rows]


def _count(answers: list[Message]) -> int:
    """The row count of the CommandComplete among a shard's answers (its tag's last word)."""
    tag = next(body for t, body in answers if t == Backend.COMMAND_COMPLETE)
    last = tag.rstrip(b"\0").rsplit(b" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _with_count(tag: bytes, count: int) -> bytes:
    """A CommandComplete body (`UPDATE 3`, `INSERT 0 3`) with another row count."""
    return tag.rstrip(b"\0").rsplit(b" ", 1)[0] + b" %d\0" % count
