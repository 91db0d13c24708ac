"""The requests in flight on a server connection, and what to do with their answers.

While a client is linked, every request forwarded to the server is recorded in the connection's `pending` queue,
and every response that completes a request pops it. That queue lets the proxy hide the answers to requests it
injected (a Parse for a statement the server lacks, a SET that brings the session in line with the client's),
answer requests it handled itself in their proper place (SYNTH), and know when the server is free again: nothing
pending and ReadyForQuery said idle. A request that changed the proxy's books on statements (a client's name given
or closed, a statement closed here to make room) carries the call that takes the change back, made if the server
skips the request after an error (up to the next Sync). A Sync that the server ignores, because it came during a
COPY FROM STDIN, is no request: no answer comes.

The compiled loops (_core.pyx) read these tuples by position; Kind and Action there are C enums of the same values.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple


class Kind(IntEnum):
    """The client message a request stands for, which decides the response that completes it."""

    PARSE = 0
    BIND = 1
    DESCRIBE = 2
    EXECUTE = 3
    CLOSE = 4
    SYNC = 5
    QUERY = 6
    FUNCTION = 7


class Action(IntEnum):
    """What to do with the answer."""

    FORWARD = 0  # to the client
    HIDE = 1  # the proxy's own request: the client never sees its answer
    SYNTH = 2  # answered by the proxy itself (arg: the reply), in its place in the stream


class Request(NamedTuple):
    kind: Kind
    action: Action
    arg: Any = None  # a Statement (Parse, Bind, Describe), the reply (SYNTH), or a call that reads the answer (HIDE)
    undo: tuple[Any, ...] | None = None  # (call, *args) that takes back a change to the books, should it be skipped


# The common requests, prebuilt so that recording one costs no allocation.
PARSE_REQ = Request(Kind.PARSE, Action.FORWARD)
BIND_REQ = Request(Kind.BIND, Action.FORWARD)
DESCRIBE_REQ = Request(Kind.DESCRIBE, Action.FORWARD)
EXECUTE_REQ = Request(Kind.EXECUTE, Action.FORWARD)
CLOSE_REQ = Request(Kind.CLOSE, Action.FORWARD)
SYNC_REQ = Request(Kind.SYNC, Action.FORWARD)
QUERY_REQ = Request(Kind.QUERY, Action.FORWARD)
FUNCTION_REQ = Request(Kind.FUNCTION, Action.FORWARD)
HIDDEN_QUERY = Request(Kind.QUERY, Action.HIDE)
