"""Topology decisions, and health checks against real primaries and replicas.

The real-server tests share one cluster, a primary in us-east-1 with replicas
in eu-central-1 and ap-southeast-1; the test that fails it over runs last.
Split brain gets its own small cluster.
"""

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from shardproxy.cluster.health import HealthChecker
from shardproxy.cluster.topology import (
    Change,
    NodeState,
    Probe,
    Topology,
    format_lsn,
    parse_lsn,
)
from shardproxy.config import Config
from shardproxy.devtools.sandbox import REWINDABLE, Cluster, Node, Sandbox

REGIONS = ("us-east-1", "eu-central-1", "ap-southeast-1")
SHARD = "s0"


def make_config(
    nodes: Sequence[tuple[str, int, str | None]],
    region: str = "us-east-1",
    interval: str = "200ms",
    **routing: str,
) -> Config:
    """One shard of (host, port, region) nodes; regions ranked as in REGIONS."""
    return Config.model_validate({
        "region": region,
        "regions": {
            name: {"primary": rank == 0, "priority": rank + 1, "health_check_interval": interval}
            for rank, name in enumerate(REGIONS)
        },
        "shards": [{"name": SHARD, "nodes": [
            {"host": host, "port": port, "region": where} for host, port, where in nodes
        ]}],
        "routing": routing,
        "users": [{"name": "app", "password": "secret"}],
    })  # fmt: skip


def real_config(nodes: Sequence[Node], **options: str) -> Config:
    return make_config(
        [(node.host, node.port, node.region) for node in nodes], **options
    )


def address(node: Node) -> str:
    return f"{node.host}:{node.port}"


@asynccontextmanager
async def checking(config: Config, user: str = "app", password: str = "secret") -> AsyncIterator[HealthChecker]:
    checker = HealthChecker(Topology(config), config, user, password)
    await checker.start()
    try:
        yield checker
    finally:
        await checker.stop()


def read_order(checker: HealthChecker, min_lsn: int | None = None) -> list[str]:
    return [node.address for node in checker.topology.read_candidates(SHARD, min_lsn)]


def known(node: NodeState | None) -> NodeState:
    assert node is not None
    return node


def primary_address(topology: Topology) -> str | None:
    primary = topology.primary(SHARD)
    return primary.address if primary else None


# --- pure topology -----------------------------------------------------------


def seen(
    topology: Topology,
    port: int,
    in_recovery: bool,
    lsn: int,
    timeline: int = 1,
    replay_age: float | None = None,
    at: float = 1.0,
    receiving: bool = True,
) -> None:
    """What the checker does after a successful check of 127.0.0.1:port (a replica streams unless told)."""
    probe = Probe(in_recovery, lsn, timeline, replay_age, sent=at, received=at, at=at,
                  receiving=receiving if in_recovery else None)
    topology.report(f"127.0.0.1:{port}", probe, rise=1)


FAKE = [
    ("127.0.0.1", 1, "us-east-1"),
    ("127.0.0.1", 2, "eu-central-1"),
    ("127.0.0.1", 3, "eu-central-1"),
    ("127.0.0.1", 4, "ap-southeast-1"),
]


def test_lsn_text() -> None:
    assert parse_lsn("16/B374D848") == 0x16_B374_D848
    assert format_lsn(0x16_B374_D848) == "16/B374D848"
    assert format_lsn(parse_lsn("0/0")) == "0/0"


def test_read_candidates_rank_regions_then_outstanding() -> None:
    topology = Topology(make_config(FAKE, region="eu-central-1"))
    seen(topology, 1, False, 100)
    for port in (2, 3, 4):
        seen(topology, port, True, 100, at=2.0)
    known(topology.node("127.0.0.1:2")).load.outstanding = 5
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 2, 4, 1]
    assert [n.port for n in topology.read_candidates(SHARD, min_lsn=101)] == [1]
    # A read goes to the first candidate that did not just refuse a connection.
    for avoid, port in (set(), 3), ({"127.0.0.1:3"}, 2), ({"127.0.0.1:3", "127.0.0.1:2"}, 4):
        assert known(topology.read_node(SHARD, None, avoid)).port == port
    assert known(topology.read_node(SHARD, 101, set())).port == 1
    assert topology.read_node(SHARD, None, {f"127.0.0.1:{port}" for port in (1, 2, 3, 4)}) is None
    # Behind a primary sample taken before the check: lagging by its replay age.
    seen(topology, 4, True, 90, replay_age=9.0, at=3.0)
    assert known(topology.node("127.0.0.1:4")).lag_bytes == 10
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 2, 1]
    # A reload keeps what checks learned about the nodes that remain.
    topology.apply_config(make_config(FAKE[:3], region="eu-central-1"))
    assert topology.node("127.0.0.1:4") is None
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 2, 1]


def test_reads_stay_in_the_region_on_its_primary_before_other_regions_replicas() -> None:
    topology = Topology(make_config([*FAKE, ("127.0.0.1", 5, "us-east-1")]))  # the proxy is in us-east-1 too
    seen(topology, 1, False, 100)
    for port in (2, 3, 4):
        seen(topology, port, True, 100)
    # No replica in this region: its primary, then the other regions' replicas by priority.
    assert [n.port for n in topology.read_candidates(SHARD)] == [1, 2, 3, 4]
    assert known(topology.read_node(SHARD, None, set())).port == 1
    assert known(topology.read_node(SHARD, None, {"127.0.0.1:1"})).port == 2
    # A replica in this region comes first; under read-your-writes, only once it has replayed the commit.
    seen(topology, 5, True, 100)
    assert [n.port for n in topology.read_candidates(SHARD)] == [5, 1, 2, 3, 4]
    assert [n.port for n in topology.read_candidates(SHARD, min_lsn=101)] == [1]
    assert known(topology.read_node(SHARD, 101, set())).port == 1
    # This region without a node that can serve: the other regions by priority.
    topology.report_failure("127.0.0.1:1", at=2.0, fall=1, error="connection refused")
    topology.report_failure("127.0.0.1:5", at=2.0, fall=1, error="connection refused")
    assert [n.port for n in topology.read_candidates(SHARD)] == [2, 3, 4]


def test_newest_timeline_leads_and_ties_keep_the_leader() -> None:
    topology = Topology(make_config(FAKE))
    changes: list[Change] = []
    topology.on_change(changes.append)
    for port, in_recovery in ((1, False), (2, True), (3, True)):
        seen(topology, port, in_recovery, 100)
    assert primary_address(topology) == "127.0.0.1:1"
    seen(topology, 2, False, 200, timeline=2)
    assert primary_address(topology) == "127.0.0.1:2"
    assert known(topology.node("127.0.0.1:1")).fenced
    assert (
        Change("primary", SHARD, "127.0.0.1:2", "127.0.0.1:1", "127.0.0.1:2") in changes
    )
    seen(topology, 3, False, 200, timeline=2)  # same timeline: the leader stays
    assert primary_address(topology) == "127.0.0.1:2"
    assert known(topology.node("127.0.0.1:3")).fenced
    topology.report_failure("127.0.0.1:2", at=4.0, fall=1, error="connection refused")
    assert primary_address(topology) == "127.0.0.1:3"
    assert known(topology.node("127.0.0.1:1")).fenced


def test_replicas_read_only_on_the_primarys_timeline_while_streaming(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "shardproxy.cluster.topology")
    topology = Topology(make_config(FAKE))
    for port in (1, 2, 3, 4):
        seen(topology, port, port != 1, 100)
    # Port 1 fails, port 2 is promoted (timeline 2) and ports 3 and 4 follow it.
    topology.report_failure("127.0.0.1:1", at=2.0, fall=1, error="connection refused")
    seen(topology, 2, False, 200, timeline=2, at=2.0)
    for port in (3, 4):
        seen(topology, port, True, 200, timeline=2, at=2.0)
    # Port 1 comes back as a standby on its old timeline, with WAL the new primary never had: its LSN is
    # ahead of the primary's, yet its data is not the primary's.
    seen(topology, 1, True, 300, timeline=1, receiving=False, at=3.0)
    old = known(topology.node("127.0.0.1:1"))
    assert (old.role, old.state, old.lag_seconds, old.lag_bytes) == ("replica", "up", None, None)
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 4, 2]
    assert [n.port for n in topology.read_candidates(SHARD, min_lsn=250)] == [2]
    assert known(topology.read_node(SHARD, 250, set())).port == 2
    assert "127.0.0.1:1 gets no reads: it is on timeline 1, the shard's primary on 2" in caplog.text
    # Its WAL receiver reaches the new primary, asking for the old timeline: still no reads.
    seen(topology, 1, True, 300, timeline=1, at=3.5)
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 4, 2]
    # Port 4 stops streaming: until the primary answers a check, it may have lost a primary that died.
    seen(topology, 4, True, 200, timeline=2, receiving=False, at=3.5)
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 4, 2]
    # The primary answers: port 4 streams from nobody while the shard has a primary, so it gets no reads.
    seen(topology, 2, False, 200, timeline=2, at=3.6)
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 2]
    seen(topology, 4, True, 200, timeline=2, receiving=False, at=3.7)
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 2]
    assert "127.0.0.1:4 gets no reads: it receives no WAL while the shard's primary is up" in caplog.text
    # Rewound, port 1 streams on the primary's timeline: it reads again, first as in this region.
    seen(topology, 1, True, 200, timeline=2, at=4.0)
    assert [n.port for n in topology.read_candidates(SHARD)] == [1, 3, 2]
    assert "127.0.0.1:1 follows the shard's primary again" in caplog.text
    # With no primary up nothing streams: replicas on its timeline still serve reads, the others do not.
    topology.report_failure("127.0.0.1:2", at=5.0, fall=1, error="connection refused")
    seen(topology, 1, True, 200, timeline=1, receiving=False, at=5.0)
    seen(topology, 3, True, 200, timeline=2, receiving=False, at=5.0)
    assert [n.port for n in topology.read_candidates(SHARD)] == [3, 4]


# --- real servers ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(sandbox: Sandbox) -> Cluster:
    cluster = sandbox.cluster("health", replicas=2, regions=REGIONS)
    cluster.primary.sql("CREATE TABLE ticks (n int)")
    cluster.wait_replicas_caught_up()
    return cluster


async def test_roles_are_discovered_whatever_the_listed_order(cluster: Cluster) -> None:
    us, eu, ap = cluster.nodes
    async with checking(real_config([ap, eu, us])) as checker:
        topology = checker.topology
        assert primary_address(topology) == address(us)
        roles = [known(topology.node(address(n))).role for n in (us, eu, ap)]
        assert roles == ["primary", "replica", "replica"]
        assert all(
            node.state == "up" and node.timeline == 1 for node in topology.nodes()
        )
        # Idle and caught up: no lag, however old the last replayed commit is.
        nodes = topology.nodes()
        assert await checker.wait_for(lambda: all(n.lag_seconds == 0 for n in nodes), 2)


@pytest.mark.parametrize("region, order", [
    ("us-east-1", ("us", "eu", "ap")),
    ("eu-central-1", ("eu", "ap", "us")),
    ("ap-southeast-1", ("ap", "eu", "us")),
])  # fmt: skip
async def test_reads_prefer_own_region_then_priority(
    cluster: Cluster, region: str, order: tuple[str, ...]
) -> None:
    named = dict(zip(("us", "eu", "ap"), cluster.nodes))
    async with checking(real_config(cluster.nodes, region=region)) as checker:
        assert read_order(checker) == [address(named[name]) for name in order]


async def test_lagging_replica_is_excluded_until_it_catches_up(
    cluster: Cluster,
) -> None:
    us, eu, _ = cluster.nodes
    async with checking(real_config(cluster.nodes, max_replica_lag="500ms")) as checker:
        node = known(checker.topology.node(address(eu)))
        assert address(eu) in read_order(checker)
        eu.sql("SELECT pg_wal_replay_pause()")
        try:
            us.sql("INSERT INTO ticks VALUES (1)")
            assert await checker.wait_for(
                lambda: address(eu) not in read_order(checker), 5
            )
            assert node.lag_seconds is not None and node.lag_seconds > 0.5
            assert node.lag_bytes is not None and node.lag_bytes > 0
        finally:
            eu.sql("SELECT pg_wal_replay_resume()")
        assert await checker.wait_for(lambda: address(eu) in read_order(checker), 5)
        assert node.lag_seconds == 0


async def test_min_lsn_skips_replicas_that_have_not_replayed_it(
    cluster: Cluster,
) -> None:
    us, eu, ap = cluster.nodes
    async with checking(real_config(cluster.nodes, region="ap-southeast-1", max_replica_lag="1m")) as checker:
        ap.sql("SELECT pg_wal_replay_pause()")
        try:
            us.sql("INSERT INTO ticks VALUES (2)")
            lsn = parse_lsn(us.sql("SELECT pg_current_wal_lsn()::text")[0][0])
            eu_state = known(checker.topology.node(address(eu)))
            ap_state = known(checker.topology.node(address(ap)))
            assert await checker.wait_for(
                lambda: eu_state.wal_lsn >= lsn and ap_state.lag_bytes != 0, 5
            )
            assert read_order(checker, min_lsn=lsn) == [address(eu), address(us)]
            assert read_order(checker) == [address(ap), address(eu), address(us)]
        finally:
            ap.sql("SELECT pg_wal_replay_resume()")


async def test_ban_and_unban(cluster: Cluster) -> None:
    us, eu, ap = cluster.nodes
    async with checking(real_config(cluster.nodes)) as checker:
        topology = checker.topology
        changes: list[Change] = []
        topology.on_change(changes.append)
        assert topology.ban(address(eu)) and topology.ban(address(us))
        assert known(topology.node(address(eu))).state == "banned"
        assert topology.primary(SHARD) is None
        assert read_order(checker) == [address(ap)]
        assert topology.unban(address(eu)) and topology.unban(address(us))
        assert read_order(checker) == [address(us), address(eu), address(ap)]
        assert Change("state", SHARD, address(eu), "up", "banned") in changes
        assert Change("primary", SHARD, None, address(us), None) in changes
        assert not topology.ban("127.0.0.1:1")


async def test_killed_replica_is_down_after_failed_checks_and_up_after_restart(
    cluster: Cluster,
) -> None:
    _, _, ap = cluster.nodes
    # Slow polling: check_now, as the data path calls it, must make this fast.
    async with checking(real_config(cluster.nodes, interval="30s")) as checker:
        node = known(checker.topology.node(address(ap)))
        assert node.state == "up"
        ap.kill()
        checker.check_now(address(ap))
        assert await checker.wait_for(lambda: node.state == "down", 5)
        assert node.failures >= checker.fall
        assert address(ap) not in read_order(checker)
        ap.start()
        checker.check_now(address(ap))
        assert await checker.wait_for(lambda: node.state == "up", 5)
        assert node.role == "replica"


async def test_failover_to_a_promoted_replica(cluster: Cluster) -> None:
    us, eu, _ = cluster.nodes
    async with checking(real_config(cluster.nodes)) as checker:
        old = known(checker.topology.primary(SHARD))
        assert old.address == address(us)
        us.stop()
        assert await checker.wait_for_primary(SHARD, 0.5) is None
        eu.promote()
        new = known(await checker.wait_for_primary(SHARD, 10))
        assert new.address == address(eu)
        assert new.timeline > old.timeline and old.state == "down"
        # The old primary comes back on its old timeline: it stays out.
        us.start()
        assert await checker.wait_for(lambda: old.fenced, 5)
        assert checker.topology.primary(SHARD) is new
        assert address(us) not in read_order(checker)


async def test_split_brain_newest_timeline_wins(sandbox: Sandbox) -> None:
    brain = sandbox.cluster("health-split", replicas=1, regions=REGIONS[:2])
    old, promoted = brain.nodes
    async with checking(real_config(brain.nodes)) as checker:
        topology = checker.topology
        promoted.promote()  # while the old primary keeps running
        winner = address(promoted)
        assert await checker.wait_for(lambda: primary_address(topology) == winner, 5)
        loser = known(topology.node(address(old)))
        assert loser.role == "primary" and loser.state == "up" and loser.fenced
        assert known(topology.primary(SHARD)).timeline > loser.timeline
        assert read_order(checker) == [winner]


async def test_old_primary_back_on_its_old_timeline_gets_no_reads_until_rewound(sandbox: Sandbox) -> None:
    """A failed primary restarted as a standby before pg_rewind (as Patroni does) runs on the timeline it
    left, its LSN ahead of the new primary's. Checks with pg_monitor (admin) and without it (app) keep reads
    off it; rewound, it streams on the new timeline and serves reads again."""
    rejoin = sandbox.cluster("health-rejoin", replicas=1, regions=REGIONS[:2], settings=REWINDABLE)
    old, promoted = rejoin.nodes
    config = real_config(rejoin.nodes)

    async def kept_off(checker: HealthChecker) -> None:
        back = known(checker.topology.node(address(old)))
        assert await checker.wait_for(lambda: back.role == "replica" and back.state == "up", 10)
        assert back.timeline == 1 and back.wal_lsn > known(checker.topology.primary(SHARD)).wal_lsn
        assert not await checker.wait_for(lambda: address(old) in read_order(checker), 1)
        assert read_order(checker, min_lsn=back.wal_lsn) == [address(promoted)]

    async with checking(config, "admin", "adminpw") as monitor, checking(config) as plain:
        promoted.promote()
        old.sql("CREATE TABLE diverged AS SELECT generate_series(1, 10000) AS n")  # WAL the new primary lacks
        old.stop()
        old.start_as_standby(promoted)
        await kept_off(monitor)
        await kept_off(plain)
        old.stop()
        old.rewind(promoted)
        assert await monitor.wait_for(lambda: read_order(monitor) == [address(old), address(promoted)], 10)
        # Without pg_monitor a replica's timeline is its last restartpoint's: it reads again after one.
        old.sql("CHECKPOINT")
        assert await plain.wait_for(lambda: read_order(plain) == [address(old), address(promoted)], 10)
