from collections.abc import Callable
from typing import Any

DURATION_BUCKETS: tuple[float, ...]
QUERY_KINDS: tuple[str, ...]

class Spread:
    sum: float
    @property
    def counts(self) -> list[int]: ...
    def observe(self, value: float) -> None: ...

class Tally:
    duration: Spread
    wait: Spread
    def __init__(self, **queries: int) -> None: ...
    @property
    def queries(self) -> dict[str, int]: ...

class PoolStats:
    assignments: int
    transactions: int
    transaction_time: float
    wait_time: float
    def __init__(self, tally_of: Callable[[str, str], Tally], shard: str, node: Any) -> None: ...

class Load:
    outstanding: int
