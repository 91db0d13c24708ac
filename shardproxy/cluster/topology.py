"""The topology: shards, their nodes, and what health checks learned about them.

One object that the router and pools read and the health checker writes. It
does no I/O: observations come in through ``report`` / ``report_failure``,
and decisions (which node is the primary, which replicas may serve a read)
are pure functions of them.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from shardproxy.config import Config
from shardproxy.counters import Load

log = logging.getLogger(__name__)

Role = Literal["primary", "replica", "unknown"]
State = Literal["up", "down", "banned"]
ChangeKind = Literal["primary", "role", "state"]

# Enough primary LSN samples to compare a replica's answer with the primary as
# it was before that answer, even when a few checks overlap.
_SAMPLES = 16


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> its 64-bit position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """A 64-bit WAL position as PostgreSQL prints it."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class Probe:
    """What one successful health check saw on a node."""

    in_recovery: bool
    lsn: int  # current WAL LSN on a primary, last replayed LSN on a replica
    timeline: int
    replay_age: float | None  # seconds since the last replayed commit; replicas only
    sent: float  # monotonic time the query was sent
    received: float  # monotonic time the answer arrived
    at: float  # wall time, for display
    receiving: bool | None  # a replica's WAL receiver streams; None on a primary
    prepared_transactions: int | None = None  # max_prepared_transactions: 0 means no two-phase commit


@dataclass(frozen=True)
class Change:
    """A change the data path may react to.

    kind "primary": the shard's primary changed; old/new are addresses or None.
    kind "role" / "state": node ``address`` went from ``old`` to ``new``.
    """

    kind: ChangeKind
    shard: str
    address: str | None
    old: str | None
    new: str | None


Listener = Callable[[Change], None]


@dataclass(eq=False)  # nodes are compared by identity: each is one live record
class NodeState:
    shard: str
    host: str
    port: int
    region: str | None
    role: Role = "unknown"  # discovered by checks, never taken from the config
    healthy: bool = False  # down until a check succeeds
    banned: bool = False
    in_recovery: bool | None = None
    timeline: int = 0  # a primary's: the one it writes; a replica's: the newest it received or restarted on
    # A replica's checks have seen it stream no WAL since this monotonic time (the first such check's); None
    # while it streams, and on a primary.
    not_streaming_since: float | None = None
    follows: bool = True  # a replica followed the shard's primary at its last check (see _follows; for the log)
    wal_lsn: int = 0
    lag_bytes: int | None = None  # None: unknown, so not used for reads
    lag_seconds: float | None = None
    last_check: float | None = None  # wall time of the last check, failed or not
    probed_at: float | None = None  # monotonic time the last successful check was sent
    last_error: str | None = None  # why the last check failed; None once one succeeds
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    load: Load = field(default_factory=Load, init=False, repr=False)  # requests in flight, kept by the pools
    # Claims to be primary but another one leads the shard (a newer timeline,
    # or the same one and it led first): it gets no traffic.
    fenced: bool = False
    address: str = field(init=False)  # host:port, the node's name everywhere (made once: it is on the data path)

    def __post_init__(self) -> None:
        self.address = f"{self.host}:{self.port}"

    @property
    def state(self) -> State:
        if self.banned:
            return "banned"
        return "up" if self.healthy else "down"


class Topology:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = 0  # bumped on every Change
        self._shards: dict[str, list[NodeState]] = {}
        self._nodes: dict[str, NodeState] = {}
        self._leaders: dict[str, NodeState | None] = {}
        # The primary listeners were last told about, per shard.
        self._announced: dict[str, NodeState | None] = {}
        # (received, lsn) of the shard's elected primary, oldest first.
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        # The newest timeline a node claiming to be the shard's primary is on, down or not.
        self._timelines: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._readable_cache: dict[str, list[tuple[tuple[int, float, str], NodeState]]] = {}  # see _readable
        self._load(config)

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def shards(self) -> list[str]:
        return list(self._shards)

    def nodes(self, shard: str | None = None) -> list[NodeState]:
        if shard is None:
            return list(self._nodes.values())
        return list(self._shards.get(shard, ()))

    def node(self, address: str) -> NodeState | None:
        return self._nodes.get(address)

    def primary(self, shard: str) -> NodeState | None:
        """The shard's writable node: up, not banned, not fenced."""
        leader = self._leaders.get(shard)
        return leader if leader is not None and not leader.banned else None

    def read_candidates(self, shard: str, min_lsn: int | None = None) -> list[NodeState]:
        """Nodes for a read, best first (see _readable), by requests in flight within a rank. ``min_lsn``
        (read-your-writes) drops replicas that have not replayed it yet."""
        return [node for _, node in sorted(
            (((rank, node.load.outstanding), node) for rank, node in self._readable(shard)
             if min_lsn is None or node.wal_lsn >= min_lsn or node.role == "primary"), key=lambda ranked: ranked[0])]

    def read_node(self, shard: str, min_lsn: int | None, avoid: set[str]) -> NodeState | None:
        """The first of read_candidates() whose address is not in ``avoid``, found without building the list:
        this runs for every routed read."""
        best: NodeState | None = None
        best_rank = None
        for rank, node in self._readable(shard):
            if best is not None and rank != best_rank:
                break  # the rest rank worse
            if (min_lsn is None or node.wal_lsn >= min_lsn or node.role == "primary") and \
                    node.address not in avoid and (best is None or node.load.outstanding < best.load.outstanding):
                best, best_rank = node, rank
        return best

    def _readable(self, shard: str) -> list[tuple[tuple[int, float, str], NodeState]]:
        """The shard's nodes that may serve reads with their rank, best first: this region's replicas, this
        region's primary, the other regions' replicas by region priority, then the primary of another region.
        A replica serves while it is up, follows the primary and its lag is known and within the limit. Kept
        until the next check, ban or reload changes them."""
        readable = self._readable_cache.get(shard)
        if readable is None:
            max_lag = self.config.routing.max_replica_lag
            ranked = [(self._region_rank(node.region), node) for node in self._shards.get(shard, ())
                      if node.role == "replica" and node.state == "up" and self._follows(node)
                      and node.lag_seconds is not None and node.lag_seconds <= max_lag]
            primary = self.primary(shard)
            if primary is not None:
                here = self.config.region is not None and primary.region == self.config.region
                ranked.append(((0, 1, "") if here else (2, 0, ""), primary))
            readable = self._readable_cache[shard] = sorted(ranked, key=lambda ranked: ranked[0])
        return readable

    def _follows(self, node: NodeState) -> bool:
        """A replica holds the primary's history only on its timeline: a node on an older one may have
        diverged (an old primary restarted as a standby before pg_rewind), its LSNs on another history. And
        one that streams no WAL while the primary still answers checks falls behind. One that stopped
        streaming after the primary's last answer may have lost a primary that died (found down only after a
        few failed checks), and serves on, as replicas do while a shard has no primary."""
        if node.timeline < self._timelines.get(node.shard, 0):
            return False
        leader, since = self._leaders.get(node.shard), node.not_streaming_since
        return since is None or leader is None or (leader.probed_at or 0.0) < since

    def ban(self, address: str) -> bool:
        return self._set_banned(address, True)

    def unban(self, address: str) -> bool:
        return self._set_banned(address, False)

    def apply_config(self, config: Config) -> None:
        """Switch to a reloaded config; nodes that remain keep what checks learned."""
        self.config = config
        self._load(config)
        for shard in self._shards:
            self._refresh(shard)

    def report(self, address: str, probe: Probe, rise: int) -> None:
        """Record a successful check; the node is up after ``rise`` in a row.

        A node's first check ever brings it up at once: nothing was wrong
        with it, it just had not been seen yet.
        """
        node = self._nodes.get(address)
        if node is None:  # removed by a reload while it was being checked
            return
        self._readable_cache.clear()
        old_role, old_state = node.role, node.state
        node.role = "replica" if probe.in_recovery else "primary"
        node.in_recovery = probe.in_recovery
        node.timeline = probe.timeline
        if probe.receiving is False:
            node.not_streaming_since = node.not_streaming_since or probe.sent
        else:
            node.not_streaming_since = None
        node.wal_lsn = probe.lsn
        node.successes += 1
        node.failures = 0
        node.last_error = None
        if not node.healthy and (node.last_check is None or node.successes >= rise):
            node.healthy = True
        node.last_check = probe.at
        node.probed_at = probe.sent
        self._announce(node, old_role, old_state)
        if node.role == "replica":
            self._measure_lag(node, probe)
            self._note_following(node)
        elif node is self._leaders.get(node.shard):
            self._samples[node.shard].append((probe.received, probe.lsn))
            node.lag_bytes, node.lag_seconds = 0, 0.0
        else:
            node.lag_bytes, node.lag_seconds = None, None
        self._readable_cache.clear()  # listeners told of the changes above may have read it meanwhile

    def report_failure(self, address: str, at: float, fall: int, error: str) -> None:
        """Record a failed check and why it failed; the node is down after ``fall`` in a row."""
        node = self._nodes.get(address)
        if node is None:
            return
        self._readable_cache.clear()
        old_role, old_state = node.role, node.state
        node.last_check = at
        node.last_error = error
        node.failures += 1
        node.successes = 0
        if node.failures >= fall:
            node.healthy = False
        self._announce(node, old_role, old_state)

    def _load(self, config: Config) -> None:
        self._readable_cache.clear()
        previous = self._nodes
        self._shards, self._nodes = {}, {}
        for shard in config.shards:
            members = []
            for spec in shard.nodes:
                node = previous.get(spec.address)
                if node is None or node.shard != shard.name:
                    node = NodeState(shard.name, spec.host, spec.port, spec.region)
                node.region = spec.region
                members.append(node)
                self._nodes[node.address] = node
            self._shards[shard.name] = members
            self._samples.setdefault(shard.name, deque(maxlen=_SAMPLES))
        for gone in set(self._samples) - set(self._shards):
            del self._samples[gone]
            self._timelines.pop(gone, None)
            self._leaders.pop(gone, None)
            self._announced.pop(gone, None)

    def _set_banned(self, address: str, banned: bool) -> bool:
        node = self._nodes.get(address)
        if node is None:
            return False
        if node.banned != banned:
            self._readable_cache.clear()
            old = node.state
            node.banned = banned
            self._emit(Change("state", node.shard, address, old, node.state))
            self._refresh(node.shard)
        return True

    def _announce(self, node: NodeState, old_role: Role, old_state: State) -> None:
        """Emit what changed on ``node``, then re-elect its shard's primary."""
        if node.role != old_role:
            self._emit(Change("role", node.shard, node.address, old_role, node.role))
        if node.state != old_state:
            self._emit(Change("state", node.shard, node.address, old_state, node.state))
        self._refresh(node.shard)

    def _refresh(self, shard: str) -> None:
        """Re-elect the shard's primary and announce it if it changed."""
        before = self._announced.get(shard)
        self._elect(shard)
        self._readable_cache.clear()  # it ranks the primary too
        after = self._announced[shard] = self.primary(shard)
        if before is not after:
            old = before.address if before else None
            new = after.address if after else None
            self._emit(Change("primary", shard, new, old, new))

    def _elect(self, shard: str) -> None:
        """Among nodes claiming to be primary, only one on the newest timeline leads.

        The newest timeline counts nodes that are down too: a promoted node that
        crashed still proves the old primary is stale, so that one stays fenced.
        On a tie the current leader keeps its place, so traffic does not flap.
        """
        members = self._shards[shard]
        claimants = [node for node in members if node.role == "primary"]
        newest = self._timelines[shard] = max((node.timeline for node in claimants), default=0)
        live = [node for node in claimants if node.healthy and node.timeline == newest]
        current = self._leaders.get(shard)
        leader = current if current in live else next(iter(live), None)
        if leader is not None and leader is not current:
            # From now on replicas must catch up with this node's LSNs.
            self._samples[shard].clear()
        self._leaders[shard] = leader
        for node in members:
            fenced = node in claimants and node.healthy and node is not leader
            if fenced and not node.fenced:
                log.warning("%s fenced: another primary leads the shard", node.address)
            node.fenced = fenced

    def _measure_lag(self, node: NodeState, probe: Probe) -> None:
        """Replica lag against the primary LSNs known for the shard.

        A replica at or past the primary's LSN has lag 0: the age of its last
        replayed commit only means something while there is WAL it has not
        replayed, else an idle primary would make every replica look stale. The
        comparison uses the primary as seen before this check was sent, as a
        newer sample may have raced with the replica's answer.
        """
        samples = self._samples[node.shard]
        if node.timeline < self._timelines.get(node.shard, 0):  # its LSNs may be on another history
            node.lag_bytes, node.lag_seconds = None, None
            return
        if not samples:
            node.lag_bytes, node.lag_seconds = None, probe.replay_age
            return
        node.lag_bytes = max(0, samples[-1][1] - probe.lsn)
        earlier = [lsn for received, lsn in samples if received <= probe.sent]
        target = earlier[-1] if earlier else samples[-1][1]
        node.lag_seconds = 0.0 if probe.lsn >= target else probe.replay_age

    def _note_following(self, node: NodeState) -> None:
        """Log when a replica stops or starts following the primary: an up replica that gets no reads."""
        follows = self._follows(node)
        if follows == node.follows:
            return
        node.follows = follows
        if follows:
            log.info("%s follows the shard's primary again", node.address,
                     extra={"event": "replica_follows", "shard": node.shard, "node": node.address})
        elif node.timeline < self._timelines.get(node.shard, 0):
            log.warning("%s gets no reads: it is on timeline %d, the shard's primary on %d", node.address,
                        node.timeline, self._timelines[node.shard],
                        extra={"event": "replica_behind", "shard": node.shard, "node": node.address})
        else:
            log.warning("%s gets no reads: it receives no WAL while the shard's primary is up", node.address,
                        extra={"event": "replica_behind", "shard": node.shard, "node": node.address})

    def _region_rank(self, region: str | None) -> tuple[int, float, str]:
        """A replica's: this proxy's region first, then by priority (lower first), unknown last."""
        if region is not None and region == self.config.region:
            return (0, 0, region)
        known = self.config.regions.get(region) if region is not None else None
        return (1, known.priority if known else math.inf, region or "")

    def _emit(self, change: Change) -> None:
        self.version += 1
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # one broken listener must not stop health checks
                log.exception("topology listener failed on %s", change)
