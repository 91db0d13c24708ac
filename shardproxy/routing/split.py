"""The text of a multi-row INSERT cut down to some of its rows, for the shards its rows belong to.

PostgreSQL's own scanner (through pglast) finds the rows: the parenthesised groups after the VALUES that holds them
(the statement's own, or the one in ``SELECT ... FROM (VALUES ...)``), so a row's text is sliced exactly as
written, comments, strings and all, and the rest of the statement (the column list, ON CONFLICT, RETURNING) is
kept around the rows a shard gets. Parameters are renumbered in order, since a shard's statement has only those
its rows (and the rest of the statement) use.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, NamedTuple

from pglast import parser as pg_parser

_OPEN, _CLOSE, _COMMA = "ASCII_40", "ASCII_41", "ASCII_44"


class Unsplittable(Exception):
    """The rows of the statement cannot be found in its text (a form the router keys but this does not cut)."""


class Part(NamedTuple):
    """A statement with some of the rows: its text, and for each of its parameters, the original's number."""

    sql: str
    params: tuple[int, ...]


class _Layout(NamedTuple):
    rows: list[tuple[int, int]]  # each row's text: start, end (exclusive)
    params: list[tuple[int, int, int]]  # each $n: start, end (exclusive), n


def parts(sql: str, subsets: list[list[int]], rows: int) -> list[Part]:
    """For each subset of row indexes (in the statement's order), the statement with those rows only. rows: how
    many the statement has. Raises Unsplittable."""
    layout = _layout(sql, rows)
    return [_part(sql, layout, subset) for subset in subsets]


def _layout(sql: str, expected: int) -> _Layout:
    try:
        tokens = pg_parser.scan(sql)
    except pg_parser.ParseError:
        raise Unsplittable from None
    start = _rows_start(tokens)
    rows: list[tuple[int, int]] = []
    depth = 0
    opened = 0
    for token in tokens[start:] if start is not None else ():
        if token.name == _OPEN:
            if depth == 0:
                opened = token.start
            depth += 1
        elif token.name == _CLOSE:
            depth -= 1
            if depth == 0:
                rows.append((opened, token.end + 1))
            elif depth < 0:
                break
        elif depth == 0 and token.name != _COMMA:
            break
    if len(rows) != expected:
        raise Unsplittable
    params = [(t.start, t.end + 1, int(sql[t.start + 1 : t.end + 1])) for t in tokens if t.name == "PARAM"]
    return _Layout(rows, params)


def _rows_start(tokens: list[Any]) -> int | None:
    """The index of the token after the VALUES whose groups are the rows: the first at the statement's own
    level, else the first right after ``FROM (``."""
    depth = 0
    for i, token in enumerate(tokens):
        if token.name == "VALUES" and (depth == 0 or (depth == 1 and i >= 2 and tokens[i - 1].name == _OPEN
                                                       and tokens[i - 2].name == "FROM")):
            return i + 1
        depth += token.name == _OPEN
        depth -= token.name == _CLOSE
    return None


def _part(sql: str, layout: _Layout, subset: list[int]) -> Part:
    rows, params = layout.rows, layout.params
    spans = [(0, rows[0][0])] + [rows[i] for i in subset] + [(rows[-1][1], len(sql))]
    inside = [params[bisect_left(params, (a,)) : bisect_left(params, (b,))] for a, b in spans]
    kept = sorted({n for found in inside for _, _, n in found})
    number = {n: i + 1 for i, n in enumerate(kept)}
    pieces: list[str] = []
    for index, ((a, b), found) in enumerate(zip(spans, inside)):
        if 1 < index < len(spans) - 1:
            pieces.append(", ")
        pos = a
        for start, end, n in found:
            pieces += [sql[pos:start], f"${number[n]}"]
            pos = end
        pieces.append(sql[pos:b])
    return Part("".join(pieces), tuple(kept))
