"""Cutting a multi-row INSERT's text down to some of its rows (routing/split.py), as each shard gets it."""

from __future__ import annotations

import pytest

from shardproxy.routing.split import Part, Unsplittable, parts


def test_rows_are_sliced_as_written_and_the_rest_kept():
    sql = ("INSERT INTO t (a, b) VALUES (1, 'x, )'), (2, $$ ( $$ /* ), ( */), (3, (4 + 5)) "
           "ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b RETURNING *;")
    first, second = parts(sql, [[0, 2], [1]], 3)
    assert first == Part("INSERT INTO t (a, b) VALUES (1, 'x, )'), (3, (4 + 5)) "
                         "ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b RETURNING *;", ())
    assert second.sql == ("INSERT INTO t (a, b) VALUES (2, $$ ( $$ /* ), ( */) "
                          "ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b RETURNING *;")


def test_parameters_are_renumbered_in_order():
    sql = "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $2), ($4, $5) ON CONFLICT (a) DO UPDATE SET b = $6"
    assert parts(sql, [[1], [0, 2]], 3) == [
        Part("INSERT INTO t (a, b) VALUES ($2, $1) ON CONFLICT (a) DO UPDATE SET b = $3", (2, 3, 6)),
        Part("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) ON CONFLICT (a) DO UPDATE SET b = $5", (1, 2, 4, 5, 6)),
    ]


def test_the_values_of_insert_select_from_values():
    """SQLAlchemy's bulk INSERT: the rows are the VALUES in FROM, not the SELECT's columns."""
    sql = ("INSERT INTO users (name, user_id) SELECT p0::VARCHAR, p1::BIGINT FROM (VALUES ($1::VARCHAR, "
           "$2::BIGINT, 0), ($3::VARCHAR, $4::BIGINT, 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter "
           "RETURNING users.id, users.id AS id__1")
    (part,) = parts(sql, [[1]], 2)
    assert part.sql == ("INSERT INTO users (name, user_id) SELECT p0::VARCHAR, p1::BIGINT FROM (VALUES ($1::VARCHAR, "
                        "$2::BIGINT, 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter "
                        "RETURNING users.id, users.id AS id__1")
    assert part.params == (3, 4)


def test_text_in_other_scripts_keeps_its_characters():
    sql = "INSERT INTO t (k, v) VALUES (1, 'é€𝄞'), (2, 'ü')"
    assert [p.sql for p in parts(sql, [[1], [0]], 2)] == ["INSERT INTO t (k, v) VALUES (2, 'ü')",
                                                          "INSERT INTO t (k, v) VALUES (1, 'é€𝄞')"]


@pytest.mark.parametrize("sql", ["INSERT INTO t (k) VALUES (1), (2), (3)", "INSERT INTO t (k) SELECT 1",
                                 "INSERT INTO t (k) VALUES (1, 'unterminated)"])
def test_rows_not_found_as_the_router_counted_them(sql):
    with pytest.raises(Unsplittable):
        parts(sql, [[0], [1]], 2)
