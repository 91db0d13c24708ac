"""Shared fixtures."""

from collections.abc import Iterator

import pytest

from shardproxy.sandbox import Cluster, Sandbox


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """One Sandbox for the whole session, so initdb runs only once."""
    with Sandbox() as box:
        yield box


@pytest.fixture(scope="session")
def pg(sandbox: Sandbox) -> Cluster:
    """A primary-only cluster shared by the whole session."""
    return sandbox.cluster("single")
