# cython: language_level=3, boundscheck=False, wraparound=False
"""The per-message loops of the data path, compiled: what a client sends (`forward_requests`, the body of
ClientConnection._forward) and what a server answers (`forward_responses`, ServerConnection.on_data).

Every request forwarded to a server is recorded in the server connection's `pending` queue as a
(kind, action, arg) tuple, and every response that completes a request pops it (see server.py). The loops
read message headers straight from the receive buffer and forward the bytes they arrived in; anything
unusual (named statements, session statements, routing, errors) is handed to the connection's Python methods.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact
from libc.string cimport memchr

from time import monotonic

from shardproxy import protocol as pg
from shardproxy.params import REPORTED
from shardproxy.statements import parameter_types

# Request kinds, and what to do with their responses.
cdef enum:
    K_PARSE, K_BIND, K_DESCRIBE, K_EXECUTE, K_CLOSE, K_SYNC, K_QUERY, K_FUNCTION
cdef enum:
    A_FORWARD, A_HIDE, A_SYNTH

PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, QUERY, FUNCTION = range(8)
FORWARD, HIDE, SYNTH = range(3)

# The common requests, prebuilt so that recording one costs no allocation.
PARSE_REQ = (PARSE, FORWARD, None)
BIND_REQ = (BIND, FORWARD, None)
DESCRIBE_REQ = (DESCRIBE, FORWARD, None)
EXECUTE_REQ = (EXECUTE, FORWARD, None)
CLOSE_REQ = (CLOSE, FORWARD, None)
SYNC_REQ = (SYNC, FORWARD, None)
QUERY_REQ = (QUERY, FORWARD, None)
FUNCTION_REQ = (FUNCTION, FORWARD, None)
HIDDEN_QUERY = (QUERY, HIDE, None)
HIDDEN_CLOSE = (CLOSE, HIDE, None)

cdef object _INVALID_LENGTH = "invalid message length"


cdef inline const unsigned char* _chars(object buf):
    if PyBytes_CheckExact(buf):
        return <const unsigned char*>PyBytes_AS_STRING(buf)
    return <const unsigned char*>PyByteArray_AS_STRING(buf)


cdef inline Py_ssize_t _length(const unsigned char* p):
    """A message's length field (big-endian, counting itself)."""
    return (<Py_ssize_t>p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]


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


def is_session_statement(buf, Py_ssize_t start, Py_ssize_t end) -> bool:
    """_session_prefix for Python callers: the statement text at buf[start:end] (a bytes or bytearray)."""
    return _session_prefix(_chars(buf) + start, end - start)


cdef inline long _action(object pending):
    return (<tuple>pending[0])[1]


def forward_requests(client, buf):
    """Frame what the client sent, record each request in the linked server's `pending` queue, and write it
    on unchanged, but for named statements, session statements and routing decisions (the client's methods)."""
    if not (PyBytes_CheckExact(buf) or PyByteArray_CheckExact(buf)):
        buf = bytes(buf)
    cdef const unsigned char* p = _chars(buf)
    cdef Py_ssize_t n = len(buf), pos = 0, span = 0, end, length, check, refuse = -1, decider = -1, name_end, portal_end
    cdef Py_ssize_t max_size = client.max_message_size
    cdef unsigned char t
    cdef bint routes = client.routes, executing = client.mid_batch, go
    server = client.server
    pending = server.pending
    append = pending.append
    out = []
    check = 0 if routes and not executing else -1  # where the next batch starts
    while n - pos >= 5:
        t = p[pos]
        length = _length(p + pos + 1)
        end = pos + 1 + length
        if length < 4 or length > max_size:
            client._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, _INVALID_LENGTH))
            return
        if end > n:
            break
        if server.ignoring and t != c'S' and t != c'X':  # after an error the server skips all up to Sync
            out.append(buf[span:pos])
            span = pos = end
            continue
        if pos == check:
            check, decider, refuse, go = client._route_batch_here(buf, pos)
            if not go:
                client.stopped = True
                client._stopped(server, out)
                break
        if (t == c'B' or t == c'P' or t == c'D' or t == c'C') and length < 6 or (t == c'B' or t == c'P') and \
                memchr(p + pos + 5, 0, length - 4) == NULL:  # a name or statement without its end
            client._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, "invalid message format"))
            return
        if pos == refuse:
            out.append(buf[span:pos])
            span = end
            if client._refusal:
                client._refuse(client._refusal, buf, pos, end, out)
            else:  # SET/RESET shardproxy.shard_key: the proxy's own setting, never sent
                server.enqueue_synthetic(client._local_reply)
        elif t == c'B' and routes and pos != decider and (refusal := client._batch_member(buf, pos, end)):
            out.append(buf[span:pos])
            span = end
            client._refuse(refusal, buf, pos, end, out)
        elif t == c'B':
            portal_end = <const unsigned char*>memchr(p + pos + 5, 0, length - 4) - p
            if portal_end + 1 < end and p[portal_end + 1]:  # a named statement: use its server-side name
                out.append(buf[span:pos])
                span = end
                client._bind(buf, pos, portal_end, end, out)
            append(BIND_REQ)
        elif t == c'E':
            append(EXECUTE_REQ)
        elif t == c'S':
            append(SYNC_REQ)
            if routes:
                check = end  # the next batch, if in this read, is routed too
        elif t == c'Q':
            if _session_prefix(p + pos + 5, length - 4):
                out.append(buf[span:pos])
                span = end
                client._session_statement(bytes(buf[pos:end]), out)
            else:
                append(QUERY_REQ)
        elif t == c'P':
            name_end = <const unsigned char*>memchr(p + pos + 5, 0, length - 4) - p
            if _session_prefix(p + name_end + 1, end - name_end - 1):  # a SET, extended
                client._track_set(pg.read_cstring(buf, name_end + 1)[0].decode(errors="replace"), server)
            if p[pos + 5]:
                out.append(buf[span:pos])
                span = end
                client._parse(buf, pos, end, out)
            else:
                append(PARSE_REQ)
                if routes:  # for the Binds that follow it in this batch
                    client.unnamed = client.proxy.statements.get(bytes(buf[pos + 6:end]))
        elif t == c'D' or t == c'C':
            if p[pos + 5] == c'S' and p[pos + 6]:
                out.append(buf[span:pos])
                span = end
                client._statement_message(t, bytes(buf[pos + 6:end - 1]), out)
            elif t == c'D' and p[pos + 5] == c'S' and routes:  # the unnamed statement: learn its types
                append((DESCRIBE, FORWARD, client.unnamed))
            else:
                append(DESCRIBE_REQ if t == c'D' else CLOSE_REQ)
        elif t == c'F':
            append(FUNCTION_REQ)
        elif t == c'X':
            out.append(buf[span:pos])
            server.write(b"".join(out))
            client.reason = "client sent Terminate"
            client.close()
            return
        elif t not in b"dHcf":
            client._fatal(pg.PostgresError(pg.PROTOCOL_VIOLATION, f"invalid frontend message type {t}"))
            return
        pos = end
        if t == c'E':
            executing = True
        elif t == c'S' or t == c'Q' or t == c'F':
            executing = False
    # After an Execute, the connection is kept until Sync ends the implicit transaction it opened.
    client.mid_batch = executing
    if not out and span == 0 and pos == n:
        server.transport.write(buf)
    else:
        out.append(buf[span:pos])
        server.transport.write(b"".join(out))
    server.last_used = monotonic()  # query_timeout counts the server's silence from here
    if pos < n:
        client.buf = bytearray(buf[pos:])
        if not pending and server.status == pg.IDLE:
            client._server_ready(server)  # stopped with nothing in flight: move on now
    elif not pending and server.on_ready is not None and client.server is server:
        server.on_ready(server)  # all answered by the proxy itself (DEALLOCATE ALL): no server reply will come


def forward_responses(server, data):
    """Frame what the server sent, pop the requests it completes, hide the answers to requests the proxy
    injected, put the proxy's own answers in their place, and write the rest on to the linked client."""
    buf = server.take_input(data) if server.buf else data
    cdef const unsigned char* p = _chars(buf)
    cdef Py_ssize_t n = len(buf), pos = 0, span = 0, end
    cdef unsigned char t
    cdef long kind, action
    cdef bint done, hiding
    cdef tuple request
    server.last_used = monotonic()
    client = server.client
    pending = server.pending
    out = []
    hiding = bool(pending) and _action(pending) == A_HIDE
    while n - pos >= 5:
        t = p[pos]
        end = pos + 1 + _length(p + pos + 1)
        if end > n:
            break
        if t == c'D':  # DataRow: the bulk of the traffic, never completes a request
            if not hiding:
                pos = end
                continue
            if pending and (<tuple>pending[0])[2] is not None:  # a hidden query whose answer the proxy reads
                (<tuple>pending[0])[2](server, t, buf[pos + 5:end])
        if not pending:
            if not server._unsolicited(t, buf, pos, end):
                out.append(buf[span:pos])
                span = end
            pos = end
            continue
        request = pending[0]
        kind = request[0]
        action = request[1]
        arg = request[2]
        done = False
        if t == c'Z':
            server.status = p[pos + 5]
            done = True
            server.ignoring = False
            if server.settings_before is not None and p[pos + 5] == c'I' and action != A_HIDE:
                if server.settings_undone and client is not None:  # rolled back: so are the client's SETs
                    client.param_sql, server.param_sql = server.settings_before
                server.settings_before = None
            server.settings_undone = False
        elif t == c'C' or t == c'I' or t == c's':
            done = kind == K_EXECUTE
            if arg is not None and kind == K_QUERY and t == c'C':
                arg(server, t, bytes(buf[pos + 5:end - 1]))
            if t == c'C' and server.settings_before is not None and buf[pos + 5:end - 1] == b"ROLLBACK":
                server.settings_undone = True
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
            name, value = server._record_parameter(buf[pos + 5:end])
            if client is not None and name in REPORTED:  # hidden SETs too: the server's spelling is kept
                client.params[name] = value
        elif t == c't' and arg is not None:  # a named statement's parameter types, for routing by key
            arg.param_types = parameter_types(buf[pos + 5:end])
        elif t == c'E' and kind != K_SYNC and kind != K_QUERY and kind != K_FUNCTION:
            server._skip_to_sync()
            server.ignoring = not pending  # no Sync sent yet (after a Flush): the server waits for the client's
            if hiding and kind == K_PARSE:  # the client must learn that its statement does not exist
                hiding = False
        if t == c'E':
            server.settings_undone = True
        if hiding:
            out.append(buf[span:pos])
            span = end
        pos = end
        if done:
            pending.popleft()
        if (done or t == c'E') and pending:
            if _action(pending) == A_SYNTH:
                out.append(buf[span:pos])
                span = pos
                server._synthesize(out)
            hiding = bool(pending) and _action(pending) == A_HIDE
    if client is not None:
        if not out and span == 0 and pos == n:
            client.transport.write(buf)  # the common case: the whole read, uncopied
        else:
            out.append(buf[span:pos])
            client.transport.write(b"".join(out))
    if pos < n:
        server.buf = bytearray(buf[pos:])  # an incomplete message, for the next read
    if not pending and server.on_ready is not None:
        server.on_ready(server)
