"""Shared fixtures: one Sandbox per test session, its clusters and proxies shared by every test.

Tests that use the sandbox (real servers, a proxy process) are marked `e2e`, the others `unit`: `pytest -m unit`
runs the pure ones in seconds.
"""

from collections.abc import Iterator

import pytest

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox
from tests.support import APP_DB


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "sandbox" in getattr(item, "fixturenames", ()) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """One Sandbox for the whole session, so initdb runs only once."""
    with Sandbox() as box:
        yield box


@pytest.fixture(scope="session")
def pg(sandbox: Sandbox) -> Cluster:
    """A primary-only cluster shared by the whole session, with a database `appdb` owned by `app`."""
    cluster = sandbox.cluster("single")
    cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    return cluster


@pytest.fixture(scope="session")
def proxy(sandbox: Sandbox, pg: Cluster) -> ProxyProcess:
    """A transaction-pooling proxy in front of `pg`, with a pool smaller than most tests' client counts."""
    return sandbox.proxy("core", [pg], pool={"size": 4, "query_wait_timeout": "20s"})
