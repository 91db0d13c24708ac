"""Regions end to end: which node serves a read or a write, through proxies placed in different regions.

Every shard is a primary in us-east-1 with streaming replicas in eu-central-1 and ap-southeast-1. The node
that served a statement is read from the statement itself (`pg_is_in_recovery(), inet_server_port()`), so
nothing is taken from the proxy's word. The routing tests share one two-shard topology and four proxies
(us-east-1 has no replica: reads stay on its primary; eu-central-1 has its own; one with a generous lag bound for
read-your-writes; one with strong consistency). Failover, split brain and a failed primary that rejoins wreck
their clusters, so they get their own and run last.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest

from shardproxy.devtools.sandbox import REWINDABLE, Cluster, Node, ProxyProcess, Sandbox, wait_until
from tests.support import APP_DB
from tests.support.admin import admin, nodes_seen
from tests.support.regions import REGIONS, Loop, regions
from tests.support.ring import owner

US, EU, AP = 0, 1, 2  # a cluster's nodes: the primary, then one replica per other region
POOL = {"size": 4, "query_wait_timeout": "10s"}
READ = "SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM t WHERE user_id = {key}"


def key_on(cluster: Cluster, clusters: Sequence[Cluster], start: int = 1) -> int:
    names = [c.name for c in clusters]
    return next(k for k in range(start, start + 10_000) if owner(k, names) == cluster.name)


# -- helpers ---------------------------------------------------------------------------------------------
def connect(proxy: ProxyProcess) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True, connect_timeout=10)


def node_names(*clusters: Cluster) -> dict[int, str]:
    return {node.port: node.name for cluster in clusters for node in cluster.nodes}


def served(conn: psycopg.Connection, sql: str, names: dict[int, str], promoted: bool = False) -> str:
    """The node that ran `sql` (whose first two columns are pg_is_in_recovery(), inet_server_port()).

    Until a replica is promoted, the node's own answer must agree with its name.
    """
    in_recovery, port, *_ = conn.execute(sql).fetchone()
    name = names[port]
    assert promoted or in_recovery == ("replica" in name), (name, in_recovery)
    return name


def read_node(proxy: ProxyProcess, key: int, names: dict[int, str]) -> str:
    with connect(proxy) as conn:
        return served(conn, READ.format(key=key), names)


def outcome(function: Callable[..., Any], *args: Any) -> Any:
    """What the call returns, or the error it raises, as text: for calls made on another thread."""
    try:
        return function(*args)
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {exc}"


def direct(node: Node, sql: str) -> list[tuple]:
    return node.sql(sql, dbname=APP_DB)


def statement(sql: Callable[[int], str]) -> Callable[[psycopg.Connection, int], tuple]:
    """Work that runs one statement, in autocommit: acknowledged once it returns."""
    return lambda conn, i: conn.execute(sql(i)).fetchone()


def in_transaction(sql: Callable[[int], str]) -> Callable[[psycopg.Connection, int], tuple]:
    """Work that runs one statement between BEGIN and COMMIT: acknowledged once COMMIT returns."""
    def work(conn: psycopg.Connection, i: int) -> tuple:
        with conn.transaction():
            return conn.execute(sql(i)).fetchone()
    return work


# -- the shared two-shard topology -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(sandbox: Sandbox) -> list[Cluster]:
    clusters = [sandbox.cluster(f"rg{i}", replicas=2, regions=REGIONS) for i in range(2)]
    for cluster in clusters:
        cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    return clusters


def _proxy(sandbox: Sandbox, name: str, clusters: list[Cluster], region: str, **routing: Any) -> ProxyProcess:
    return sandbox.proxy(name, clusters, region=region, regions=regions("300ms"), pool=POOL,
                         routing={"strong_tables": ["audit_log"], **routing})


@pytest.fixture(scope="module")
def proxies(sandbox: Sandbox, shards: list[Cluster]) -> dict[str, ProxyProcess]:
    found = {
        "us": _proxy(sandbox, "rg-us", shards, "us-east-1", max_replica_lag="1s"),
        "eu": _proxy(sandbox, "rg-eu", shards, "eu-central-1", max_replica_lag="1s"),
        # Lag never excludes a replica here: only read-your-writes keeps a client off a stale one.
        "ryw": _proxy(sandbox, "rg-ryw", shards, "eu-central-1", max_replica_lag="1h"),
        "strong": _proxy(sandbox, "rg-strong", shards, "eu-central-1", consistency="strong"),
    }
    with connect(found["eu"]) as conn:  # DDL runs on every shard's primary
        conn.execute("CREATE TABLE t (user_id bigint NOT NULL, v text)")
        conn.execute("CREATE TABLE audit_log (user_id bigint NOT NULL, note text)")
    for cluster in shards:
        cluster.wait_replicas_caught_up()
    return found


@pytest.fixture(scope="module")
def keys(shards: list[Cluster]) -> list[int]:
    """One user_id per shard."""
    return [key_on(cluster, shards) for cluster in shards]


@pytest.fixture(scope="module")
def names(shards: list[Cluster]) -> dict[int, str]:
    return node_names(*shards)


def test_reads_on_the_own_region_replica_writes_on_the_primary(proxies, shards, keys, names) -> None:
    eu = proxies["eu"]
    with connect(eu) as conn:
        for cluster, key in zip(shards, keys):
            replica, primary = cluster.nodes[EU].name, cluster.primary.name
            for _ in range(3):
                assert served(conn, READ.format(key=key), names) == replica
            assert served(conn, f"/* shard_key: {key} */ SELECT pg_is_in_recovery(), inet_server_port()",
                          names) == replica
            write = f"INSERT INTO t (user_id, v) VALUES ({key}, 'w') RETURNING pg_is_in_recovery(), inet_server_port()"
            assert served(conn, write, names) == primary
            locking = f"SELECT pg_is_in_recovery(), inet_server_port() FROM t WHERE user_id = {key} FOR UPDATE"
            assert served(conn, locking, names) == primary
            with conn.transaction():  # a read-write transaction runs on the primary, reads included
                assert served(conn, READ.format(key=key), names) == primary
    with connect(eu) as conn:  # a client that wrote nothing: read-your-writes does not hold it back
        conn.execute("BEGIN READ ONLY")
        assert served(conn, READ.format(key=keys[1]), names) == shards[1].nodes[EU].name
        conn.execute("COMMIT")


def test_next_transaction_on_another_shard_right_after_a_commit(proxies, shards, keys, names) -> None:
    """After a write commits, the proxy asks that primary for the commit's WAL position (read-your-writes);
    a statement for another shard arriving meanwhile starts the next transaction there, it is not refused."""
    with connect(proxies["eu"]) as conn:
        for i in range(30):
            with conn.transaction():
                conn.execute(f"INSERT INTO t (user_id, v) VALUES ({keys[0]}, 'next{i}')")
            assert conn.execute(f"{READ.format(key=keys[1])} AND v = 'next{i - 1}'").fetchone()[2] == min(i, 1)
            conn.execute(f"INSERT INTO t (user_id, v) VALUES ({keys[1]}, 'next{i}')")  # autocommit, likewise
            assert conn.execute(f"{READ.format(key=keys[0])} AND v = 'next{i}'").fetchone()[2] == 1


def test_reads_stay_in_the_region_on_its_primary_without_a_replica_there(proxies, shards, keys, names) -> None:
    us = proxies["us"]  # us-east-1 holds only primaries: they serve its reads, not another region's replicas
    with connect(us) as conn:
        for cluster, key in zip(shards, keys):
            assert served(conn, READ.format(key=key), names) == cluster.primary.name
            write = f"INSERT INTO t (user_id, v) VALUES ({key}, 'us') RETURNING pg_is_in_recovery(), inet_server_port()"
            assert served(conn, write, names) == cluster.primary.name
    # With no node of its own region to serve, other regions by priority: eu-central-1 (2) before ap-southeast-1.
    banned = shards[0].primary
    assert admin(us, f"BAN {banned.host}:{banned.port}")["ok"]
    try:
        assert read_node(us, keys[0], names) == shards[0].nodes[EU].name
        assert read_node(us, keys[1], names) == shards[1].primary.name
    finally:
        assert admin(us, f"UNBAN {banned.host}:{banned.port}")["ok"]
    assert read_node(us, keys[0], names) == shards[0].primary.name


def test_strong_tables_and_target_comment_read_on_the_primary(proxies, shards, keys, names) -> None:
    with connect(proxies["eu"]) as conn:
        for cluster, key in zip(shards, keys):
            strong = f"SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM audit_log WHERE user_id = {key}"
            assert served(conn, strong, names) == cluster.primary.name
            assert served(conn, "/* target: primary */ " + READ.format(key=key), names) == cluster.primary.name
            assert served(conn, READ.format(key=key), names) == cluster.nodes[EU].name


def test_strong_consistency_reads_on_the_primary(proxies, shards, keys, names) -> None:
    with connect(proxies["strong"]) as conn:
        for cluster, key in zip(shards, keys):
            assert served(conn, READ.format(key=key), names) == cluster.primary.name
            assert served(conn, f"/* shard_key: {key} */ SELECT pg_is_in_recovery(), inet_server_port()",
                          names) == cluster.primary.name


def test_lagging_replica_stops_getting_reads_and_the_next_region_serves(proxies, shards, keys, names) -> None:
    eu = proxies["eu"]  # max_replica_lag 1s
    lagging, other = shards
    paused = lagging.nodes[EU]
    assert read_node(eu, keys[0], names) == paused.name
    paused.sql("SELECT pg_wal_replay_pause()")
    try:
        direct(lagging.primary, f"INSERT INTO t (user_id, v) VALUES ({keys[0]}, 'while paused')")
        started = time.monotonic()
        assert wait_until(lambda: read_node(eu, keys[0], names) == lagging.nodes[AP].name, 5), (
            "reads of the lagging shard move to ap-southeast-1")
        seen = nodes_seen(eu)[paused.port]
        print(f"\nlagging replica excluded after {time.monotonic() - started:.2f}s: "
              f"lag {seen['lag_seconds']}s, {seen['lag_bytes']} bytes")
        assert seen["lag_seconds"] is not None and float(seen["lag_seconds"]) > 1.0, seen
        assert seen["state"] == "up" and seen["role"] == "replica", seen
        for _ in range(5):  # for good: never back while it lags
            assert read_node(eu, keys[0], names) == lagging.nodes[AP].name
        assert read_node(eu, keys[1], names) == other.nodes[EU].name  # the other shard is not affected
    finally:
        paused.sql("SELECT pg_wal_replay_resume()")
    assert wait_until(lambda: read_node(eu, keys[0], names) == paused.name, 5), "the caught-up replica serves again"


def test_read_your_writes_holds_with_a_paused_replica(proxies, shards, keys, names) -> None:
    ryw = proxies["ryw"]  # eu-central-1, lag bound 1h: the paused replica stays a candidate
    cluster, key = shards[1], keys[1]
    paused = cluster.nodes[EU]
    count = f"SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM t WHERE user_id = {key} AND v = '{{v}}'"
    with connect(ryw) as writer, connect(ryw) as bystander:
        assert served(writer, READ.format(key=key), names) == paused.name
        paused.sql("SELECT pg_wal_replay_pause()")
        try:
            for i in range(10):
                writer.execute(f"INSERT INTO t (user_id, v) VALUES ({key}, 'ryw{i}')")
                _, port, rows = writer.execute(count.format(v=f"ryw{i}")).fetchone()
                assert rows == 1, f"write {i} not visible to its writer on {names[port]}"
                assert names[port] != paused.name
            # Another client has written nothing: it still reads the paused replica, which lacks the rows.
            _, port, rows = bystander.execute(count.format(v="ryw9")).fetchone()
            assert (names[port], rows) == (paused.name, 0)
            with writer.transaction():  # and in an explicit transaction
                writer.execute("SET TRANSACTION READ ONLY")
                _, port, rows = writer.execute(count.format(v="ryw9")).fetchone()
                assert rows == 1 and names[port] != paused.name
        finally:
            paused.sql("SELECT pg_wal_replay_resume()")
        assert wait_until(lambda: served(writer, count.format(v="ryw9"), names) == paused.name, 5), (
            "the writer reads its own region's replica again once it has replayed the writes")
        assert writer.execute(count.format(v="ryw9")).fetchone()[2] == 1


@pytest.mark.parametrize("how", ["transaction", "one INSERT"])
def test_read_your_writes_holds_after_a_commit_on_both_shards(proxies, shards, keys, names, how) -> None:
    """A transaction, or one INSERT whose rows the proxy splits, writes on both shards (a two-phase commit) while
    both shards' own-region replicas are paused: its client's next reads of either key go to a node that has its
    writes; another client still reads the paused replicas."""
    ryw = proxies["ryw"]
    paused = [cluster.nodes[EU] for cluster in shards]
    count = "SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM t WHERE user_id = {key} AND v = '{how}'"
    with connect(ryw) as writer, connect(ryw) as bystander:
        for node in paused:
            node.sql("SELECT pg_wal_replay_pause()")
        try:
            if how == "transaction":
                with writer.transaction():
                    for key in keys:
                        writer.execute(f"INSERT INTO t (user_id, v) VALUES ({key}, '{how}')")
            else:
                writer.execute(f"INSERT INTO t (user_id, v) VALUES ({keys[0]}, '{how}'), ({keys[1]}, '{how}')")
            for key, node in zip(keys, paused):
                _, port, rows = writer.execute(count.format(key=key, how=how)).fetchone()
                assert rows == 1 and names[port] != node.name, f"{key}'s write not visible to its writer"
                _, port, rows = bystander.execute(count.format(key=key, how=how)).fetchone()
                assert (names[port], rows) == (node.name, 0)
        finally:
            for node in paused:
                node.sql("SELECT pg_wal_replay_resume()")


def test_killed_replica_reads_move_to_the_next_candidate(proxies, shards, keys, names) -> None:
    eu = proxies["eu"]
    cluster, key = shards[1], keys[1]
    victim = cluster.nodes[EU]
    assert read_node(eu, key, names) == victim.name  # the proxy keeps an idle connection to it
    answers: list[str] = []
    with connect(eu) as conn:
        # The replica dies while the proxy is busy (stopped): when it runs again, the read is already there
        # next to the news of the death, and no health check has noticed it.
        eu.signal(signal.SIGSTOP)
        try:
            victim.kill()
            read = READ.format(key=key)
            reading = threading.Thread(target=lambda: answers.append(outcome(served, conn, read, names)))
            reading.start()
            time.sleep(0.2)
        finally:
            eu.signal(signal.SIGCONT)
        try:
            reading.join(10)
            assert answers == [cluster.nodes[AP].name]  # moved before any byte reached the client
            for _ in range(3):
                assert read_node(eu, key, names) == cluster.nodes[AP].name
            assert read_node(eu, keys[0], names) == shards[0].nodes[EU].name
            assert f"cannot connect to server 127.0.0.1:{victim.port}" in eu.log()
        finally:
            victim.start()
    assert wait_until(lambda: read_node(eu, key, names) == victim.name, 10), "the restarted replica serves again"


# -- failover: a shard that loses its primary, next to one that does not ------------------------------------------
@pytest.fixture(scope="module")
def failover(sandbox: Sandbox) -> dict[str, Any]:
    main = sandbox.cluster("rgfo", replicas=2, regions=REGIONS)
    other = sandbox.cluster("rgfo-other")
    # Synchronous on the primary only: the promoted replica must not wait for a standby of its own.
    main.primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (\"rgfo-replica1\")'")
    main.primary.sql("SELECT pg_reload_conf()")
    for cluster in (main, other):
        cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    sync = "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'rgfo-replica1'"
    assert wait_until(lambda: main.primary.sql(sync) == [("sync",)], 10), "rgfo-replica1 is a synchronous standby"
    clusters = [main, other]
    settings = {"regions": regions("500ms"), "pool": {"size": 8, "query_wait_timeout": "15s"},
                "server_auth": {"methods": ["scram-sha-256", "md5"]}}  # md5user logs in to the servers with md5
    proxy = sandbox.proxy("rgfo", clusters, region="us-east-1", routing={"failover_timeout": "10s"}, **settings)
    impatient = sandbox.proxy("rgfo-short", clusters, region="us-east-1", routing={"failover_timeout": "1s"},
                              **settings)
    with connect(proxy) as conn:
        conn.execute("CREATE TABLE w (user_id bigint NOT NULL, n int NOT NULL, PRIMARY KEY (user_id, n))")
    return {"main": main, "other": other, "proxy": proxy, "impatient": impatient,
            "keys": [key_on(main, clusters), key_on(other, clusters)], "names": node_names(main, other)}


def test_failover_holds_writes_then_moves_them_to_the_promoted_replica(failover) -> None:
    main, other, proxy = failover["main"], failover["other"], failover["proxy"]
    names = failover["names"]
    key, other_key = failover["keys"]
    old, promoted, orphan = main.nodes
    insert = "INSERT INTO w (user_id, n) VALUES ({key}, {n}) RETURNING inet_server_port(), n"
    where = f"/* shard_key: {key} */ SELECT pg_is_in_recovery(), inet_server_port()"
    writers = [
        Loop(proxy, statement(lambda n: insert.format(key=key, n=n))),
        Loop(proxy, in_transaction(lambda n: insert.format(key=key, n=1_000_000 + n))),  # a held BEGIN
    ]
    bystander = Loop(proxy, statement(lambda n: insert.format(key=other_key, n=n)))
    reader = Loop(proxy, statement(lambda n: where))
    with connect(failover["impatient"]) as conn:  # its pools know the shard before the failure
        conn.execute(insert.format(key=key, n=0))
    loops = (*writers, bystander, reader)
    for loop in loops:
        loop.start()
    try:
        assert wait_until(lambda: all(len(loop.ok) >= 20 for loop in loops), 10), "traffic flows"
        killing = time.monotonic()
        old.kill()
        killed = time.monotonic()  # every server process is gone

        # No primary: a proxy with a short failover_timeout holds the write that long, then refuses it.
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as refused, connect(failover["impatient"]) as conn:
            conn.execute(insert.format(key=key, n=-1))
        waited = time.monotonic() - started
        print(f"\nwith failover_timeout 1s and no primary: {refused.value.sqlstate} after {waited:.2f}s")
        assert refused.value.sqlstate in ("57P03", "08006"), refused.value
        assert 0.9 <= waited < 5, f"refused after {waited:.2f}s, failover_timeout is 1s"
        # Clients that connect meanwhile read from the replicas, also one whose pools are all new.
        for user, password in (("app", "secret"), ("md5user", "md5secret")):
            with psycopg.connect(proxy.dsn(user, password, APP_DB), autocommit=True, connect_timeout=10) as conn:
                assert served(conn, where, names) in (promoted.name, orphan.name), user

        time.sleep(0.5)
        promoting = time.monotonic()
        promoted.promote()
        promoted_at = time.monotonic()
        assert wait_until(lambda: all(w.successes_after(promoting) for w in writers), 10), (
            "writes succeed after the promotion")
        firsts = [w.successes_after(promoting)[0] for w in writers]
        rto = min(done for _, _, done, _ in firsts) - promoting
        print(f"RTO {rto * 1000:.0f} ms from `pg_ctl promote` to the first write through the proxy "
              f"({(rto + promoting - promoted_at) * 1000:.0f} ms after the promoted node took writes; "
              f"promotion itself {(promoted_at - promoting) * 1000:.0f} ms; health_check_interval 500ms)")
        assert wait_until(lambda: all(len(w.successes_after(promoted_at)) >= 30 for w in writers), 10), (
            "writes flow on the new primary")
    finally:
        for loop in loops:
            loop.finish()

    # The writes that succeeded first after the promotion were sent before it: held, not failed.
    assert all(sent < promoting for _, sent, _, _ in firsts), "a write was not held through the failover"
    assert rto < 1.0, f"RTO {rto:.3f}s (goal < 1s)"
    acknowledged, failed = set(), []
    for w in writers:
        # At most the statement in flight at the kill failed; nothing was acknowledged without a primary.
        assert len(w.errors) <= 1 and all(killing < done < killed + 1 for _, _, done, *_ in w.errors), w.errors
        # A proper ErrorResponse; or, when the kill came between a commit and the proxy's look at its LSN, the
        # proxy's FATAL reached an idle client, which libpq reports as a closed connection at the next query.
        assert all(state == "08006" or (state is None and "closed the connection" in message)
                   for *_, state, message in w.errors), w.errors
        assert not [entry for entry in w.ok if killed < entry[2] < promoting]
        assert {names[row[0]] for _, _, done, row in w.ok if done < killing} == {old.name}
        assert {names[row[0]] for _, _, done, row in w.ok if done > promoting} == {promoted.name}
        acknowledged |= {row[1] for *_, row in w.ok}
        failed += [state for *_, state, _ in w.errors]
    # Every write the client saw committed is on the new primary (synchronous replication).
    present = {n for (n,) in direct(promoted, f"SELECT n FROM w WHERE user_id = {key}")}
    print(f"{len(acknowledged)} acknowledged writes, {len(acknowledged - present)} missing on the new primary; "
          f"failed in flight: {failed}")
    assert acknowledged <= present, sorted(acknowledged - present)
    # Reads never stopped: replicas served them while the shard had no primary. Until the kill they ran on the
    # primary, this region's node: at most the one in flight there failed.
    assert len(reader.errors) <= 1 and all(killing < done < killed + 1 and state == "08006"
                                           for _, _, done, state, _ in reader.errors), reader.errors
    during = [names[row[1]] for _, _, done, row in reader.ok if killed < done < promoting]
    assert during and set(during) <= {promoted.name, orphan.name}, during
    # The other shard did not notice.
    assert not bystander.errors, bystander.errors
    gaps = [b[2] - a[2] for a, b in zip(bystander.ok, bystander.ok[1:]) if b[2] > killed]
    assert len(gaps) > 50 and max(gaps) < 0.5, f"longest pause on the other shard {max(gaps):.3f}s"
    assert {names[row[0]] for *_, row in bystander.ok} == {other.primary.name}


def test_old_primary_that_comes_back_is_fenced(failover) -> None:
    main, proxy, names = failover["main"], failover["proxy"], failover["names"]
    key = failover["keys"][0]
    old, promoted = main.primary, main.nodes[EU]
    old.start()  # a primary again, on the timeline the promotion left behind
    old.sql("ALTER SYSTEM RESET synchronous_standby_names")  # so a misrouted write shows, not hangs
    old.sql("SELECT pg_reload_conf()")
    assert wait_until(lambda: nodes_seen(proxy)[old.port]["state"] == "up", 10), "the proxy sees the old primary again"
    assert nodes_seen(proxy)[old.port]["role"] == "primary"
    before = direct(old, "SELECT count(*) FROM w")[0][0]
    with connect(proxy) as conn:
        for n in range(10_000, 10_020):
            insert = f"INSERT INTO w (user_id, n) VALUES ({key}, {n}) RETURNING inet_server_port()"
            port = conn.execute(insert).fetchone()[0]
            assert names[port] == promoted.name
        for _ in range(10):
            assert served(conn, f"/* shard_key: {key} */ SELECT pg_is_in_recovery(), inet_server_port()",
                          names, promoted=True) != old.name
    assert direct(old, "SELECT count(*) FROM w")[0][0] == before


def test_split_brain_the_newest_timeline_wins(sandbox: Sandbox) -> None:
    brain = sandbox.cluster("rgsb", replicas=1, regions=REGIONS[:2])
    old, promoted = brain.nodes
    old.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    names = node_names(brain)
    proxy = sandbox.proxy("rgsb", [brain], region="us-east-1", regions=regions("300ms"), pool=POOL)
    with connect(proxy) as conn:
        conn.execute("CREATE TABLE w (user_id bigint NOT NULL, n int NOT NULL)")
    insert = "INSERT INTO w (user_id, n) VALUES (1, {n}) RETURNING inet_server_port()"
    writer = Loop(proxy, statement(lambda n: insert.format(n=n)), pause=0.01)
    writer.start()
    straddling = connect(proxy)  # a transaction open on the old primary when the other one takes over
    try:
        assert wait_until(lambda: len(writer.ok) >= 10, 10), "writes flow"
        straddling.execute("BEGIN")
        assert names[straddling.execute(insert.format(n=-1)).fetchone()[0]] == old.name
        promoting = time.monotonic()
        promoted.promote()  # while the old primary keeps running and accepting writes
        assert wait_until(lambda: any(names[row[0]] == promoted.name for *_, row in writer.ok), 5), (
            "writes move to the promoted node")
        switched = next(done for _, _, done, row in writer.ok if names[row[0]] == promoted.name)
        print(f"\nsplit brain: writes moved {(switched - promoting) * 1000:.0f} ms after `pg_ctl promote`")
        assert wait_until(lambda: len(writer.successes_after(switched)) >= 30, 10), "writes flow on the new primary"
        # Its COMMIT must not be acknowledged on the fenced node: the fence ended the transaction there.
        with pytest.raises(psycopg.OperationalError) as ended:
            straddling.execute("COMMIT")
        print(f"transaction open on the fenced node: {ended.value.sqlstate} {str(ended.value).strip()!r}")
        stale = direct(old, "SELECT count(*) FROM w")[0][0]
        time.sleep(0.3)
        with connect(proxy) as conn:
            for _ in range(10):
                assert served(conn, "/* shard_key: 1 */ SELECT pg_is_in_recovery(), inet_server_port()",
                              names, promoted=True) == promoted.name
    finally:
        writer.finish()
        straddling.close()
    # Only what was in flight on the old primary when the fence closed its connections may have failed.
    assert len(writer.errors) <= 1 and all(promoting < done <= switched for _, _, done, *_ in writer.errors) \
        and all(state == "08006" or (state is None and "closed the connection" in message)
                for *_, state, message in writer.errors), writer.errors
    lost = "SELECT count(*) FROM w WHERE n = -1"
    assert direct(old, lost) == direct(promoted, lost) == [(0,)]
    assert {names[row[0]] for _, _, done, row in writer.ok if done > switched} == {promoted.name}
    assert direct(old, "SELECT count(*) FROM w")[0][0] == stale  # the fenced node got nothing more
    seen = nodes_seen(proxy)
    assert seen[old.port]["role"] == "primary" and seen[old.port]["state"] == "up"  # alive, and still fenced


def test_old_primary_back_on_its_old_timeline_serves_no_reads_until_rewound(sandbox: Sandbox) -> None:
    """After a failover the old primary restarts as a standby before pg_rewind (as Patroni restarts it): it runs
    on the timeline it left, its LSN ahead of the new primary's. Through a proxy of its region, in
    read_your_writes, a client reads every row it wrote and never from that node; rewound, the node streams
    on the new timeline and serves the region's reads again."""
    cluster = sandbox.cluster("rgrj", replicas=1, regions=REGIONS[:2], settings=REWINDABLE)
    old, promoted = cluster.nodes
    old.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    names = node_names(cluster)
    proxy = sandbox.proxy("rgrj", [cluster], region="us-east-1", regions=regions("100ms"), pool=POOL)
    with connect(proxy) as conn:
        conn.execute("CREATE TABLE r (user_id bigint NOT NULL, n int NOT NULL)")
    promoted.promote()
    old.sql("CREATE TABLE diverged AS SELECT generate_series(1, 10000) AS n")  # WAL the new primary never gets
    old.stop()
    old.start_as_standby(promoted)
    assert wait_until(lambda: nodes_seen(proxy)[old.port]["role"] == "replica", 10), "the old primary is back"
    assert nodes_seen(proxy)[old.port]["state"] == "up"
    read = "SELECT pg_is_in_recovery(), inet_server_port(), count(*) FROM r WHERE user_id = 1 AND n = {n}"
    with connect(proxy) as conn:
        for n in range(100):
            conn.execute(f"INSERT INTO r (user_id, n) VALUES (1, {n})")
            _, port, rows = conn.execute(read.format(n=n)).fetchone()
            assert (names[port], rows) == (promoted.name, 1), f"read {n} after its write"
    old.stop()
    old.rewind(promoted)

    def fresh_read() -> tuple[str, int]:  # by a client that wrote nothing
        with connect(proxy) as conn:
            _, port, rows = conn.execute(read.format(n=99)).fetchone()
            return names[port], rows

    assert wait_until(lambda: fresh_read() == (old.name, 1), 10), "the rewound node serves the region's reads"
