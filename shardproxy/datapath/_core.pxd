# The compiled data path's contract: the fields the loops read and write, and every call they make. Methods
# marked "hook" have a default body here and are filled in by the Python classes that extend these types
# (session.py, client.py, server.py, pool.py, fanout/legs.py), as asyncpg's protocol core declares the callbacks
# its Python protocol implements; the routing calls, made for every statement, go through a table looked up once
# per class (Routing, filled in by placement.py). Nothing else is called on these objects by the compiled code.

cimport cython

from shardproxy.counters cimport Load, PoolStats


@cython.final
cdef class Requests:
    cdef list _items
    cdef Py_ssize_t _head, _tail
    cdef public long long popped  # how many were taken off the front: the oldest request's number

    cdef int push(self, request) except -1
    cdef object first(self)
    cdef bint empty(self) noexcept
    cpdef popleft(self)
    cdef Py_ssize_t drop_syncs_after_first(self) except -1
    cdef long long next_number(self) noexcept
    cdef bint proxy_only(self) except -1
    cdef bint awaits_sync(self) except -1


cdef class ProxyCore:
    cdef public bint sharded  # statements are routed one by one (several shards, or replicas to read from)
    cdef public bint shutting_down
    cdef public object statements  # the statements Registry (statements.py), shared by every connection
    cdef public int prepared_per_server  # pool.prepared_statements_per_server, as the last (re)load said
    cdef public bytes statement_mark  # the random part of the statements' server-side names (statements.py)
    cdef public object two_phase_key  # signs two-phase commits' names (fanout/twophase.py)
    cdef public long long transactions  # given back by a client after running on one server connection


cdef class Endpoint:
    cdef object _transport, _write  # the transport, and its write method looked up once
    cdef int _fd  # a plain socket's descriptor, to send on without the transport; -1: none
    cdef bint _queued  # the transport may still hold bytes to send: later ones go after them, through it
    cdef public bytearray buf
    cdef public bint closed
    cdef public bint reading_paused  # by the peer's back-pressure (see connection.py)
    cdef public object peer

    cdef _send(self, object data)
    cpdef close(self)


# The routing calls, made only when a client `routes`: the functions of its class (Placement's, placement.py) of
# these names with a leading underscore (`_batch_route`, ...; `transaction_ended` is `_routed_transaction_ended`),
# looked up once per class and called with the client first.
@cython.final
cdef class Routing:
    cdef readonly object batch_route  # (buf, start) -> (decision, batch end, deciding message, standalone) | None
    cdef readonly object answer_locally  # (decision, end) -> whether the proxy answered the batch itself
    cdef readonly object start  # (decision, batch end): open the transaction where the decision says
    # (buf, pos) -> (next batch, deciding message, message to refuse, may run here), at a batch on a linked server
    cdef readonly object route_batch_here
    cdef readonly object batch_member  # (buf, pos, end) -> "" if a Bind of the batch runs here, None, or a refusal
    cdef readonly object refuse  # (message, buf, pos, end, out): the linked server raises it in the message's place
    cdef readonly object stopped  # (server, out): forwarding stopped at a statement for another connection
    cdef readonly object drained  # (server): stopped, and the server answered all it was sent
    cdef readonly object linked_on_shard  # (server, out): a routed transaction got its server connection;
                                          # what it must run first goes to out
    cdef readonly object follow_commit  # (server): learn where the commit ends in the WAL (read-your-writes)
    cdef readonly object transaction_ended  # (): a routed transaction gave its server connection back


cdef class ClientCore(Endpoint):
    cdef public ProxyCore core  # the proxy-wide state it reads
    cdef readonly Routing routing  # None if its class does not route
    cdef public long long id  # as SHOW CLIENTS and the log name it; a fanout leg carries its client's
    cdef public object user, database
    cdef public dict params, param_sql
    cdef public dict statements  # the client's statement names
    cdef public object unnamed  # the unnamed statement, for the Binds that follow its Parse (routed clients)
    cdef public object decided  # the routing of the batch being linked (placement.py), or None
    cdef public object kind  # what its transactions count as in queries_total; None: by the node's role
    cdef public object reason  # why the connection ended, for the log; "" until the proxy ends it
    # What the linked server calls once every request is answered: _server_ready in transaction pooling, bound
    # once (unset when the connection is lost), else None; a fanout leg's own.
    cdef public object on_server_ready
    cdef public PoolCore pool
    cdef public ServerCore server
    cdef public bint routes, mid_batch, stopped, busy, transaction_pooling, wrote
    cdef public bint gives_back  # on_server_ready is its _server_ready (not a fanout leg's, nor None)
    cdef public bint terminating  # sent Terminate: it closes once the server has answered what came before
    cdef public object copy_feed  # during a COPY FROM STDIN across shards: takes what the client sends (fanout/copy.py)
    cdef public double wait_started  # when it queued for a server connection; 0 when not waiting
    cdef public Py_ssize_t max_message_size
    # The routing state the loops read (placement.py keeps it).
    cdef public list replay  # an explicit transaction's BEGIN, SETs and savepoints, for each shard it joins
    cdef public bint tx_failed  # an error inside a transaction that holds no server yet: only its end ends it
    cdef public bint spanning  # the batch's implicit transaction spans shards: its Sync is the proxy's to answer
    cdef public object _refusal  # the message of the statement to refuse, or "" to answer it with _local_reply
    cdef public object _local_reply
    # The batch that may run again should the server find its first statement's plan out of date (session.py):
    # the read it came in, where it starts, and the number its first request has in the server's queue.
    cdef public object retry_buf
    cdef public Py_ssize_t retry_pos
    cdef public long long retry_request

    cpdef on_data(self, data)
    cpdef _dispatch(self)
    cpdef _acquire(self, PoolCore pool)
    cpdef link(self, ServerCore server)
    cpdef _server_ready(self, ServerCore server)
    cpdef _give_back(self, ServerCore server)
    cdef bint _bind(self, buf, Py_ssize_t pos, Py_ssize_t portal_end, Py_ssize_t end, list out) except -1
    cdef _note_retry(self, buf, Py_ssize_t pos, long long request)
    cpdef _ensure_prepared(self, statement, list out)
    cpdef _forward(self, buf, list ahead=*)

    # hooks: the connection
    cpdef _fatal(self, error)
    cpdef PoolCore _unrouted_pool(self)
    cpdef bint _answer_without_server(self) except -1
    cpdef parameter_changed(self, name, value)
    # hooks: the session's statement books (session.py)
    cpdef _parse(self, buf, Py_ssize_t pos, Py_ssize_t end, list out)
    cpdef _statement_message(self, int t, bytes name, list out)
    cpdef _session_statement(self, bytes message, list out)
    cpdef _names_proxy_statements(self, buf, Py_ssize_t pos, Py_ssize_t end, list out)
    cpdef _track_set(self, sql, server)
    cpdef bint _statement_failed(self, ServerCore server, body) except -1
    cpdef _statements_dropped(self, bint discard)


cdef class ServerCore(Endpoint):
    cdef public object pool, on_ready, settings_before, prepared, poller
    cdef public object newest  # the statement name last put at the end of `prepared` (the LRU's), if still in it
    cdef public dict params, reported, param_sql
    cdef public Requests pending  # requests forwarded and not yet answered (see server.py)
    cdef public ClientCore client
    cdef public bytes error_as  # the ErrorResponse that replaces the next one (a statement the proxy cancelled)
    cdef public bint ignoring, settings_undone
    # In COPY FROM STDIN, as far as the client's messages forwarded so far go: the server ignores Sync and Flush.
    cdef public bint copy_in
    cdef public int status, cancels
    cdef public int commands  # statements answered (CommandComplete or ErrorResponse) since linked, for metrics
    cdef public double last_used, linked_at, created

    cpdef bint reuse_prepared(self, name) except -1
    cpdef remember_prepared(self, bytes name, int limit, list out)
    cpdef enqueue_synthetic(self, request)
    cpdef _synthesize(self, list out)
    cpdef _skip_to_sync(self)
    cpdef _record_parameter(self, body)
    cdef _copy_in_began(self, ClientCore client, long kind)
    cdef _statements_dropped(self, ClientCore client, bint discard)

    # hooks (server.py)
    cpdef bint _unsolicited(self, int t, buf, Py_ssize_t pos, Py_ssize_t end) except -1
    cpdef _request_failed(self, body)


cdef class PoolCore:
    cdef public object node, node_label, servers
    cdef object _waiting, _enqueue, _dequeue  # the deque of clients queued, and its methods looked up once
    cdef public list idle  # most recently used last
    cdef public int size  # pool settings, as the last (re)load said (see Pool.configure)
    cdef public double server_lifetime, slow_queries
    cdef public PoolStats stats
    cdef public Load load  # its node's
    cdef public bint paused, draining
    cdef public int opening

    cpdef acquire(self, ClientCore client)
    cpdef release(self, ServerCore server)
    cpdef unlink(self, ServerCore server, double now=*)
    cdef _hand_over(self, ClientCore client, ServerCore server, double now)

    # hooks (pool.py)
    cpdef discard(self, ServerCore server)
    cpdef _grow(self)
