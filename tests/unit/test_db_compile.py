"""shared.db compiles each Core statement shape once and reuses it with new values."""

from __future__ import annotations

import sqlalchemy as sa

from shared import db
from shared.db import compile_query

t = sa.Table(
    "things",
    sa.MetaData(schema="s"),
    sa.Column("id", sa.Text),
    sa.Column("n", sa.Integer),
    sa.Column("tags", sa.JSON),
)


def test_same_shape_reuses_sql_with_each_statements_values() -> None:
    first_sql, first = compile_query(sa.select(t).where(t.c.id == "a", t.c.n > 1))
    second_sql, second = compile_query(sa.select(t).where(t.c.id == "b", t.c.n > 7))
    assert first_sql == second_sql
    assert first == ["a", 1] and second == ["b", 7]


def test_insert_and_update_values_follow_placeholders() -> None:
    sql, args = compile_query(sa.insert(t).values(id="x", n=3, tags={"k": 1}))
    assert sql.count("$") == 3 and args == ["x", 3, {"k": 1}]
    sql, args = compile_query(sa.update(t).where(t.c.id == "y").values(n=9))
    assert args == [9, "y"]


def test_in_lists_of_different_lengths_get_their_own_sql() -> None:
    sql2, args2 = compile_query(sa.select(t).where(t.c.id.in_(["a", "b"])))
    sql3, args3 = compile_query(sa.select(t).where(t.c.id.in_(["a", "b", "c"])))
    assert args2 == ["a", "b"] and args3 == ["a", "b", "c"]
    assert sql2 != sql3 and "$3" in sql3


def test_cache_holds_one_entry_per_shape() -> None:
    db._compiled.clear()
    for i in range(50):
        compile_query(sa.select(t.c.id).where(t.c.n == i))
    assert len(db._compiled) == 1
