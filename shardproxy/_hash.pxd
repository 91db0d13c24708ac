# Declarations of the consistent-hash ring, so other Cython modules can
# `cimport shardproxy._hash` and route keys without Python call overhead.

from libc.stdint cimport uint32_t


cdef enum:
    # Room for an int64 in decimal (20 chars) or a UUID in text form (36).
    KEY_BUF_SIZE = 40


cdef inline uint32_t _rotl32(uint32_t x, int r) noexcept nogil:
    return (x << r) | (x >> (32 - r))


cdef inline uint32_t _mix_block(uint32_t k) noexcept nogil:
    k *= <uint32_t>0xcc9e2d51
    k = _rotl32(k, 15)
    return k * <uint32_t>0x1b873593


cdef inline uint32_t _fmix32(uint32_t h) noexcept nogil:
    h ^= h >> 16
    h *= <uint32_t>0x85ebca6b
    h ^= h >> 13
    h *= <uint32_t>0xc2b2ae35
    return h ^ (h >> 16)


cdef inline uint32_t murmur3_32_c(const unsigned char* data, Py_ssize_t n,
                                  uint32_t seed) noexcept nogil:
    """MurmurHash3 x86_32 of data[:n]."""
    cdef uint32_t h = seed
    cdef uint32_t k = 0
    cdef Py_ssize_t tail = n - (n & 3)
    cdef Py_ssize_t i
    for i in range(0, tail, 4):
        # Assemble blocks little-endian byte by byte: same result on any CPU.
        k = (data[i] | (<uint32_t>data[i + 1] << 8)
             | (<uint32_t>data[i + 2] << 16) | (<uint32_t>data[i + 3] << 24))
        h ^= _mix_block(k)
        h = _rotl32(h, 13) * 5 + <uint32_t>0xe6546b64
    k = 0
    if n & 3 == 3:
        k ^= <uint32_t>data[tail + 2] << 16
    if n & 3 >= 2:
        k ^= <uint32_t>data[tail + 1] << 8
    if n & 3 >= 1:
        k ^= data[tail]
        h ^= _mix_block(k)
    return _fmix32(h ^ <uint32_t>n)


cdef object key_bytes(object key, char* buf, const unsigned char** data,
                      Py_ssize_t* n)


cdef class HashRing:
    cdef uint32_t* _points   # distinct ring points, ascending
    cdef int* _owners        # shard index (into names) owning each point
    cdef Py_ssize_t _size
    cdef readonly tuple names

    cdef int owner_of_hash_c(self, uint32_t h) noexcept nogil
    cdef int owner_index_c(self, const unsigned char* data,
                           Py_ssize_t n) noexcept nogil
    cdef int owner_index_key(self, object key) except -1
