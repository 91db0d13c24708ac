"""Committing a transaction whose legs span shards: plainly when at most one leg wrote, else in two phases,
recoverable without a log.

Before the commit every leg tells whether it wrote (whether PostgreSQL assigned its transaction an xid). Legs that
only read commit plainly. With two or more writers, every writer prepares (PREPARE TRANSACTION, in parallel) under
one name, the gid, which names the first writer (the decider) and the decider's own xid, signed with a key the
proxies share. The decider commits first; the client is answered once the others have committed too. A commit left
in doubt by a proxy that died is resolved from the decider alone (recovery.py): prepared there means nobody
committed; gone there, PostgreSQL's record of the decider's xid (pg_xact_status) says whether it committed or
aborted, so a PREPARE that failed on the decider while others prepared is rolled back everywhere. A gid whose
signature does not check out was not made by a proxy of this fleet, and is never touched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from shardproxy.config import Config
from shardproxy.datapath.fanout.legs import Leg, Message, error_fields, exchange, first_error
from shardproxy.datapath.params import literal
from shardproxy.wire import protocol as pg
from shardproxy.wire.protocol import Backend

log = logging.getLogger("shardproxy.fanout")

GID_PREFIX = "shardproxy:"
_MAC_LENGTH = 16  # hex digits: with a 150-byte shard name and a 20-digit xid, a gid stays under PostgreSQL's 200
_ASK = pg.query("SELECT pg_current_xact_id_if_assigned(), current_setting('max_prepared_transactions')")
_COMMIT = pg.query("COMMIT")


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
    return hmac.new(key, f"{decider}:{xid}".encode(), hashlib.sha256).hexdigest()[:_MAC_LENGTH]


@dataclass
class Outcome:
    """How a commit went: the error to send the client (None: committed), and whether it took two phases."""

    error: pg.PostgresError | None
    two_phase: bool = False


async def commit(legs: list[Leg], shards: list[str], key: bytes) -> Outcome:
    """Commit the transaction open on every leg (legs[i] on shard shards[i], in the shards' order). Every leg's
    transaction is over afterwards, committed or rolled back."""
    answers = await exchange(legs, [_ASK] * len(legs))
    asked = [_answer(messages) for messages in answers]
    failed = next((error for error, *_ in asked if error is not None), None)
    if failed is not None:  # aborted already: roll back, and the client learns why
        await exchange(legs, [pg.query("ROLLBACK")] * len(legs))
        return Outcome(failed)
    writers = [i for i, (_, xid, _) in enumerate(asked) if xid is not None]
    if len(writers) <= 1 or any(asked[i][2] == 0 for i in writers):  # (no prepared transactions: plain commits)
        committed = await exchange(legs, [_COMMIT] * len(legs))
        errors = [error_of(messages) for messages in committed]
        return Outcome(next((errors[i] for i in writers if errors[i] is not None), None))
    readers = [i for i in range(len(legs)) if i not in writers]
    decider = writers[0]
    xid = asked[decider][1]
    assert xid is not None
    gid = literal(new_gid(shards[decider], xid, key))
    statements = {i: pg.query(f"PREPARE TRANSACTION {gid}") for i in writers} | {i: _COMMIT for i in readers}
    prepared = await exchange([legs[i] for i in statements], list(statements.values()))
    refusals = {i: error_of(messages) for i, messages in zip(statements, prepared) if i in writers}
    refused = next((error for error in refusals.values() if error is not None), None)
    if refused is not None:
        undo = [i for i, error in refusals.items() if error is None]
        await exchange([legs[i] for i in undo], [pg.query(f"ROLLBACK PREPARED {gid}")] * len(undo))
        return Outcome(refused, two_phase=True)
    done = await exchange([legs[decider]], [pg.query(f"COMMIT PREPARED {gid}")])
    if first_error(done) is not None:
        return Outcome(pg.PostgresError(pg.INTERNAL_ERROR, "shardproxy: COMMIT PREPARED failed on the first shard; "
                                        "in-doubt recovery commits or rolls back every shard as that shard "
                                        "decided"), two_phase=True)
    # Decided: committed on the decider. A shard that fails now gets the commit from in-doubt recovery.
    others = [i for i in writers if i != decider]
    results = await exchange([legs[i] for i in others], [pg.query(f"COMMIT PREPARED {gid}")] * len(others))
    unfinished = [shards[i] for i, result in zip(others, results) if first_error([result]) is not None]
    if unfinished:
        log.warning("COMMIT PREPARED %s failed on %s: committed on the first shard, in-doubt recovery finishes it",
                    gid, ", ".join(unfinished))
    return Outcome(None, two_phase=True)


def error_of(messages: list[Message]) -> pg.PostgresError | None:
    """The ErrorResponse among a leg's answers, as the client gets it (the server's SQLSTATE and fields)."""
    if first_error([messages]) is None:
        return None
    fields = error_fields(messages)
    return pg.PostgresError(fields.get("C", pg.INTERNAL_ERROR), fields.get("M", ""), fields.get("S", "ERROR"), fields)


def _answer(messages: list[Message]) -> tuple[pg.PostgresError | None, int | None, int]:
    """The answer to _ASK: the error if the transaction is aborted, else its xid (None if it wrote nothing) and
    the server's max_prepared_transactions."""
    error = error_of(messages)
    if error is not None:
        return error, None, 0
    row = next(body for t, body in messages if t == Backend.DATA_ROW)
    xid, setting = _columns(row)
    return None, (None if xid is None else int(xid)), int(setting or 0)


def _columns(row: bytes) -> list[str | None]:
    """The values of a DataRow in the text format."""
    (count,) = pg.INT16.unpack_from(row, 0)
    values: list[str | None] = []
    pos = 2
    for _ in range(count):
        (length,) = pg.INT32.unpack_from(row, pos)
        pos += 4
        if length == 0xFFFFFFFF:
            values.append(None)
            continue
        values.append(row[pos : pos + length].decode())
        pos += length
    return values
