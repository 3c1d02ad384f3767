"""shared.pagination: page sizes per AIP-158 and opaque keyset page tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import pagination
from shared.errors import InvalidArgument


@given(st.lists(st.one_of(st.integers(), st.text(max_size=20)), min_size=1, max_size=3))
def test_page_tokens_round_trip(key: list[object]) -> None:
    shape = tuple(type(v) for v in key)
    assert pagination.decode_page_token(pagination.encode_page_token(key), shape) == key


@pytest.mark.parametrize("token", ["!!!", "bm90IGpzb24", "WyJ4Il0", "e30"])
def test_foreign_page_tokens_are_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        pagination.decode_page_token(token, (int,))
    assert caught.value.violations[0].field == "page_token"


def test_page_size_defaults_and_caps() -> None:
    assert pagination.page_size(0) == 50
    assert pagination.page_size(5000) == 1000
    assert pagination.page_size(5000, maximum=500) == 500
    with pytest.raises(InvalidArgument):
        pagination.page_size(-1)
