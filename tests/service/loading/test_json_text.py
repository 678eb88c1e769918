"""The one JSON parser for untrusted text: size and nesting bounded, every failure INVALID_ARGUMENT."""

from __future__ import annotations

import pytest

from curvscope_service.errors import InvalidInput
from curvscope_service.loading.json_text import MAX_DEPTH, parse_json


@pytest.mark.parametrize("opener, closer", [("[", "]"), ('{"a":', "}")])
def test_nesting_up_to_the_cap_parses_and_one_level_more_is_refused(opener, closer):
    assert parse_json(opener * MAX_DEPTH + "1" + closer * MAX_DEPTH, what="x", max_bytes=1 << 20) is not None
    with pytest.raises(InvalidInput, match="deeper than 64"):
        parse_json(opener * (MAX_DEPTH + 1) + "1" + closer * (MAX_DEPTH + 1), what="x", max_bytes=1 << 20)


def test_nesting_past_the_interpreters_recursion_limit_is_refused_not_raised():
    with pytest.raises(InvalidInput, match="the header nests JSON deeper"):
        parse_json("[" * 200_000 + "]" * 200_000, what="the header", max_bytes=1 << 20)


def test_wide_documents_are_not_deep():
    document = "[" + ",".join(["[1, [2]]"] * 10_000) + "]"
    assert len(parse_json(document, what="x", max_bytes=1 << 20)) == 10_000


@pytest.mark.parametrize(
    "text, fragment",
    [(b"x" * 101, "101 bytes of JSON; the limit is 100"), (b"{", "not valid JSON"), (b"\xff\xfe", "not valid JSON")],
)
def test_bad_text_is_invalid_input(text, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        parse_json(text, what="x", max_bytes=100)
