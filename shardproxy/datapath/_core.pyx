# cython: language_level=3, boundscheck=False, wraparound=False
"""The data path, compiled: the hot halves of client connections, server connections and pools, as extension
types that the Python classes (ClientSession and ClientConnection, ServerConnection, Pool) extend. Their
fields, and every method the loops call (the hooks the Python classes fill in), are declared in _core.pxd.

ClientCore takes what a client sends: between transactions it starts the next one on a server connection from
a pool (`_dispatch`, then PoolCore.acquire and `link`), during one it frames and forwards (`_forward`), and when
the server is free again it gives it back (`_server_ready`, PoolCore.release, which hands it straight to the
next waiting client). ServerCore frames what a server answers and forwards it (`on_data`). Every request
forwarded to a server is recorded in the server connection's `pending` queue as a Request tuple, and every
response that completes a request pops it (see pending.py). The loops read message headers straight from
the receive buffer and forward the bytes they arrived in; anything unusual (named statements, session
statements, routing, errors, logins, opening connections) is left to the Python methods. Fields the data path
reads are typed attributes here, so that a transaction's hand-over runs without a Python call; the counters it
bumps (PoolStats, Load) are compiled too (shardproxy/counters.pyx).
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "<string.h>":
    void* memmem(const void* haystack, size_t haystack_size, const void* needle, size_t needle_size) nogil
cdef extern from "<time.h>":
    enum: CLOCK_MONOTONIC_COARSE
cdef extern from "<sys/socket.h>":
    ssize_t send(int fd, const void *buf, size_t n, int flags) nogil
    enum: MSG_NOSIGNAL, MSG_DONTWAIT

import logging
import select
from sys import intern

from shardproxy.datapath.params import REPORTED, sync_statements, with_value
from shardproxy.datapath.pending import (BIND_REQ, CLOSE_REQ, DESCRIBE_REQ, EXECUTE_REQ, FUNCTION_REQ, HIDDEN_QUERY,
                                         PARSE_REQ, QUERY_REQ, SYNC_REQ, Action, Kind, Request)
from shardproxy.datapath.statements import parameter_types
from shardproxy.routing.keys import ShardKeyError
from shardproxy.wire import protocol as pg

# pending.Kind and pending.Action, as C constants.
cdef enum:
    K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE, K_SYNC, K_QUERY, K_FUNCTION
cdef enum:
    A_FORWARD, A_HIDE, A_SYNTH

cdef extern from "Python.h":
    object PyType_GenericAlloc(type cls, Py_ssize_t items)
    void PyTuple_SET_ITEM(object t, Py_ssize_t i, object item)  # steals a reference
    void Py_INCREF(object item)


cdef inline void _put(object made, Py_ssize_t i, object item) noexcept:
    Py_INCREF(item)
    PyTuple_SET_ITEM(made, i, item)


cdef object _named(type cls, Py_ssize_t n, a, b, c, d):
    """NamedTuple cls of the first n of a, b, c, d, made as tuple() makes a tuple: routing makes a few per
    statement, and the Python-level __new__ of a NamedTuple (or tuple.__new__ on a type) allocates two more tuples
    on the way."""
    made = PyType_GenericAlloc(cls, n)
    _put(made, 0, a)
    _put(made, 1, b)
    _put(made, 2, c)
    if n == 4:
        _put(made, 3, d)
    return made


cpdef named3(type cls, a, b, c):
    return _named(cls, 3, a, b, c, None)


cpdef named4(type cls, a, b, c, d):
    return _named(cls, 4, a, b, c, d)


cdef object _INVALID_LENGTH = "invalid message length"
cdef int _IDLE = pg.IDLE
cdef double HUNG_UP_CHECK_AFTER = 0.01  # seconds idle, before a hand-out checks that the server is still there
_pool_log = logging.getLogger("shardproxy.pool")


cdef inline const unsigned char* _chars(object buf):
    if PyBytes_CheckExact(buf):
        return <const unsigned char*>PyBytes_AS_STRING(buf)
    return <const unsigned char*>PyByteArray_AS_STRING(buf)


cdef inline Py_ssize_t _length(const unsigned char* p):
    """A message's length field (big-endian, counting itself)."""
    return (<Py_ssize_t>p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]


cdef inline void _put_length(unsigned char* p, Py_ssize_t length) noexcept:
    p[0] = (length >> 24) & 0xFF
    p[1] = (length >> 16) & 0xFF
    p[2] = (length >> 8) & 0xFF
    p[3] = length & 0xFF


cdef inline bint _session_prefix(const unsigned char* s, Py_ssize_t size):
    """Whether a statement starts like SET, RESET, DEALLOCATE or DISCARD (then the proxy keeps its books)."""
    if size < 4:
        return False
    cdef unsigned char a = s[0] | 32, b = s[1] | 32, c = s[2] | 32, d = s[3]  # | 32: lower case, for letters
    if a == c's':
        return b == c'e' and c == c't' and d == c' '
    if a == c'r':
        return b == c'e' and c == c's' and d | 32 == c'e'
    if a == c'd':
        return b == c'e' and c == c'a' and d | 32 == c'l' or b == c'i' and c == c's' and d | 32 == c'c'
    return False


cdef bint _names_ours(const unsigned char* s, Py_ssize_t size, bytes mark) noexcept:
    """Whether a message body holds a name of the proxy's server-side statements: `sp`, in any case, then the
    digits of `mark` (None before a registry is set)."""
    if mark is None:
        return False
    cdef const unsigned char* m = <const unsigned char*>PyBytes_AS_STRING(mark)
    cdef Py_ssize_t k = PyBytes_GET_SIZE(mark)
    cdef const unsigned char* end = s + size
    cdef const unsigned char* at = s
    cdef const unsigned char* hit
    while True:
        hit = <const unsigned char*>memmem(at, end - at, m, k)
        if hit == NULL:
            return False
        if hit - s >= 2 and (hit - 2)[0] | 32 == c's' and (hit - 1)[0] | 32 == c'p':
            return True
        at = hit + 1


cdef inline Py_ssize_t _uint16(const unsigned char* p) noexcept:
    return (p[0] << 8) | p[1]


cdef bint _well_formed(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end) noexcept:
    """Whether the message at p[pos:end] holds what the proxy reads of it: a Query its text, the names of a Bind,
    Parse, Describe or Close their ends, and a Parse its text and parameter types."""
    cdef unsigned char t = p[pos]
    cdef const unsigned char* name_end
    cdef const unsigned char* text_end
    if t == c'Q':
        return end - pos > 5
    if not (t == c'B' or t == c'P' or t == c'D' or t == c'C'):
        return True
    if end - pos < 7:
        return False
    if t == c'D' or t == c'C':
        return True
    name_end = <const unsigned char*>memchr(p + pos + 5, 0, end - pos - 5)
    if name_end == NULL:
        return False
    if t == c'B':
        return True
    text_end = <const unsigned char*>memchr(name_end + 1, 0, p + end - name_end - 1)
    if text_end == NULL or p + end - text_end < 3:
        return False
    return p + end - text_end - 3 >= 4 * _uint16(text_end + 1)  # the types, after their count


def well_formed(buf, Py_ssize_t pos, Py_ssize_t end) -> bool:
    """_well_formed for Python callers: routing reads messages before the framing loop has checked them."""
    return _well_formed(_chars(buf), pos, end)


def text(buf, Py_ssize_t start, Py_ssize_t end) -> str:
    """buf[start:end] as UTF-8 (bad bytes replaced), decoded in place: the text of each routed Query."""
    return PyUnicode_DecodeUTF8(<const char*>_chars(buf) + start, end - start, "replace")


def is_session_statement(buf, Py_ssize_t start, Py_ssize_t end) -> bool:
    """_session_prefix for Python callers: the statement text at buf[start:end] (a bytes or bytearray)."""
    return _session_prefix(_chars(buf) + start, end - start)


def batch_end(buf, Py_ssize_t pos) -> int:
    """Just past the Sync that ends the batch going on at pos in buf, or the end of what has arrived."""
    cdef const unsigned char* p = _chars(buf)
    cdef Py_ssize_t n = len(buf), end
    cdef unsigned char t
    while n - pos >= 5:
        end = pos + 1 + _length(p + pos + 1)
        if end > n:
            break
        t = p[pos]
        pos = end
        if t == c'S':
            break
    return pos


def data_rows_end(buf, Py_ssize_t pos) -> int:
    """Just past the run of complete DataRow messages that starts at pos in buf: a scatter read passes such runs
    on to its client whole, without a Python step per row."""
    cdef const unsigned char* p = _chars(buf)
    cdef Py_ssize_t n = len(buf), end
    while n - pos >= 5 and p[pos] == c'D':
        end = pos + 1 + _length(p + pos + 1)
        if end > n:
            break
        pos = end
    return pos


def split_messages(buf) -> list:
    """The complete messages in buf, as (type, body) pairs: what the proxy reads of the answers it collects (the
    rounds of a commit across shards run one per statement)."""
    cdef const unsigned char* p = _chars(buf)
    cdef Py_ssize_t n = len(buf), pos = 0, end
    cdef list messages = []
    while n - pos >= 5:
        end = pos + 1 + _length(p + pos + 1)
        if end > n:
            break
        messages.append((p[pos], PyBytes_FromStringAndSize(<const char*>p + pos + 5, end - pos - 5)))
        pos = end
    return messages


def row_values(row) -> list:
    """The values of a DataRow's body in the text format (None for NULL): the proxy's own questions' answers."""
    cdef const unsigned char* p = _chars(row)
    cdef Py_ssize_t n = len(row), pos = 2, length, i
    cdef list values = []
    if n < 2:
        return values
    for i in range(_uint16(p)):
        if pos + 4 > n:
            break
        length = _length(p + pos)
        pos += 4
        if length == 0xFFFFFFFF or pos + length > n:  # NULL (or cut short)
            values.append(None)
            continue
        values.append(PyUnicode_DecodeUTF8(<const char*>p + pos, length, NULL))
        pos += length
    return values


def bind_statement(buf, Py_ssize_t pos, Py_ssize_t end):
    """The statement name of the Bind at buf[pos:end] (b"" for the unnamed one); None if malformed."""
    cdef const unsigned char* p = _chars(buf)
    cdef const unsigned char* portal_end = <const unsigned char*>memchr(p + pos + 5, 0, end - pos - 5)
    if portal_end == NULL:
        return None
    cdef const unsigned char* name_end = <const unsigned char*>memchr(portal_end + 1, 0, end - (portal_end + 1 - p))
    if name_end == NULL:
        return None
    return PyBytes_FromStringAndSize(<const char*>portal_end + 1, name_end - portal_end - 1)


cdef object _MALFORMED_BIND = "shardproxy: malformed Bind message"


def bind_parameter(buf, Py_ssize_t start, Py_ssize_t end, Py_ssize_t index) -> tuple:
    """The raw value (None for NULL) and format code of 1-based parameter `index` of the Bind whose body is
    buf[start:end] (portal\\0 statement\\0 int16 nfmt, int16 fmt[nfmt], int16 nparams, (int32 len, bytes)[nparams]),
    read in place: routing reads the key of every Bind. Raises ShardKeyError for a parameter it lacks."""
    cdef const unsigned char* p = _chars(buf)
    cdef const unsigned char* q = <const unsigned char*>memchr(p + start, 0, end - start)
    cdef Py_ssize_t pos, formats, count, fmt = 0, length, i
    if q != NULL:
        q = <const unsigned char*>memchr(q + 1, 0, end - (q + 1 - p))
    if q == NULL or end - (q + 1 - p) < 2:
        raise ShardKeyError(_MALFORMED_BIND)
    pos = q + 1 - p
    formats = _uint16(p + pos)
    if end - pos < 4 + 2 * formats:
        raise ShardKeyError(_MALFORMED_BIND)
    count = _uint16(p + pos + 2 + 2 * formats)
    if not 1 <= index <= count:
        raise ShardKeyError(f"shardproxy: Bind has {count} parameters, not ${index}")
    if formats > 1 and index > formats:
        raise ShardKeyError(_MALFORMED_BIND)
    if formats:
        fmt = _uint16(p + pos + 2 + 2 * (index - 1 if formats > 1 else 0))
    pos += 4 + 2 * formats
    for i in range(index):
        if end - pos < 4:
            raise ShardKeyError(_MALFORMED_BIND)
        length = <int>_length(p + pos)  # signed: -1 is NULL
        pos += 4
        if length > end - pos:
            raise ShardKeyError(_MALFORMED_BIND)
        if i < index - 1:
            pos += max(length, 0)
    if length < 0:
        return None, fmt
    return PyBytes_FromStringAndSize(<const char*>p + pos, length), fmt


cdef inline list _add_span(list out, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    """out with the bytes p[start:end] appended (copied from the buffer: no slice object, no index objects), made
    on the first call: most reads are written on as they came, without a list. An empty span adds nothing."""
    if out is None:
        out = []
    if end > start:
        out.append(PyBytes_FromStringAndSize(<const char*>p + start, end - start))
    return out


cdef inline long _action(Requests pending):
    return (<tuple>pending.first())[1]


cdef inline double _now() noexcept:
    """time.monotonic(), without a Python call."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double _about_now() noexcept:
    """_now() as of the last clock tick (a few ms behind), kept by the kernel and read without the time
    counter: for a server's last activity, which only timeouts and the hand-out's idle check read."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Requests:
    """A server connection's requests in flight, oldest first: the deque operations the proxy uses (append,
    popleft, [0], len), with C calls for the data path. A list used as a queue from _head to _tail: the slots
    are reused once it empties (at the end of every transaction), so a transaction allocates nothing here."""

    def __cinit__(self):
        self._items = []

    cdef int push(self, request) except -1:
        if self._tail < len(self._items):
            self._items[self._tail] = request
        else:
            self._items.append(request)
        self._tail += 1
        return 0

    cdef object first(self):
        """The oldest request; the caller knows there is one."""
        return self._items[self._head]

    cdef bint empty(self) noexcept:
        return self._head == self._tail

    cdef Py_ssize_t drop_syncs_after_first(self) except -1:
        """Remove the Syncs queued right behind the oldest request; returns how many there were."""
        cdef Py_ssize_t end = self._head + 1
        while end < self._tail and (<tuple>self._items[end])[0] == K_SYNC:
            end += 1
        if end > self._head + 1:
            del self._items[self._head + 1:end]
            self._tail -= end - self._head - 1
        return end - self._head - 1

    cdef long long next_number(self) noexcept:
        """The number the next request pushed gets (the oldest one's is `popped`)."""
        return self.popped + self._tail - self._head

    cdef bint awaits_sync(self) except -1:
        """Whether the newest request is of an extended-protocol batch not yet ended by a Sync: the server holds
        its answers until a Sync or Flush comes."""
        if self._head == self._tail:
            return False
        kind = (<tuple>self._items[self._tail - 1])[0]
        return kind != K_SYNC and kind != K_QUERY and kind != K_FUNCTION

    cdef bint proxy_only(self) except -1:
        """Whether every request in flight is the proxy's own (hidden, or answered by the proxy)."""
        cdef Py_ssize_t i
        for i in range(self._head, self._tail):
            if (<tuple>self._items[i])[1] == A_FORWARD:
                return False
        return True

    def append(self, request) -> None:
        self.push(request)

    cpdef popleft(self):
        if self._head == self._tail:
            raise IndexError("pop from an empty queue")
        request = self._items[self._head]
        self._items[self._head] = None
        self._head += 1
        self.popped += 1
        if self._head == self._tail:
            self._head = self._tail = 0
        elif self._head >= 64 and self._head * 2 >= self._tail:  # a pipeline that never lets it empty
            del self._items[:self._head]
            self._tail -= self._head
            self._head = 0
        return request

    def __len__(self) -> int:
        return self._tail - self._head

    def __bool__(self) -> bool:
        return self._tail > self._head

    def __getitem__(self, Py_ssize_t index):
        if not 0 <= index < self._tail - self._head:
            raise IndexError("queue index out of range")
        return self._items[self._head + index]

    def __iter__(self):
        return iter(self._items[self._head:self._tail])

# Calls between the methods below name the class, as in ClientCore.link(client, server): a direct C call, where
# client.link(server) would first look for an override in the Python subclass, on every call.


cdef class ProxyCore:
    """The proxy-wide state the data path reads per transaction (Proxy adds everything else)."""


cdef class Endpoint:
    """What client and server connections share: the socket, the receive buffer, and the connection whose
    reading pauses while this one's socket cannot take more (see connection.py)."""

    def __cinit__(self):
        self._fd = -1
        self.buf = bytearray()

    @property
    def transport(self):
        return self._transport

    @transport.setter
    def transport(self, transport):
        self._transport = transport
        self._write = None if transport is None else transport.write

    def send_directly(self) -> None:
        """From now on (after login) send on the socket at once rather than through the transport, which
        queues every write until the end of the event loop's turn. Only plain sockets: TLS stays in the
        transport. The descriptor is the transport's: asyncio and uvloop transports close their socket only
        after calling connection_lost, which marks this connection closed, and nothing is sent once it is;
        so a send never reaches a descriptor number given out again to another connection."""
        transport = self._transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= 0:
            self._fd = sock.fileno()
            self._queued = True  # the login's last answer may still wait in the transport

    def write(self, data) -> None:
        Endpoint._send(self, data)

    cdef _send(self, object data):
        """Send what the socket takes now; the rest goes through the transport, which buffers it and tells
        a slow peer's reader to pause (pause_writing). A failed send leaves the error to the transport. What is
        not bytes (a message that arrived over several reads, joined in a bytearray) goes through the transport
        too, and bytes sent after it wait their turn there."""
        cdef Py_ssize_t sent, n
        if self.closed or self._write is None or not data:  # (forwarding that stops at once has nothing to send)
            return
        if self._fd >= 0 and PyBytes_CheckExact(data):
            if not self._queued or not self._transport.get_write_buffer_size():
                n = len(<bytes>data)
                sent = send(self._fd, PyBytes_AS_STRING(data), n, MSG_NOSIGNAL | MSG_DONTWAIT)
                if sent == n:
                    self._queued = False
                    return
                if sent > 0:
                    data = data[sent:]
        self._queued = True
        self._write(data)

    cpdef close(self):
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()


cdef inline bint _fresh_batch(ServerCore server) except -1:
    """Whether a batch starting now starts outside a transaction block, with nothing of its client's in flight."""
    return server.status == _IDLE and server.pending.proxy_only()


cdef inline bint _wipes_statements(const unsigned char* tag, Py_ssize_t size) noexcept:
    """Whether a CommandComplete tag says the server dropped every prepared statement of its session."""
    return (size == 11 and memcmp(tag, b"DISCARD ALL", 11) == 0
            or size == 14 and memcmp(tag, b"DEALLOCATE ALL", 14) == 0)


cdef inline object _joined(Endpoint connection, object data):
    """What arrived, after the bytes of an incomplete message left from the last read."""
    cdef bytearray buf = connection.buf
    if not buf:
        return data
    connection.buf = bytearray()
    buf += data
    return buf


cdef dict _routing_of = {}  # per client class: its Routing, or None if it does not route


@cython.final
cdef class Routing:
    """The routing calls of the loops, looked up once per client class that routes (placement.py defines them):
    a cpdef hook overridden in Python would cost an attribute lookup and a bound method at every call, and these
    run for every statement. Each is the class's plain function, called with the client first."""

    def __init__(self, cls):
        self.batch_route = cls._batch_route
        self.answer_locally = cls._answer_locally
        self.start = cls._start
        self.route_batch_here = cls._route_batch_here
        self.batch_member = cls._batch_member
        self.refuse = cls._refuse
        self.stopped = cls._stopped
        self.drained = cls._drained
        self.linked_on_shard = cls._linked_on_shard
        self.follow_commit = cls._follow_commit
        self.transaction_ended = cls._routed_transaction_ended


cdef Routing _routing(type cls):
    try:
        return _routing_of[cls]
    except KeyError:
        routing = _routing_of[cls] = Routing(cls) if hasattr(cls, "_batch_route") else None
        return routing


cdef class ClientCore(Endpoint):
    """The data path's half of a client session (ClientSession adds its statement books and parameters,
    ClientConnection login, Placement routing)."""

    def __cinit__(self):
        self.replay = []
        self.reason = ""
        self._refusal = ""
        self.routing = _routing(type(self))

    cpdef on_data(self, data):
        if self.server is not None:
            if self.stopped:  # what follows a statement for another connection waits for this one to end
                self.buf += data
                return
            ClientCore._forward(self, _joined(self, data))
            return
        self.buf += data
        if self.copy_feed is not None:
            self.copy_feed()
            return
        ClientCore._dispatch(self)

    cpdef _dispatch(self):
        """Between transactions: start the next one on the server connection its first statement needs."""
        cdef Py_ssize_t length
        cdef const unsigned char* p
        cdef bint sharded
        cdef PoolCore pool
        cdef tuple routed
        while self.server is None and not (self.busy or self.wait_started or self.closed):
            if len(self.buf) < 5:
                return
            p = <const unsigned char*>PyByteArray_AS_STRING(self.buf)
            length = _length(p + 1)
            if length < 4 or length > self.max_message_size:  # refused now, not once it all arrived
                self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, _INVALID_LENGTH))
                return
            if p[0] == c'P' and len(self.buf) > 5 and p[5] or p[0] == c'C' or p[0] == c'S':  # (what it may answer)
                if not self._answer_without_server():  # answers trim buf in place
                    return
            if self.buf[0] == c'X':
                self.reason = "client sent Terminate"
                self.close()
                return
            sharded = self.core.sharded
            if self.routes != sharded and not self.replay:  # a reload added or removed shards
                self.routes = sharded
            if not self.routes:  # one server: the pool found at login, unless a reload drained it
                pool = self.pool
                if pool.draining:
                    pool = self._unrouted_pool()
                ClientCore._acquire(self, pool)
                return
            found = self.routing.batch_route(self, self.buf, 0)
            if found is None:  # the statement that decides has not fully arrived
                return
            routed = <tuple>found  # (a BatchRoute: unpacked as a tuple, not through the iterator of a subclass)
            decision, batch_end, standalone = routed[0], routed[1], routed[3]
            if not (standalone and (decision.route.local or self.tx_failed)
                    and self.routing.answer_locally(self, decision, batch_end)):
                # A whole batch is not routed twice: its decision serves the link's first check too.
                self.decided = found if standalone or self.buf[batch_end - 5] == c'S' else None
                self.routing.start(self, decision, batch_end)

    cpdef _acquire(self, PoolCore pool):
        self.pool = pool
        PoolCore.acquire(pool, self)  # links now, or when a connection is free

    cpdef link(self, ServerCore server):
        """Serve this client's messages on `server` until its transaction (or session) ends."""
        self.wait_started = 0.0
        self.server = server
        server.client = self
        server.peer = self
        self.peer = server
        server.on_ready = self.on_server_ready
        cdef list ahead = []  # what the server runs first, hidden: sent with the client's messages, in one write
        # Equal reported values are mostly one shared dict (params.shared): compared only when not.
        if (self.params is not server.reported and self.params != server.reported
                or (self.param_sql or server.param_sql) and self.param_sql != server.param_sql):
            statements = sync_statements(self.params, self.param_sql, server.params, server.param_sql)
            if statements:
                server.pending.push(HIDDEN_QUERY)
                ahead.append(pg.query("; ".join(statements)))
        if self.routes:
            self.routing.linked_on_shard(self, server, ahead)
        cdef bytearray buf = self.buf  # forwarded as bytes: the transport would wrap a bytearray in a memoryview
        data = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf), len(buf))
        PyByteArray_Resize(buf, 0)
        ClientCore._forward(self, data, ahead)
        self.decided = None

    cpdef _server_ready(self, ServerCore server):
        """The linked server answered everything it was sent: if forwarding stopped at a statement for another
        server connection, routing moves on (_drained); else, in transaction pooling, once the transaction is
        over the connection goes back to the pool."""
        if server.cancels or server is not self.server:
            return
        if server.ignoring:  # an error, and the client's Sync is yet to come
            if self.stopped:  # before the statement forwarding stopped at: as PostgreSQL does, the server skips
                self.stopped = False  # the rest of the batch
                ClientCore.on_data(self, b"")
            return
        if self.stopped:
            self.routing.drained(self, server)
        elif server.status == _IDLE and not self.mid_batch and self.transaction_pooling:
            ClientCore._give_back(self, server)

    cpdef _give_back(self, ServerCore server):
        """The transaction is over: the connection goes back to its pool, and what the client sent meanwhile
        starts the next one."""
        if self.wrote:  # read-your-writes: learn where this commit ends in the WAL before letting go
            self.routing.follow_commit(self, server)
            return
        self.server = None
        self.peer = None
        PoolCore.release(<PoolCore>server.pool, server)
        self.core.transactions += 1
        self.mid_batch = self.stopped = False
        if self.routes:
            self.routing.transaction_ended(self)
        if self.core.shutting_down:
            self._fatal(pg.PostgresError(pg.ADMIN_SHUTDOWN, "shardproxy is shutting down"))
        elif self.buf and not self.closed:
            ClientCore.on_data(self, b"")

    cdef bint _bind(self, buf, Py_ssize_t pos, Py_ssize_t portal_end, Py_ssize_t end, list out) except -1:
        """A Bind of a named statement, to the server-side name (prepared there first if it lacks it), recorded in
        the queue. Returns False if the message was malformed (the client is gone)."""
        cdef const unsigned char* p = _chars(buf)
        cdef const unsigned char* name = p + portal_end + 1
        cdef const unsigned char* name_end = <const unsigned char*>memchr(name, 0, end - portal_end - 1)
        if name_end == NULL:
            self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, "invalid message format"))
            return False
        cdef Requests pending = self.server.pending
        statement = self.statements.get(PyBytes_FromStringAndSize(<const char*>name, name_end - name))
        if statement is None:  # unknown to us: let the server say so, in its own words
            out.append(buf[pos:end])
            pending.push(BIND_REQ)
            return True
        cdef bint fresh = _fresh_batch(self.server)
        ClientCore._ensure_prepared(self, statement, out)
        if fresh:
            ClientCore._note_retry(self, buf, pos, pending.next_number())
        request = statement.bind_request  # it names the statement, should the server find its plan out of date
        if request is None:
            request = statement.bind_request = named4(Request, Kind.BIND, Action.FORWARD, statement, None)
        pending.push(request)
        cdef bytes server_name = statement.bind_prefix  # the name and its NUL
        cdef Py_ssize_t portal = portal_end + 1 - (pos + 5), rest = end - (name_end + 1 - p)
        cdef Py_ssize_t size = 1 + 4 + portal + len(server_name) + rest
        cdef bytes message = PyBytes_FromStringAndSize(NULL, size)
        cdef unsigned char* m = <unsigned char*>PyBytes_AS_STRING(message)
        m[0] = c'B'
        _put_length(m + 1, size - 1)
        memcpy(m + 5, p + pos + 5, portal)
        memcpy(m + 5 + portal, PyBytes_AS_STRING(server_name), len(server_name))
        memcpy(m + 5 + portal + len(server_name), name_end + 1, rest)
        out.append(message)
        return True

    cdef _note_retry(self, buf, Py_ssize_t pos, long long request):
        """The batch at buf[pos] starts with a Bind or Describe of a named statement (request number `request`),
        outside a transaction block: it can run again should that statement's plan be out of date (see
        ClientSession._statement_failed)."""
        self.retry_buf = buf
        self.retry_pos = pos
        self.retry_request = request

    cpdef _ensure_prepared(self, statement, list out):
        """Prepare the statement on the linked server first if it lacks it, hiding the ParseComplete."""
        cdef ServerCore server = self.server
        name = statement.name
        if not ServerCore.reuse_prepared(server, name):
            out.append(statement.parse)
            server.pending.push(named4(Request, Kind.PARSE, Action.HIDE, statement, None))
            ServerCore.remember_prepared(server, name, self.core.prepared_per_server, out)

    cpdef _forward(self, buf, list ahead=None):
        """Frame what the client sent, record each request in the linked server's `pending` queue, and write it
        on unchanged, but for named statements, session statements and routing decisions (the Python methods);
        after the messages `ahead`, if any (their requests are recorded)."""
        if not (PyBytes_CheckExact(buf) or PyByteArray_CheckExact(buf)):
            buf = bytes(buf)
        cdef const unsigned char* p = _chars(buf)
        cdef Py_ssize_t n = len(buf), pos = 0, span = 0, end, length, check, refuse = -1, decider = -1, name_end, portal_end
        cdef Py_ssize_t max_size = self.max_message_size
        cdef unsigned char t
        cdef bint routes = self.routes, executing = self.mid_batch, go, fresh
        cdef tuple here
        cdef ServerCore server = self.server
        cdef Requests pending = server.pending
        cdef list out = ahead or None  # made when what is written differs from what was read
        check = 0 if routes and not executing else -1  # where the next batch starts
        while n - pos >= 5:
            t = p[pos]
            length = _length(p + pos + 1)
            end = pos + 1 + length
            if length < 4 or length > max_size:
                self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, _INVALID_LENGTH))
                return
            if end > n:
                break
            if server.ignoring and t != c'S' and t != c'X':  # after an error the server skips all up to Sync
                out = _add_span(out, p, span, pos)
                span = pos = end
                continue
            if pos == check:
                here = <tuple>self.routing.route_batch_here(self, buf, pos)  # a HereVerdict
                check, decider, refuse, go = here[0], here[1], here[2], here[3]
                if not go:  # what came before it goes first, with what _stopped adds after it
                    out = _add_span(out, p, span, pos)
                    span = pos
                    self.mid_batch = executing
                    self.stopped = True
                    self.routing.stopped(self, server, out)
                    break
            if not _well_formed(p, pos, end):
                self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, "invalid message format"))
                return
            if pos == refuse:
                out = _add_span(out, p, span, pos)
                span = end
                if self._refusal:
                    self.routing.refuse(self, self._refusal, buf, pos, end, out)
                else:  # SET/RESET shardproxy.shard_key: the proxy's own setting, never sent
                    ServerCore.enqueue_synthetic(server, self._local_reply)
            elif t == c'B' and routes and pos != decider and (refusal := self.routing.batch_member(self, buf, pos, end)) != "":
                out = _add_span(out, p, span, pos)
                if refusal is None:  # its shard's server connection continues the batch
                    span = pos
                    self.mid_batch = executing
                    self.stopped = True
                    self.routing.stopped(self, server, out)
                    break
                span = end
                self.routing.refuse(self, refusal, buf, pos, end, out)
            elif t == c'B':
                portal_end = <const unsigned char*>memchr(p + pos + 5, 0, length - 4) - p
                if portal_end + 1 < end and p[portal_end + 1]:  # a named statement: use its server-side name
                    out = _add_span(out, p, span, pos)
                    span = end
                    if not ClientCore._bind(self, buf, pos, portal_end, end, out):  # (it records the request)
                        return
                else:
                    pending.push(BIND_REQ)
            elif t == c'E':
                pending.push(EXECUTE_REQ)
            elif t == c'S':
                if server.copy_in:  # ignored by a server in COPY FROM STDIN: no answer comes, no batch ends
                    pos = end
                    continue
                if self.spanning:  # the batch's transaction spans shards: the proxy ends it on each (_drained)
                    out = _add_span(out, p, span, pos)
                    span = pos
                    self.mid_batch = executing
                    self.stopped = True
                    self.routing.stopped(self, server, out)
                    break
                pending.push(SYNC_REQ)
                if routes:
                    check = end  # the next batch, if in this read, is routed too
            elif (t == c'Q' or t == c'P') and _names_ours(p + pos + 5, length - 4, self.core.statement_mark):
                out = _add_span(out, p, span, pos)
                span = end
                self._names_proxy_statements(buf, pos, end, out)
            elif t == c'Q':
                if _session_prefix(p + pos + 5, length - 4):
                    out = _add_span(out, p, span, pos)
                    span = end
                    self._session_statement(bytes(buf[pos:end]), out)
                else:
                    pending.push(QUERY_REQ)
            elif t == c'P':
                name_end = <const unsigned char*>memchr(p + pos + 5, 0, length - 4) - p
                if _session_prefix(p + name_end + 1, end - name_end - 1):  # a SET, extended
                    self._track_set(pg.read_cstring(buf, name_end + 1)[0].decode(errors="replace"), server)
                if p[pos + 5]:
                    out = _add_span(out, p, span, pos)
                    span = end
                    self._parse(buf, pos, end, out)
                else:
                    pending.push(PARSE_REQ)
                    if routes:  # for the Binds that follow it in this batch
                        self.unnamed = self.core.statements.get(bytes(buf[pos + 6:end]))
            elif t == c'D' or t == c'C':
                if p[pos + 5] == c'S' and p[pos + 6]:
                    out = _add_span(out, p, span, pos)
                    span = end
                    fresh = t == c'D' and _fresh_batch(server)
                    self._statement_message(t, bytes(buf[pos + 6:end - 1]), out)
                    if fresh:  # (its request is the last one recorded)
                        ClientCore._note_retry(self, buf, pos, pending.next_number() - 1)
                elif t == c'D' and p[pos + 5] == c'S' and routes:  # the unnamed statement: learn its types
                    pending.push(named4(Request, Kind.DESCRIBE, Action.FORWARD, self.unnamed, None))
                else:
                    pending.push(DESCRIBE_REQ if t == c'D' else CLOSE_REQ)
            elif t == c'F':
                pending.push(FUNCTION_REQ)
            elif t == c'c' or t == c'f':  # CopyDone, CopyFail: Syncs count again from here
                server.copy_in = False
            elif t == c'X':  # it goes once what it sent before is answered, as with PostgreSQL (ServerCore.on_data)
                out = _add_span(out, p, span, pos)
                span = pos = n  # nothing after it is read
                self.reason = "client sent Terminate"
                self.terminating = True
                break
            elif t not in b"dHcf":
                self._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, f"invalid frontend message type {t}"))
                return
            pos = end
            if t == c'E':
                executing = True
            elif t == c'S' or t == c'Q' or t == c'F':
                executing = False
        # After an Execute, the connection is kept until Sync ends the implicit transaction it opened.
        self.mid_batch = executing
        if not out and span == 0 and pos == n:
            Endpoint._send(server, buf)
        else:
            out = _add_span(out, p, span, pos)
            Endpoint._send(server, b"".join(out))
        server.last_used = _about_now()  # query_timeout counts the server's silence from here
        if pos < n:
            self.buf = bytearray(buf[pos:])
            if self.stopped and pending.empty():
                ClientCore._server_ready(self, server)  # stopped with nothing in flight: move on now
        elif pending.empty() and server.on_ready is not None and self.server is server:
            server.on_ready(server)  # all answered by the proxy itself (DEALLOCATE ALL): no server reply will come
        if self.terminating:
            # Mid-COPY the server waits for data, and in a batch with no Sync it holds its answers: as PostgreSQL
            # ends such a session at once, the connection closes (the server connection, mid-batch, with it).
            if pending.empty() or server.copy_in or pending.awaits_sync():
                self.close()
            elif self._transport is not None:
                self._transport.pause_reading()

    # -- hooks: the defaults of a bare session; the Python classes fill them in (declared in _core.pxd) ----------
    cpdef _fatal(self, error):
        """End the connection over an error (a client is told it as FATAL; a fanout leg keeps it)."""
        self.close()

    cpdef PoolCore _unrouted_pool(self):
        """The pool of an unrouted connection whose pool a reload drained."""
        return self.pool

    cpdef bint _answer_without_server(self) except -1:
        """Answer what needs no server between transactions; whether messages that need one remain."""
        return True

    cpdef parameter_changed(self, name, value):
        """The linked server reported a new value of a parameter that follows the client."""
        self.params = with_value(self.params, name, value)

    cpdef _parse(self, buf, Py_ssize_t pos, Py_ssize_t end, list out):
        """A Parse of a named statement."""
        out.append(buf[pos:end])
        self.server.pending.push(PARSE_REQ)

    cpdef _statement_message(self, int t, bytes name, list out):
        """A Describe (t 'D') or Close (t 'C') of a named statement."""
        out.append(pg.message(bytes((t,)), b"S" + name + b"\0"))
        self.server.pending.push(DESCRIBE_REQ if t == c'D' else CLOSE_REQ)

    cpdef _session_statement(self, bytes message, list out):
        """A simple query that starts like SET, RESET, DEALLOCATE or DISCARD."""
        out.append(message)
        self.server.pending.push(QUERY_REQ)

    cpdef _track_set(self, sql, server):
        """A SET or RESET sent in a Parse (server: None when no server is linked yet)."""

    cpdef _names_proxy_statements(self, buf, Py_ssize_t pos, Py_ssize_t end, list out):
        """A Query or Parse whose text names the proxy's server-side statements."""
        out.append(buf[pos:end])
        self.server.pending.push(QUERY_REQ if buf[pos] == c'Q' else PARSE_REQ)

    cpdef bint _statement_failed(self, ServerCore server, body) except -1:
        """The server refused a Bind or Describe of a named statement (the oldest request of its queue) with the
        ErrorResponse `body`: whether the client sent the batch again in its place (then the error is hidden,
        and the client has skipped the queue to the Sync, hidden too)."""
        return False

    cpdef _statements_dropped(self, bint discard):
        """The linked server dropped every prepared statement (DEALLOCATE ALL), and its settings (DISCARD ALL)."""


cdef class ServerCore(Endpoint):
    """The data path's half of a server connection (ServerConnection adds login and cancels)."""

    def __cinit__(self):
        self.pending = Requests()
        self.status = _IDLE

    cpdef bint reuse_prepared(self, name) except -1:
        """Whether the statement is prepared here; if so it goes to the LRU's end, but for the one used last (a
        client repeating one statement), which is there already."""
        if name not in self.prepared:
            return False
        if name is not self.newest:
            self.prepared.move_to_end(name)
            self.newest = name
        return True

    cpdef remember_prepared(self, bytes name, int limit, list out):
        """Note a statement as prepared here; past the limit, close the least recently used one."""
        self.prepared[name] = None
        self.newest = name
        if len(self.prepared) > limit:
            old, _ = self.prepared.popitem(last=False)
            out.append(pg.message(b"C", b"S" + old + b"\0"))
            self.pending.push(named4(Request, Kind.CLOSE, Action.HIDE, None, (self.prepared.__setitem__, old, None)))

    cpdef enqueue_synthetic(self, request):
        """Record a request the proxy answers itself; with nothing ahead of it, answer at once."""
        cdef list out
        self.pending.push(request)
        if len(self.pending) == 1 and self.client is not None:
            out = []
            ServerCore._synthesize(self, out)
            self.client.write(b"".join(out))

    cpdef _synthesize(self, list out):
        """Answer, in their place in the stream, the requests the proxy handled itself."""
        cdef tuple request
        pending = self.pending
        while not pending.empty() and _action(pending) == A_SYNTH:
            request = <tuple>pending.popleft()
            out.append(request[2] + pg.READY[self.status] if request[0] == K_QUERY else request[2])

    cpdef _skip_to_sync(self):
        """After an error the server skips every extended-protocol message up to the next Sync: so do the
        proxy's books (a statement not prepared after all, a client's name given or closed taken back)."""
        cdef tuple request
        cdef list undo = []
        pending = self.pending
        while not pending.empty() and (<tuple>pending.first())[0] != K_SYNC:
            request = <tuple>pending.popleft()  # a request the proxy answers itself goes unanswered too
            if request[0] == K_PARSE and request[1] != A_SYNTH and request[2] is not None:
                self.prepared.pop(request[2].name, None)
            if request[3] is not None:
                undo.append(request[3])
        for call in reversed(undo):  # the books as they were before the skipped requests
            call[0](*call[1:])

    cpdef _record_parameter(self, body):
        """A ParameterStatus: the server's value, and its linked client's too if the parameter follows clients
        (even for a hidden SET: the server's spelling is kept)."""
        name, offset = pg.read_cstring(body, 0)
        value, _ = pg.read_cstring(body, offset)
        # Interned: when two dicts of equal values are not the one shared dict, comparing them is identity checks.
        name, value = intern(name.decode()), intern(value.decode())
        self.params[name] = value
        if name in REPORTED:
            self.reported = with_value(self.reported, name, value)
            if self.client is not None:
                self.client.parameter_changed(name, value)

    cdef _copy_in_began(self, ClientCore client, long kind):
        """CopyInResponse: until the client's CopyDone or CopyFail the server reads copy data and ignores Sync and
        Flush. The Syncs a client sent right after its Execute, before it knew the statement was a COPY (libpq
        does), get no answer; the Execute's batch keeps this connection until the Sync sent after the copy."""
        self.copy_in = True
        if self.pending.drop_syncs_after_first() and kind == K_EXECUTE and client is not None:
            client.mid_batch = True

    cdef _statements_dropped(self, ClientCore client, bint discard):
        """The server ran DEALLOCATE ALL, or DISCARD ALL (which resets its settings too)."""
        self.prepared.clear()
        self.newest = None
        if discard:
            self.param_sql.clear()
        if client is not None:
            client._statements_dropped(discard)

    # -- hooks (server.py) ---------------------------------------------------------------------------------
    cpdef bint _unsolicited(self, int t, buf, Py_ssize_t pos, Py_ssize_t end) except -1:
        """A message outside any request (a notice, a notification, a parameter change, a FATAL error):
        whether to forward it to the client."""
        return self.client is not None

    cpdef _request_failed(self, body):
        """The ErrorResponse (its body) to an extended-protocol request."""

    def on_data(self, data):
        """Frame what the server sent, pop the requests it completes, hide the answers to requests the proxy
        injected, put the proxy's own answers in their place, and write the rest on to the linked client."""
        buf = _joined(self, data)
        cdef const unsigned char* p = _chars(buf)
        cdef Py_ssize_t n = len(buf), pos = 0, span = 0, end
        cdef unsigned char t
        cdef long kind, action
        cdef bint done, hiding
        cdef tuple request
        self.last_used = _about_now()
        cdef ClientCore client = self.client
        cdef Requests pending = self.pending
        cdef list out = None
        hiding = not pending.empty() and _action(pending) == A_HIDE
        while n - pos >= 5:
            t = p[pos]
            end = pos + 1 + _length(p + pos + 1)
            if end > n:
                break
            if t == c'D':  # DataRow: the bulk of the traffic, never completes a request
                if not hiding:
                    pos = end
                    continue
                if not pending.empty() and (<tuple>pending.first())[2] is not None:  # the proxy reads the answer
                    (<tuple>pending.first())[2](self, t, buf[pos + 5:end])
            if pending.empty():
                if not self._unsolicited(t, buf, pos, end):
                    out = _add_span(out, p, span, pos)
                    span = end
                pos = end
                continue
            request = <tuple>pending.first()
            kind = request[0]
            action = request[1]
            arg = request[2]
            done = False
            if t == c'Z':
                self.status = p[pos + 5]
                done = True
                self.ignoring = False
                self.error_as = None  # (a cancel that landed too late to fail the statement)
                if self.settings_before is not None and p[pos + 5] == c'I' and action != A_HIDE:
                    if self.settings_undone and client is not None:  # rolled back: so are the client's SETs
                        client.param_sql, self.param_sql = self.settings_before
                    self.settings_before = None
                self.settings_undone = False
            elif t == c'C' or t == c'I' or t == c's':
                done = kind == K_EXECUTE
                if t == c'C' and action != A_HIDE:
                    self.commands += 1
                if arg is not None and kind == K_QUERY and t == c'C':
                    arg(self, t, bytes(buf[pos + 5:end - 1]))
                if t == c'C' and self.settings_before is not None and buf[pos + 5:end - 1] == b"ROLLBACK":
                    self.settings_undone = True
                if t == c'C' and _wipes_statements(p + pos + 5, end - pos - 6):
                    ServerCore._statements_dropped(self, client, p[pos + 6] == c'I')  # DISCARD ALL: settings too
            elif t == c'T' or t == c'n':
                done = kind == K_DESCRIBE
            elif t == c'2':
                done = kind == K_BIND
            elif t == c'1':
                done = kind == K_PARSE
                if arg is not None:
                    arg.verified = True
            elif t == c'3':
                done = kind == K_CLOSE
            elif t == c'S':
                self._record_parameter(buf[pos + 5:end])
            elif t == c'G':
                ServerCore._copy_in_began(self, client, kind)
            elif t == c't' and arg is not None:  # a named statement's parameter types, for routing by key
                arg.param_types = parameter_types(buf[pos + 5:end])
            elif t == c'E' and kind != K_SYNC and kind != K_QUERY and kind != K_FUNCTION:
                if (kind == K_BIND or kind == K_DESCRIBE) and arg is not None and client is not None \
                        and client._statement_failed(self, buf[pos + 5:end]):
                    hiding = True  # its batch runs again on a fresh statement (the client skipped to the Sync)
                else:
                    self._request_failed(buf[pos + 5:end])
                    ServerCore._skip_to_sync(self)
                self.ignoring = pending.empty()  # no Sync sent yet (after a Flush): the server waits for the client's
                if hiding and kind == K_PARSE:  # the client must learn that its statement does not exist
                    hiding = False
            if t == c'E':
                self.commands += 1
                self.settings_undone = True
                self.copy_in = False  # an error ends COPY FROM STDIN: the server drops the rest of the data
                if self.error_as is not None and not hiding:
                    out = _add_span(out, p, span, pos)
                    out.append(self.error_as)
                    span = end
                    self.error_as = None
            if hiding:
                out = _add_span(out, p, span, pos)
                span = end
            pos = end
            if done:
                pending.popleft()
            if (done or t == c'E') and not pending.empty():
                if _action(pending) == A_SYNTH:
                    out = _add_span(out, p, span, pos)
                    span = pos
                    ServerCore._synthesize(self, out)
                hiding = not pending.empty() and _action(pending) == A_HIDE
        if client is not None:
            if not out and span == 0 and pos == n:
                Endpoint._send(client, buf)  # the common case: the whole read, uncopied
            else:
                out = _add_span(out, p, span, pos)
                Endpoint._send(client, b"".join(out))
        if pos < n:
            self.buf = bytearray(buf[pos:])  # an incomplete message, for the next read
        if pending.empty():
            if self.on_ready is not None:
                if client is not None and client.gives_back:  # the usual, called in C: after every statement
                    ClientCore._server_ready(client, self)
                else:
                    self.on_ready(self)
            if client is not None and client.terminating:  # all it asked before its Terminate is answered
                client.close()


cdef class PoolCore:
    """The data path's half of a pool (Pool adds opening connections, timeouts, pause and drain)."""

    @property
    def waiting(self):
        """The clients queued for a connection, longest waiting first."""
        return self._waiting

    @waiting.setter
    def waiting(self, waiting):
        self._waiting = waiting
        self._enqueue, self._dequeue = waiting.append, waiting.popleft

    cpdef acquire(self, ClientCore client):
        """Link an idle connection to the client now, or queue the client until one is free."""
        cdef double now = _now()
        cdef ServerCore server
        while self.idle:
            server = self.idle.pop()  # the most recently used: warm caches, and the rest can time out
            if server.closed:
                continue
            # Died while idle: the client will not get it, whose read could move on. Checked past a few
            # milliseconds of idleness only, so that a busy pool pays no system call per transaction (a death
            # within them is one the event loop would normally have delivered already).
            if now - server.last_used > HUNG_UP_CHECK_AFTER and _hung_up(server):
                self.discard(server)
                continue
            self._hand_over(client, server, now)
            return
        client.wait_started = now
        self._enqueue(client)
        if len(self.servers) + self.opening < self.size:  # (a full pool: the usual case under load)
            self._grow()

    cpdef release(self, ServerCore server):
        """A connection is free: to the longest-waiting client, else back to the idle list."""
        cdef double now = _now()
        cdef ClientCore client
        PoolCore.unlink(self, server, now)
        server.last_used = now
        if server.closed:
            return
        if server.status != _IDLE or not server.pending.empty():  # never hand out a transaction or a batch begun
            _pool_log.warning("server connection to %s given back %s: closed", self.node_label,
                              "inside a transaction" if server.status != _IDLE else "with answers pending")
            self.discard(server)
            return
        if self.paused:  # PAUSE: connections close as their transactions end
            self.discard(server)
            return
        waiting = self._waiting
        if now - server.created > self.server_lifetime and not waiting:
            self.discard(server)
            return
        while waiting:
            client = self._dequeue()
            if not client.closed:
                self._hand_over(client, server, now)
                return
        self.idle.append(server)

    cpdef unlink(self, ServerCore server, double now=0.0):
        """The client's transaction (or session) on this connection is over."""
        cdef ClientCore client = server.client
        cdef double seconds
        if client is not None:
            seconds = (now or _now()) - server.linked_at
            self.stats.transaction(seconds, client.kind, server.commands)
            server.commands = 0
            self.load.outstanding -= 1
            # Per transaction (per session in session pooling): the time from hand-out to give-back, so one
            # comparison per transaction, never per statement.
            if self.slow_queries and seconds > self.slow_queries:
                shard = self.node.shard
                _pool_log.warning("client %d: slow transaction, %.3fs on shard %s node %s", client.id, seconds,
                                  shard, self.node_label, extra={"event": "slow", "client": client.id,
                                  "shard": shard, "node": self.node_label, "seconds": round(seconds, 3)})
        server.client = None
        server.peer = None
        server.on_ready = None
        if server.reading_paused and server._transport is not None:  # the client's back-pressure ends with it
            server.reading_paused = False
            server._transport.resume_reading()

    cdef _hand_over(self, ClientCore client, ServerCore server, double now):
        """Link them, counting the hand-out and how long the client waited for it."""
        self.stats.assigned(now - client.wait_started if client.wait_started else 0.0)
        server.linked_at = now
        self.load.outstanding += 1
        ClientCore.link(client, server)

    # -- hooks (pool.py) ------------------------------------------------------------------------------------
    cpdef discard(self, ServerCore server):
        """Close a connection that cannot be reused."""
        server.close()

    cpdef _grow(self):
        """Open connections while clients wait and the pool has room."""


cdef bint _hung_up(ServerCore server) except -1:
    """Whether an idle connection's socket has something to read. An idle server sends nothing, so that is
    its end (EOF, a reset, a FATAL before closing) which the event loop has not delivered yet: a server
    that was killed while the proxy was busy. One zero-timeout poll() (poll, not select: descriptors go past
    select's 1024 with many clients)."""
    poller = server.poller
    if poller is None:
        sock = server.transport.get_extra_info("socket") if server.transport is not None else None
        if sock is None or sock.fileno() < 0:
            return False
        poller = server.poller = select.poll()  # registered once: a hand-out costs one poll() call
        poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))  # POLLIN, or POLLHUP/POLLERR which poll reports regardless
