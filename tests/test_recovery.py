"""In-doubt two-phase commits, left by hand on three real shards as a proxy that died would leave them,
and resolved by a running proxy from the first participant's (the decider's) state alone."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from shardproxy.config import load_config
from shardproxy.datapath.fanout.twophase import new_gid, signing_key
from tests.support import APP_DB

REGION = "recov"
SHORT = {"in_doubt_after": "1s", "two_phase_secret": "shared by the fleet"}


@pytest.fixture(scope="module")
def shards(sandbox):
    clusters = [sandbox.cluster(f"recov{i}", regions=[REGION]) for i in range(3)]
    for cluster in clusters:
        cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    return clusters


def start_proxy(sandbox, shards, name: str, routing: dict):
    # Health checked every second: a shard that comes back is seen soon.
    return sandbox.proxy(name, shards, routing=routing,
                         regions={REGION: {"primary": True, "health_check_interval": "1s"}})


@pytest.fixture(scope="module")
def proxy(sandbox, shards):
    proxy = start_proxy(sandbox, shards, "recovery", SHORT)
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        conn.execute("CREATE TABLE doubts (tag text)")  # DDL through the proxy: a two-phase commit
    return proxy


def prepare(cluster, gid: str, tag: str) -> None:
    """A transaction of the app user that inserts `tag`, prepared as `gid` and left there."""
    with psycopg.connect(cluster.primary.dsn(user="app", dbname=APP_DB), autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO doubts VALUES (%s)", (tag,))
        conn.execute(f"PREPARE TRANSACTION '{gid}'")


def begin_decider(proxy, cluster, tag: str) -> tuple[psycopg.Connection, str]:
    """The decider's part of a two-phase commit, left open: a transaction on `cluster` that inserts `tag`; and the
    gid a proxy would have given it, signed with the proxy's key."""
    conn = psycopg.connect(cluster.primary.dsn(user="app", dbname=APP_DB), autocommit=True)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO doubts VALUES (%s)", (tag,))
    (xid,) = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
    return conn, new_gid(cluster.name, xid, signing_key(load_config(proxy.config_path)))


def decide(proxy, cluster, tag: str, end: str) -> str:
    """The decider's part of a two-phase commit, ended by `end`: COMMIT (as a proxy does), ROLLBACK, or PREPARE
    (as proxies before it did, committing the decider first); its gid."""
    conn, gid = begin_decider(proxy, cluster, tag)
    with conn:
        conn.execute(f"PREPARE TRANSACTION '{gid}'" if end == "PREPARE" else end)
    return gid


def prepared(cluster) -> set[str]:
    return {gid for (gid,) in cluster.primary.sql("SELECT gid FROM pg_prepared_xacts")}


def holders(shards, gid: str) -> list[str]:
    return [cluster.name for cluster in shards if gid in prepared(cluster)]


def rows(shards, tag: str) -> list[int]:
    return [cluster.primary.sql(f"SELECT count(*) FROM doubts WHERE tag = '{tag}'", dbname=APP_DB)[0][0]
            for cluster in shards]


def wait_resolved(shards, gid: str, timeout: float = 8) -> None:
    deadline = time.monotonic() + timeout
    while holders(shards, gid):
        assert time.monotonic() < deadline, f"{gid} still prepared on {holders(shards, gid)}"
        time.sleep(0.1)


def test_ddl_through_the_proxy_leaves_nothing_prepared(proxy, shards):
    assert [prepared(cluster) for cluster in shards] == [set()] * 3
    assert rows(shards, "none") == [0, 0, 0]  # the table is on every shard


def test_first_participant_committed_so_the_others_commit(proxy, shards):
    gid = decide(proxy, shards[0], "a", "COMMIT")
    for cluster in shards[1:]:
        prepare(cluster, gid, "a")
    wait_resolved(shards, gid)
    assert rows(shards, "a") == [1, 1, 1]
    assert f"in-doubt transaction {gid} resolved: commit on" in proxy.log()


def test_first_participant_aborted_so_the_others_roll_back(proxy, shards):
    """Its PREPARE failed (or never came) while the others prepared: its xid is recorded as aborted."""
    gid = decide(proxy, shards[1], "f", "ROLLBACK")
    for cluster in (shards[0], shards[2]):
        prepare(cluster, gid, "f")
    wait_resolved(shards, gid)
    assert rows(shards, "f") == [0, 0, 0]
    assert f"in-doubt transaction {gid} resolved: rollback on" in proxy.log()


def test_first_participant_still_deciding_leaves_the_others_prepared(proxy, shards):
    """The decider's transaction is still open (its proxy is between the others' PREPARE and the decider's
    COMMIT): passes leave the others prepared, however old, and commit them once the decider has committed."""
    conn, gid = begin_decider(proxy, shards[0], "g")
    with conn:
        for cluster in shards[1:]:
            prepare(cluster, gid, "g")
        time.sleep(3)  # passes every second: the gid is old after the first
        assert holders(shards, gid) == [cluster.name for cluster in shards[1:]]
        conn.execute("COMMIT")
    wait_resolved(shards, gid)
    assert rows(shards, "g") == [1, 1, 1]
    assert f"in-doubt transaction {gid} resolved: commit on" in proxy.log()


def test_all_prepared_so_all_roll_back(proxy, shards):
    """The decider prepared too, as proxies did before the decider committed plainly: nobody committed."""
    gid = decide(proxy, shards[1], "b", "PREPARE")
    for cluster in (shards[0], shards[2]):
        prepare(cluster, gid, "b")
    wait_resolved(shards, gid)
    assert rows(shards, "b") == [0, 0, 0]
    assert f"in-doubt transaction {gid} resolved: rollback on" in proxy.log()


def test_first_participant_down_decides_nothing_until_it_is_back(proxy, shards):
    gid = decide(proxy, shards[2], "c", "PREPARE")
    for cluster in shards[:2]:
        prepare(cluster, gid, "c")
    decider = shards[2].primary
    decider.stop()
    try:
        time.sleep(3)  # passes every second: without the decider, a committing pass would have run
        assert holders(shards[:2], gid) == [shards[0].name, shards[1].name]
    finally:
        decider.start()
    wait_resolved(shards, gid)
    assert rows(shards, "c") == [0, 0, 0]


def test_young_transactions_are_left_to_their_commit(sandbox, proxy, shards):
    """A proxy that waits 5s: a pass that resolves an old gid leaves a younger one alone."""
    proxy.stop()
    patient = None
    try:
        old = decide(proxy, shards[0], "d-old", "PREPARE")
        for cluster in shards[1:]:
            prepare(cluster, old, "d-old")
        time.sleep(5.5)
        young = decide(proxy, shards[0], "d-young", "PREPARE")
        for cluster in shards[1:]:
            prepare(cluster, young, "d-young")
        prepared = time.monotonic()
        patient = start_proxy(sandbox, shards, "recovery-patient", {**SHORT, "in_doubt_after": "5s"})
        wait_resolved(shards, old)
        assert len(holders(shards, young)) == 3 or time.monotonic() - prepared > 5, "resolved while young"
        wait_resolved(shards, young)  # once it is old
    finally:
        if patient is not None:
            patient.stop()
        proxy.start()


def test_other_gids_are_never_touched(proxy, shards):
    """Gids not signed with the fleet's key, forged ones included (pg_prepared_xacts is readable by every user,
    so anyone may copy a real gid's form, or sign with another key): a pass never finishes them."""
    ours = decide(proxy, shards[0], "e", "COMMIT")
    decider, xid, _ = ours[len("shardproxy:"):].rsplit(":", 2)
    foreign = [f"other:{shards[0].name}:{uuid.uuid4().hex}", f"shardproxy_{uuid.uuid4().hex}",
               f"shardproxy:{decider}:{xid}:{'0' * 16}", new_gid(decider, int(xid), b"another fleet's key")]
    for cluster in shards[1:]:
        for gid in [*foreign, ours]:
            prepare(cluster, gid, "e")
    wait_resolved(shards, ours)
    time.sleep(1.5)  # another pass
    try:
        assert all(holders(shards, gid) == [c.name for c in shards[1:]] for gid in foreign)
        assert rows(shards, "e") == [1, 1, 1]
    finally:
        for cluster in shards[1:]:
            for gid in foreign:
                cluster.primary.sql(f"ROLLBACK PREPARED '{gid}'", dbname=APP_DB)
