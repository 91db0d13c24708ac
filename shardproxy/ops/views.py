"""Views of the proxy's state that the admin console and the metrics both show."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shardproxy.cluster.topology import Topology
from shardproxy.config import Config


class Linked(Protocol):
    """A client, as far as its state shows: linked to a server connection, queued for one, or idle."""

    server: object | None
    wait_started: float


@dataclass(frozen=True)
class NodeView:
    shard: str
    host: str
    port: int
    region: str | None
    role: str
    state: str
    lag_bytes: int | None
    lag_seconds: float | None
    last_check: float | None  # wall time
    last_error: str | None  # why the last check failed, if it did

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def node_views(topology: Topology) -> list[NodeView]:
    """Every node, as health checks see it."""
    return [NodeView(n.shard, n.host, n.port, n.region, n.role, n.state, n.lag_bytes, n.lag_seconds, n.last_check,
                     n.last_error) for n in topology.nodes()]


def role_of(topology: Topology, address: str) -> str:
    node = topology.node(address)
    return node.role if node is not None else "unknown"


def shard_of(config: Config) -> dict[str, str]:
    """Node address -> the name of the shard it belongs to."""
    return {node.address: shard.name for shard in config.shards for node in shard.nodes}


def client_state(client: Linked) -> str:
    if client.server is not None:
        return "active"
    return "waiting" if client.wait_started else "idle"
