"""Writes and DDL on every shard's primary, all-or-nothing.

Each leg runs the batch inside a transaction, then all commit in two phases (twophase.py), or plainly if only
one wrote. Servers without prepared transactions (max_prepared_transactions = 0) get a plain COMMIT on each shard,
after every shard has succeeded. Statements that PostgreSQL refuses inside a transaction block (CREATE INDEX
CONCURRENTLY, VACUUM, ...) cannot be all-or-nothing: each shard runs them on its own, and a failure names the
shards they took effect on.
"""

from __future__ import annotations

from collections.abc import Callable

from shardproxy.datapath.fanout.legs import (
    Leg,
    Message,
    error_fields,
    first_error,
    join_messages,
    run_legs,
    with_status,
)
from shardproxy.datapath.fanout.twophase import ask_wrote, commit, told_xid
from shardproxy.datapath.session import ClientSession
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend

ACTIVE_SQL_TRANSACTION = "25001"  # "... cannot run inside a transaction block"
_BEGIN = pg.query("BEGIN")
# From every leg's answers (or a failed leg's alone), the client's: the first leg's stand for all (DDL, a
# reference table's write), or they are combined (a write of each shard's own rows, combine.py).
Answer = Callable[[list[list[Message]]], list[Message]]


def first_stands(responses: list[list[Message]]) -> list[Message]:
    return responses[0]


class NotTransactional(Exception):
    """The batch cannot run inside a transaction block (SQLSTATE 25001): nothing of it ran."""


async def run_everywhere(client: ClientSession, legs: list[Leg], batches: list[bytes],
                         answer: Answer = first_stands) -> tuple[bytes, bool]:
    """Outside a transaction: run a write batch on each leg (on its shard's primary), all-or-nothing. The
    client's response, and whether it took a two-phase commit."""
    # Each leg also tells whether it wrote (after the batch, in the same write), so that the commit needs no round
    # to ask.
    answers = await run_legs(legs, [_BEGIN + batch + ask_wrote(leg) for leg, batch in zip(legs, batches)])
    responses, told = zip(*(_before_last(_after_begin(messages)) for messages in answers))
    failed = first_error(list(responses))
    if failed is not None:
        await run_legs(legs, [pg.query("ROLLBACK")] * len(legs))
        if error_fields(failed).get("C") == ACTIVE_SQL_TRANSACTION:
            raise NotTransactional  # VACUUM and the like: run without a transaction, on the same legs
        return join_messages(with_status(answer([failed]), pg.IDLE)), False
    outcome = await commit(legs, client.core.two_phase_key, [told_xid(leg, t) for leg, t in zip(legs, told)])
    if outcome.error is not None:
        return outcome.error.to_message() + pg.READY[pg.IDLE], outcome.two_phase
    return join_messages(with_status(answer(list(responses)), pg.IDLE)), outcome.two_phase


async def run_in_transaction(legs: list[Leg], batches: list[bytes], answer: Answer = first_stands) -> bytes:
    """Inside a transaction: run a batch on each of its legs. The first error aborts the transaction (the leg
    that raised it says so from then on)."""
    responses = await run_legs(legs, batches)
    failed = first_error(responses)
    return join_messages(answer([failed] if failed is not None else responses))


async def run_alone_everywhere(client: ClientSession, legs: list[Leg], batch: bytes, status: int) -> bytes:
    """Run a batch that cannot be inside a transaction block on every shard's primary at once, each on its
    own. Nothing can be undone afterwards, so if some shards fail, the client's error says which shards
    have it done (and PostgreSQL's SQLSTATE and detail of the first failure)."""
    if status != pg.IDLE:  # as PostgreSQL answers it inside a transaction block
        raise pg.PostgresError(ACTIVE_SQL_TRANSACTION, "shardproxy: this statement cannot run inside a "
                               "transaction block (it runs on every shard without one)")
    responses = await run_legs(legs, [batch] * len(legs))
    names = [leg.pool.node.shard for leg in legs]
    failed = [i for i, answers in enumerate(responses) if first_error([answers]) is not None]
    if not failed:
        return join_messages(with_status(responses[0], status))
    fields = error_fields(responses[failed[0]])
    done = [name for i, name in enumerate(names) if i not in failed]
    outcome = (f"it took effect on {_shards(done)}, where it stays (it cannot run inside a transaction, "
               "so it is not all-or-nothing)" if done else "it took effect on no shard")
    fields["M"] = f"shardproxy: failed on {_shards([names[i] for i in failed])}: {fields.get('M', '')}; {outcome}"
    error = pg.PostgresError(fields.get("C", pg.INTERNAL_ERROR), fields["M"], fields=fields).to_message()
    answers = [(t, error[5:] if t == Backend.ERROR_RESPONSE else body) for t, body in responses[failed[0]]]
    return join_messages(with_status(answers, status))


def _shards(names: list[str]) -> str:
    return f"shard{'s' if len(names) > 1 else ''} {', '.join(names)}"


def _before_last(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """Answers to `<batch>; <query>`: the batch's, and the query's."""
    end = max(i for i, (t, _) in enumerate(messages[:-1]) if t == Backend.READY_FOR_QUERY) + 1
    return messages[:end], messages[end:]


def _after_begin(messages: list[Message]) -> list[Message]:
    """The answers to `BEGIN; <batch>` without the BEGIN's."""
    first_ready = next(i for i, (t, _) in enumerate(messages) if t == Backend.READY_FOR_QUERY)
    return messages[first_ready + 1 :]
