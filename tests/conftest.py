"""Shared fixtures: one Sandbox per test session, its clusters and proxies shared by every test."""

from collections.abc import Iterator

import pytest

from shardproxy.sandbox import Cluster, ProxyProcess, Sandbox

APP_DB = "appdb"  # owned by the `app` user, so tests can create tables in it


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
