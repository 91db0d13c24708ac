# cython: language_level=3
"""The data path's counters: plain numbers that the compiled data path bumps without locks or label lookups, and
that ops/metrics.py turns into Prometheus series (and SHOW STATS into rows) when they are read. A leaf: it imports
nothing of the package, so every layer may use it."""

DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)
QUERY_KINDS = ("read", "write", "ddl", "scatter")
_KIND_INDEX = {kind: i for i, kind in enumerate(QUERY_KINDS)}


cdef class Spread:
    """A histogram of DURATION_BUCKETS as plain numbers: observations per bucket (the last one past every
    bound) and their sum."""

    def __cinit__(self):
        for i, bound in enumerate(DURATION_BUCKETS):
            self._bounds[i] = bound

    @property
    def counts(self) -> list:
        return [self._counts[i] for i in range(_BUCKETS + 1)]

    cpdef observe(self, double value):
        cdef int i = 0
        while i < _BUCKETS and self._bounds[i] < value:  # the first bound >= value: Prometheus' "le"
            i += 1
        self._counts[i] += 1
        self.sum += value


cdef class Tally:
    """The events of one (shard, role): plain numbers that the data path bumps and a scrape reads."""

    def __init__(self, **queries: int):
        """queries: counts to start from, by kind (a test's)."""
        for kind, count in queries.items():
            self._queries[_KIND_INDEX[kind]] = count
        self.duration = Spread()  # how long a client held a server connection
        self.wait = Spread()  # how long a client queued for one

    @property
    def queries(self) -> dict:
        """Statements by kind (QUERY_KINDS)."""
        return {kind: self._queries[i] for i, kind in enumerate(QUERY_KINDS)}


cdef class PoolStats:
    """One pool's counters for SHOW STATS, and the tally of its node's current role for Prometheus."""

    def __init__(self, tally_of, shard: str, node):
        """tally_of(shard, role): the Tally of that shard and role (made on first use)."""
        self._tally_of = tally_of
        self._shard = shard
        self._node = node
        self._tally = tally_of(shard, node.role)  # the pool's series exist from its creation
        self._set_role(node.role)

    cdef _set_role(self, role):
        self._role = role
        self._kind = _KIND_INDEX["read" if role == "replica" else "write"]

    cdef Tally tally(self):
        """The tally of the node's role now: a failover changes it."""
        role = self._node.role
        if role is not self._role and role != self._role:
            self._set_role(role)
            self._tally = self._tally_of(self._shard, role)
        return self._tally

    cdef assigned(self, double waited):
        self.assignments += 1
        if waited:  # only clients that queued are observed: compare the count with hand-outs for the share
            self.wait_time += waited
            self.tally().wait.observe(waited)

    cdef transaction(self, double seconds, object kind, int statements):
        """A transaction of `statements` statements ended. They count as queries of its kind: a shard's part of a
        statement on every shard (scatter, ddl, write) says so; any other is a read on a replica, else a write."""
        cdef Tally tally = self.tally()
        self.transactions += 1
        self.transaction_time += seconds
        tally._queries[self._kind if kind is None else <int>_KIND_INDEX[kind]] += statements
        tally.duration.observe(seconds)


cdef class Load:
    """A node's requests in flight, over all its pools: kept by hand-outs and give-backs, read to choose
    among replicas (see Topology.read_node)."""
