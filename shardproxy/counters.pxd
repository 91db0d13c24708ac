# Declarations of the data path's counters, so that the compiled data path (datapath/_core.pyx) bumps them with
# C calls. Plain numbers; ops/metrics.py turns them into Prometheus series at scrape time.

cdef enum:
    _KINDS = 4  # len(QUERY_KINDS)
    _BUCKETS = 16  # len(DURATION_BUCKETS)


cdef class Spread:
    cdef double _bounds[_BUCKETS]
    cdef long long _counts[_BUCKETS + 1]
    cdef public double sum

    cpdef observe(self, double value)


cdef class Tally:
    cdef long long _queries[_KINDS]
    cdef public Spread duration, wait


cdef class PoolStats:
    cdef public long long assignments, transactions
    cdef public double transaction_time, wait_time
    cdef object _tally_of, _shard, _node, _role
    cdef int _kind
    cdef Tally _tally

    cdef _set_role(self, role)
    cdef Tally tally(self)
    cdef assigned(self, double waited)
    cdef transaction(self, double seconds, object kind, int statements)


cdef class Load:
    cdef public long outstanding
