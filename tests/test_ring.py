"""The compiled ring against a plain-Python model of the routing contract."""

from __future__ import annotations

import random
import uuid
from bisect import bisect_left
from collections import Counter
from types import SimpleNamespace

import mmh3
import pytest

from shardproxy.routing.ring import HASH_SPACE, Ring, canonical_key, fraction_moved, murmur3_32
from shardproxy.routing.ring import moves as moving_pairs

Shards = list[tuple[str, int]]

SHARD_SETS: list[tuple[Shards, int]] = [
    ([("solo", 1)], 1),
    ([("shard-1", 1), ("shard-2", 1), ("shard-3", 1), ("shard-4", 1)], 256),
    ([("east", 1), ("west", 3), ("eu-1", 2)], 64),
    ([("shård-ü", 2), ("分片", 1), ("z", 5), ("A", 1)], 16),
]

# "shard-a#8291" and "shard-b#7111" hash to the same point (found offline by a
# birthday search over both names); the test re-checks it with mmh3.
TIE_POINT = 1500606573
TIE_SHARDS: Shards = [("shard-b", 7112), ("shard-a", 8292)]


def model_key(key: object) -> bytes:
    if isinstance(key, bool):
        raise TypeError("bool")
    if isinstance(key, (int, uuid.UUID)):
        return str(key).encode()
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return key
    raise TypeError(type(key).__name__)


class ModelRing:
    """The contract written plainly: mmh3 + bisect."""

    def __init__(self, shards: Shards, virtual_nodes: int) -> None:
        owner: dict[int, str] = {}
        for name, weight in shards:
            for i in range(virtual_nodes * weight):
                point = mmh3.hash(f"{name}#{i}".encode(), signed=False)
                if point not in owner or name < owner[point]:
                    owner[point] = name
        self.points = sorted(owner)
        self.owners = [owner[point] for point in self.points]

    def owner(self, key: object) -> str:
        h = mmh3.hash(model_key(key), signed=False)
        return self.owners[bisect_left(self.points, h) % len(self.points)]


def sample_keys(rng: random.Random, n: int) -> list[object]:
    """n keys of every supported type, weighted towards the tricky ones."""
    edges: list[object] = [0, -1, 1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1,
                           10**30, -(10**40), "", b"", "é", "🦀", b"\x00\xff"]
    chars = "abcXYZ09-_ éüß中文🦀\u0000\u07ff\uffff"
    makers = [
        lambda: rng.randrange(-(2**63), 2**63),
        lambda: rng.randrange(10**7),
        lambda: rng.randrange(-(2**100), 2**100),
        lambda: uuid.UUID(int=rng.getrandbits(128)),
        lambda: "".join(rng.choices(chars, k=rng.randrange(24))),
        lambda: rng.randbytes(rng.randrange(24)),
    ]
    return edges + [rng.choice(makers)() for _ in range(n)]


def test_murmur3_matches_mmh3() -> None:
    rng = random.Random(1)
    lengths = list(range(65)) * 40 + [100, 255, 256, 1000, 4097, 65537]
    for length in lengths:
        data = rng.randbytes(length)
        assert murmur3_32(data) == mmh3.hash(data, signed=False)
        seed = rng.getrandbits(32)
        assert murmur3_32(data, seed) == mmh3.hash(data, seed, signed=False)


def test_canonical_key() -> None:
    assert canonical_key(42) == b"42"
    assert canonical_key(-7) == b"-7"
    assert canonical_key(-(2**63)) == b"-9223372036854775808"
    assert canonical_key(2**64) == b"18446744073709551616"
    u = uuid.UUID("0123ABCD-0000-4000-8000-00000000FFFF")
    assert canonical_key(u) == b"0123abcd-0000-4000-8000-00000000ffff"
    assert canonical_key("zürich") == "zürich".encode()
    assert canonical_key(b"\x00raw") == b"\x00raw"
    for key in sample_keys(random.Random(2), 20_000):
        assert canonical_key(key) == model_key(key)


@pytest.mark.parametrize("key", [True, False, 1.5, None, bytearray(b"x"), ("a",)])
def test_unsupported_keys(key: object) -> None:
    ring = Ring([("a", 1)], 4)
    with pytest.raises(TypeError):
        ring.owner(key)


@pytest.mark.parametrize(("shards", "virtual_nodes"), SHARD_SETS)
def test_ring_matches_model(shards: Shards, virtual_nodes: int) -> None:
    ring, model = Ring(shards, virtual_nodes), ModelRing(shards, virtual_nodes)
    assert ring.names == tuple(name for name, _ in shards)
    assert ring.points == list(zip(model.points, model.owners))
    for key in sample_keys(random.Random(virtual_nodes), 60_000):
        owner = ring.owner(key)
        assert owner == model.owner(key), key
        assert ring.names[ring.owner_index(key)] == owner
    for h in (0, 1, model.points[0], model.points[-1], model.points[-1] + 1, HASH_SPACE - 1):
        expected = model.owners[bisect_left(model.points, h) % len(model.points)]
        assert ring.names[ring.owner_of_hash(h)] == expected


@pytest.mark.parametrize("shards", [TIE_SHARDS, TIE_SHARDS[::-1]])
def test_equal_points_go_to_lowest_name(shards: Shards) -> None:
    assert mmh3.hash(b"shard-a#8291", signed=False) == TIE_POINT
    assert mmh3.hash(b"shard-b#7111", signed=False) == TIE_POINT
    ring = Ring(shards, 1)
    assert ring.names[ring.owner_of_hash(TIE_POINT)] == "shard-a"
    assert (TIE_POINT, "shard-a") in ring.points
    assert (TIE_POINT, "shard-b") not in ring.points
    model = ModelRing(shards, 1)
    assert ring.points == list(zip(model.points, model.owners))


def test_balance() -> None:
    ring = Ring([(f"shard-{i}", 1) for i in range(1, 5)], 256)
    counts = Counter(map(ring.owner, range(1_000_000)))
    assert len(counts) == 4
    assert max(counts.values()) <= 1.10 * 1_000_000 / 4


def moves(old: Ring, new: Ring, keys: range) -> list[tuple[str, str]]:
    """(old owner, new owner) of every key whose owner changed."""
    pairs = zip(map(old.owner, keys), map(new.owner, keys))
    return [(a, b) for a, b in pairs if a != b]


KEYS = range(-100_000, 100_000)
FOUR = [("shard-1", 1), ("shard-2", 1), ("shard-3", 1), ("shard-4", 1)]


def test_adding_a_shard_moves_keys_only_to_it() -> None:
    old, new = Ring(FOUR, 256), Ring(FOUR + [("shard-5", 1)], 256)
    moved = moves(old, new, KEYS)
    assert {b for _, b in moved} == {"shard-5"}
    assert len(moved) / len(KEYS) == pytest.approx(1 / 5, abs=0.03)
    assert fraction_moved(old, new) == pytest.approx(new.share("shard-5"))
    assert fraction_moved(old, new) == pytest.approx(len(moved) / len(KEYS), abs=0.01)


def test_removing_a_shard_moves_only_its_keys() -> None:
    old, new = Ring(FOUR, 256), Ring(FOUR[1:], 256)
    moved = moves(old, new, KEYS)
    assert {a for a, _ in moved} == {"shard-1"}
    assert len(moved) == sum(1 for key in KEYS if old.owner(key) == "shard-1")
    assert fraction_moved(old, new) == pytest.approx(old.share("shard-1"))


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (3, 5)])
def test_weight_change_moves_keys_only_to_or_from_that_shard(before: int, after: int) -> None:
    def ring(weight: int) -> Ring:
        return Ring(FOUR[:3] + [("shard-4", weight)], 256)

    moved = moves(ring(before), ring(after), KEYS)
    assert moved
    side = 1 if after > before else 0
    assert {pair[side] for pair in moved} == {"shard-4"}


@pytest.mark.parametrize("after", [FOUR + [("shard-5", 1)], FOUR[1:], FOUR[:3] + [("shard-4", 3)], FOUR])
def test_moving_pairs_are_the_shards_sampled_keys_move_between(after: list[tuple[str, int]]) -> None:
    old, new = Ring(FOUR, 256), Ring(after, 256)
    assert moving_pairs(old, new) == set(moves(old, new, KEYS))


def test_shares() -> None:
    ring = Ring([("a", 1), ("b", 3)], 128)
    shares = {name: ring.share(name) for name in ring.names}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    counts = Counter(map(ring.owner, KEYS))
    for name, share in shares.items():
        assert counts[name] / len(KEYS) == pytest.approx(share, abs=0.01)
    assert Ring([("solo", 1)], 1).share("solo") == 1.0
    assert fraction_moved(ring, ring) == 0.0
    with pytest.raises(KeyError):
        ring.share("missing")


def test_from_config() -> None:
    config = SimpleNamespace(
        sharding=SimpleNamespace(virtual_nodes=32),
        shards=[SimpleNamespace(name="east", weight=1), SimpleNamespace(name="west", weight=2)],
    )
    ring = Ring.from_config(config)
    assert isinstance(ring, Ring)
    assert ring.names == ("east", "west")
    assert ring.points == Ring([("east", 1), ("west", 2)], 32).points
    assert len(ring.points) == 96


@pytest.mark.parametrize(
    ("shards", "virtual_nodes"),
    [([], 8), ([("a", 1), ("a", 2)], 8), ([("a", 1)], 0), ([("a", -1)], 8), ([("a", 0)], 8)],
)
def test_invalid_rings(shards: Shards, virtual_nodes: int) -> None:
    with pytest.raises(ValueError):
        Ring(shards, virtual_nodes)


def test_owner_of_hash_range() -> None:
    ring = Ring([("a", 1)], 8)
    assert ring.owner_of_hash(HASH_SPACE - 1) == 0
    for h in (-1, HASH_SPACE):
        with pytest.raises(OverflowError):
            ring.owner_of_hash(h)
