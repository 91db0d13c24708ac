"""Microseconds per call of the query router: planning (cached and uncached) and routing.

Run: python bench/bench_router.py

"Uncached" plans a text the router has not seen (a fresh column name each call); "cached" repeats
texts whose plan is in the cache. For the simple protocol, cached texts still differ in their literal
values, so each call pays for the normalisation that finds the shared template ("simple normalise"
alone, on texts made beforehand; the other simple lines include formatting the text).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shardproxy.config import parse_config
from shardproxy.routing._literals import normalise
from shardproxy.routing.keys import number
from shardproxy.routing.router import Router

CONFIG = """\
sharding: {key: user_id, reference_tables: [countries]}
shards:
  - {name: shard0, nodes: [{host: db0, port: 5432}]}
  - {name: shard1, nodes: [{host: db1, port: 5432}]}
  - {name: shard2, nodes: [{host: db2, port: 5432}]}
  - {name: shard3, nodes: [{host: db3, port: 5432}]}
users: [{name: app, password: secret}]
"""

# {c} varies the text for uncached runs; {k} is the key for simple-protocol runs.
KEYED = (
    "SELECT o.id, o.total, o.{c} FROM orders o JOIN items i ON i.order_id = o.id "
    "WHERE o.user_id = {k} AND o.status = 'open' ORDER BY o.created DESC LIMIT 20"
)
UPDATE = "UPDATE orders SET total = total + 1, {c} = 'x' WHERE user_id = {k} AND id = 17"
SCATTER = "SELECT {c}, count(*) FROM orders WHERE status = 'open' GROUP BY {c} ORDER BY count(*) DESC LIMIT 10"
N = 3000
ROUNDS = 5


def micros(call: Callable[[int], object]) -> float:
    """Best of ROUNDS runs of N calls, in µs per call (the best damps scheduler noise)."""
    best = float("inf")
    for round_ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(N):
            call(round_ * N + i)
        best = min(best, time.perf_counter() - start)
    return best / N * 1e6


def measure(router: Router, query: str) -> dict[str, float]:
    """µs per call for one query shape, keyed "extended uncached plan", "simple plan + route", ..."""
    param_text = query.replace("{k}", "$1")
    cached = param_text.format(c="note")
    router.plan(cached)
    plan = router.plan(cached)

    def simple_cached(i: int) -> object:
        return router.plan_simple(query.format(c="note", k=i))

    def plan_and_route(i: int) -> object:
        plan, literals = router.plan_simple(query.format(c="note", k=i))
        return router.route(plan, literals)

    texts = [query.format(c="note", k=i) for i in range(N * ROUNDS)]

    return {
        "extended uncached plan": micros(lambda i: router.plan(param_text.format(c=f"c{i}"))),
        "extended cached plan": micros(lambda i: router.plan(cached)),
        "extended route": micros(lambda i: router.route(plan, params=[i])),
        "simple uncached plan": micros(lambda i: router.plan_simple(query.format(c=f"s{i}", k=i))),
        "simple normalise": micros(lambda i: normalise(texts[i], number)),
        "simple cached plan": micros(simple_cached),
        "simple plan + route": micros(plan_and_route),
    }


QUERIES = {"select": KEYED, "update": UPDATE, "scatter": SCATTER}


def make_router() -> Router:
    return Router(parse_config(CONFIG), cache_size=4 * N * ROUNDS)


def main() -> None:
    router = make_router()
    for name, query in QUERIES.items():
        for what, value in measure(router, query).items():
            print(f"{name:8} {what:24} {value:8.1f} µs")


if __name__ == "__main__":
    main()
