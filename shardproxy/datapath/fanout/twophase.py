"""Committing a transaction whose legs span shards: plainly when at most one leg wrote, else in two phases,
recoverable without a log.

What a leg's transaction wrote is known when PostgreSQL assigned it an xid: the proxy learns it as the client
moves off a leg (Transaction.park), or asks here, in the commit's first round. Legs that only read commit plainly.
With two or more writers, a writer whose xid is known is the decider: every other writer prepares (PREPARE
TRANSACTION, in parallel; a leg not known to have written is asked and prepared in the same round) under one
name, the gid, which names the decider's shard and the decider's own xid, signed with a key the proxies share.
Then the decider commits plainly: its COMMIT is the decision. Then the others commit their prepared
transactions, and the client is answered once they have, so that its next statement sees its writes on every
shard. A commit left in doubt by a proxy that died is resolved from the decider alone (recovery.py):
PostgreSQL's record of the decider's xid (pg_xact_status) says whether it committed (commit everywhere), aborted
(its COMMIT failed, or never came before its connection closed: roll back everywhere), or is still in progress
(its proxy is still deciding: leave it). Proxies before this one prepared on the decider too and committed it
first: a gid still prepared there means nobody committed (roll back everywhere). A gid whose signature does not
check out was not made by a proxy of this fleet, and is never touched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from shardproxy.cluster.topology import parse_lsn
from shardproxy.config import Config
from shardproxy.datapath._core import row_values
from shardproxy.datapath.fanout.legs import Leg, Message, exchange
from shardproxy.datapath.params import literal
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend

if TYPE_CHECKING:
    from shardproxy.datapath.server import ServerConnection

log = logging.getLogger("shardproxy.fanout")

GID_PREFIX = "shardproxy:"
_MAC_LENGTH = 16  # hex digits: with a 150-byte shard name and a 20-digit xid, a gid stays under PostgreSQL's 200
_WROTE = "pg_current_xact_id_if_assigned()"
_WROTE_AND_SETTING = _WROTE + ", current_setting('max_prepared_transactions')"
# In the xids commit is given, a leg whose xid is not known: it ran a statement that writes, so it is asked in
# the round that prepares it; or not, so it is asked first (a leg that only read must not be prepared unasked: a
# NOTIFY, say, cannot be prepared, and a failed PREPARE would lose it).
WRITING = -2
UNKNOWN = -1
_ROLLBACK = pg.query("ROLLBACK")
_COMMIT_LSN = pg.query("SELECT pg_current_wal_insert_lsn()")


def signing_key(config: Config) -> bytes:
    """The key gids are signed with: routing.two_phase_secret, else one derived from the users and passwords the
    config gives (which the proxies of a fleet share)."""
    secret = config.routing.two_phase_secret
    if secret is None:
        secret = "\0".join(f"{user.name}\0{user.password or ''}" for user in sorted(config.users, key=lambda u: u.name))
    return hashlib.sha256(b"shardproxy two-phase commit\0" + secret.encode()).digest()


def new_gid(decider: str, xid: int, key: bytes) -> str:
    """A two-phase commit's name: its decider's shard and xid, signed (see read_gid)."""
    return f"{GID_PREFIX}{decider}:{xid}:{_mac(key, decider, xid)}"


def read_gid(gid: str, key: bytes) -> tuple[str, int] | None:
    """The decider's shard and xid of a gid a proxy of this fleet made; None for any other gid."""
    if not gid.startswith(GID_PREFIX):
        return None
    parts = gid[len(GID_PREFIX):].rsplit(":", 2)  # a shard name may hold colons: the last two fields are ours
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    decider, xid, mac = parts[0], int(parts[1]), parts[2]
    return (decider, xid) if hmac.compare_digest(mac, _mac(key, decider, xid)) else None


def _mac(key: bytes, decider: str, xid: int) -> str:
    mac = _keyed(key).copy()
    mac.update(f"{decider}:{xid}".encode())
    return mac.hexdigest()[:_MAC_LENGTH]


@lru_cache(maxsize=4)
def _keyed(key: bytes) -> hmac.HMAC:
    """An HMAC with the key in, copied for each gid: keying it anew costs more than the gid's own bytes."""
    return hmac.new(key, digestmod=hashlib.sha256)


@dataclass
class Outcome:
    """How a commit went: the error to send the client (None: committed), and whether it took two phases."""

    error: pg.PostgresError | None
    two_phase: bool = False


def _ending(leg: Leg, statement: str) -> bytes:
    """The statement that ends a leg's transaction; a leg that follows its commit (read-your-writes) asks in the
    same write where the commit ends in the WAL (COMMIT PREPARED cannot share a Query with another)."""
    return pg.query(statement) + _COMMIT_LSN if leg.follow else pg.query(statement)


async def _end(legs: list[Leg], statements: list[str]) -> list[list[Message]]:
    """End each leg's transaction with its statement; a leg that follows its commit learns where it ends."""
    answers = await exchange(legs, [_ending(leg, statement) for leg, statement in zip(legs, statements)])
    _committed_at(legs, answers)
    return answers


def _committed_at(legs: list[Leg], answers: list[list[Message]]) -> None:
    for leg, messages in zip(legs, answers):
        if leg.follow:
            row = next((body for t, body in messages if t == Backend.DATA_ROW), None)
            if row is not None and (lsn := row_values(row)[0]) is not None:
                leg.committed_at = parse_lsn(lsn)


async def commit(legs: list[Leg], key: bytes, xids: list[int | None] | None = None) -> Outcome:
    """Commit the transaction open on every leg (one per shard, in the shards' order). xids: what each leg's
    transaction is known to have written: its xid, None if nothing, else WRITING or UNKNOWN (all, if not given).
    A leg that follows its commit (Leg.follow) learns where it ends in its WAL. Every leg's transaction is over
    afterwards: committed, rolled back, or, if the decider's connection was lost during its COMMIT, prepared until
    in-doubt recovery finishes it."""
    xids = list(xids) if xids is not None else [UNKNOWN] * len(legs)
    unknown = [i for i, xid in enumerate(xids) if xid is not None and xid < 0]
    writers = [i for i, xid in enumerate(xids) if xid is not None and xid >= 0]
    if len(writers) + len(unknown) <= 1:  # at most one leg can have written: plain commits
        return await _plain(legs, writers + unknown)
    if not writers or any(xids[i] == UNKNOWN or not _prepared_transactions(legs[i]) for i in unknown):  # ask first
        answers = await exchange([legs[i] for i in unknown], [ask_wrote(legs[i]) for i in unknown])
        for i, messages in zip(unknown, answers):
            failed = error_of(messages)
            if failed is not None:  # aborted already: roll back, and the client learns why
                await exchange(legs, [_ROLLBACK] * len(legs))
                return Outcome(failed)
            xids[i] = _xid(legs[i], messages)
        return await commit(legs, key, xids)
    if not all(_prepared_transactions(legs[i]) for i in writers):  # a server takes no prepared transactions
        return await _plain(legs, writers + unknown)
    decider = writers[0]
    xid = xids[decider]
    assert xid is not None
    gid = literal(new_gid(_shard(legs[decider]), xid, key))
    return await _two_phases(legs[decider], [legs[i] for i in writers[1:]], [legs[i] for i in unknown],
                             [leg for leg, xid in zip(legs, xids) if xid is None], gid)


async def _plain(legs: list[Leg], writers: list[int]) -> Outcome:
    """A plain COMMIT on every leg; the client gets a writer's error, if any."""
    errors = [error_of(messages) for messages in await _end(legs, ["COMMIT"] * len(legs))]
    return Outcome(next((errors[i] for i in writers if errors[i] is not None), None))


async def _two_phases(decider: Leg, others: list[Leg], unsure: list[Leg], readers: list[Leg], gid: str) -> Outcome:
    """The others prepare, and so do the unsure (not known to have written: asked in the same round); the readers
    commit (what they read is over, whatever the writers decide). The decider's COMMIT decides; the others finish
    as it decided. An unsure leg that wrote nothing after all (an UPDATE of no row) finishes with the decider."""
    prepare = f"PREPARE TRANSACTION {gid}"
    answers = await exchange(others + unsure + readers, [pg.query(prepare)] * len(others)  # (one Query: one flush)
                             + [pg.query(f"SELECT {wrote_columns(leg.connection)}; {prepare}") for leg in unsure]
                             + [_ending(leg, "COMMIT") for leg in readers])
    _committed_at(readers, answers[len(others) + len(unsure):])
    preparing = others + unsure
    refusals = [error_of(messages) for messages in answers[: len(preparing)]]
    refused = next((error for error in refusals if error is not None), None)
    prepared = [leg for leg, error in zip(preparing, refusals) if error is None]
    if refused is not None:  # the decider's rollback decides, should an undo of a PREPARE not arrive
        await exchange([decider, *prepared], [_ROLLBACK] + [pg.query(f"ROLLBACK PREPARED {gid}")] * len(prepared))
        return Outcome(refused, two_phase=True)
    wrote = [_xid(leg, messages) is not None for leg, messages in zip(unsure, answers[len(others):])]
    idle = [leg for leg, written in zip(unsure, wrote) if not written]
    writers = others + [leg for leg, written in zip(unsure, wrote) if written]
    decided = error_of((await _end([decider, *idle], ["COMMIT"] + [f"COMMIT PREPARED {gid}"] * len(idle)))[0])
    if decided is not None and decider.error is not None:  # lost: its COMMIT may have run, or not
        log.warning("connection to %s lost during the COMMIT that decides %s: in-doubt recovery finishes it",
                    _shard(decider), gid)
        return Outcome(pg.PostgresError(pg.TRANSACTION_RESOLUTION_UNKNOWN, "shardproxy: the connection to the deciding "
                                        f"shard ({_shard(decider)}) was lost during COMMIT; in-doubt recovery "
                                        "commits or rolls back every shard as that shard decided"), two_phase=True)
    if not writers:  # only the decider wrote
        return Outcome(decided)
    ending = "COMMIT" if decided is None else "ROLLBACK"  # a COMMIT that fails (a deferred constraint) rolls back
    finished = await _end(writers, [f"{ending} PREPARED {gid}"] * len(writers))
    unfinished = [_shard(leg) for leg, messages in zip(writers, finished) if error_of(messages) is not None]
    if unfinished:
        log.warning("%s PREPARED %s failed on %s: in-doubt recovery finishes it as the deciding shard did", ending,
                    gid, ", ".join(unfinished))
    return Outcome(decided, two_phase=True)


def _shard(leg: Leg) -> str:
    return leg.pool.node.shard


def ask_wrote(leg: Leg) -> bytes:
    """The Query that asks whether the leg's transaction wrote (told_xid reads its answer)."""
    return pg.query(f"SELECT {wrote_columns(leg.connection)}")


def told_xid(leg: Leg, messages: list[Message]) -> int | None:
    """From the answers to ask_wrote: the leg's xid, None if it wrote nothing, UNKNOWN if the query failed."""
    return UNKNOWN if error_of(messages) is not None else _xid(leg, messages)


def wrote_columns(server: ServerConnection | None) -> str:
    """What a SELECT lists to learn whether the transaction on a server connection wrote (read_xid reads it); the
    first time on a connection, also whether its server takes prepared transactions (a setting that changes only
    with a restart, which ends the connection)."""
    return _WROTE if server is not None and server.prepared_transactions is not None else _WROTE_AND_SETTING


def _prepared_transactions(leg: Leg) -> int | None:
    """The leg's server's max_prepared_transactions, once asked on its connection."""
    server = leg.connection
    return None if server is None else server.prepared_transactions


def _xid(leg: Leg, messages: list[Message]) -> int | None:
    """From the answer to ask_wrote: the transaction's xid (None if it wrote nothing)."""
    for t, body in messages:
        if t == Backend.DATA_ROW:
            return read_xid(leg.server, row_values(body))
    raise pg.PostgresError(pg.PROTOCOL_VIOLATION, "shardproxy: a shard sent no row for its transaction's xid")


def read_xid(server: ServerConnection, values: list[str | None]) -> int | None:
    """From the values wrote_columns listed: the transaction's xid (None if it wrote nothing). A setting asked for
    is kept on the server connection."""
    xid, *setting = values
    if setting:
        server.prepared_transactions = int(setting[0] or 0)
    return None if xid is None else int(xid)


def error_of(messages: list[Message]) -> pg.PostgresError | None:
    """The ErrorResponse among a leg's answers, as the client gets it (the server's SQLSTATE and fields)."""
    for t, body in messages:
        if t == Backend.ERROR_RESPONSE:
            return pg.PostgresError.from_body(body)
    return None
