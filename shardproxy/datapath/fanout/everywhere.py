"""Writes and DDL on every shard's primary, all-or-nothing.

Each leg runs the batch inside a transaction, then all commit in two phases (twophase.py). Servers without
prepared transactions (max_prepared_transactions = 0) get a plain COMMIT on each shard, after every shard has
succeeded. Statements that PostgreSQL refuses inside a transaction block (CREATE INDEX CONCURRENTLY, VACUUM, ...)
cannot be all-or-nothing: each shard runs them on its own, and a failure names the shards they took effect on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardproxy.datapath.fanout.legs import (
    Leg,
    Message,
    error_fields,
    first_error,
    join_messages,
    run_legs,
    with_status,
)
from shardproxy.datapath.fanout.twophase import commit
from shardproxy.datapath.session import ClientSession
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend

if TYPE_CHECKING:
    from shardproxy.datapath.pool import Pool

ACTIVE_SQL_TRANSACTION = "25001"  # "... cannot run inside a transaction block"


class NotTransactional(Exception):
    """The batch cannot run inside a transaction block (SQLSTATE 25001): nothing of it ran."""


async def run_everywhere(client: ClientSession, pools: list[Pool], batch: bytes, status: int, kind: str) -> bytes:
    """Run a write batch on every shard's primary, all-or-nothing; the client's response."""
    legs = [Leg(client, pool, kind) for pool in pools]
    try:
        begin = pg.query("BEGIN")
        setting = pg.query("SHOW max_prepared_transactions")
        responses = [_middle(r) for r in await run_legs(legs, [begin + batch + setting] * len(legs))]
        failed = first_error([answers for answers, _ in responses])
        if failed is not None:
            await run_legs(legs, [pg.query("ROLLBACK")] * len(legs))
            if status == pg.IDLE and error_fields(failed).get("C") == ACTIVE_SQL_TRANSACTION:
                raise NotTransactional  # VACUUM and the like: run without a transaction, once the legs are back
            return join_messages(with_status(failed, status))
        await commit(legs, two_phase=all(setting != "0" for _, setting in responses))
        return join_messages(with_status(responses[0][0], status))
    finally:
        for leg in legs:
            leg.release()


async def run_alone_everywhere(client: ClientSession, pools: list[Pool], batch: bytes, status: int,
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
    names = [pool.node.shard for pool in pools]
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


def _middle(messages: list[Message]) -> tuple[list[Message], str]:
    """Split `BEGIN; <batch>; SHOW max_prepared_transactions` responses: the batch's, and the setting."""
    ready = [i for i, (t, _) in enumerate(messages) if t == Backend.READY_FOR_QUERY]
    setting = messages[ready[-2] + 1 : ready[-1]]
    return messages[ready[0] + 1 : ready[-2] + 1], (_data_value(setting[1]) if len(setting) > 1 else "")


def _data_value(message: Message) -> str:
    """The first column of a one-column DataRow, as text."""
    t, body = message
    if t != Backend.DATA_ROW:
        return ""
    (length,) = pg.INT32.unpack_from(body, 2)
    return body[6 : 6 + length].decode()
