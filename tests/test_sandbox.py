"""The sandbox starts, replicates, fails over and cleans up real servers."""

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psycopg
import pytest

from shardproxy.devtools.sandbox import Cluster, Sandbox, SandboxError, demo_topology

pytestmark = pytest.mark.e2e  # against servers and proxies the test starts itself

REPO_ROOT = Path(__file__).resolve().parents[1]


def processes_under(base_dir: str) -> list[int]:
    """PIDs of live processes working inside base_dir (every server process does)."""
    pids = []
    for entry in os.listdir("/proc"):
        with suppress(OSError, ValueError):
            if os.readlink(f"/proc/{entry}/cwd").startswith(base_dir + "/"):
                pids.append(int(entry))
    return pids


def wait_gone(base_dir: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while processes_under(base_dir) or os.path.exists(base_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def replicated(sandbox: Sandbox) -> Cluster:
    return sandbox.cluster("replicated", replicas=2, regions=["us", "eu", "ap"])


def test_replicas_stream_and_replay(replicated: Cluster) -> None:
    primary = replicated.primary
    streaming = primary.sql("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
    assert sorted(row[0] for row in streaming) == [node.name for node in replicated.replicas]
    assert [node.region for node in replicated.nodes] == ["us", "eu", "ap"]

    primary.sql("CREATE TABLE seen (id int); INSERT INTO seen VALUES (1), (2)")
    replicated.wait_replicas_caught_up()
    for replica in replicated.replicas:
        assert replica.sql("SELECT id FROM seen ORDER BY id") == [(1,), (2,)]
        assert replica.sql("SELECT pg_is_in_recovery()") == [(True,)]
    assert primary.sql("SELECT pg_is_in_recovery()") == [(False,)]


@pytest.mark.parametrize(
    ("user", "password", "hash_prefix"),
    [("app", "secret", "SCRAM-SHA-256$"), ("md5user", "md5secret", "md5")],
)
def test_users_log_in_with_their_method(pg: Cluster, user: str, password: str, hash_prefix: str) -> None:
    node = pg.primary
    with psycopg.connect(node.dsn(user, password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(node.dsn(user, "wrong"))
    stored = node.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'")
    assert stored[0][0].startswith(hash_prefix)


def test_promote(sandbox: Sandbox) -> None:
    cluster = sandbox.cluster("promo", replicas=1)
    replica = cluster.replicas[0]
    replica.promote()
    assert replica.sql("SELECT pg_is_in_recovery()") == [(False,)]
    replica.sql("CREATE TABLE written_after_promote (id int)")


def test_kill_then_start_again(sandbox: Sandbox) -> None:
    node = sandbox.cluster("crash").primary
    node.kill()
    assert not node.is_running()
    node.start()
    assert node.sql("SELECT 1") == [(1,)]
    assert "not properly shut down" in node.log()


def test_failed_start_reports_the_server_log(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match="invalid value for parameter"):
        sandbox.cluster("broken", settings={"shared_buffers": "'plenty'"})


def test_free_ports_are_unique(sandbox: Sandbox) -> None:
    ports = [sandbox.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)


def test_demo_topology(sandbox: Sandbox) -> None:
    regions = ("us-east-1", "eu-central-1", "ap-southeast-1")
    clusters = demo_topology(sandbox, shards=2, regions=regions)
    assert [cluster.name for cluster in clusters] == ["shard0", "shard1"]
    for cluster in clusters:
        assert tuple(node.region for node in cluster.nodes) == regions


def test_close_stops_servers_and_removes_dir() -> None:
    box = Sandbox()
    box.cluster("doomed", replicas=1)
    assert processes_under(box.base_dir)
    box.close()
    assert not processes_under(box.base_dir)
    assert not os.path.exists(box.base_dir)
    box.close()


CHILD = """
import time
from shardproxy.devtools.sandbox import Sandbox

sandbox = Sandbox()
sandbox.cluster("orphaned", replicas=1)
print(sandbox.base_dir, flush=True)
time.sleep(120)
"""


def test_watchdog_cleans_up_after_sigkill() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    base_dir = child.stdout.readline().strip() if child.stdout else ""
    assert base_dir and processes_under(base_dir)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert wait_gone(base_dir), f"left behind: {processes_under(base_dir)}"
