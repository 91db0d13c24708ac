# cython: language_level=3, boundscheck=False, wraparound=False
"""The hot loop of a COPY across shards (routing/copy.py's RowSplitter), compiled: it finds each row's end and its
shard-key field, hashes the field on the ring and appends the row to its shard's buffer, at C speed, for as long as
the rows are plain. A row it cannot read on its own (an escape, a quote, a NULL or non-canonical key, a missing
field, the end-of-data line) stops it: the caller reads that row in Python, then calls again past it.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy

from shardproxy._hash cimport HashRing

cdef enum:
    TEXT_KEY = 0  # the field's bytes are the key (text types)
    INTEGER_KEY = 1  # an integer: only its canonical spelling is hashed here
    BINARY_INT_KEY = 2  # binary int2/int4/int8: hashed as its decimal text
    OTHER_KEY = 3  # the caller decodes it (uuid, numeric, binary text of unknown types)


cdef inline int _append(bytearray out, const unsigned char* data, Py_ssize_t n) except -1:
    cdef Py_ssize_t size = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, size + n)  # (it over-allocates as it grows: appends are amortised)
    memcpy(PyByteArray_AS_STRING(out) + size, data, n)
    return 0


cdef inline bint _canonical_integer(const unsigned char* s, Py_ssize_t n) noexcept:
    """Whether s[:n] is an integer as the ring spells it: -?[1-9][0-9]* or 0."""
    cdef Py_ssize_t i = 0
    if n > 0 and s[0] == c'-':
        i = 1
    if i == n or n - i > 19 or s[i] == c'0' and (n > 1):
        return False
    for i in range(i, n):
        if not c'0' <= s[i] <= c'9':
            return False
    return True


def route_lines(bytes buf, Py_ssize_t pos, Py_ssize_t end, list out, HashRing ring, bytes delimiter,
                Py_ssize_t key_index, bytes null, int key_kind, bytes special):
    """Route the text or csv rows of buf[pos:end] (end just past a newline) into out[shard] (bytearrays) while
    they are plain: no `special` byte (backslash in text, the quote in csv), a key field present, not NULL, and
    of a spelling the ring hashes as it is. Returns (rows routed, where the row it stopped at starts)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef const unsigned char* nul = <const unsigned char*>PyBytes_AS_STRING(null)
    cdef Py_ssize_t null_size = PyBytes_GET_SIZE(null), rows = 0, row_end, field, field_end, i
    cdef unsigned char sep = (<const unsigned char*>PyBytes_AS_STRING(delimiter))[0]
    cdef unsigned char odd = (<const unsigned char*>PyBytes_AS_STRING(special))[0]
    cdef const unsigned char* hit
    if key_kind != TEXT_KEY and key_kind != INTEGER_KEY:
        return 0, pos
    while pos < end:
        hit = <const unsigned char*>memchr(p + pos, c'\n', end - pos)
        if hit == NULL:
            break
        row_end = hit - p
        if memchr(p + pos, odd, row_end - pos) != NULL or p[pos] == c'\\':  # (\. ends the data, in csv too)
            break
        field = pos
        for i in range(key_index):
            hit = <const unsigned char*>memchr(p + field, sep, row_end - field)
            if hit == NULL:
                break
            field = hit - p + 1
        else:
            hit = <const unsigned char*>memchr(p + field, sep, row_end - field)
            field_end = row_end if hit == NULL else hit - p
            if hit == NULL and field_end > field and p[field_end - 1] == c'\r':
                field_end -= 1
            if field_end - field == null_size and memcmp(p + field, nul, null_size) == 0:
                break
            if key_kind == INTEGER_KEY and not _canonical_integer(p + field, field_end - field):
                break
            _append(<bytearray>out[ring.owner_index_c(p + field, field_end - field)], p + pos, row_end + 1 - pos)
            rows += 1
            pos = row_end + 1
            continue
        break  # the key field is missing
    return rows, pos


cdef inline long long _signed(const unsigned char* s, Py_ssize_t n) noexcept:
    cdef unsigned long long value = 0
    cdef Py_ssize_t i
    for i in range(n):
        value = (value << 8) | s[i]
    if n < 8 and value >> (8 * n - 1):  # negative: sign-extend
        value |= ~0ULL << (8 * n)
    return <long long>value


cdef inline Py_ssize_t _decimal(long long value, unsigned char* out) noexcept:
    """value in decimal into out (at least 20 bytes); returns its length."""
    cdef unsigned char digits[20]
    cdef Py_ssize_t n = 0, i, size = 0
    cdef unsigned long long magnitude = <unsigned long long>value
    if value < 0:
        out[0] = c'-'
        size = 1
        magnitude = -magnitude
    while True:
        digits[n] = c'0' + magnitude % 10
        n += 1
        magnitude //= 10
        if magnitude == 0:
            break
    for i in range(n):
        out[size + i] = digits[n - 1 - i]
    return size + n


def route_tuples(bytes buf, Py_ssize_t pos, list out, HashRing ring, Py_ssize_t key_index, int key_kind):
    """Route the binary tuples at buf[pos:] into out[shard] while their key is text or an integer and not NULL.
    Returns (tuples routed, where the tuple it stopped at starts): at the trailer, an incomplete tuple, or one
    the caller reads."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf), rows = 0, at, count, length, i, key_at = -1, key_size = 0
    cdef unsigned char number[24]
    cdef int shard
    if key_kind != TEXT_KEY and key_kind != BINARY_INT_KEY:
        return 0, pos
    while n - pos >= 2:
        count = (p[pos] << 8) | p[pos + 1]
        if count == 0xFFFF or count <= key_index:
            break
        at = pos + 2
        for i in range(count):
            if n - at < 4:
                return rows, pos
            length = <int>((<unsigned int>p[at] << 24) | (p[at + 1] << 16) | (p[at + 2] << 8) | p[at + 3])
            at += 4
            if i == key_index:
                key_at, key_size = at, length
            if length > 0:
                at += length
        if at > n:
            break
        if key_size < 0:  # NULL
            break
        if key_kind == TEXT_KEY:
            shard = ring.owner_index_c(p + key_at, key_size)
        elif key_size == 2 or key_size == 4 or key_size == 8:
            shard = ring.owner_index_c(number, _decimal(_signed(p + key_at, key_size), number))
        else:
            break
        _append(<bytearray>out[shard], p + pos, at - pos)
        rows += 1
        pos = at
    return rows, pos
