"""A least-recently-used cache bounded by its count of entries and by the size of their keys.

What clients can make the proxy remember (statement texts, and the plans made of them) is bounded in bytes too:
a count alone lets a client that sends huge texts grow the proxy by the count times the texts' size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SizedLru(Generic[K, V]):
    """Entries by key, the least recently used first out past `max_entries` entries or `max_bytes` of key sizes
    (as `size` measures them). Either limit may change; the next entry made brings the cache within them."""

    def __init__(self, max_entries: int, max_bytes: int, size: Callable[[K], int]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, make: Callable[[K], V]) -> V:
        """The entry of `key`, made by make(key) on a miss and kept as the most recent."""
        try:
            value = self._entries[key]
        except KeyError:
            value = self._entries[key] = make(key)
            self.bytes += self._size(key)
            self._trim()
            return value
        self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The entry of `key`, if kept, without making it the most recent."""
        return self._entries.get(key)

    def discard(self, key: K) -> None:
        """Forget the entry of `key`, if kept."""
        if self._entries.pop(key, None) is not None:
            self.bytes -= self._size(key)

    def _trim(self) -> None:
        entries = self._entries
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            key, _ = entries.popitem(last=False)
            self.bytes -= self._size(key)

    def __len__(self) -> int:
        return len(self._entries)
