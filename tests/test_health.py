"""Topology decisions, and health checks against real primaries and replicas.

The real-server tests share one cluster, a primary in us-east-1 with replicas
in eu-central-1 and ap-southeast-1; the test that fails it over runs last.
Split brain gets its own small cluster.
"""

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
from shardproxy.devtools.sandbox import Cluster, Node, Sandbox

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
async def checking(config: Config) -> AsyncIterator[HealthChecker]:
    checker = HealthChecker(Topology(config), config, "app", "secret")
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
) -> None:
    """What the checker does after a successful check of 127.0.0.1:port."""
    probe = Probe(in_recovery, lsn, timeline, replay_age, sent=at, received=at, at=at)
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
    ("us-east-1", ("eu", "ap", "us")),
    ("eu-central-1", ("eu", "ap", "us")),
    ("ap-southeast-1", ("ap", "eu", "us")),
])  # fmt: skip
async def test_reads_prefer_own_region_then_priority_then_primary(
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
    async with checking(real_config(cluster.nodes, max_replica_lag="1m")) as checker:
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
            assert read_order(checker) == [address(eu), address(ap), address(us)]
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
        assert read_order(checker) == [address(eu), address(ap), address(us)]
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
