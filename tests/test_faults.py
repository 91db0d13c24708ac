"""Faults under load: a server killed, a server stalled, a replica stalled, the proxy restarted, and a short soak.

Two shards; the first is reached through a fault relay (tests/relay.py), the second directly. Writers on
both shards record every write the proxy acknowledged; at the end each one must be on its shard. The replica
tests have their own pair of shards: the first with a replica in the proxy's region, reached through the relay.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from shardproxy.devtools.faults import Relay
from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from shardproxy.devtools.soak import rss_growth_kb, run_soak
from shardproxy.devtools.workload import TABLE, Workload, create_table, keys_by_shard, server_sessions
from shardproxy.wire import protocol as pg
from tests.support import APP_DB
from tests.support.admin import nodes_seen
from tests.support.regions import REGIONS, Loop, regions

DB = "faultdb"
CONNECT_TIMEOUT = 1.0
FAILOVER_TIMEOUT = 2.0
# A client of a failed shard hears of it within: the failover wait, a connect attempt, and some slack.
ERROR_WITHIN = FAILOVER_TIMEOUT + CONNECT_TIMEOUT + 2.0


@pytest.fixture(scope="module")
def shards(sandbox: Sandbox) -> dict[str, Cluster]:
    clusters = {name: sandbox.cluster(name) for name in ("faults0", "faults1")}
    for cluster in clusters.values():
        cluster.primary.sql(f"CREATE DATABASE {DB} OWNER app")
    create_table(list(clusters.values()), DB)
    return clusters


def _through_relay(proxy: ProxyProcess, relay: Relay, node: int) -> Iterator[tuple[ProxyProcess, Relay]]:
    """Start the proxy with its first shard's `node` reached through the relay; stop it after."""
    config = proxy.config
    config["shards"][0]["nodes"][node]["port"] = relay.port
    proxy.write_config(config)
    proxy.start()
    yield proxy, relay
    proxy.stop()


@pytest.fixture
def relayed(sandbox: Sandbox, shards: dict[str, Cluster], request: pytest.FixtureRequest
            ) -> Iterator[tuple[ProxyProcess, Relay]]:
    """A proxy whose first shard's node is the relay, in front of that shard's real server."""
    first = shards["faults0"].primary
    with Relay(first.host, first.port) as relay:
        name = "faults-" + request.node.name.removeprefix("test_")[:20].replace("_", "-")
        proxy = sandbox.proxy(
            name, list(shards.values()), start=False, shutdown_timeout="10s",
            sharding={"key": "user_id"},
            pool={"size": 4, "server_connect_timeout": f"{CONNECT_TIMEOUT}s", "query_wait_timeout": "5s",
                  **getattr(request, "param", {})},  # extra pool settings, for tests that ask (indirect)
            routing={"failover_timeout": f"{FAILOVER_TIMEOUT}s"},
        )
        yield from _through_relay(proxy, relay, node=0)


def no_transaction_left_open(shards: dict[str, Cluster]) -> bool:
    return all(server_sessions(c, "state LIKE 'idle in transaction%'") == 0 for c in shards.values())


def test_server_killed_mid_transaction_fails_its_clients_quickly_and_pools_recover(
    relayed: tuple[ProxyProcess, Relay], shards: dict[str, Cluster]
) -> None:
    proxy, _ = relayed
    victim = shards["faults1"].primary
    key = keys_by_shard(proxy, 1)["faults1"][0]
    with Workload(proxy, DB) as load, psycopg.connect(proxy.dsn(dbname=DB), autocommit=True) as sleeper:
        assert wait_until(lambda: load.successes_after(0) >= 3, 10), load.failures()[:5]
        # A statement surely in flight at the kill (the writers' may all fall between two transactions).
        in_flight = ThreadPoolExecutor(1).submit(sleeper.execute, f"/* shard_key: {key} */ SELECT pg_sleep(30)")
        assert wait_until(lambda: server_sessions(shards["faults1"], "query LIKE '%pg_sleep(30)%'") == 1, 5)
        killed = time.monotonic()
        victim.stop("immediate")
        with pytest.raises(psycopg.OperationalError):
            in_flight.result(ERROR_WITHIN)
        assert time.monotonic() - killed < ERROR_WITHIN
        time.sleep(1.0)
        victim.start()
        back = time.monotonic()
        assert wait_until(lambda: load.successes_after(back) >= 5, 15), "the pools did not recover"
        assert load.successes_after(killed, "faults0") >= 20  # the other shard never paused
    affected = load.failures("faults1")
    print(f"kill: {len(affected)} writer errors on the killed shard, {load.acked()} acknowledged writes")
    for failure in affected:
        assert failure.ended - failure.started < ERROR_WITHIN, failure
        assert failure.started < back + 1, failure
    assert load.failures("faults0") == []
    assert load.missing(shards, DB) == []
    assert wait_until(lambda: no_transaction_left_open(shards), 3)


def test_stalled_server_holds_only_its_own_shard(
    relayed: tuple[ProxyProcess, Relay], shards: dict[str, Cluster]
) -> None:
    proxy, relay = relayed
    stall = 3.0
    with Workload(proxy, DB) as load:
        assert wait_until(lambda: load.successes_after(0) >= 3, 10), load.failures()[:5]
        relay.set_mode("stall")
        stalled = time.monotonic()
        time.sleep(stall)
        progress = load.successes_after(stalled, "faults1")
        relay.set_mode("pass")
        resumed = time.monotonic()
        assert wait_until(lambda: load.successes_after(resumed) >= 5, 15), "the stalled shard did not recover"
    assert progress >= 20, f"clients of the other shard were held up: {progress} transactions each"
    assert load.failures("faults1") == [], load.failures("faults1")
    # The proxy has no timeout for a server that stops answering on an established connection (no
    # query timeout): its clients wait out the stall, then go on, or fail once a connect is attempted.
    gaps = []
    for writer in load.of("faults0"):
        before = [t for t in writer.successes if t < stalled]
        after = [t for t in writer.successes if t > stalled]
        gaps.append(after[0] - before[-1])
    failures = load.failures("faults0")
    print(f"stall {stall}s: stalled-shard clients waited {[round(g, 2) for g in gaps]}s, "
          f"{len(failures)} errors {[(f.sqlstate, round(f.ended - f.started, 2)) for f in failures]}")
    assert max(gaps) < stall + ERROR_WITHIN, gaps
    assert all(f.ended - f.started < stall + ERROR_WITHIN for f in failures)
    assert load.missing(shards, DB) == []
    assert wait_until(lambda: no_transaction_left_open(shards), 3)


@pytest.mark.parametrize("relayed", [{"query_timeout": "1s"}], indirect=True)
def test_query_timeout_fails_the_clients_of_a_stalled_server(
    relayed: tuple[ProxyProcess, Relay], shards: dict[str, Cluster]
) -> None:
    """With query_timeout, a server that stops answering costs its clients an error, not a hang."""
    proxy, relay = relayed
    with Workload(proxy, DB) as load:
        assert wait_until(lambda: load.successes_after(0) >= 3, 10), load.failures()[:5]
        relay.set_mode("stall")
        stalled = time.monotonic()
        assert wait_until(lambda: all(w.failures for w in load.of("faults0")), 6), "stalled clients hang"
        waited = max(f.ended - stalled for w in load.of("faults0") for f in w.failures[:1])
        progress = load.successes_after(stalled, "faults1")
        relay.set_mode("pass")
        resumed = time.monotonic()
        assert wait_until(lambda: load.successes_after(resumed) >= 5, 15), "the stalled shard did not recover"
    assert waited < 1 + 0.5 + 2.0, waited  # the timeout, a janitor round, slack for a busy machine
    assert {f.sqlstate for f in load.failures("faults0")} <= {"57014", "08006", None}, load.failures("faults0")
    assert progress >= 5 and load.failures("faults1") == []
    assert load.missing(shards, DB) == []
    assert wait_until(lambda: no_transaction_left_open(shards), 3)


def test_proxy_sigterm_under_load_finishes_transactions_then_clients_reconnect(
    relayed: tuple[ProxyProcess, Relay], shards: dict[str, Cluster]
) -> None:
    proxy, _ = relayed
    with Workload(proxy, DB) as load:
        assert wait_until(lambda: load.successes_after(0) >= 3, 10), load.failures()[:5]
        proxy.signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 0
        down = time.monotonic()
        proxy.start()
        assert wait_until(lambda: load.successes_after(down) >= 5, 15), "clients did not come back"
    failures = load.failures()
    print(f"SIGTERM: {len(failures)} client errors {sorted({(f.phase, f.sqlstate) for f in failures}, key=str)}")
    # Between transactions a client is told the proxy is going away (57P01), or cannot connect meanwhile;
    # a transaction under way is never cut: no error after the first statement.
    assert all(f.phase in ("connect", "insert") for f in failures), failures
    assert all(f.sqlstate in ("57P01", None) or f.sqlstate.startswith("08") for f in failures), failures
    assert load.missing(shards, DB) == []
    assert wait_until(lambda: no_transaction_left_open(shards), 3)


SOAK_SECONDS = 60  # a minute in the default run; bench/soak.py runs longer ones


def test_soak_short(relayed: tuple[ProxyProcess, Relay], shards: dict[str, Cluster]) -> None:
    proxy, relay = relayed
    report = run_soak(proxy, relay, shards, DB, SOAK_SECONDS, seed=int(time.time()), fault_every=3.0)
    print(report.summary())
    assert proxy.process.poll() is None
    assert sum(report.faults.values()) >= 5
    assert report.acked > 100
    assert report.missing == []
    assert report.idle_in_transaction == 0
    assert all(on_server == in_pools for on_server, in_pools in report.leaks.values()), report.leaks
    assert rss_growth_kb(report.rss_kb) < 20 * 1024, report.rss_kb


# -- a replica stalled (blackholed): reads leave it, nothing else notices ---------------------------------------
QUERY_TIMEOUT = 1.0
CHECK_INTERVAL = 0.3
# A read on the stalled replica fails within: the timeout, a janitor round, slack for a busy machine.
READ_ERROR_WITHIN = QUERY_TIMEOUT + 0.5 + 1.5
STALL_REGIONS = REGIONS[:2]  # the primaries in the first, shard A's replica in the second: the proxy's


@pytest.fixture(scope="module")
def replicated(sandbox: Sandbox) -> dict[str, Cluster]:
    """Shard A: a primary and a replica in another region; shard B: a primary only."""
    clusters = {"stall-a": sandbox.cluster("stall-a", replicas=1, regions=STALL_REGIONS),
                "stall-b": sandbox.cluster("stall-b", regions=STALL_REGIONS[:1])}
    for cluster in clusters.values():
        cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    create_table(list(clusters.values()), APP_DB)
    clusters["stall-a"].wait_replicas_caught_up()
    return clusters


@pytest.fixture
def replica_relayed(sandbox: Sandbox, replicated: dict[str, Cluster]) -> Iterator[tuple[ProxyProcess, Relay]]:
    """A proxy in the replica's region (reads go to it) that reaches the replica through the relay."""
    replica = replicated["stall-a"].replicas[0]
    with Relay(replica.host, replica.port) as relay:
        proxy = sandbox.proxy(
            "faults-replica", list(replicated.values()), start=False, region=replica.region,
            regions=regions(f"{CHECK_INTERVAL * 1000:g}ms"), sharding={"key": "user_id"},
            pool={"size": 4, "server_connect_timeout": f"{CONNECT_TIMEOUT}s", "query_wait_timeout": "5s",
                  "query_timeout": f"{QUERY_TIMEOUT:g}s"},
        )
        yield from _through_relay(proxy, relay, node=1)


def read_key(key: int) -> str:
    return f"SELECT inet_server_port(), count(*) FROM {TABLE} WHERE user_id = {key}"


def point_reads(proxy: ProxyProcess, key: int) -> Loop:
    """A client reading its key in autocommit; each success records the port of the server that answered.
    psycopg prepares the statement on its 6th run, in a batch of its own that names no shard."""
    return Loop(proxy, lambda conn, i: conn.execute(read_key(key)).fetchone())


def ports(loop: Loop, start: float, end: float = float("inf")) -> set[int]:
    return {row[0] for _, _, done, row in loop.ok if start < done < end}


def longest_gap(loop: Loop, start: float, end: float) -> float:
    """The longest time without a completed read in [start, end]."""
    moments = [start, *(done for _, _, done, _ in loop.ok if start < done < end), end]
    return max(b - a for a, b in zip(moments, moments[1:]))


def test_a_refused_batch_leaves_no_server_connection_mid_batch(sandbox: Sandbox,
                                                              replicated: dict[str, Cluster]) -> None:
    """A pipeline whose reads ran on shard A's replica and shard B's primary, then a statement the proxy refuses:
    every server connection the batch touched ends it (Sync) before it goes back to the pool. None stays inside a
    transaction, which on a replica would hold back WAL replay, and so every client's reads there."""
    replica = replicated["stall-a"].replicas[0]
    proxy = sandbox.proxy("faults-refused-batch", list(replicated.values()), region=replica.region,
                          regions=regions("300ms"), sharding={"key": "user_id"})
    busy = ("usename = 'app' AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND application_name NOT LIKE 'shardproxy%' AND state <> 'idle'")
    try:
        keys = keys_by_shard(proxy, 1)
        nodes = [replica, *(cluster.primary for cluster in replicated.values())]
        for pipeline in (True, False):
            with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
                with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy:"):
                    with conn.pipeline() if pipeline else contextlib.nullcontext():
                        conn.execute(read_key(keys["stall-a"][0]))
                        conn.execute(read_key(keys["stall-b"][0]))
                        conn.execute(f"SELECT user_id, row_number() OVER () FROM {TABLE}")
                assert conn.execute(read_key(keys["stall-a"][0])).fetchone()[0] == replica.port
                assert wait_until(lambda: all(node.sql(f"SELECT count(*) FROM pg_stat_activity WHERE {busy}")
                                              == [(0,)] for node in nodes), 3), \
                    [node.sql(f"SELECT state, query FROM pg_stat_activity WHERE {busy}") for node in nodes]
    finally:
        proxy.stop()


def test_stalled_replica_fails_its_reads_quickly_then_they_move_to_the_primary(
    replica_relayed: tuple[ProxyProcess, Relay], replicated: dict[str, Cluster]
) -> None:
    proxy, relay = replica_relayed
    primary, replica = replicated["stall-a"].primary, replicated["stall-a"].replicas[0]
    keys = keys_by_shard(proxy, 2)
    readers = {shard: [point_reads(proxy, key) for key in shard_keys] for shard, shard_keys in keys.items()}
    a, b = readers["stall-a"], readers["stall-b"]
    with Workload(proxy, APP_DB, per_shard=2) as load:
        for loop in a + b:
            loop.start()
        try:
            assert wait_until(lambda: all(replica.port in ports(r, 0) for r in a), 10), [r.errors for r in a]
            relay.set_mode("stall")
            stalled = time.monotonic()
            assert wait_until(lambda: nodes_seen(proxy)[relay.port]["state"] == "down", 5 + 10 * CHECK_INTERVAL)
            down = time.monotonic()
            assert wait_until(lambda: all(ports(r, down) == {primary.port} for r in a)
                              and min(len(r.successes_after(down)) for r in a) >= 5, 5), "reads stay off"
            relay.set_mode("pass")
            resumed = time.monotonic()
            assert wait_until(lambda: all(replica.port in ports(r, resumed) for r in a), 10), "no reads come back"
            back = time.monotonic()
        finally:
            for loop in a + b:
                loop.finish()
    a_errors = [e for r in a for e in r.errors]
    print(f"replica stall: down after {down - stalled:.2f}s, reads back on it {back - resumed:.2f}s after the relay"
          f" passed; shard A reads: {len(a_errors)} errors"
          f" {[(e[3], round(e[2] - e[1], 2)) for e in a_errors]}; during the stall shard B did"
          f" {[len(r.successes_after(stalled)) - len(r.successes_after(resumed)) for r in b]} reads,"
          f" longest gap {max(longest_gap(r, stalled, resumed) for r in b):.2f}s, writes acknowledged"
          f" {load.acked()}")
    # Shard B never noticed.
    assert all(r.errors == [] for r in b), [r.errors for r in b]
    assert max(longest_gap(r, stalled, resumed) for r in b) < 0.5
    # Shard A: reads on the replica failed with the proxy's timeout, never hung; none failed once it was down.
    assert a_errors, "no read was caught on the stalled replica"
    assert {e[3] for e in a_errors} == {pg.QUERY_CANCELED}, a_errors
    assert all(stalled < e[2] and e[2] - e[1] < READ_ERROR_WITHIN for e in a_errors), a_errors
    assert all(e[2] < down + READ_ERROR_WITHIN for e in a_errors), a_errors
    assert max(done - sent for r in a for _, sent, done, _ in r.ok) < READ_ERROR_WITHIN
    # Writes on both primaries went on.
    assert load.failures() == [], load.failures()
    assert load.successes_after(stalled) >= 5 and load.missing(replicated, APP_DB) == []
    assert wait_until(lambda: no_transaction_left_open(replicated), 3)
    assert proxy.process.poll() is None

