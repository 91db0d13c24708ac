"""Lookups per second: compiled ring vs a plain-Python ring (mmh3 + bisect).

Run: python bench/bench_ring.py
"""

from __future__ import annotations

import random
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable

import mmh3

from shardproxy.routing.ring import Ring

SHARDS = [(f"shard-{i}", 1) for i in range(1, 9)]
VIRTUAL_NODES = 256
N_KEYS = 200_000
ROUNDS = 5


class PythonRing:
    """The same contract in plain Python, as a baseline."""

    def __init__(self, shards: list[tuple[str, int]], virtual_nodes: int) -> None:
        owner: dict[int, str] = {}
        for name, weight in shards:
            for i in range(virtual_nodes * weight):
                point = mmh3.hash(f"{name}#{i}".encode(), signed=False)
                if point not in owner or name < owner[point]:
                    owner[point] = name
        self.points = sorted(owner)
        self.owners = [owner[point] for point in self.points]

    def owner(self, key: object) -> str:
        if isinstance(key, str):
            data = key.encode()
        elif isinstance(key, bytes):
            data = key
        else:
            data = str(key).encode()
        i = bisect_left(self.points, mmh3.hash(data, signed=False))
        return self.owners[i % len(self.points)]


def lookups_per_second(owner: Callable[[object], str], keys: list[object]) -> float:
    """Best of ROUNDS passes, to damp scheduler noise."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for key in keys:
            owner(key)
        best = min(best, time.perf_counter() - start)
    return len(keys) / best


def measure(n_keys: int = N_KEYS) -> dict[str, tuple[float, float]]:
    """Lookups/s per key type: (compiled, python)."""
    rng = random.Random(0)
    key_sets: dict[str, list[object]] = {
        "int (int64)": [rng.randrange(-(2**63), 2**63) for _ in range(n_keys)],
        "int (< 10^7)": [rng.randrange(10**7) for _ in range(n_keys)],
        "str": [f"user-{rng.getrandbits(40):x}@example.org" for _ in range(n_keys)],
        "uuid": [uuid.UUID(int=rng.getrandbits(128)) for _ in range(n_keys)],
    }
    compiled, python = Ring(SHARDS, VIRTUAL_NODES), PythonRing(SHARDS, VIRTUAL_NODES)
    return {name: (lookups_per_second(compiled.owner, keys), lookups_per_second(python.owner, keys))
            for name, keys in key_sets.items()}


def main() -> None:
    print(f"{len(SHARDS)} shards x {VIRTUAL_NODES} virtual nodes, {N_KEYS} keys, best of {ROUNDS}")
    print(f"{'keys':<14}{'compiled/s':>14}{'python/s':>14}{'speedup':>10}")
    for name, (fast, slow) in measure().items():
        print(f"{name:<14}{fast:>14,.0f}{slow:>14,.0f}{fast / slow:>9.1f}x")


if __name__ == "__main__":
    main()
