"""Two-phase commit across the legs of a statement: recoverable without a log.

Every leg prepares (PREPARE TRANSACTION) and all commit, or all roll back. The first leg (the decider) prepares
before the others, commits before them and rolls back after them, and the transaction's name (gid) names the
decider's shard, so that a commit left in doubt by a proxy that died can be resolved from the decider's state
alone (recovery.py): prepared there means nobody committed; gone there means it committed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from shardproxy.datapath.fanout.legs import Leg, first_error, run_legs
from shardproxy.datapath.params import literal
from shardproxy.wire import protocol as pg

log = logging.getLogger("shardproxy.fanout")

GID_PREFIX = "shardproxy:"
PREPARE_FAILED = "shardproxy: PREPARE TRANSACTION failed on a shard; rolled back"


def new_gid(decider: str) -> str:
    """A two-phase commit's name: it names its first participant, whose state decides it (see recovery.py)."""
    return f"{GID_PREFIX}{decider}:{uuid.uuid4().hex}"


def decider_of(gid: str) -> str:
    return gid.removeprefix(GID_PREFIX).rpartition(":")[0]


async def commit(legs: list[Leg], two_phase: bool) -> None:
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
        await roll_back(decider, [leg for leg, answers in zip(others, prepared) if first_error([answers]) is None],
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


async def roll_back(decider: Leg, prepared: list[Leg], gid: str) -> None:
    """The decider last, and only once every other leg has rolled back: while it holds the transaction
    prepared, recovery (shardproxy.recovery) rolls back whatever is left."""
    undone = await run_legs(prepared, [pg.query(f"ROLLBACK PREPARED {gid}")] * len(prepared))
    if first_error(undone) is None:
        await decider.run(pg.query(f"ROLLBACK PREPARED {gid}"))
