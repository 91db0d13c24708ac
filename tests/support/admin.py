"""A proxy's admin socket, as the tests ask it."""

from __future__ import annotations

import json
from typing import Any

from shardproxy.devtools.sandbox import ProxyProcess
from shardproxy.ops.admin.socket import request


def admin(proxy: ProxyProcess, command: str) -> dict[str, Any]:
    return json.loads(request(proxy.admin_socket, command, timeout=30))


def table(proxy: ProxyProcess, command: str) -> list[dict[str, Any]]:
    """An ok reply's rows as dicts by column."""
    reply = admin(proxy, command)
    assert reply["ok"], reply
    return [dict(zip(reply["columns"], row)) for row in reply["rows"]]


def nodes_seen(proxy: ProxyProcess) -> dict[int, dict[str, Any]]:
    """SHOW NODES by port."""
    return {int(row["port"]): row for row in table(proxy, "SHOW NODES")}
