"""Tests' way to a proxy's admin socket, and to waiting on what it reports."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from shardproxy.admin import request
from shardproxy.sandbox import ProxyProcess


def admin(proxy: ProxyProcess, command: str) -> dict[str, Any]:
    return json.loads(request(proxy.admin_socket, command, timeout=30))


def table(proxy: ProxyProcess, command: str) -> list[dict[str, Any]]:
    """An ok reply's rows as dicts by column."""
    reply = admin(proxy, command)
    assert reply["ok"], reply
    return [dict(zip(reply["columns"], row)) for row in reply["rows"]]


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
