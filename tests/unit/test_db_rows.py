"""shared.db.from_row: a record from a row by field name, with the conversions given."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shared.db import from_row


@dataclass(frozen=True)
class Record:
    id: str
    note: str
    parent: str | None
    size: int
    kind: str = "plain"


def test_columns_fill_fields_by_name_and_null_text_reads_empty() -> None:
    row = {"id": "r1", "note": None, "parent": None, "size": 3, "kind": "big", "extra": 1}
    assert from_row(Record, row) == Record("r1", "", None, 3, "big")


def test_computed_values_win_and_unselected_defaults_stay() -> None:
    row = {"id": "r1", "note": "n", "parent": "p", "size": "3"}
    assert from_row(Record, row, size=int(row["size"])) == Record("r1", "n", "p", 3)


def test_a_missing_column_without_a_default_is_an_error() -> None:
    with pytest.raises(TypeError, match="size"):
        from_row(Record, {"id": "r1", "note": "n", "parent": None})
