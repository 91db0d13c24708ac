"""Changing the shards of a running cluster: RELOAD refuses a change of key ownership, RELOAD FORCE applies it.

Three primary-only clusters shared by the module: the proxies route over the first two, and the file adds the third.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from shardproxy.devtools.sandbox import Cluster, ProxyProcess, Sandbox, wait_until
from shardproxy.routing.ring import Ring, fraction_moved
from tests.support.admin import admin, table

ITEMS = "rs_items"  # sharded: its primary key includes user_id
MORE = "rs_more"  # sharded too, copied after ITEMS (the fault tests stall the copy on it)
PLANS = "rs_plans"  # a reference table
RESHARDER = {"name": "resharder", "password": "reshardpw", "auth": "scram-sha-256"}
PRELOADED_KEYS = range(1, 601)
ROWS_PER_KEY = 4


@pytest.fixture(scope="module")
def clusters(sandbox: Sandbox) -> list[Cluster]:
    found = [sandbox.cluster(f"rs{i}") for i in range(3)]
    for cluster in found:
        cluster.primary.sql("CREATE ROLE resharder LOGIN SUPERUSER PASSWORD 'reshardpw'")
    return found


def rings(clusters: list[Cluster]) -> tuple[Ring, Ring]:
    return Ring([(c.name, 1) for c in clusters[:2]], 256), Ring([(c.name, 1) for c in clusters], 256)


def shard_config(clusters: list[Cluster]) -> list[dict[str, Any]]:
    return [{"name": c.name, "nodes": [{"host": c.primary.host, "port": c.primary.port}]} for c in clusters]


def start_proxy(sandbox: Sandbox, name: str, clusters: list[Cluster], **sections: Any) -> ProxyProcess:
    proxy = sandbox.proxy(name, clusters[:2], start=False, admin_users=["admin"],
                          sharding={"reference_tables": [PLANS]}, **sections)
    config = proxy.config
    config["users"] = [*config["users"], RESHARDER]
    config.setdefault("reshard", {})["user"] = "resharder"
    proxy.write_config(config)
    proxy.start()
    return proxy


def add_third_shard(proxy: ProxyProcess, clusters: list[Cluster]) -> None:
    proxy.write_config({**proxy.config, "shards": shard_config(clusters)})


def owner_on(proxy: ProxyProcess, key: int) -> str:
    return table(proxy, f"ROUTE {key}")[0]["shard"]


# -- RELOAD ----------------------------------------------------------------------------------------------------
def test_reload_refuses_new_owners_and_reload_force_applies_them(sandbox: Sandbox, clusters: list[Cluster]) -> None:
    proxy = start_proxy(sandbox, "rs-reload", clusters)
    old, new = rings(clusters)
    moving = next(key for key in range(1000) if old.owner(key) != new.owner(key))
    try:
        add_third_shard(proxy, clusters)
        reply = admin(proxy, "RELOAD")
        assert not reply["ok"]
        assert "RESHARD" in reply["error"] and "RELOAD FORCE" in reply["error"]
        assert f"{fraction_moved(old, new):.2%}" in reply["error"]
        proxy.signal(signal.SIGHUP)  # refused the same way
        assert wait_until(lambda: proxy.log().count("reload rejected") == 2)
        assert owner_on(proxy, moving) == old.owner(moving)
        [reply] = table(proxy, "RELOAD FORCE")
        assert reply["fraction_moved"] == pytest.approx(fraction_moved(old, new), abs=1e-6)
        assert owner_on(proxy, moving) == new.owner(moving)
        assert admin(proxy, "RELOAD SOFTLY")["error"] == "usage: RELOAD [FORCE]"
    finally:
        proxy.stop()
