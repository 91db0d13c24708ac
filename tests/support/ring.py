"""The contract's ring, written out plainly from its published rules (an oracle, independent of the proxy's own)."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import mmh3


@functools.cache
def ring_points(names: tuple[str, ...], virtual_nodes: int = 256) -> list[tuple[int, str]]:
    """Every shard's points (weight 1), sorted; equal points keep the lower name first."""
    return sorted((mmh3.hash(f"{name}#{i}".encode(), signed=False), name)
                  for name in names for i in range(virtual_nodes))


def owner(key: object, names: Sequence[str]) -> str:
    """The shard that owns key: the first point >= the key's hash (lower name first on ties), wrapping."""
    points = ring_points(tuple(names))
    h = mmh3.hash(str(key).encode(), signed=False)  # ints as decimal text, UUIDs lowercase hyphenated
    i = bisect.bisect_left(points, (h, ""))
    return points[i % len(points)][1]
