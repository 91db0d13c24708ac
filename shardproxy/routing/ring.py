"""Consistent-hash ring that maps shard keys to shards.

The mapping is a public contract that anyone can reproduce:

* A key's canonical bytes: an int is its decimal text (``42``, ``-7``), a
  ``uuid.UUID`` its lowercase hyphenated text, a str its UTF-8 encoding and
  bytes are used as they are. Other types, including bool, are a TypeError.
* ``h = MurmurHash3_x86_32(canonical bytes, seed=0)`` as an unsigned 32-bit int.
* A shard ``s`` of weight ``w`` puts the points
  ``MurmurHash3_x86_32(f"{s.name}#{i}".encode())`` for
  ``i in range(virtual_nodes * w)`` on the ring.
* The key's owner is the shard of the first point ``>= h``, wrapping around to
  the first point; among equal points the lowest shard name wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from shardproxy._hash import HashRing, canonical_key, murmur3_32

__all__ = ["HASH_SPACE", "Ring", "canonical_key", "fraction_moved", "moves", "murmur3_32"]

HASH_SPACE = 1 << 32


class Ring(HashRing):
    """The compiled ring plus config loading and reporting helpers."""

    __slots__ = ()

    @classmethod
    def from_config(cls, config: Any) -> Ring:
        """Build from any object with `.sharding.virtual_nodes` and
        `.shards` (each with `.name` and `.weight`)."""
        shards = [(shard.name, shard.weight) for shard in config.shards]
        return cls(shards, config.sharding.virtual_nodes)

    def share(self, shard_name: str) -> float:
        """Fraction of the hash space that shard_name owns."""
        if shard_name not in self.names:
            raise KeyError(shard_name)
        owned = sum(
            length
            for end, length in _arcs(point for point, _ in self.points)
            if self.names[self.owner_of_hash(end)] == shard_name
        )
        return owned / HASH_SPACE


def fraction_moved(old: HashRing, new: HashRing) -> float:
    """Fraction of the hash space whose owner differs between two rings."""
    bounds = (point for ring in (old, new) for point, _ in ring.points)
    moved = sum(
        length
        for end, length in _arcs(bounds)
        if old.names[old.owner_of_hash(end)] != new.names[new.owner_of_hash(end)]
    )
    return moved / HASH_SPACE


def moves(old: HashRing, new: HashRing) -> set[tuple[str, str]]:
    """The (old owner, new owner) pairs of the keys whose owner differs between two rings."""
    bounds = (point for ring in (old, new) for point, _ in ring.points)
    pairs = ((old.names[old.owner_of_hash(end)], new.names[new.owner_of_hash(end)]) for end, _ in _arcs(bounds))
    return {(before, after) for before, after in pairs if before != after}


def _arcs(points: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Split the hash circle at points into arcs (previous point, end].

    Yields (end, length). No ring point lies strictly inside an arc, so every
    hash in it has the owner of `end` in each ring whose points were given.
    """
    bounds = sorted(set(points))
    previous = bounds[-1] - HASH_SPACE  # the first arc wraps around zero
    for end in bounds:
        yield end, end - previous
        previous = end
