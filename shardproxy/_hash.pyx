# cython: boundscheck=False, wraparound=False, cdivision=True
"""Compiled consistent-hash ring (the routing contract lives in ring.py)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport qsort

import uuid


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    long long PyLong_AsLongLongAndOverflow(object v, int* overflow) except? -1


cdef type _UUID = uuid.UUID
cdef const char* _HEX = b"0123456789abcdef"


cdef Py_ssize_t _format_u64(uint64_t v, char* out) noexcept nogil:
    """Write v in decimal at out and return the length."""
    cdef char digits[20]
    cdef Py_ssize_t n = 0
    cdef Py_ssize_t i
    while True:
        digits[n] = c'0' + <char>(v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        out[i] = digits[n - 1 - i]
    return n


cdef Py_ssize_t _format_int64(object key, char* buf) except -2:
    """Decimal text of an int into buf; -1 if it does not fit int64."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(key, &overflow)
    if overflow:
        return -1
    if v < 0:
        buf[0] = c'-'
        return 1 + _format_u64(~(<uint64_t>v) + 1, buf + 1)
    return _format_u64(<uint64_t>v, buf)


cdef Py_ssize_t _format_uuid(object key, char* buf) except -1:
    """Lowercase hyphenated text of a UUID (8-4-4-4-12 hex digits) into buf."""
    cdef bytes raw = key.int.to_bytes(16, "big")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t i, j = 0
    for i in range(16):
        if i == 4 or i == 6 or i == 8 or i == 10:
            buf[j] = c'-'
            j += 1
        buf[j] = _HEX[p[i] >> 4]
        buf[j + 1] = _HEX[p[i] & 15]
        j += 2
    return j


cdef object key_bytes(object key, char* buf, const unsigned char** data,
                      Py_ssize_t* n):
    """Point *data, *n at the canonical bytes of key.

    The bytes live either in buf (KEY_BUF_SIZE bytes; int64 and UUID keys)
    or in the returned object, which the caller keeps alive while reading.
    """
    if isinstance(key, int):
        if isinstance(key, bool):
            raise TypeError("bool is not a shard key")
        n[0] = _format_int64(key, buf)
        if n[0] >= 0:
            data[0] = <const unsigned char*>buf
            return None
        key = b"%d" % key  # rare: a temporary bytes object is fine
    elif isinstance(key, str):
        data[0] = <const unsigned char*>PyUnicode_AsUTF8AndSize(key, n)
        return key
    elif isinstance(key, _UUID):
        n[0] = _format_uuid(key, buf)
        data[0] = <const unsigned char*>buf
        return None
    elif not isinstance(key, bytes):
        raise TypeError(f"unsupported shard key type: {type(key).__name__}")
    data[0] = <const unsigned char*>PyBytes_AS_STRING(key)
    n[0] = PyBytes_GET_SIZE(key)
    return key


def murmur3_32(bytes data not None, uint32_t seed=0) -> int:
    """MurmurHash3 x86_32 of data, as an unsigned 32-bit int."""
    return murmur3_32_c(<const unsigned char*>PyBytes_AS_STRING(data),
                        PyBytes_GET_SIZE(data), seed)


def canonical_key(key) -> bytes:
    """The bytes a key hashes as: see the key rules in ring.py."""
    cdef char buf[KEY_BUF_SIZE]
    cdef const unsigned char* data
    cdef Py_ssize_t n
    keep = key_bytes(key, buf, &data, &n)  # owns data unless it is buf
    return <bytes>data[:n]


cdef int _compare_u64(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0]
    cdef uint64_t y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef void _shard_points(bytes name, Py_ssize_t count, uint64_t rank,
                        uint64_t* out):
    """Hash name#0 .. name#count-1 into out as (point << 32 | rank)."""
    cdef bytearray label = bytearray(name + b"#" + bytes(20))
    cdef char* buf = label
    cdef Py_ssize_t prefix = len(name) + 1
    cdef Py_ssize_t i, n
    for i in range(count):
        n = prefix + _format_u64(<uint64_t>i, buf + prefix)
        out[i] = (<uint64_t>murmur3_32_c(<unsigned char*>buf, n, 0) << 32) | rank


cdef uint64_t* _sorted_points(list names, list counts, list by_rank,
                              Py_ssize_t total) except NULL:
    """All (point << 32 | name rank) of the ring, ascending; caller frees."""
    cdef uint64_t* keys = <uint64_t*>PyMem_Malloc(total * sizeof(uint64_t))
    if keys == NULL:
        raise MemoryError()
    cdef Py_ssize_t filled = 0
    try:
        for rank, s in enumerate(by_rank):
            _shard_points(names[s].encode(), counts[s], rank, keys + filled)
            filled += counts[s]
    except BaseException:
        PyMem_Free(keys)
        raise
    qsort(keys, total, sizeof(uint64_t), _compare_u64)
    return keys


cdef void _check_shards(list names, list weights, int virtual_nodes):
    if not names:
        raise ValueError("a ring needs at least one shard")
    if not all(isinstance(name, str) for name in names):
        raise TypeError("shard names must be str")
    if len(set(names)) != len(names):
        raise ValueError("shard names must be unique")
    if virtual_nodes < 1:
        raise ValueError("virtual_nodes must be >= 1")
    if any(weight < 0 for weight in weights):
        raise ValueError("shard weights must be >= 0")


cdef class HashRing:
    """Sorted ring points with the owning shard of each; lookups are a
    binary search for the first point >= hash(key), wrapping around."""

    def __cinit__(self, shards, int virtual_nodes):
        shards = list(shards)  # iterated twice below
        names = [name for name, _ in shards]
        weights = [weight for _, weight in shards]
        _check_shards(names, weights, virtual_nodes)
        self.names = tuple(names)
        counts = [virtual_nodes * w for w in weights]
        # Sorting (point, name rank) leaves the lowest name first among equal
        # points, which is the tie winner; the other duplicates are dropped.
        by_rank = sorted(range(len(names)), key=names.__getitem__)
        cdef Py_ssize_t total = sum(counts), i
        if total == 0:
            raise ValueError("a ring needs at least one point")
        cdef uint64_t* keys = _sorted_points(names, counts, by_rank, total)
        cdef uint32_t point
        try:
            self._points = <uint32_t*>PyMem_Malloc(total * sizeof(uint32_t))
            self._owners = <int*>PyMem_Malloc(total * sizeof(int))
            if self._points == NULL or self._owners == NULL:
                raise MemoryError()
            for i in range(total):
                point = <uint32_t>(keys[i] >> 32)
                if self._size and self._points[self._size - 1] == point:
                    continue
                self._points[self._size] = point
                self._owners[self._size] = by_rank[keys[i] & 0xffffffff]
                self._size += 1
        finally:
            PyMem_Free(keys)

    def __dealloc__(self):
        PyMem_Free(self._points)
        PyMem_Free(self._owners)

    cdef int owner_of_hash_c(self, uint32_t h) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self._size, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._points[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        return self._owners[lo if lo < self._size else 0]

    cdef int owner_index_c(self, const unsigned char* data,
                           Py_ssize_t n) noexcept nogil:
        return self.owner_of_hash_c(murmur3_32_c(data, n, 0))

    cdef int owner_index_key(self, object key) except -1:
        cdef char buf[KEY_BUF_SIZE]
        cdef const unsigned char* data
        cdef Py_ssize_t n
        keep = key_bytes(key, buf, &data, &n)  # owns data unless it is buf
        return self.owner_index_c(data, n)

    def owner(self, key) -> str:
        """Name of the shard that owns key."""
        return self.names[self.owner_index_key(key)]

    def owner_index(self, key) -> int:
        """Index into names of the shard that owns key."""
        return self.owner_index_key(key)

    def owner_of_hash(self, uint32_t h) -> int:
        """Index into names of the shard that owns hash value h."""
        return self.owner_of_hash_c(h)

    @property
    def points(self) -> list:
        """The effective ring: (point, shard name), ascending, ties resolved."""
        return [(self._points[i], self.names[self._owners[i]])
                for i in range(self._size)]
